"""Logging: one line per event, text or JSON, and py-libp2p's loggers tamed.

Importing libp2p sets its logger not to propagate, and its DHT warns on every
ordinary request; we set those loggers explicitly so ``--log-level`` means
the same thing for our code and theirs.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    converter = time.gmtime

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text.replace("\n", "\n    ")  # keep one event per visual block


def setup(level: str = "info", fmt: str = "text", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    numeric = getattr(logging, level.upper(), logging.INFO)
    root.setLevel(numeric)
    # Third-party libraries: quieter than ours unless we are debugging.
    third = logging.DEBUG if numeric <= logging.DEBUG else logging.WARNING
    for name in ("libp2p", "hypercorn", "hypercorn.error", "httpx", "httpcore", "zeroconf", "quart", "multiaddr"):
        lg = logging.getLogger(name)
        lg.setLevel(third)
        lg.propagate = True
        for h in list(lg.handlers):
            lg.removeHandler(h)
    # Noisy at WARNING for normal operation (DHT requests, pubsub peers leaving).
    for name in ("libp2p.kad_dht", "libp2p.pubsub", "libp2p.network", "libp2p.host", "libp2p.stream_muxer",
                 "libp2p.transport", "libp2p.security", "libp2p.discovery", "libp2p.rcmgr", "libp2p.tools",
                 "libp2p.relay", "libp2p.host.autonat"):
        logging.getLogger(name).setLevel(logging.DEBUG if numeric <= logging.DEBUG else logging.ERROR)
    # A failed TCP dial is routine where peers sit behind NAT (we try every
    # address, then the relay); our own dial logs say which path worked.
    logging.getLogger("libp2p.transport.tcp").setLevel(logging.DEBUG if numeric <= logging.DEBUG else logging.CRITICAL)
    logging.getLogger("hypercorn.access").disabled = True

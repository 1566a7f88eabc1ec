"""Which browser origins may call the gateway, the way Ollama decides (pure).

Ollama (gin-contrib/cors, spec §1.6) lets through requests without an
``Origin`` and same-origin ones, allows a fixed set of local origins plus
``OLLAMA_ORIGINS``, and answers any other ``Origin`` with ``403`` and an empty
body. We do the same with ``gateway.cors_origins`` in place of
``OLLAMA_ORIGINS``; ``*`` in a pattern matches any run of characters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..httpmsg import Headers

LOCAL_ORIGINS = (
    "http://localhost",
    "https://localhost",
    "http://localhost:*",
    "https://localhost:*",
    "http://127.0.0.1",
    "https://127.0.0.1",
    "http://127.0.0.1:*",
    "https://127.0.0.1:*",
    "http://0.0.0.0",
    "https://0.0.0.0",
    "http://0.0.0.0:*",
    "https://0.0.0.0:*",
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)

ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
ALLOW_HEADERS = (
    "Authorization, Content-Type, User-Agent, Accept, X-Requested-With, OpenAI-Beta, "
    "x-stainless-arch, x-stainless-async, x-stainless-custom-poll-interval, x-stainless-helper-method, "
    "x-stainless-lang, x-stainless-os, x-stainless-package-version, x-stainless-poll-helper, "
    "x-stainless-retry-count, x-stainless-runtime, x-stainless-runtime-version, x-stainless-timeout"
)
MAX_AGE = "43200"  # gin-contrib/cors default: 12 hours
_HEADER_LIST = re.compile(r"[A-Za-z0-9\-_, ]*\Z")


def _pattern(origin: str) -> re.Pattern[str]:
    parts = (re.escape(p) for p in origin.split("*"))
    return re.compile(".*".join(parts) + r"\Z", re.IGNORECASE)


EXPOSE_HEADERS = "X-Meshollama-Peer, X-Meshollama-Trace-Id"


class CorsPolicy:
    """Ollama's local origins plus the configured ones."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        extra = tuple(extra)
        self.allow_all = "*" in extra
        self._patterns = tuple(_pattern(o) for o in LOCAL_ORIGINS + extra if o != "*")

    def allowed(self, origin: str) -> bool:
        if self.allow_all:
            return True
        candidates = {origin, origin.rstrip("/")}
        return any(p.match(o) for p in self._patterns for o in candidates)

    @staticmethod
    def same_origin(origin: str, host: str | None) -> bool:
        """gin-contrib/cors: an Origin equal to http(s)://<Host> is not cross-origin."""
        return bool(host) and origin.rstrip("/").lower() in (f"http://{host}".lower(), f"https://{host}".lower())

    @staticmethod
    def response_headers(origin: str) -> Headers:
        # An allowed web app (Open WebUI in another origin) may read which peer answered and the trace id.
        return (("access-control-allow-origin", origin), ("vary", "Origin"),
                ("access-control-expose-headers", EXPOSE_HEADERS))

    @staticmethod
    def preflight_headers(origin: str, requested_headers: str | None) -> Headers:
        allow = ALLOW_HEADERS
        if requested_headers and _HEADER_LIST.match(requested_headers):
            # The browser asks for exactly what it will send; auth is still
            # checked on the real request, so echoing the list costs nothing.
            allow = requested_headers
        return (
            ("access-control-allow-origin", origin),
            ("access-control-allow-methods", ALLOW_METHODS),
            ("access-control-allow-headers", allow),
            ("access-control-max-age", MAX_AGE),
            ("vary", "Origin"),
        )

"""What benchmark scripts share: a child process that reports its port, and the end
(show the table, keep the JSON)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]


async def start_child(args: Sequence[str], port_file: Path, log_path: Path, what: str) -> tuple[subprocess.Popen, str]:
    """Start ``args`` (output to ``log_path``) and wait, at most 30 s, until it writes its
    port to ``port_file``; the process and ``http://127.0.0.1:<port>``."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(list(args), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    with trio.fail_after(30):
        while not port_file.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited: {log_path.read_text()[-2000:]}")
            await trio.sleep(0.05)
    return proc, f"http://127.0.0.1:{int(port_file.read_text())}"


def report(result: dict[str, Any], out: Path | None, show: Callable[[dict[str, Any]], None]) -> None:
    """Print ``result`` with ``show`` and, if ``out`` is given, write it there as JSON."""
    show(result)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")

"""What every benchmark script does at the end: show the table, keep the JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def report(result: dict[str, Any], out: Path | None, show: Callable[[dict[str, Any]], None]) -> None:
    """Print ``result`` with ``show`` and, if ``out`` is given, write it there as JSON."""
    show(result)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")

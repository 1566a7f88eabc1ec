"""Placeholder, replaced by the panel work."""

from __future__ import annotations

from typing import Any, Callable


def register(app: Any, state: Any, respond: Callable) -> None:
    pass

"""Placeholder, replaced by the panel work: what the gateway served recently."""

from __future__ import annotations


class Traffic:
    def record(self, *, endpoint: str, model: str, peer: str, status: int, ttfb: float | None,
               duration: float) -> None:
        pass

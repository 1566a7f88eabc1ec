"""A virtual clock and a deterministic event queue."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any


class Sim:
    """Events run in time order; ties in the order they were scheduled."""

    def __init__(self) -> None:
        self.now = 0.0
        self._q: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._n = itertools.count()
        self.events = 0

    def at(self, t: float, fn: Callable[..., Any], *args: Any) -> None:
        heapq.heappush(self._q, (max(t, self.now), next(self._n), fn, args))

    def after(self, dt: float, fn: Callable[..., Any], *args: Any) -> None:
        self.at(self.now + dt, fn, *args)

    def run(self, until: float, stop: Callable[[], bool] | None = None) -> None:
        """Run events up to ``until`` (or until ``stop()`` is true after an event)."""
        q = self._q
        pop = heapq.heappop
        while q and q[0][0] <= until:
            t, _, fn, args = pop(q)
            self.now = t
            fn(*args)
            self.events += 1
            if stop is not None and stop():
                return
        self.now = max(self.now, until)

"""What the gateway served recently: the panel's traffic charts and last requests.

The proxy calls :meth:`Traffic.record` once for every routed request when it
ends. Memory is bounded whatever the traffic: one bucket per wall-clock
second over the last ``window`` seconds (buckets older than that are
dropped), inside each bucket one accumulator for the total, one per peer and
one per model, with at most ``max_keys`` distinct peers and models each
(further ones are counted under ``"(other)"``), plus a ring of the last
``recent`` requests.

An accumulator keeps counts, errors and the sum and maximum of the time to
first byte, so any span of buckets merges into a mean and a maximum without
keeping every sample. Errors are what a client would call a failure of the
mesh: a 5xx, or a status of 0 (nothing was sent at all). A 499 (the client
went away) and 4xx answers (the client's own mistake) are not errors.

The clock is injected (``clock``, wall-clock seconds) so tests are exact;
wall-clock time because the panel shows when each request was served.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NONE = "(none)"  # no peer answered, or the request named no model: not a valid peer id or model name
OTHER = "(other)"  # keys beyond max_keys
DIMENSIONS = ("peers", "models")


def is_error(status: int) -> bool:
    return status == 0 or status >= 500


@dataclass
class Stats:
    """Counts and time-to-first-byte totals of some requests (mergeable)."""

    requests: int = 0
    errors: int = 0
    ttfb_count: int = 0
    ttfb_sum: float = 0.0
    ttfb_max: float = 0.0

    def add(self, error: bool, ttfb: float | None) -> None:
        self.requests += 1
        self.errors += error
        if ttfb is not None and ttfb >= 0:
            self.ttfb_count += 1
            self.ttfb_sum += ttfb
            self.ttfb_max = max(self.ttfb_max, ttfb)

    def merge(self, other: Stats) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.ttfb_count += other.ttfb_count
        self.ttfb_sum += other.ttfb_sum
        self.ttfb_max = max(self.ttfb_max, other.ttfb_max)

    @property
    def ttfb_mean(self) -> float | None:
        return self.ttfb_sum / self.ttfb_count if self.ttfb_count else None

    def summary(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "ttfb_mean": _round(self.ttfb_mean),
                "ttfb_max": _round(self.ttfb_max) if self.ttfb_count else None}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


class _Second:
    """Everything recorded in one wall-clock second."""

    __slots__ = ("total", "peers", "models")

    def __init__(self) -> None:
        self.total = Stats()
        self.peers: dict[str, Stats] = {}
        self.models: dict[str, Stats] = {}


class Traffic:
    """Recent requests by second, peer and model; see the module docstring."""

    def __init__(self, *, clock: Callable[[], float] = time.time, window: int = 900, max_keys: int = 64,
                 recent: int = 100) -> None:
        if window < 1 or max_keys < 1 or recent < 1:
            raise ValueError("window, max_keys and recent must be positive")
        self.clock = clock
        self.window = window
        self.max_keys = max_keys
        self._seconds: dict[int, _Second] = {}
        self._recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self._keys: dict[str, dict[str, int]] = {d: {} for d in DIMENSIONS}  # key -> last second seen
        self._expired_at: int | None = None
        self.version = 0  # bumped by every record(): a cheap "anything new?" for the event stream

    def record(self, *, endpoint: str, model: str, peer: str, status: int, ttfb: float | None,
               duration: float) -> None:
        """One routed request ended (called by the proxy)."""
        now = self.clock()
        second = int(now)
        self._expire(second)
        bucket = self._seconds.get(second)
        if bucket is None:
            bucket = self._seconds[second] = _Second()
        error = is_error(status)
        bucket.total.add(error, ttfb)
        for dim, key, into in (("peers", peer, bucket.peers), ("models", model, bucket.models)):
            name = self._key(dim, key or NONE, second)
            stats = into.get(name)
            if stats is None:
                stats = into[name] = Stats()
            stats.add(error, ttfb)
        self._recent.append({"at": round(now, 3), "endpoint": endpoint, "model": model, "peer": peer,
                             "status": status, "ttfb": _round(ttfb), "duration": _round(max(0.0, duration))})
        self.version += 1

    def _key(self, dim: str, key: str, second: int) -> str:
        known = self._keys[dim]
        if key in known or len(known) < self.max_keys:
            known[key] = second
            return key
        oldest = second - self.window
        for stale in [k for k, seen in known.items() if seen < oldest]:
            del known[stale]
        if len(known) < self.max_keys:
            known[key] = second
            return key
        return OTHER

    def _expire(self, second: int) -> None:
        # Keep only [second - window, second]: a wall clock set back leaves no bucket behind for ever.
        if self._expired_at == second:
            return
        self._expired_at = second
        low = second - self.window
        for s in [s for s in self._seconds if not low < s <= second]:
            del self._seconds[s]

    def snapshot(self, step: int = 10) -> dict[str, Any]:
        """Compact JSON: totals and per-``step`` series over the window, by peer and model, and the last requests.

        Series run oldest first; point ``i`` covers the seconds
        ``[start + i*step, start + (i+1)*step)``, the last one the current,
        still filling, step. A series point of ``ttfb_mean`` is None where no
        request of that step had a first byte.
        """
        step = max(1, int(step))
        now = self.clock()
        second = int(now)
        self._expire(second)
        points = max(1, self.window // step)
        end = (second // step + 1) * step  # exclusive: the current step included
        start = end - points * step
        total = _Series(points)
        by: dict[str, dict[str, _Series]] = {d: {} for d in DIMENSIONS}
        for s, bucket in self._seconds.items():
            if s < start:
                continue
            i = (s - start) // step
            total.add(i, bucket.total)
            for dim, stats in (("peers", bucket.peers), ("models", bucket.models)):
                for key, st in stats.items():
                    series = by[dim].get(key)
                    if series is None:
                        series = by[dim][key] = _Series(points)
                    series.add(i, st)
        return {
            "now": round(now, 3), "window": self.window, "step": step, "start": start, "points": points,
            "total": total.json(),
            **{dim: {k: by[dim][k].json() for k in sorted(by[dim])} for dim in DIMENSIONS},
            "recent": list(reversed(self._recent)),
        }


class _Series:
    def __init__(self, points: int) -> None:
        self.whole = Stats()
        self.steps = [Stats() for _ in range(points)]

    def add(self, i: int, stats: Stats) -> None:
        self.whole.merge(stats)
        self.steps[i].merge(stats)

    def json(self) -> dict[str, Any]:
        return {**self.whole.summary(), "series": {
            "requests": [s.requests for s in self.steps],
            "errors": [s.errors for s in self.steps],
            "ttfb_mean": [_round(s.ttfb_mean) for s in self.steps],
            "ttfb_max": [_round(s.ttfb_max) if s.ttfb_count else None for s in self.steps],
        }}

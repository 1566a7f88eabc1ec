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

:meth:`Traffic.snapshot` runs on the event loop about once a second while a
panel is open, so it does not re-merge the whole window each time: a step
that has ended cannot change (requests are recorded into the current
second), so each ended step is merged once and kept, the series of the
ended steps of the window are assembled once per step, and each call adds
only the current step's few seconds. A snapshot is reused while nothing was
recorded and the step did not advance. A wall clock set back (a record or a
snapshot earlier than what was cached) drops these caches.
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
    """Everything recorded in one wall-clock second (or merged over one step)."""

    __slots__ = ("models", "peers", "total")

    def __init__(self) -> None:
        self.total = Stats()
        self.peers: dict[str, Stats] = {}
        self.models: dict[str, Stats] = {}

    def merge(self, other: _Second) -> None:
        self.total.merge(other.total)
        for into, source in ((self.peers, other.peers), (self.models, other.models)):
            for key, st in source.items():
                mine = into.get(key)
                if mine is None:
                    mine = into[key] = Stats()
                mine.merge(st)


_COLUMNS = ("requests", "errors", "counts", "sums", "maxes", "ttfb_mean", "ttfb_max")


class _Prefix:
    """One key's values in each ended step of the window, oldest first, and over them all."""

    __slots__ = (*_COLUMNS, "whole")

    def __init__(self, columns: tuple[list[Any], ...]) -> None:
        for name, values in zip(_COLUMNS, columns, strict=True):
            setattr(self, name, values)
        self.whole = Stats(sum(self.requests), sum(self.errors), sum(self.counts), sum(self.sums),
                           max(self.maxes, default=0.0))

    @staticmethod
    def columns(steps: list[Stats | None]) -> tuple[list[Any], ...]:
        return ([st.requests if st else 0 for st in steps],
                [st.errors if st else 0 for st in steps],
                [st.ttfb_count if st else 0 for st in steps],
                [st.ttfb_sum if st else 0.0 for st in steps],
                [st.ttfb_max if st else 0.0 for st in steps],
                [_round(st.ttfb_mean) if st else None for st in steps],
                [_round(st.ttfb_max) if st and st.ttfb_count else None for st in steps])

    def slid(self, drop: int, steps: list[Stats | None]) -> _Prefix:
        """The oldest ``drop`` steps gone, ``steps`` added at the end (slices: cheap)."""
        added = self.columns(steps)
        return _Prefix(tuple(getattr(self, name)[drop:] + new for name, new in zip(_COLUMNS, added, strict=True)))


class _Ended:
    """The series of the ended steps of one window (all but its last point), by key."""

    __slots__ = ("length", "models", "peers", "total")

    def __init__(self, length: int, total: _Prefix, peers: dict[str, _Prefix], models: dict[str, _Prefix]) -> None:
        self.length = length
        self.total = total
        self.peers = peers
        self.models = models

    @classmethod
    def of(cls, steps: list[_Second]) -> _Ended:
        empty = cls(0, _Prefix(_Prefix.columns([])), {}, {})
        return empty.slid(0, steps, len(steps))

    def slid(self, drop: int, steps: list[_Second], length: int) -> _Ended:
        """The window moved on by ``drop`` steps, ``steps`` the newly ended ones (``length`` in all)."""
        total = self.total.slid(drop, [s.total for s in steps])
        return _Ended(length, total, _slide(self.peers, drop, [s.peers for s in steps], length),
                      _slide(self.models, drop, [s.models for s in steps], length))


def _slide(old: dict[str, _Prefix], drop: int, rows: list[dict[str, Stats]], length: int) -> dict[str, _Prefix]:
    keys = set(old)
    for row in rows:
        keys.update(row)
    out = {}
    for key in keys:
        added = [row.get(key) for row in rows]
        before = old.get(key)
        if before is None:
            prefix = _Prefix(_Prefix.columns([None] * (length - len(rows)) + added))
        else:
            prefix = before.slid(drop, added)
        if prefix.whole.requests:  # nothing left of this key in the window: no entry, as if never seen
            out[key] = prefix
    return out


def _point(prefix: _Prefix | None, current: Stats | None, ended: int) -> dict[str, Any]:
    """A key's JSON: ``prefix`` (the ended steps) and then the current step."""
    whole = Stats()
    if prefix is not None:
        whole.merge(prefix.whole)
    if current is not None:
        whole.merge(current)
    if prefix is None:
        zeros, nones = [0] * ended, [None] * ended
        requests, errors, means, maxes = zeros, zeros, nones, nones
    else:
        requests, errors, means, maxes = prefix.requests, prefix.errors, prefix.ttfb_mean, prefix.ttfb_max
    cur = current if current is not None else Stats()
    return {**whole.summary(), "series": {
        "requests": requests + [cur.requests],
        "errors": errors + [cur.errors],
        "ttfb_mean": means + [_round(cur.ttfb_mean)],
        "ttfb_max": maxes + [_round(cur.ttfb_max) if cur.ttfb_count else None],
    }}


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
        # The snapshot's caches (module docstring); every step in them ended at or before _ended_by.
        self._ended: dict[int, tuple[tuple[int, int], _Ended]] = {}  # step -> ((start, points), series)
        self._snapshots: dict[int, tuple[tuple[int, int], dict[str, Any]]] = {}  # step -> (key, snapshot)
        self._ended_by = 0

    def record(self, *, endpoint: str, model: str, peer: str, status: int, ttfb: float | None,
               duration: float) -> None:
        """One routed request ended (called by the proxy)."""
        now = self.clock()
        second = int(now)
        self._expire(second)
        self._forget_past(second)
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
        # Seen "in the future" too: the wall clock was set back, and that key has no bucket any more.
        for stale in [k for k, seen in known.items() if not oldest <= seen <= second]:
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
        self._forget_past(second)
        key = (self.version, second // step)
        cached = self._snapshots.get(step)
        if cached is not None and cached[0] == key:
            return {**cached[1], "now": round(now, 3)}
        points = max(1, self.window // step)
        end = (second // step + 1) * step  # exclusive: the current step included
        start = end - points * step
        ended = self._ended_series(step, start, points, second)
        current = self._merged(end - step, end)
        out = {
            "now": round(now, 3), "window": self.window, "step": step, "start": start, "points": points,
            "total": _point(ended.total, current.total, points - 1),
            **{dim: {k: _point(getattr(ended, dim).get(k), getattr(current, dim).get(k), points - 1)
                     for k in sorted(getattr(ended, dim).keys() | getattr(current, dim).keys())}
               for dim in DIMENSIONS},
            "recent": list(reversed(self._recent)),
        }
        if step not in self._snapshots and len(self._snapshots) >= 4:  # a few step sizes at most
            self._snapshots.clear()
            self._ended.clear()
        self._snapshots[step] = (key, out)
        return out

    def _forget_past(self, second: int) -> None:
        """The clock went back behind what the caches hold as ended: they may be wrong now."""
        if second < self._ended_by:
            self._ended.clear()
            self._snapshots.clear()
            self._ended_by = second

    def _merged(self, low: int, high: int) -> _Second:
        """The buckets of the seconds ``[low, high)`` merged."""
        out = _Second()
        buckets = self._seconds
        if high - low > len(buckets):
            found = [b for s, b in buckets.items() if low <= s < high]
        else:
            found = [b for b in map(buckets.get, range(low, high)) if b is not None]
        for bucket in found:
            out.merge(bucket)
        return out

    def _ended_series(self, step: int, start: int, points: int, second: int) -> _Ended:
        """The series of the window's ended steps, ``[start, start + (points-1)*step)``."""
        cached = self._ended.get(step)
        if cached is not None and cached[0] == (start, points):
            return cached[1]
        self._ended_by = max(self._ended_by, second)
        length = points - 1
        drop = length
        if cached is not None and cached[0][1] == points and cached[0][0] < start:
            drop = min(length, (start - cached[0][0]) // step)
        # Only the steps that ended since: the others are in the cached series already.
        firsts = range(start + (length - drop) * step, start + length * step, step)
        steps = [self._merged(first, first + step) for first in firsts]
        if drop < length:
            assert cached is not None
            ended = cached[1].slid(drop, steps, length)
        else:
            ended = _Ended.of(steps)
        self._ended[step] = ((start, points), ended)
        return ended

"""Periodic loops that wake together (pure timing, no state).

An idle node is woken by timers only, and each separate wake-up costs far
more than the work most loops then do (the event loop, the system call,
caches gone cold: ~0.4 ms on a small box, against ~0.1 ms for a liveness
round that pings nobody). Five 1 s loops on their own phases cost an idle
trio process about 0.2 % of a core; the same five woken at the same instants
about 0.06 %. :func:`tick` sleeps to the next multiple of ``period`` on
trio's clock (at least half a period away), so every loop of this process
whose period divides another's wakes in the same pass of the event loop:
the 1 s loops on every whole second, the 2 s ones on every other.

The period is kept on average; only the first wait (between half a period
and one and a half) and a round that overran its period are shortened or
stretched, by less than a period.
"""

from __future__ import annotations

import math

import trio


def next_tick(now: float, period: float) -> float:
    """The first multiple of ``period`` at least ``period / 2`` after ``now``."""
    if period <= 0:
        return now
    return math.ceil((now + period / 2) / period) * period


async def tick(period: float) -> None:
    """Sleep until :func:`next_tick` (``trio.sleep(period)``, in step with the other loops)."""
    await trio.sleep_until(next_tick(trio.current_time(), period))

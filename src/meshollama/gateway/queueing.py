"""The gateway's per-model wait line: queue instead of failing when busy.

When every holder of a model is at capacity (by the router's estimate:
announced load corrected by this gateway's own sends and finishes), a
request does not go out to pile onto a peer that would answer "busy" or
queue it out of sight: it waits here, first in first out per model, and is
dispatched as soon as a slot frees anywhere. A slot frees when one of this
gateway's requests ends (:meth:`ModelQueues.poke`, at once) or when a
heartbeat shows one (the head of the line re-checks every
:data:`RECHECK` seconds). The line is bounded twice: ``size`` requests per
model (the next one gets :class:`~meshollama.errors.Overloaded`, a 503 with
``Retry-After``), and ``timeout`` seconds per request (then the same 503).

Order is kept by tickets: only the request at the head may leave when a slot
is free; a newcomer joins the back even if it sees a free slot while others
wait. A request leaving the line, for any reason, wakes the next one.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import trio

from ..errors import Overloaded

RECHECK = 0.25  # seconds between re-checks of the head of a line (a heartbeat may have freed a slot)


class ModelQueues:
    """Bounded FIFO wait lines, one per model key."""

    def __init__(self, size: int, timeout: float, *, on_depth: Callable[[str, int], None] | None = None,
                 on_outcome: Callable[[str], None] | None = None) -> None:
        self.size = max(0, int(size))
        self.timeout = float(timeout)
        self._lines: dict[str, deque[object]] = {}
        self._changed = trio.Event()
        self._on_depth = on_depth or (lambda key, depth: None)
        self._on_outcome = on_outcome or (lambda outcome: None)

    def depth(self, key: str) -> int:
        return len(self._lines.get(key, ()))

    def depths(self) -> dict[str, int]:
        return {k: len(q) for k, q in self._lines.items() if q}

    def total(self) -> int:
        return sum(len(q) for q in self._lines.values())

    def poke(self) -> None:
        """Something may have freed a slot: heads of lines look again."""
        self._changed.set()
        self._changed = trio.Event()

    def retry_after(self, key: str) -> int:
        """Seconds a refused client should wait: a tenth of the queue timeout, at least one."""
        return max(1, math.ceil(self.timeout / 10))

    async def wait(self, key: str, free: Callable[[], bool], *, label: str = "", after_busy: bool = False,
                   deadline: float | None = None, servable: Callable[[], bool] = lambda: True) -> None:
        """Return when this request may be dispatched for ``key``.

        ``free()`` says whether a holder has a free slot now. Returns at once
        when nobody waits and a slot is free (and not ``after_busy``: every
        holder just answered busy, so wait for a change first). Raises
        :class:`Overloaded` when the line is full or the wait times out
        (``timeout`` from now, or ``deadline`` when a request comes back to
        the line after its peers answered busy: one budget per request).
        Returns early, to let the caller say so, when ``servable()`` turns
        False: nobody holds the model any more. ``size`` 0: no line at all,
        every request is sent at once (the peers' own queues take it).
        """
        line = self._lines.get(key)
        if self.size == 0 or (not line and not after_busy and free()):
            return
        name = label or key
        if line is not None and len(line) >= self.size:
            self._on_outcome("full")
            raise Overloaded(f"every peer serving '{name}' is busy and {self.depth(key)} requests wait already "
                             "(gateway.queue_size); retry later", self.retry_after(key))
        if line is None:
            line = self._lines[key] = deque()
        ticket = object()
        line.append(ticket)
        self._on_depth(key, len(line))
        outcome = "gone"
        try:
            with trio.move_on_at(deadline if deadline is not None else trio.current_time() + self.timeout):
                first = True
                while True:
                    if not servable():
                        outcome = "unservable"
                        return
                    if line[0] is ticket and not (first and after_busy) and free():
                        outcome = "dispatched"
                        return
                    first = False
                    changed = self._changed
                    with trio.move_on_after(RECHECK):
                        await changed.wait()
            outcome = "timeout"
            raise Overloaded(f"every peer serving '{name}' stayed busy for {self.timeout:g}s "
                             "(gateway.queue_timeout); retry later", self.retry_after(key))
        finally:
            line.remove(ticket)
            if not line and self._lines.get(key) is line:
                del self._lines[key]
            self._on_depth(key, len(line))
            self._on_outcome(outcome)
            self.poke()  # the next in line looks now

"""Keeping the libp2p host up: rebuild it, with backoff, whenever it fails.

The host and the loops that run on it (``mesh.loops``) share one nursery, so
whatever one of them raises ends them all, and :func:`supervise` builds a
fresh host after a pause: 0.5 s, doubling on every failure in a row up to
30 s, back to 0.5 s once a host has run healthily for a minute
(:class:`Backoff`). Everything else of the node (peer table, gateway,
backend) lives outside that nursery and keeps running meanwhile.

Only the very first start is not retried: a node that cannot bind its port
must say so and exit (``meshollama start`` reports a
:class:`~meshollama.errors.PortInUseError` in one line), so that error
leaves :func:`supervise`, unwrapped from its nursery's exception group.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from ..errors import P2PError

FIRST_DELAY = 0.5
MAX_DELAY = 30.0
HEALTHY_AFTER = 60.0  # a host that ran this long before failing was healthy: start over at FIRST_DELAY


class Backoff:
    """The pause before each restart (pure): ``first`` doubling to ``cap``,
    back to ``first`` after a run of at least ``healthy_after`` seconds."""

    def __init__(self, first: float = FIRST_DELAY, cap: float = MAX_DELAY,
                 healthy_after: float = HEALTHY_AFTER) -> None:
        if not 0 < first <= cap:
            raise ValueError("need 0 < first <= cap")
        self.first = first
        self.cap = cap
        self.healthy_after = healthy_after
        self._next = first

    def after_failure(self, ran_for: float | None) -> float:
        """The pause after a host that ran ``ran_for`` seconds (None: it never came up)."""
        if ran_for is not None and ran_for >= self.healthy_after:
            self._next = self.first
        delay = self._next
        self._next = min(delay * 2, self.cap)
        return delay


class HostStopped(P2PError):
    """The libp2p host ended without an error while it should have been running."""


def leaf(exc: BaseException) -> BaseException:
    """``exc``, out of any exception groups that hold just one exception."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def supervise(
    run_host: Callable[..., Awaitable[None]],
    on_failure: Callable[[BaseException, float], None],
    backoff: Backoff,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``run_host`` again and again, until cancelled.

    ``run_host(task_status=...)`` builds one host, reports ``started(value)``
    once it is up, and runs until it fails. The first start's ``value`` is
    ours to report; if the first start fails, that error is raised. After
    that, any failure (an exception other than cancellation, or ``run_host``
    returning) calls ``on_failure(error, delay)`` and a fresh host is run
    ``delay`` seconds later, a failed restart included.
    """
    first = True
    while True:
        up_at: float | None = None
        error: BaseException = HostStopped("the libp2p host stopped by itself")
        try:
            async with trio.open_nursery() as nursery:
                value = await nursery.start(run_host)
                up_at = trio.current_time()
                if first:
                    first = False
                    task_status.started(value)
        except Exception as exc:  # cancellation (a BaseException) goes through
            error = leaf(exc)
        if first:
            raise error  # outside the except: its own cause and context stay as they were
        ran_for = None if up_at is None else trio.current_time() - up_at
        delay = backoff.after_failure(ran_for)
        on_failure(error, delay)
        await trio.sleep(delay)

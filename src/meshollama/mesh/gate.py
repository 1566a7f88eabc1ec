"""The door of a protocol that faces strangers: checked before anything is read.

A peer is served only if it is allowed (admitted, in a closed mesh), did not
ask within ``every`` seconds, and a slot (of ``slots``) is free. Who asked
when is remembered for at most :data:`REMEMBERED` peers. Used by the table
sync (``mesh.sync``) and the load answers (``mesh.load_server``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import trio

REMEMBERED = 4096


class Gate:
    def __init__(self, *, allow: Callable[[str], bool], every: float, slots: int) -> None:
        self.allow = allow
        self.every = every
        self._slots = trio.Semaphore(slots)
        self._asked: dict[str, float] = {}

    def enter(self, peer: str, now: float) -> str | None:
        """None: come in (a slot is taken: :meth:`leave` after); else why not."""
        last = self._asked.get(peer)
        if not self.allow(peer):
            return "not_admitted"
        if last is not None and now - last < self.every:
            return "too_often"
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            return "busy"
        remember(self._asked, peer, now, REMEMBERED)
        return None

    def leave(self) -> None:
        self._slots.release()


def remember(d: dict, key, value, limit: int) -> None:
    """``d[key] = value`` as the newest entry; past ``limit`` entries the oldest tenth go at
    once (amortised O(1)), so peers a stranger makes up cannot grow ``d`` for ever."""
    d.pop(key, None)  # re-inserted last: the dict stays in age order
    d[key] = value
    if len(d) > limit:
        for old in list(itertools.islice(d, len(d) - limit * 9 // 10)):
            del d[old]

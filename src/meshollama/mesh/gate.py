"""The door of a protocol that faces strangers: checked before anything is read.

A peer is served only if it is allowed (admitted, in a closed mesh), did not
ask within ``every`` seconds, and a slot (of ``slots``) is free. Who asked
when is remembered for at most :data:`REMEMBERED` peers. Used by the table
sync (``mesh.sync``) and the load answers (``mesh.load_server``).
"""

from __future__ import annotations

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
        if len(self._asked) >= REMEMBERED:
            self._asked = {p: t for p, t in self._asked.items() if now - t < self.every}
            while len(self._asked) >= REMEMBERED:
                del self._asked[next(iter(self._asked))]
        self._asked[peer] = now
        return None

    def leave(self) -> None:
        self._slots.release()

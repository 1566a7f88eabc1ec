"""Answering "how busy are you?" (``/meshollama/load/1``), for large meshes.

Past ``p2p.full_view_up_to`` peers a node no longer announces load changes
to the whole mesh (every node would hear every busy node's every change);
a gateway about to route asks a few holders of the model directly instead
(``mesh.load_client``), as Petals does. The answer is one small JSON line,
``{"f": in_flight, "c": capacity, "q": queued, "w": waiting}``, then the
stream closes; the caller sends nothing.

It faces strangers: in a closed mesh only admitted peers get an answer; at
most :data:`SLOTS` answers are in progress at once; a peer asking more than
once per :data:`PER_PEER_GAP` is reset; the write has a short deadline.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import trio

from ..catalog import LoadInfo
from ..errors import P2PError

PROTOCOL = "/meshollama/load/1"
SLOTS = 32  # answers in progress at once
PER_PEER_GAP = 0.1  # seconds: one peer's questions, at most ten a second
DEADLINE = 2.0  # seconds to write the answer
MAX_REMEMBERED = 4096  # peers whose last question is remembered (for the rate)


def encode(load: LoadInfo) -> bytes:
    return json.dumps({"f": load.in_flight, "c": load.capacity, "q": load.queued, "w": load.waiting},
                      separators=(",", ":")).encode() + b"\n"


class LoadServer:
    def __init__(self, load: Callable[[], LoadInfo], *, allow: Callable[[str], bool] = lambda peer_id: True,
                 on_count: Callable[[str], None] = lambda what: None) -> None:
        self.load = load
        self.allow = allow
        self.on_count = on_count
        self._slots = trio.Semaphore(SLOTS)
        self._asked: dict[str, float] = {}

    async def handle(self, stream) -> None:
        peer = stream.peer_id
        now = trio.current_time()
        last = self._asked.get(peer)
        refused = ("not_admitted" if not self.allow(peer) else
                   "too_often" if last is not None and now - last < PER_PEER_GAP else None)
        if refused is None:
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                refused = "busy"
        if refused is not None:
            self.on_count(f"refused_{refused}")
            await stream.reset()
            return
        try:
            if len(self._asked) >= MAX_REMEMBERED:
                self._asked = {p: t for p, t in self._asked.items() if now - t < PER_PEER_GAP}
                while len(self._asked) >= MAX_REMEMBERED:
                    del self._asked[next(iter(self._asked))]
            self._asked[peer] = now
            await stream.write(encode(self.load()), timeout=DEADLINE)
            await stream.close()
            self.on_count("answered")
        except P2PError:
            self.on_count("failed")
            await stream.reset()
        finally:
            self._slots.release()

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
from .gate import Gate

PROTOCOL = "/meshollama/load/1"
SLOTS = 32  # answers in progress at once
PER_PEER_GAP = 0.1  # seconds: one peer's questions, at most ten a second
DEADLINE = 2.0  # seconds to write the answer


def encode(load: LoadInfo) -> bytes:
    return json.dumps({"f": load.in_flight, "c": load.capacity, "q": load.queued, "w": load.waiting},
                      separators=(",", ":")).encode() + b"\n"


class LoadServer:
    def __init__(self, load: Callable[[], LoadInfo], *, allow: Callable[[str], bool] = lambda peer_id: True,
                 on_count: Callable[[str], None] = lambda what: None) -> None:
        self.load = load
        self.on_count = on_count
        self.gate = Gate(allow=allow, every=PER_PEER_GAP, slots=SLOTS)

    async def handle(self, stream) -> None:
        refused = self.gate.enter(stream.peer_id, trio.current_time())
        if refused is not None:
            self.on_count(f"refused_{refused}")
            await stream.reset()
            return
        try:
            await stream.write(encode(self.load()), timeout=DEADLINE)
            await stream.close()
            self.on_count("answered")
        except P2PError:
            self.on_count("failed")
            await stream.reset()
        finally:
            self.gate.leave()

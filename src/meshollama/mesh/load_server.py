"""Answering "how busy are you?" (``/meshollama/load/1``), for large meshes.

Past ``p2p.full_view_up_to`` peers a node no longer announces load changes
to the whole mesh (every node would hear every busy node's every change);
a gateway about to route asks a few holders of the model directly instead
(``mesh.load_client``), as Petals does. The answer is one small JSON line,
``{"f": in_flight, "c": capacity, "q": queued, "w": waiting}``, then the
stream closes; the caller sends nothing.

The same server answers "do you hold this model?" (``/meshollama/holds/1``,
:data:`HOLDS_PROTOCOL`) for a gateway that found us through a DHT provider
record (``mesh.holders``): the asker writes the model's name and a newline
(at most :data:`MAX_QUESTION` bytes), the answer is ``{}`` or our digest,
``"l"`` (loaded) and the load fields above.

It faces strangers: in a closed mesh only admitted peers get an answer; at
most :data:`SLOTS` answers are in progress at once for each question (its
own gate, so slow holds questions never starve the load answers); a peer
asking more than once per :data:`PER_PEER_GAP` is reset; the question must
arrive within :data:`QUESTION_DEADLINE` and the answer go out within
:data:`DEADLINE`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .. import names
from ..catalog import LoadInfo, ModelInfo
from ..errors import P2PError
from .gate import Gate

PROTOCOL = "/meshollama/load/1"
HOLDS_PROTOCOL = "/meshollama/holds/1"
MAX_QUESTION = 512  # bytes: a model name (names.MAX_LEN is far below) and a newline
SLOTS = 32  # answers in progress at once
PER_PEER_GAP = 0.1  # seconds: one peer's questions, at most ten a second
DEADLINE = 2.0  # seconds to write the answer
HOLDS_PER_PEER_GAP = 0.02  # seconds: a gateway may ask about several models at once (a 280-model holder)
QUESTION_DEADLINE = 0.5  # seconds for a holds question to arrive (a trickled one holds a slot no longer)


def _fields(load: LoadInfo) -> dict:
    return {"f": load.in_flight, "c": load.capacity, "q": load.queued, "w": load.waiting}


def encode(load: LoadInfo) -> bytes:
    return json.dumps(_fields(load), separators=(",", ":")).encode() + b"\n"


def encode_holds(model: ModelInfo | None, load: LoadInfo) -> bytes:
    if model is None:
        return b"{}\n"
    return json.dumps({"d": model.digest, "l": model.loaded, **_fields(load)}, separators=(",", ":")).encode() + b"\n"


class LoadServer:
    def __init__(self, load: Callable[[], LoadInfo], *, allow: Callable[[str], bool] = lambda peer_id: True,
                 on_count: Callable[[str], None] = lambda what: None,
                 holds: Callable[[str], ModelInfo | None] = lambda key: None) -> None:
        self.load = load
        self.holds = holds  # names.key -> the model we hold under it, if any (our whole list)
        self.on_count = on_count
        self.gate = Gate(allow=allow, every=PER_PEER_GAP, slots=SLOTS)
        self.holds_gate = Gate(allow=allow, every=HOLDS_PER_PEER_GAP, slots=SLOTS)

    async def handle(self, stream) -> None:
        await self._serve(stream, self.gate, self._load_answer)

    async def handle_holds(self, stream) -> None:
        await self._serve(stream, self.holds_gate, self._holds_answer)

    async def _load_answer(self, stream) -> bytes | None:
        return encode(self.load())

    async def _holds_answer(self, stream) -> bytes | None:
        """The answer to the question on ``stream``; None: not a question (it is reset)."""
        question = await read_line(stream, MAX_QUESTION, QUESTION_DEADLINE)
        try:
            name = question.decode("utf-8").strip() if question.endswith(b"\n") else ""
        except UnicodeDecodeError:
            name = ""
        if not names.is_valid(name):
            self.on_count("refused_question")
            return None
        return encode_holds(self.holds(names.key(name)), self.load())

    async def _serve(self, stream, gate: Gate, answer: Callable[[Any], Awaitable[bytes | None]]) -> None:
        """One question: a slot at ``gate`` first, then ``answer``, written within
        :data:`DEADLINE`; any failure resets the stream. The one close point."""
        refused = gate.enter(stream.peer_id, trio.current_time())
        if refused is not None:
            self.on_count(f"refused_{refused}")
            await stream.reset()
            return
        try:
            data = await answer(stream)
            if data is None:
                await stream.reset()
                return
            await stream.write(data, timeout=DEADLINE)
            await stream.close()
            self.on_count("answered")
        except P2PError:
            self.on_count("failed")
            await stream.reset()
        finally:
            gate.leave()


async def read_line(stream, limit: int, timeout: float) -> bytes:
    """Up to ``limit`` + 1 bytes until a newline, the stream's end or ``timeout`` (what
    arrived by then); the caller checks for the newline and the size."""
    data = b""
    with trio.move_on_after(timeout):
        while len(data) <= limit and not data.endswith(b"\n"):
            chunk = await stream.read(limit + 1 - len(data), timeout=timeout)
            if not chunk:
                break
            data += chunk
    return data

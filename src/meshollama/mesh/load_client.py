"""Asking holders of a model how busy they are (``/meshollama/load/1``), for large meshes.

The gateway, about to route in a mesh past ``p2p.full_view_up_to`` peers
(where load changes are not gossiped) with a strategy that uses load, asks
:data:`SAMPLE` random holders it is connected to (a dial would not fit) and
has not asked within :data:`FRESH` seconds, answered or not, all at once,
for at most :data:`TIMEOUT`; what comes back counts as a heartbeat of its own for routing
(``routing.RouteStats.sampled``), and those holders join the decision's
sample. A peer that does not answer in time is simply not counted: the
decision goes on with what the announcements said. The answer is a
stranger's claim, bounded like an announcement's load
(``announce.MAX_CAPACITY``, ``announce.MAX_LOAD``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..catalog import LoadInfo
from ..errors import P2PError
from .announce import MAX_CAPACITY, MAX_LOAD, MAX_STR
from .holders import Found
from .load_server import HOLDS_PROTOCOL, PROTOCOL, read_line

SAMPLE = 3  # holders asked per decision
FRESH = 1.0  # seconds an answer is good for: not asked again before
TIMEOUT = 0.25  # seconds the decision waits for answers
MAX_ANSWER = 1024  # bytes (a digest may be up to announce.MAX_STR)


def decode(data: bytes) -> LoadInfo:
    """A peer's answer, bounded; ValueError if it is not one."""
    obj = json.loads(data.decode("utf-8"))
    if not isinstance(obj, dict):
        raise ValueError("not an object")

    def num(key: str, default: int, limit: int) -> int:
        v = obj.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{key}: not a count")
        return min(v, limit)

    return LoadInfo(in_flight=num("f", 0, MAX_LOAD), capacity=num("c", 1, MAX_CAPACITY),
                    queued=num("q", 0, MAX_LOAD), waiting=num("w", 0, MAX_LOAD))


def decode_holds(peer_id: str, data: bytes) -> Found | None:
    """A provider's answer to "do you hold it?": None for ``{}``; ValueError if it is not one."""
    obj = json.loads(data.decode("utf-8"))
    if obj == {}:
        return None
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    digest, loaded = obj.get("d", ""), obj.get("l", False)
    if not isinstance(digest, str) or len(digest) > MAX_STR or not isinstance(loaded, bool):
        raise ValueError("d/l: not a digest and a flag")
    return Found(peer_id, digest, loaded, decode(data))


async def _question(open_stream: Callable[..., Awaitable], peer_id: str, protocol: str, question: bytes,
                    timeout: float, what: str, parse: Callable[[bytes], Any]) -> Any:
    with trio.move_on_after(timeout):
        stream = await open_stream(peer_id, protocol, timeout=timeout)
        try:
            if question:
                await stream.write(question, timeout=timeout)
            data = await read_line(stream, MAX_ANSWER, timeout)
            try:
                return parse(data)
            except (ValueError, UnicodeDecodeError) as exc:
                raise P2PError(f"{what} of {peer_id}: not an answer ({exc})") from None
        finally:
            await stream.reset()  # the answer is in: no polite close to wait for
    raise P2PError(f"{what} of {peer_id}: no answer within {timeout}s")


async def ask(open_stream: Callable[..., Awaitable], peer_id: str, timeout: float = TIMEOUT) -> LoadInfo:
    """One holder's load; P2PError if it does not answer in time or answers nonsense."""
    return await _question(open_stream, peer_id, PROTOCOL, b"", timeout, "load", decode)


async def ask_holds(open_stream: Callable[..., Awaitable], peer_id: str, model: str,
                    timeout: float) -> Found | None:
    """Whether a DHT provider holds ``model`` now (its digest, loaded, load), None if not;
    P2PError if it does not answer in time or answers nonsense."""
    return await _question(open_stream, peer_id, HOLDS_PROTOCOL, model.encode() + b"\n", timeout, "holds",
                           lambda data: decode_holds(peer_id, data))


def pick(holders, skip: Callable[[str], bool], rng: random.Random, k: int = SAMPLE) -> list[str]:
    """Up to ``k`` random holders (``PeerView`` objects) not to ``skip`` (asked within
    :data:`FRESH`, not connected, ourselves): O(k), whatever the number of holders."""
    sample = rng.sample(range(len(holders)), min(len(holders), 8 * k))
    return [pid for i in sample if not skip(pid := holders[i].peer_id)][:k]

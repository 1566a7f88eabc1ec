"""The panel's live updates: event payloads (pure) and the Server-Sent Events stream.

``GET /api/mesh/events`` answers ``text/event-stream``::

    retry: 2000

    event: hello
    data: {"self_id": ..., "version": ..., "role": "admin", "kind": "key", "name": "ops", "open": false}

    event: mesh
    data: {"self_id": ..., "peers": [...], "counts": {...}, ...}

    event: models
    data: {"models": [...], "store": ..., "can_replicate": true, "can_delete": true}

    event: traffic
    data: {"now": ..., "step": 10, "total": {...}, "peers": {...}, "models": {...}, "recent": [...]}

    : keep-alive

``hello`` comes once, first; ``mesh``, ``models`` and ``traffic`` come at once
and then again whenever their content changes (checked every ``tick``
seconds); a comment line keeps an idle stream from looking dead to proxies;
``bye`` says the node is shutting down (the client reconnects).

Whether content *changed* is decided on a fingerprint that leaves out what
moves by itself (seconds since a heartbeat, uptime): otherwise every stream
would be re-sent the whole mesh every second. The client ages those values
itself from when the event arrived.

:class:`Feeds` builds each payload at most once per tick for every open
stream together, and counts the streams (:data:`MAX_STREAMS`).
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from .. import __version__, names
from ..mesh.peertable import Snapshot
from . import listings
from .errors import dumps

RETRY_MS = 2000  # the client's first reconnection delay; it backs off from there
TICK = 1.0
HEARTBEAT = 15.0
MAX_STREAMS = 32
_VOLATILE = frozenset({"seconds_since_heartbeat", "uptime_seconds"})
_NODE_FIELDS = ("host", "draining", "heartbeat_interval", "uptime_seconds", "admission", "api_url")


def frame(event: str, data: Any) -> bytes:
    """One SSE event; compact JSON never holds a newline, so one ``data:`` line."""
    payload = data if isinstance(data, bytes) else dumps(data)
    return b"event: " + event.encode("ascii") + b"\ndata: " + payload + b"\n\n"


def _stable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def fingerprint(event: str, payload: Any) -> bytes:
    """Equal for two payloads that differ only in values that move by themselves."""
    if event == "traffic":
        payload = {k: v for k, v in payload.items() if k != "now"}
    return hashlib.blake2b(dumps(_stable(payload)), digest_size=16).digest()


def hello_payload(self_id: str, caller: Any, open_gateway: bool, heartbeat: float = HEARTBEAT) -> dict[str, Any]:
    """Who this node is and who the caller is (never their secret); ``heartbeat``: the
    keep-alive period, from which the client judges a silent stream dead."""
    return {"self_id": self_id, "version": __version__, **whoami(caller), "open": open_gateway,
            "heartbeat": heartbeat}


def whoami(caller: Any) -> dict[str, Any]:
    """``GET /api/mesh/whoami``: the caller's role, kind and key name."""
    if caller is None:
        return {"role": None, "kind": None, "name": None}
    name = caller.name or (caller.ident if caller.kind in ("jwt", "key", "shared", "config") else "")
    return {"role": str(caller.role), "kind": caller.kind, "name": name or None}


def mesh_payload(snapshot: Snapshot, self_id: str, status: dict[str, Any], queue: Any,
                 in_flight: int) -> dict[str, Any]:
    """Every peer and the counts, as ``/api/mesh/peers`` and ``/api/mesh/status`` give them."""
    summary = listings.mesh_status(snapshot, self_id, {}, __version__)
    node = {k: status[k] for k in _NODE_FIELDS if k in status}
    node["connected_peers"] = len(status.get("connected_peers") or ())
    node["p2p_addrs"] = list(status.get("p2p_addrs") or ())
    return {"self_id": self_id, "version": __version__, "counts": summary["peers"], "models": summary["models"],
            "node": node, "queue": queue, "gateway_in_flight": in_flight,
            "peers": listings.mesh_peers(snapshot)}


def models_from_snapshot(snapshot: Snapshot) -> list[dict[str, Any]]:
    """The rows of ``ModelService.mesh_models`` for a node without a model service."""
    rows: dict[str, dict[str, Any]] = {}
    for peer in snapshot.peers:
        for m in peer.models:
            row = rows.setdefault(names.key(m.name), {"model": names.shortest(m.name), "size": int(m.size),
                                                      "holders": [], "digests": {}})
            row["holders"].append({"peer": peer.peer_id, "state": peer.state.value, "self": peer.is_self,
                                   "digest": m.digest, "loaded": m.loaded})
            row["digests"][m.digest] = row["digests"].get(m.digest, 0) + 1
            row["size"] = max(row["size"], int(m.size))
    for row in rows.values():
        row["copies"] = len(row["holders"])
    return sorted(rows.values(), key=lambda r: r["model"])


def models_payload(service: Any, snapshot: Snapshot, has_backend: bool) -> dict[str, Any]:
    """Every model in the mesh with its holders; what this node can do about them."""
    if service is not None:
        listing = service.mesh_models()
        models, store = listing["models"], listing.get("store")
    else:
        models, store = models_from_snapshot(snapshot), None
    return {"models": models, "store": store, "can_replicate": getattr(service, "replicator", None) is not None,
            "can_delete": has_backend}


class Feeds:
    """The current payload of each event, built at most once per ``tick`` for all streams."""

    EVENTS = ("mesh", "models", "traffic")

    def __init__(self, state: Any, *, clock: Callable[[], float] = trio.current_time, tick: float = TICK,
                 heartbeat: float = HEARTBEAT, max_streams: int = MAX_STREAMS) -> None:
        self.state = state
        self.clock = clock
        self.tick = tick
        self.heartbeat = heartbeat
        self.max_streams = max_streams
        self._built_at: float | None = None
        self._current: dict[str, tuple[bytes, bytes]] = {}
        self._traffic_key: tuple[int, int] | None = None
        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()

    def build(self) -> dict[str, Any]:
        state = self.state
        mesh = state.mesh
        snapshot = mesh.snapshot()
        return {
            "mesh": mesh_payload(snapshot, mesh.self_id, mesh.status(), state.proxy.queues.depths(),
                                 state.proxy.in_flight),
            "models": models_payload(state.models, snapshot, state.backend is not None),
            "traffic": None,  # built only when the traffic changed or a step went by (below)
        }

    def current(self) -> dict[str, tuple[bytes, bytes]]:
        """``event -> (fingerprint, JSON bytes)``."""
        now = self.clock()
        if self._built_at is not None and now - self._built_at < self.tick * 0.5:
            return self._current
        self._built_at = now
        fresh = self.build()
        traffic = self.state.traffic
        step_key = (traffic.version, int(traffic.clock()) // 10)
        if step_key != self._traffic_key or "traffic" not in self._current:
            self._traffic_key = step_key
            fresh["traffic"] = traffic.snapshot()
        else:
            del fresh["traffic"]
        for event, payload in fresh.items():
            self._current[event] = (fingerprint(event, payload), dumps(payload))
        return self._current

    def open_streams(self) -> int:
        return sum(1 for s in self._streams if not s.closed)

    def stream(self, hello: dict[str, Any], closing: trio.Event) -> EventStream | None:
        """A new event stream, or None when :attr:`max_streams` are open."""
        if self.open_streams() >= self.max_streams:
            return None
        out = EventStream(self, hello, closing)
        self._streams.add(out)
        return out


class EventStream:
    """One client's stream: an async iterator of SSE bytes that counts as open until closed.

    Counted by :class:`Feeds` through a weak reference, so a stream whose
    response was never sent (the client left first) stops counting once it
    is dropped, without relying on ``aclose`` being called.
    """

    def __init__(self, feeds: Feeds, hello: dict[str, Any], closing: trio.Event) -> None:
        self.feeds = feeds
        self.closing = closing
        self.closed = False
        self._gen = self._frames(hello)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> bytes:
        if self.closed:
            raise StopAsyncIteration
        try:
            return await self._gen.__anext__()
        except BaseException:
            self.closed = True
            raise

    async def aclose(self) -> None:
        self.closed = True
        await self._gen.aclose()

    async def _frames(self, hello: dict[str, Any]) -> AsyncIterator[bytes]:
        sent: dict[str, bytes] = {}
        clock = self.feeds.clock
        first = b"retry: %d\n\n" % RETRY_MS + frame("hello", hello)
        last_write = clock()
        pending = [first]
        while True:
            for event, (print_, data) in self.feeds.current().items():
                if sent.get(event) != print_:
                    sent[event] = print_
                    pending.append(frame(event, data))
            if not pending and clock() - last_write >= self.feeds.heartbeat:
                pending.append(b": keep-alive\n\n")
            if pending:
                yield b"".join(pending)
                pending = []
                last_write = clock()
            with trio.move_on_after(self.feeds.tick):
                await self.closing.wait()
            if self.closing.is_set():
                yield frame("bye", {"reason": "shutting down"})
                self.closed = True
                return

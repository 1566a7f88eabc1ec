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
seconds); a comment line keeps an idle stream from looking dead to proxies.
The stream ends with ``bye`` and a ``reason``: ``"shutting down"`` (the
client reconnects), :data:`REVOKED` (the client asks for a key again) or
another reason to reconnect (:data:`REAUTHENTICATE`, :data:`ROLE_CHANGED`);
or with ``error`` and a ``message`` when an update could not be built (the
client reconnects, backing off).

A stream serves nothing after its credential stops being valid: every tick
it asks its ``check`` (:func:`.panel_routes.credential_check`) before
sending anything, as every request does at the gate.

Streams are limited: :data:`MAX_STREAMS` in all and :data:`MAX_PER_CALLER`
for one caller (a key, a JWT subject, or on an open gateway a client
address). A stream whose last chunk the server has not been able to write
for ``send_timeout`` seconds (a client that stopped reading) no longer
counts and ends as soon as that write returns. The write itself cannot be
cut short from here: the server shields socket writes from cancellation.

Whether content *changed* is decided on a fingerprint that leaves out what
moves by itself (seconds since a heartbeat, uptime): otherwise every stream
would be re-sent the whole mesh every second. The client ages those values
itself from when the event arrived.

:class:`Feeds` builds each payload at most once per tick for every open
stream together, and counts the streams.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from .. import __version__
from ..mesh.peertable import Snapshot
from ..models import listing
from . import listings
from .errors import dumps

log = logging.getLogger(__name__)

RETRY_MS = 2000  # the client's first reconnection delay; it backs off from there
TICK = 1.0
HEARTBEAT = 15.0
MAX_STREAMS = 32
MAX_PER_CALLER = 4
REVOKED = "credential no longer valid"  # bye reasons
REAUTHENTICATE = "credential to be checked again"
ROLE_CHANGED = "role changed"
SHUTTING_DOWN = "shutting down"
JWT_STREAM_SECONDS = 300.0  # a stream opened with a JWT ends then (its expiry is not known): it reconnects
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


def models_payload(service: Any, snapshot: Snapshot, has_backend: bool) -> dict[str, Any]:
    """Every model in the mesh with its holders; what this node can do about them."""
    if service is not None:
        answer = service.mesh_models()
        models, store = answer["models"], answer.get("store")
    else:
        models, store = listing.sorted_rows(listing.holder_rows(snapshot)), None
    return {"models": models, "store": store, "can_replicate": getattr(service, "replicator", None) is not None,
            "can_delete": has_backend}


class FeedError(Exception):
    """An update could not be built; its text is what the client is shown."""


class Feeds:
    """The current payload of each event, built at most once per ``tick`` for all streams.

    ``send_timeout``: how long a chunk may wait to be written before its
    stream is given up (None: twice the ``heartbeat``); ``jwt_lifetime``: how
    long a stream opened with a JWT lasts.
    """

    EVENTS = ("mesh", "models", "traffic")

    def __init__(self, state: Any, *, clock: Callable[[], float] = trio.current_time, tick: float = TICK,
                 heartbeat: float = HEARTBEAT, max_streams: int = MAX_STREAMS, max_per_caller: int = MAX_PER_CALLER,
                 send_timeout: float | None = None, jwt_lifetime: float = JWT_STREAM_SECONDS) -> None:
        self.state = state
        self.clock = clock
        self.tick = tick
        self.heartbeat = heartbeat
        self.max_streams = max_streams
        self.max_per_caller = max_per_caller
        self._send_timeout = send_timeout
        self.jwt_lifetime = jwt_lifetime
        self._built_at: float | None = None
        self._current: dict[str, tuple[bytes, bytes]] = {}
        self._failure: str | None = None  # why the last build failed (logged once), until one succeeds
        self._traffic_key: tuple[int, int] | None = None
        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()

    @property
    def send_timeout(self) -> float:
        return self._send_timeout if self._send_timeout is not None else 2 * self.heartbeat

    @send_timeout.setter
    def send_timeout(self, value: float | None) -> None:
        self._send_timeout = value

    def build(self) -> dict[str, Callable[[], Any]]:
        """How to build each event's payload (called one by one, so a failure names its event)."""
        state = self.state
        mesh = state.mesh
        snapshot: list[Snapshot] = []

        def peers() -> Snapshot:
            if not snapshot:
                snapshot.append(mesh.snapshot())
            return snapshot[0]

        return {
            "mesh": lambda: mesh_payload(peers(), mesh.self_id, mesh.status(), state.proxy.queues.depths(),
                                         state.proxy.in_flight),
            "models": lambda: models_payload(state.models, peers(), state.backend is not None),
        }

    def current(self) -> dict[str, tuple[bytes, bytes]]:
        """``event -> (fingerprint, JSON bytes)``; raises :class:`FeedError` when one cannot be built."""
        now = self.clock()
        if self._built_at is not None and now - self._built_at < self.tick * 0.5:
            if self._failure is not None:
                raise FeedError(self._failure)
            return self._current
        self._built_at = now
        fresh: dict[str, tuple[bytes, bytes]] = {}
        event = "mesh"
        try:
            for event, make in self.build().items():
                payload = make()
                fresh[event] = (fingerprint(event, payload), dumps(payload))
            event = "traffic"
            traffic = self.state.traffic
            # The traffic changes only with a request or a new step: its fingerprint is that,
            # not the hash of its JSON (which is large at the bounds).
            step_key = (traffic.version, int(traffic.clock()) // 10)
            if step_key != self._traffic_key or "traffic" not in self._current:
                fresh["traffic"] = (b"%d:%d" % step_key, dumps(traffic.snapshot()))
                self._traffic_key = step_key
        except Exception:
            message = f"the node could not build the {event} update"
            if self._failure != message:  # once, not every tick while it keeps failing
                log.exception("panel event stream: building the %s update failed", event)
            self._failure = message
            raise FeedError(message) from None
        self._failure = None
        self._current.update(fresh)
        return self._current

    def open_streams(self, owner: str | None = None) -> int:
        """Streams that count: neither ended nor stuck writing (those are given up here)."""
        now = self.clock()
        count = 0
        for s in list(self._streams):
            if s.closed:
                continue
            if s.stalled(now, self.send_timeout):
                s.closed = True
                log.info("panel event stream given up: the client read nothing for %.0f s", self.send_timeout)
                continue
            if owner is None or s.owner == owner:
                count += 1
        return count

    def stream(self, hello: dict[str, Any], closing: trio.Event, *, owner: str = "",
               check: Callable[[], str | None] = lambda: None) -> EventStream | str:
        """A new event stream; or, when :attr:`max_streams` are open in all or
        :attr:`max_per_caller` for ``owner``, why not. ``check()`` is asked every
        tick: None while the stream may go on, else the reason it ends."""
        if self.open_streams() >= self.max_streams:
            return f"too many event streams open (at most {self.max_streams}); retry later"
        if self.open_streams(owner) >= self.max_per_caller:
            return f"too many event streams open for this caller (at most {self.max_per_caller}); retry later"
        out = EventStream(self, hello, closing, owner=owner, check=check)
        self._streams.add(out)
        return out


class EventStream:
    """One client's stream: an async iterator of SSE bytes that counts as open until closed.

    Counted by :class:`Feeds` through a weak reference, so a stream whose
    response was never sent (the client left first) stops counting once it
    is dropped, without relying on ``aclose`` being called.
    """

    def __init__(self, feeds: Feeds, hello: dict[str, Any], closing: trio.Event, *, owner: str = "",
                 check: Callable[[], str | None] = lambda: None) -> None:
        self.feeds = feeds
        self.closing = closing
        self.owner = owner
        self.check = check
        self.closed = False
        self._handed_at: float | None = None  # when the chunk being written was handed over
        self._gen = self._frames(hello)

    def stalled(self, now: float, limit: float) -> bool:
        """Its last chunk has been waiting to be written for more than ``limit`` seconds."""
        return self._handed_at is not None and now - self._handed_at > limit

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> bytes:
        # Asked for the next chunk: the server has written the last one.
        self._handed_at = None
        if self.closed:
            raise StopAsyncIteration
        try:
            chunk = await self._gen.__anext__()
        except BaseException:
            self.closed = True
            raise
        self._handed_at = self.feeds.clock()
        return chunk

    async def aclose(self) -> None:
        self.closed = True
        await self._gen.aclose()

    def _last_frame(self, sent: dict[str, bytes], pending: list[bytes]) -> bytes | None:
        """Adds what changed to ``pending``; or returns the frame that ends the stream."""
        try:
            reason = self.check()
            if reason is not None:
                return frame("bye", {"reason": reason})
            for event, (print_, data) in self.feeds.current().items():
                if sent.get(event) != print_:
                    sent[event] = print_
                    pending.append(frame(event, data))
        except FeedError as exc:  # logged by Feeds, once for every stream
            return frame("error", {"message": str(exc)})
        except Exception:
            log.exception("panel event stream failed")
            return frame("error", {"message": "the event stream failed"})
        return None

    async def _frames(self, hello: dict[str, Any]) -> AsyncIterator[bytes]:
        sent: dict[str, bytes] = {}
        clock = self.feeds.clock
        first = b"retry: %d\n\n" % RETRY_MS + frame("hello", hello)
        last_write = clock()
        pending = [first]
        while True:
            last = self._last_frame(sent, pending)
            if last is not None:  # the end: a bye, or an error
                yield b"".join(pending) + last
                self.closed = True
                return
            if not pending and clock() - last_write >= self.feeds.heartbeat:
                pending.append(b": keep-alive\n\n")
            if pending:
                yield b"".join(pending)
                pending = []
                last_write = clock()
            with trio.move_on_after(self.feeds.tick):
                await self.closing.wait()
            if self.closing.is_set():
                yield frame("bye", {"reason": SHUTTING_DOWN})
                self.closed = True
                return

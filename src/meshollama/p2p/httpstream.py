"""HTTP requests over libp2p streams, one at a time per stream, streams kept alive.

Exchange (frames from ``wire.frames``): the client sends ``Request``,
``Data``*, ``End``; the server answers ``Response``, ``Data``*, ``End``, or an
``Error`` at any point (before ``Response``: "could not serve, try someone
else"; after it: "broken mid-stream").

Keep-alive: after a complete answer (``End``) both sides keep the stream and
the client may send its next request on it, like HTTP/1.1 keep-alive. Opening
a stream costs a Yamux SYN/ACK, four multistream-select messages and two FINs,
each a Noise-encrypted frame: reusing idle streams (:class:`StreamPool`) halves
the frames per request and most of the CPU of the libp2p leg (numbers in
docs/benchmarks.md). A stream that ended any other way (error, reset, caller
gone) is never reused. The server closes a stream idle for ``idle_timeout``;
the client retires idle streams well before that, and a reused stream that
fails before the answer's head is retried once on a fresh stream.

The client never half-closes its side: while it answers, the server keeps a
read pending on the stream (its frame pump), so a reset (the HTTP caller went
away) is noticed at once and the backend request is aborted even while the
model is still loading and no token has been written yet.

A frozen peer never resets anything, so reads on the client side have no
deadline of their own; instead the mesh cancels every stream to a peer the
moment its liveness check fails (:class:`PeerScopes`).

This module is the client (:class:`PeerUpstream` over a :class:`StreamPool`);
the server, and what it lets a peer do, is ``p2p.httpserver``.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from ..errors import FrameError, P2PError, UpstreamBroken, UpstreamBusy, UpstreamUnavailable
from ..httpmsg import ProxyRequest, ProxyResponse, Upstream, peer_safe
from ..wire import frames
from .httpserver import HttpStreamServer, WRITE_SLICE, _read_ahead, _write  # noqa: F401 - it lived here
from .stream import Stream

log = logging.getLogger("meshollama.p2p")

PROTOCOL = "/meshollama/http/1.1.0"
READ_SIZE = 64 * 1024
CLIENT_IDLE_TTL = 15.0  # well under the server's idle timeout, so we never race its close
MAX_IDLE_PER_PEER = 16

OpenStream = Callable[..., Awaitable[Stream]]  # (peer_id, protocol, *, timeout=None)


class Guard:
    """Cancels whatever wait is current, now or later, once the peer is down.

    (A trio CancelScope can be entered only once, and a response body waits
    many times, so each wait gets a fresh scope from here.)"""

    def __init__(self) -> None:
        self.down = False
        self._current: trio.CancelScope | None = None

    def scope(self) -> trio.CancelScope:
        self._current = trio.CancelScope()
        if self.down:
            self._current.cancel()
        return self._current

    def cancel(self) -> None:
        self.down = True
        if self._current is not None:
            self._current.cancel()


class PeerScopes:
    """Guards of in-flight client streams, by peer, so a peer marked down
    (liveness failed, connection closed) releases its callers at once."""

    def __init__(self) -> None:
        self._scopes: dict[str, set[Guard]] = defaultdict(set)
        # Peers that had a stream of ours since the last ``take_used`` (liveness reads
        # it once a round: a request shorter than a round still counts as use).
        self._used: set[str] = set()

    def register(self, peer_id: str, scope: Guard) -> None:
        self._scopes[peer_id].add(scope)
        self._used.add(peer_id)

    def take_used(self) -> set[str]:
        """Peers with a stream registered since the last call, and those with one now."""
        used, self._used = self._used | set(self._scopes), set()
        return used

    def discard(self, peer_id: str, scope: Guard) -> None:
        scopes = self._scopes.get(peer_id)
        if scopes is not None:
            scopes.discard(scope)
            if not scopes:
                del self._scopes[peer_id]

    def cancel_peer(self, peer_id: str) -> int:
        scopes = self._scopes.pop(peer_id, set())
        for scope in scopes:
            scope.cancel()
        return len(scopes)

    def count(self, peer_id: str) -> int:
        return len(self._scopes.get(peer_id, ()))

    def active(self) -> list[str]:
        """Peers with a stream of ours in flight now."""
        return list(self._scopes)


class _FrameReader:
    """Reads whole frames off a stream."""

    def __init__(self, stream: Stream, max_payload: int = frames.MAX_PAYLOAD) -> None:
        self._stream = stream
        self._decoder = frames.FrameDecoder(max_payload)
        self._ready: deque = deque()

    @property
    def idle(self) -> bool:
        """No frame or partial frame is waiting: safe to hand the stream on."""
        return not self._ready and not self._decoder.pending

    async def next(self, *, timeout: float | None = None):
        """Next frame, or ``None`` at end of stream."""
        while not self._ready:
            data = await self._stream.read(READ_SIZE, timeout=timeout)
            if not data:
                if self._decoder.pending:
                    raise FrameError("stream ended inside a frame")
                return None
            self._ready.extend(self._decoder.feed(data))
        return self._ready.popleft()

    def ready_data(self) -> bytes:
        """Body bytes of the Data frames already decoded, taken without waiting."""
        parts = []
        while self._ready and isinstance(self._ready[0], frames.Data):
            parts.append(self._ready.popleft().data)
        return b"".join(parts)


class StreamPool:
    """Idle keep-alive streams, by peer (last in, first out; each retired after ``idle_ttl``)."""

    def __init__(
        self,
        open_stream: OpenStream,
        *,
        protocol: str = PROTOCOL,
        max_idle_per_peer: int = MAX_IDLE_PER_PEER,
        idle_ttl: float = CLIENT_IDLE_TTL,
        connect_timeout: float | None = None,
        on_acquire: Callable[[bool], None] | None = None,
    ) -> None:
        self._open_stream = open_stream
        self._connect_timeout = connect_timeout
        self._on_acquire = on_acquire or (lambda reused: None)
        self._protocol = protocol
        self._max_idle = max_idle_per_peer
        self._ttl = idle_ttl
        self._idle: dict[str, list[tuple[float, Stream, _FrameReader]]] = {}
        self.opened = 0
        self.reused = 0

    async def acquire(self, peer_id: str, *, fresh: bool = False) -> tuple[Stream, _FrameReader, bool]:
        """A stream to ``peer_id``: ``(stream, reader, reused)``."""
        if not fresh:
            idle = self._idle.get(peer_id)
            now = trio.current_time()
            while idle:
                since, stream, reader = idle.pop()
                if now - since < self._ttl:
                    self.reused += 1
                    self._on_acquire(True)
                    return stream, reader, True
                await stream.close()  # too old: the server may be closing it
        stream = await self._open_stream(peer_id, self._protocol, timeout=self._connect_timeout)
        self.opened += 1
        self._on_acquire(False)
        return stream, _FrameReader(stream), False

    async def release(self, stream: Stream, reader: _FrameReader) -> None:
        """Give back a stream whose exchange ended cleanly."""
        idle = self._idle.setdefault(stream.peer_id, [])
        if reader.idle and len(idle) < self._max_idle:
            idle.append((trio.current_time(), stream, reader))
        else:
            await stream.close()

    def forget(self, peer_id: str | None = None) -> list[Stream]:
        """Drop idle streams to one peer (or all): its connection is gone or going.

        Returns them: the caller must reset them if the connection may still be
        up (a liveness blip), or each keeps one of Yamux's 256 stream slots on
        the connection and a handler on the peer until its idle timeout."""
        if peer_id is None:
            dropped = [s for idle in self._idle.values() for _, s, _ in idle]
            self._idle.clear()
        else:
            dropped = [s for _, s, _ in self._idle.pop(peer_id, [])]
        return dropped

    def idle_count(self, peer_id: str) -> int:
        return len(self._idle.get(peer_id, ()))


# --- client ------------------------------------------------------------------


class PeerUpstream(Upstream):
    """A remote peer as an Upstream: ``open(request)`` runs it over a pooled stream."""

    def __init__(
        self,
        pool: StreamPool,
        peer_id: str,
        scopes: PeerScopes,
        *,
        first_byte_timeout: float = math.inf,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self._pool = pool
        self.peer_id = peer_id
        self._scopes = scopes
        self._first_byte_timeout = first_byte_timeout
        self._on_error = on_error or (lambda kind: None)

    async def _send(self, request: ProxyRequest, guard: Guard):
        """Send ``request``; returns ``(stream, reader, head)``.

        A reused stream that fails before any answer most likely went stale
        (the server retired it): that one failure is retried on a new stream.
        """
        # Never a credential or one of our own headers (``peer_safe``); the body's
        # length, so a peer whose limit is lower refuses at the head.
        length = (("content-length", str(len(request.body))),) if request.body else ()
        wire = (
            frames.encode(frames.Request(request.method, request.path, peer_safe(request.headers) + length))
            + (frames.encode_data(request.body) if request.body else b"")
            + frames.encode(frames.End())
        )
        fresh = False
        while True:
            stream = reader = head = None
            reused = False
            try:
                with guard.scope():
                    stream, reader, reused = await self._pool.acquire(self.peer_id, fresh=fresh)
                    await stream.write(wire)
                    head = await reader.next(timeout=self._first_byte_timeout)
            except (P2PError, FrameError) as exc:
                if stream is not None:
                    await stream.reset()
                if reused and not guard.down:
                    fresh = True
                    continue
                # Before any response byte: safe for the gateway to retry elsewhere.
                self._on_error(type(exc).__name__)
                raise UpstreamUnavailable(f"peer {self.peer_id}: {exc}") from exc
            except BaseException:
                if stream is not None:
                    await stream.reset()
                raise
            if guard.down:
                if stream is not None:
                    await stream.reset()
                raise UpstreamUnavailable(f"peer {self.peer_id} went down")
            if head is None and reused:
                await stream.close()
                fresh = True
                continue
            return stream, reader, head

    @asynccontextmanager
    async def open(self, request: ProxyRequest) -> AsyncIterator[ProxyResponse]:
        guard = Guard()
        self._scopes.register(self.peer_id, guard)
        stream: Stream | None = None
        finished = False
        try:
            stream, reader, head = await self._send(request, guard)
            if head is None:
                raise UpstreamUnavailable(f"peer {self.peer_id} closed the stream without answering")
            if isinstance(head, frames.Error):
                if head.code == "busy":
                    raise UpstreamBusy(f"peer {self.peer_id} is busy: {head.message}")
                raise UpstreamUnavailable(f"peer {self.peer_id}: {head.message}")
            if not isinstance(head, frames.Response):
                self._on_error("FrameError")
                raise UpstreamUnavailable(f"peer {self.peer_id} sent {type(head).__name__} before Response")

            async def body() -> AsyncIterator[bytes]:
                nonlocal finished
                while True:
                    frame = await self._next_or_broken(reader, guard)
                    if isinstance(frame, frames.Data):
                        # Frames that came in the same read go to the caller as one chunk.
                        yield frame.data + reader.ready_data()
                    elif isinstance(frame, frames.End):
                        finished = True
                        return
                    elif isinstance(frame, frames.Error):
                        raise UpstreamBroken(frame.message)
                    else:
                        raise UpstreamBroken(f"peer {self.peer_id} sent an unexpected {type(frame).__name__}")

            yield ProxyResponse(head.status, head.headers, body())
        finally:
            self._scopes.discard(self.peer_id, guard)
            if stream is not None:
                if finished and not guard.down:
                    await self._pool.release(stream, reader)
                else:  # caller left early or something broke: stop the remote work now
                    await stream.reset()

    async def _next_or_broken(self, reader: "_FrameReader", guard: Guard):
        """Next body frame; any failure after the head is ``UpstreamBroken``."""
        try:
            with guard.scope():
                frame = await reader.next(timeout=math.inf)
        except (P2PError, FrameError) as exc:
            self._on_error(type(exc).__name__)
            raise UpstreamBroken(f"peer {self.peer_id}: {exc}") from exc
        if guard.down:
            raise UpstreamBroken(f"peer {self.peer_id} went down mid-stream")
        if frame is None:
            raise UpstreamBroken(f"peer {self.peer_id} closed the stream mid-answer")
        return frame

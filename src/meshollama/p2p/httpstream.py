"""One HTTP request per libp2p stream: the client (an Upstream) and the server.

Exchange (frames from ``wire.frames``): the client sends ``Request``,
``Data``*, ``End``; the server answers ``Response``, ``Data``*, ``End``, or an
``Error`` at any point (before ``Response``: "could not serve, try someone
else"; after it: "broken mid-stream").

The client never half-closes its side after ``End``: the server keeps a read
pending on the stream for the whole answer, so a reset (the HTTP caller went
away) is noticed at once and the backend request is aborted even while the
model is still loading and no token has been written yet.

A frozen peer never resets anything, so reads on the client side have no
deadline of their own; instead the mesh cancels every stream to a peer the
moment its liveness check fails (:class:`PeerScopes`).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from ..errors import (
    FrameError,
    P2PError,
    UpstreamBroken,
    UpstreamBusy,
    UpstreamError,
    UpstreamUnavailable,
)
from ..httpmsg import ProxyRequest, ProxyResponse, Upstream, forwardable
from ..limits import InboundLimiter
from ..wire import frames
from .stream import Stream

log = logging.getLogger("meshollama.p2p")

PROTOCOL = "/meshollama/http/1.0.0"
READ_SIZE = 64 * 1024


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

    def register(self, peer_id: str, scope: Guard) -> None:
        self._scopes[peer_id].add(scope)

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


class _FrameReader:
    """Reads whole frames off a stream."""

    def __init__(self, stream: Stream, max_payload: int = frames.MAX_PAYLOAD) -> None:
        self._stream = stream
        self._decoder = frames.FrameDecoder(max_payload)
        self._ready: list = []

    async def next(self, *, timeout: float | None = None):
        """Next frame, or ``None`` at end of stream."""
        while not self._ready:
            data = await self._stream.read(READ_SIZE, timeout=timeout)
            if not data:
                if self._decoder.pending:
                    raise FrameError("stream ended inside a frame")
                return None
            self._ready.extend(self._decoder.feed(data))
        return self._ready.pop(0)


# --- client ------------------------------------------------------------------


class PeerUpstream(Upstream):
    """A remote peer as an Upstream: ``open(request)`` runs it over a new stream."""

    def __init__(
        self,
        open_stream: Callable[[str, str], "trio.abc.Awaitable[Stream]"],
        peer_id: str,
        scopes: PeerScopes,
        *,
        first_byte_timeout: float = math.inf,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self._open_stream = open_stream
        self.peer_id = peer_id
        self._scopes = scopes
        self._first_byte_timeout = first_byte_timeout
        self._on_error = on_error or (lambda kind: None)

    @asynccontextmanager
    async def open(self, request: ProxyRequest) -> AsyncIterator[ProxyResponse]:
        guard = Guard()
        self._scopes.register(self.peer_id, guard)
        stream: Stream | None = None
        finished = False
        try:
            try:
                with guard.scope():
                    stream = await self._open_stream(self.peer_id, PROTOCOL)
                    await stream.write(
                        frames.encode(frames.Request(request.method, request.path, forwardable(request.headers)))
                        + (frames.encode_data(request.body) if request.body else b"")
                        + frames.encode(frames.End())
                    )
                    reader = _FrameReader(stream)
                    head = await reader.next(timeout=self._first_byte_timeout)
            except (P2PError, FrameError) as exc:
                # Before any response byte: safe for the gateway to retry elsewhere.
                self._on_error(type(exc).__name__)
                raise UpstreamUnavailable(f"peer {self.peer_id}: {exc}") from exc
            if guard.down:
                raise UpstreamUnavailable(f"peer {self.peer_id} went down")
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
                        yield frame.data
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
                if finished:
                    await stream.close()
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


# --- server ------------------------------------------------------------------


class HttpStreamServer:
    """Answers inbound HTTP-over-libp2p streams from this node's backend."""

    def __init__(
        self,
        backend: Upstream,
        limiter: InboundLimiter,
        *,
        max_body_bytes: int,
        on_reject: Callable[[str], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self._backend = backend
        self._limiter = limiter
        self._max_body = max_body_bytes
        self._on_reject = on_reject or (lambda reason: None)
        self._on_error = on_error or (lambda kind: None)

    async def handle(self, stream: Stream) -> None:
        peer = stream.peer_id
        if not self._limiter.try_acquire(peer):
            self._on_reject("busy")
            await self._send_error(stream, "busy", "peer is at its inbound stream limit", 503)
            return
        try:
            await self._serve(stream)
        finally:
            self._limiter.release(peer)

    async def _serve(self, stream: Stream) -> None:
        reader = _FrameReader(stream)
        try:
            request = await self._read_request(reader)
        except (FrameError, P2PError) as exc:
            self._on_error(type(exc).__name__)
            log.info("bad request stream from %s: %s", stream.peer_id, exc)
            await self._send_error(stream, "bad_request", str(exc), 400)
            return
        if request is None:
            await stream.reset()
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_caller, stream, nursery.cancel_scope)
            await self._answer(stream, request)
            nursery.cancel_scope.cancel()

    async def _watch_caller(self, stream: Stream, scope: trio.CancelScope) -> None:
        """The caller sends nothing after End: any read result means it left."""
        try:
            await stream.read(1, timeout=math.inf)
        except P2PError:
            pass
        scope.cancel()

    async def _read_request(self, reader: _FrameReader) -> ProxyRequest | None:
        head = await reader.next()
        if head is None:
            return None
        if not isinstance(head, frames.Request):
            raise FrameError(f"expected Request, got {type(head).__name__}")
        body = bytearray()
        while True:
            frame = await reader.next()
            if frame is None:
                raise FrameError("stream ended before End")
            if isinstance(frame, frames.End):
                break
            if not isinstance(frame, frames.Data):
                raise FrameError(f"expected Data or End, got {type(frame).__name__}")
            body += frame.data
            if len(body) > self._max_body:
                raise FrameError(f"request body over {self._max_body} bytes")
        return ProxyRequest(head.method, head.path, head.headers, bytes(body))

    async def _answer(self, stream: Stream, request: ProxyRequest) -> None:
        started = False
        try:
            async with self._backend.open(request) as resp:
                await stream.write(frames.encode(frames.Response(resp.status, forwardable(resp.headers))))
                started = True
                async for chunk in resp.body:
                    await stream.write(frames.encode_data(chunk))
            await stream.write(frames.encode(frames.End()))
            await stream.close()
        except UpstreamError as exc:
            code = "busy" if isinstance(exc, UpstreamBusy) else "unavailable"
            status = 503 if code == "busy" else 502
            await self._send_error(stream, code if not started else "internal", str(exc), status)
        except P2PError as exc:  # the caller went away or the link broke: nothing to tell
            self._on_error(type(exc).__name__)
            await stream.reset()
        except Exception as exc:
            log.exception("backend failed answering %s %s", request.method, request.path)
            await self._send_error(stream, "internal", f"internal error: {type(exc).__name__}", 500)

    @staticmethod
    async def _send_error(stream: Stream, code: str, message: str, status: int) -> None:
        try:
            await stream.write(frames.encode(frames.Error(code, message, status)))
            await stream.close()
        except P2PError:
            await stream.reset()

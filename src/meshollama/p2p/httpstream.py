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
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
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
from ..httpmsg import ProxyRequest, ProxyResponse, Upstream, content_length, forwardable
from ..limits import InboundLimiter
from ..wire import frames
from .stream import Stream

log = logging.getLogger("meshollama.p2p")

PROTOCOL = "/meshollama/http/1.1.0"
READ_SIZE = 64 * 1024
WRITE_SLICE = 64 * 1024  # one stream.write, each within stream_timeout even on a slow link
MAX_PIECE = 256 * 1024  # the most body the read-ahead joins into one piece
SERVER_IDLE_TIMEOUT = 30.0
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
        wire = (
            frames.encode(frames.Request(request.method, request.path, forwardable(request.headers)))
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


# --- server ------------------------------------------------------------------


async def _write(stream: Stream, data: bytes) -> None:
    """Write in slices, so each write's deadline holds even for a big answer on a slow link."""
    for i in range(0, len(data), WRITE_SLICE):
        await stream.write(data[i : i + WRITE_SLICE])


class _Failed:
    """The body iterator raised: hand the exception to the consumer."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


@asynccontextmanager
async def _read_ahead(body: AsyncIterator[bytes], depth: int = 64) -> AsyncIterator[AsyncIterator[bytes]]:
    """Iterate ``body`` in its own task while the consumer writes.

    Yields an iterator of ``(piece, last)``: whatever arrived while the
    consumer was busy writing comes joined into one piece, so a backend that
    produces tokens faster than the link takes them costs one frame per write
    instead of one per token; ``last`` says the body has already ended (a
    short answer then goes out as one write). It adds no delay: a piece goes
    as soon as the writer is free. Exceptions from ``body`` come out of the
    iterator, in order.
    """
    send, recv = trio.open_memory_channel(depth)

    async def produce() -> None:
        async with send:
            try:
                async for chunk in body:
                    if chunk:
                        await send.send(chunk)
            except Exception as exc:
                await send.send(_Failed(exc))

    async def pieces() -> AsyncIterator[tuple[bytes, bool]]:
        failed: _Failed | None = None
        async for item in recv:
            if isinstance(item, _Failed):
                raise item.exc
            parts = [item]
            size = len(item)
            last = False
            while size < MAX_PIECE:
                try:
                    more = recv.receive_nowait()
                except trio.WouldBlock:
                    break
                except trio.EndOfChannel:
                    last = True  # the body already ended: the caller can finish in the same write
                    break
                if isinstance(more, _Failed):
                    failed = more
                    break
                parts.append(more)
                size += len(more)
            yield (parts[0] if len(parts) == 1 else b"".join(parts)), last
            if failed is not None:
                raise failed.exc
            if last:
                return

    pending: Exception | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        try:
            yield pieces()
        except Exception as exc:  # re-raised below, not wrapped in the nursery's ExceptionGroup
            pending = exc
        finally:
            nursery.cancel_scope.cancel()
    if pending is not None:
        raise pending


class _Refused(Exception):
    """A peer asked for something this node does not serve to peers."""


class _Gone(Exception):
    """The caller reset or closed the stream."""


class _Answering:
    """The cancel scope of the answer in progress on one stream, if any: the
    frame pump cancels it when the caller leaves."""

    scope: trio.CancelScope | None = None


class HttpStreamServer:
    """Answers inbound HTTP-over-libp2p streams from this node's backend.

    Per stream, a pump task reads frames as they come and hands them to the
    request loop. It keeps reading while a request is answered, so the
    caller resetting the stream cancels the backend request at once, and no
    read is ever cancelled with bytes in flight (py-libp2p's Yamux read is
    not cancel-safe once it has taken bytes from its buffer).
    """

    def __init__(
        self,
        backend: Upstream,
        limiter: InboundLimiter,
        *,
        max_body_bytes: int,
        idle_timeout: float = SERVER_IDLE_TIMEOUT,
        on_reject: Callable[[str], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        allow: Callable[[str, str], bool] | None = None,
    ) -> None:
        self._backend = backend
        # (method, path) -> whether a peer may ask it; None allows all (tests).
        self._allow = allow
        self._limiter = limiter
        self._streams = InboundLimiter(2 * limiter.total, 2 * limiter.per_peer)
        self._max_body = max_body_bytes
        self._idle_timeout = idle_timeout
        self._on_reject = on_reject or (lambda reason: None)
        self._on_error = on_error or (lambda kind: None)

    async def handle(self, stream: Stream) -> None:
        # Open streams (idle keep-alive ones included) are bounded too, at twice
        # the request limits: a peer cannot park unbounded idle streams here.
        if not self._streams.try_acquire(stream.peer_id):
            self._on_reject("streams")
            await self._send_error(stream, "busy", "peer has too many open streams", 503)
            return
        try:
            await self._handle(stream)
        finally:
            self._streams.release(stream.peer_id)

    async def _handle(self, stream: Stream) -> None:
        send, inbox = trio.open_memory_channel(8)
        answer = _Answering()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, stream, send, answer)
            try:
                await self._loop(stream, inbox, answer)
            finally:
                nursery.cancel_scope.cancel()

    @staticmethod
    async def _pump(stream: Stream, send: trio.MemorySendChannel, answer: _Answering) -> None:
        """Frames into ``send`` until the stream ends; then the reason (``_Gone``,
        ``P2PError`` or ``FrameError``). A caller that leaves cancels the answer."""
        reader = _FrameReader(stream)
        async with send:
            while True:
                try:
                    item = await reader.next(timeout=math.inf)
                except (P2PError, FrameError) as exc:
                    item = exc
                if item is None or isinstance(item, P2PError):
                    item = item or _Gone()
                    if answer.scope is not None:
                        answer.scope.cancel()
                await send.send(item)
                if isinstance(item, Exception):
                    return

    async def _loop(self, stream: Stream, inbox: trio.MemoryReceiveChannel, answer: _Answering) -> None:
        while True:
            try:
                request = await self._read_request(inbox, stream.timeout)
            except (_Gone, trio.EndOfChannel):
                await stream.close()
                return
            except P2PError as exc:
                self._on_error(type(exc).__name__)
                await stream.reset()
                return
            except _Refused as exc:  # before its body is read
                self._on_reject("refused")
                log.warning("refused a request from peer %s: %s", stream.peer_id, exc)
                await self._send_error(stream, "bad_request", str(exc), 403)
                return
            except FrameError as exc:
                self._on_error(type(exc).__name__)
                log.info("bad request stream from %s: %s", stream.peer_id, exc)
                await self._send_error(stream, "bad_request", str(exc), 400)
                return
            if request is None:  # idle for too long: the client retires it before this
                await stream.close()
                return
            if not self._limiter.try_acquire(stream.peer_id):
                self._on_reject("busy")
                await self._send_error(stream, "busy", "peer is at its inbound stream limit", 503)
                return
            try:
                with trio.CancelScope() as scope:
                    answer.scope = scope
                    reusable = await self._answer(stream, request)
            finally:
                answer.scope = None
                self._limiter.release(stream.peer_id)
            if scope.cancelled_caught:  # the caller went away mid-answer
                await stream.reset()
                return
            if not reusable:
                return

    @staticmethod
    async def _receive(inbox: trio.MemoryReceiveChannel, timeout: float):
        """Next item, or ``None`` after ``timeout``; a stream-ending reason is raised."""
        with trio.move_on_after(timeout):
            item = await inbox.receive()
            if isinstance(item, Exception):
                raise item
            return item
        return None

    async def _read_request(self, inbox: trio.MemoryReceiveChannel, timeout: float) -> ProxyRequest | None:
        """The next request, or ``None`` if none started within the idle timeout."""
        head = await self._receive(inbox, self._idle_timeout)
        if head is None:
            return None
        if not isinstance(head, frames.Request):
            raise FrameError(f"expected Request, got {type(head).__name__}")
        if self._allow is not None and not self._allow(head.method, head.path):
            raise _Refused(f"{head.method} {head.path.split('?', 1)[0]} is not served to peers")
        body = bytearray()
        while True:
            frame = await self._receive(inbox, timeout)
            if frame is None:
                raise P2PError(f"request body not finished within {timeout:.1f}s")
            if isinstance(frame, frames.End):
                break
            if not isinstance(frame, frames.Data):
                raise FrameError(f"expected Data or End, got {type(frame).__name__}")
            body += frame.data
            if len(body) > self._max_body:
                raise FrameError(f"request body over {self._max_body} bytes")
        return ProxyRequest(head.method, head.path, head.headers, bytes(body))

    async def _answer(self, stream: Stream, request: ProxyRequest) -> bool:
        """Answer one request; True when the stream is fit for the next one."""
        started = ended = False
        try:
            async with self._backend.open(request) as resp, _read_ahead(resp.body) as pieces:
                head = frames.encode(frames.Response(resp.status, forwardable(resp.headers) + content_length(resp.headers)))
                # The head goes out with the first piece of body: one frame fewer per
                # answer, and a backend failing before its first byte is still an
                # "unavailable" the caller may retry elsewhere.
                async for piece, last in pieces:
                    end = frames.encode(frames.End()) if last else b""
                    await _write(stream, head + frames.encode_data(piece) + end)
                    head = b""
                    started, ended = True, last
                if not ended:
                    await stream.write(head + frames.encode(frames.End()))
                    ended = True
            return True
        except UpstreamError as exc:
            if ended:
                return await self._failed_after_end(stream, request, exc)
            code = "busy" if isinstance(exc, UpstreamBusy) else "unavailable"
            status = 503 if code == "busy" else 502
            await self._send_error(stream, code if not started else "internal", str(exc), status)
        except P2PError as exc:  # the caller went away or the link broke: nothing to tell
            self._on_error(type(exc).__name__)
            await stream.reset()
        except Exception as exc:
            if ended:
                return await self._failed_after_end(stream, request, exc)
            log.exception("backend failed answering %s %s", request.method, request.path)
            await self._send_error(stream, "internal", f"internal error: {type(exc).__name__}", 500)
        return False

    @staticmethod
    async def _failed_after_end(stream: Stream, request: ProxyRequest, exc: BaseException) -> bool:
        """The answer was complete (End sent, the caller may have pooled the
        stream) when the backend's cleanup failed: an Error frame now would be
        read as the answer to the caller's next request. Reset instead; the
        caller retries a reset pooled stream on a fresh one."""
        log.warning("backend failed after answering %s %s: %r", request.method, request.path, exc)
        await stream.reset()
        return False

    @staticmethod
    async def _send_error(stream: Stream, code: str, message: str, status: int) -> None:
        try:
            await stream.write(frames.encode(frames.Error(code, message, status)))
            await stream.close()
        except P2PError:
            await stream.reset()

"""The serving side of HTTP over libp2p streams: what a peer can make this node do.

Everything here faces strangers (anyone who reaches the libp2p port, or any
member of a PSK mesh), so a request is admitted in steps, and each refusal
is an ``Error`` frame then a stream reset; nothing more of the request is
kept (the exchange itself is described in ``p2p.httpstream``):

1. **Streams**: open streams per peer and in total, idle keep-alive ones
   included, at most twice the request limits ("busy", 503).
2. **Head**: what peers may ask (``allow(peer_id, method, path)``, 403); a
   declared ``Content-Length`` over ``max_request_bytes`` (413); then a
   request slot from the :class:`~meshollama.limits.InboundLimiter` (503).
   The slot is taken before any body is read, so a peer cannot park bodies
   (or half-sent ones) beside the slots it was given.
3. **Body**, as it arrives: past ``max_request_bytes`` (413), or not fitting
   the :class:`~meshollama.limits.ByteBudget` all streams share (503).
4. **Time**: head and body complete within ``request_timeout`` of the head
   (408). A per-read timeout would let a peer trickle a byte just before
   each one ran out and hold its slot and its bytes for ever.

The request then reaches the backend with :func:`~meshollama.httpmsg.peer_safe`
headers: whatever a peer sends, no credential and no ``x-meshollama-*``
header gets through.

**Memory bound.** What the frame pump takes off a stream is reserved in the
byte budget before it is kept (:class:`~.intake.Intake`): heads, bodies as
they arrive (a Data frame's payload is passed on piece by piece, never held
as a partial frame), whole bodies waiting for or being answered, frames read
ahead. It is given back when the request is answered or its stream ends:
``max_buffered_bytes`` in all, whatever peers send. Outside the budget: per
open stream, the read in hand (``READ_SIZE``) and py-libp2p's Yamux receive
buffer (up to the stream's window: 256 KiB, grown by auto-tuning up to 16 MiB
only on a stream we read fast, which keeps it nearly empty); for an instant
per completed request, the copy that joins its body (``max_request_bytes``).
So about::

    max_buffered_bytes + max_request_bytes + open streams x (64 KiB + window)

with at most ``2 x p2p.max_inbound_streams`` open streams. Measured on a node
process with a 64 MiB budget (``tests/p2p/test_peer_limits.py``): 128
streams pushing 32 MiB bodies at once, then a trickled one, grow its RSS by
75-77 MiB (the budget, and about 12 MiB of buffers, reads in flight and the
allocator's slack); the flood is refused within 2 s.

Exceptions that end a stream are passed on without their tracebacks
(:func:`_detached`): a traceback's frames hold the stream's buffers, and a
reference cycle through them kept refused streams' bytes alive until the
cyclic GC ran, 100 MiB more than the budget under that flood.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from ..errors import FrameError, P2PError, UpstreamBusy, UpstreamError
from ..httpmsg import ProxyRequest, Upstream, content_length, forwardable, peer_safe
from ..limits import ByteBudget, InboundLimiter, Reservation
from ..wire import frames
from .intake import Gone, Intake, Refusal, declared_length, head_size
from .stream import Stream

log = logging.getLogger("meshollama.p2p")

READ_SIZE = 64 * 1024
WRITE_SLICE = 64 * 1024  # one stream.write, each within stream_timeout even on a slow link
MAX_PIECE = 256 * 1024  # the most body the read-ahead joins into one piece
SERVER_IDLE_TIMEOUT = 30.0
REQUEST_TIMEOUT = 60.0
MAX_BUFFERED_BYTES = 256 * 1024 * 1024
# After an Error frame, how long (and how many bytes, dropped) we wait for the
# peer to reset before we do: long enough for it to read the Error first.
REFUSAL_GRACE = 0.25
REFUSAL_DRAIN = 256 * 1024  # Yamux's initial window: what a peer has in flight anyway

# (peer_id, method, path) -> whether that peer may ask it.
Allow = Callable[[str, str, str], bool]


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


def _detached(exc: BaseException) -> BaseException:
    """``exc`` without its traceback and context, to keep or pass on: its
    frames hold the stream's buffers, and an exception kept in one of them
    makes a cycle that outlives the stream (see the module docstring)."""
    exc.__context__ = exc.__cause__ = None
    return exc.with_traceback(None)


class _Answering:
    """The cancel scope of the answer in progress on one stream, if any: the
    frame pump cancels it when the caller leaves."""

    scope: trio.CancelScope | None = None


class HttpStreamServer:
    """Answers inbound HTTP-over-libp2p streams from this node's backend.

    Per stream, a pump task reads frames as they come, reserves what it
    keeps in the byte budget, and hands the frames to the request loop. It
    keeps reading while a request is answered, so the caller resetting the
    stream cancels the backend request at once, and no read is ever
    cancelled with bytes in flight (py-libp2p's Yamux read is not
    cancel-safe once it has taken bytes from its buffer), except when the
    stream is being reset anyway.

    ``budget`` is the byte budget (``max_buffered_bytes``): exposed so that
    tests and metrics can read ``in_use`` and ``peak``.
    """

    def __init__(
        self,
        backend: Upstream,
        limiter: InboundLimiter,
        *,
        max_request_bytes: int,
        max_buffered_bytes: int = MAX_BUFFERED_BYTES,
        request_timeout: float = REQUEST_TIMEOUT,
        idle_timeout: float = SERVER_IDLE_TIMEOUT,
        on_reject: Callable[[str], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        allow: Allow | None = None,
    ) -> None:
        if not 1 <= max_request_bytes <= max_buffered_bytes or not request_timeout > 0:
            raise ValueError("need 1 <= max_request_bytes <= max_buffered_bytes and request_timeout > 0")
        self._backend = backend
        self._allow = allow  # None allows all (tests)
        self._limiter = limiter
        self._streams = InboundLimiter(2 * limiter.total, 2 * limiter.per_peer)
        self._max_request = max_request_bytes
        self.budget = ByteBudget(max_buffered_bytes)
        self._request_timeout = request_timeout
        self._idle_timeout = idle_timeout
        self._on_reject = on_reject or (lambda reason: None)
        self._on_error = on_error or (lambda kind: None)

    async def handle(self, stream: Stream) -> None:
        # Open streams (idle keep-alive ones included) are bounded too, at twice
        # the request limits: a peer cannot park unbounded idle streams here.
        if not self._streams.try_acquire(stream.peer_id):
            await self._refuse(stream, Refusal("busy", 503, "streams", "peer has too many open streams"))
            return
        try:
            await self._handle(stream)
        finally:
            self._streams.release(stream.peer_id)

    async def _handle(self, stream: Stream) -> None:
        # Depth 1: the pump reads at most one read's frames ahead of the loop
        # (all of them in the budget), so a peer pipelining frames waits on
        # Yamux's window instead of filling our memory.
        send, inbox = trio.open_memory_channel(1)
        answer = _Answering()
        held = self.budget.reservation()
        refusal: Refusal | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, stream, send, answer, held)
                try:
                    await self._loop(stream, inbox, answer, held)
                except Refusal as exc:
                    refusal = _detached(exc)
                finally:
                    nursery.cancel_scope.cancel()  # stop reading first: nothing more of it
        finally:
            inbox.close()  # drops frames read ahead: nobody will take them now
            held.close()
        if refusal is not None:
            await self._refuse(stream, refusal)

    async def _pump(
        self, stream: Stream, send: trio.MemorySendChannel, answer: _Answering, held: Reservation
    ) -> None:
        """Frames into ``send`` until the stream ends; then the reason (``Gone``,
        ``P2PError``, ``FrameError`` or a ``Refusal``), and no more reading. A
        caller that leaves cancels the answer."""
        intake = Intake(held, self._max_request)
        async with send:
            while True:
                try:
                    items = intake.feed(await stream.read(READ_SIZE, timeout=math.inf))
                except P2PError as exc:
                    items = [_detached(exc)]
                for item in items:
                    if isinstance(item, (Gone, P2PError)) and answer.scope is not None:
                        answer.scope.cancel()
                    await send.send(item)
                    if isinstance(item, Exception):
                        return

    async def _loop(self, stream: Stream, inbox: trio.MemoryReceiveChannel, answer: _Answering,
                    held: Reservation) -> None:
        """Requests, one after another, until the stream ends; raises ``Refusal``."""
        while True:
            try:
                head = await self._receive(inbox, trio.current_time() + self._idle_timeout)
                if head is None:  # idle for too long: the client retires it before this
                    await stream.close()
                    return
                if not isinstance(head, frames.Request):
                    raise FrameError(f"expected Request, got {type(head).__name__}")
                if not await self._serve(stream, inbox, answer, held, head):
                    return
            except (Gone, trio.EndOfChannel):
                await stream.close()
                return
            except P2PError as exc:
                self._on_error(type(exc).__name__)
                await stream.reset()
                return
            except FrameError as exc:
                self._on_error(type(exc).__name__)
                log.info("bad request stream from %s: %s", stream.peer_id, exc)
                raise Refusal("bad_request", 400, "", str(exc)) from None  # counted as an error

    async def _serve(self, stream: Stream, inbox: trio.MemoryReceiveChannel, answer: _Answering,
                     held: Reservation, head: frames.Request) -> bool:
        """One request from its head on; True when the stream is fit for the next one."""
        deadline = trio.current_time() + self._request_timeout
        self._check_head(stream.peer_id, head)
        if not self._limiter.try_acquire(stream.peer_id):
            raise Refusal("busy", 503, "busy", "peer is at its inbound stream limit")
        size = 0
        try:
            request, size = await self._read_body(inbox, head, deadline)
            with trio.CancelScope() as scope:
                answer.scope = scope
                reusable = await self._answer(stream, request)
        finally:
            answer.scope = None
            self._limiter.release(stream.peer_id)
            held.release(head_size(head) + size)
        if scope.cancelled_caught:  # the caller went away mid-answer
            await stream.reset()
            return False
        return reusable

    def _check_head(self, peer_id: str, head: frames.Request) -> None:
        if self._allow is not None and not self._allow(peer_id, head.method, head.path):
            log.warning("refused a request from peer %s: %s %s", peer_id, head.method, head.path.split("?", 1)[0])
            raise Refusal("bad_request", 403, "refused",
                           f"{head.method} {head.path.split('?', 1)[0]} is not served to peers")
        declared = declared_length(head.headers)
        if declared > self._max_request:
            raise Refusal("bad_request", 413, "too_large",
                           f"request body of {declared} bytes over {self._max_request}")

    @staticmethod
    async def _receive(inbox: trio.MemoryReceiveChannel, deadline: float):
        """Next item, or ``None`` at ``deadline``; a stream-ending reason is raised."""
        with trio.move_on_at(deadline):
            item = await inbox.receive()
            if isinstance(item, Exception):
                exc, item = item, None
                try:
                    raise exc
                finally:
                    del exc  # this frame must not hold what its traceback holds (see _detached)
            return item
        return None

    async def _read_body(self, inbox: trio.MemoryReceiveChannel, head: frames.Request,
                         deadline: float) -> tuple[ProxyRequest, int]:
        """The request whose head is ``head``, and its body's size (the intake
        has reserved it and checked it against ``max_request_bytes``)."""
        parts: list[bytes] = []
        size = 0
        while True:
            frame = await self._receive(inbox, deadline)
            if frame is None:
                raise Refusal("bad_request", 408, "timeout",
                               f"request not complete within {self._request_timeout:g}s")
            if isinstance(frame, frames.End):
                break
            if not isinstance(frame, frames.Data):
                raise FrameError(f"expected Data or End, got {type(frame).__name__}")
            parts.append(frame.data)
            size += len(frame.data)
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        return ProxyRequest(head.method, head.path, peer_safe(head.headers), body), size

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

    async def _refuse(self, stream: Stream, refusal: Refusal) -> None:
        """Say why, then reset: never close, or the peer's bytes would keep
        arriving into our Yamux buffer until it noticed.

        In between, the peer gets a moment to read the Error (a py-libp2p
        reader drops data it has not read yet when a reset arrives): we wait
        for it to reset the stream (a PeerUpstream does as soon as it has read
        the Error), at most ``REFUSAL_GRACE``, dropping whatever it still
        sends, at most ``REFUSAL_DRAIN`` bytes. Nothing of it is kept."""
        if refusal.reason:
            self._on_reject(refusal.reason)
        if refusal.reason not in ("", "refused"):  # those are logged where raised
            log.info("refused a request from peer %s (%s): %s", stream.peer_id, refusal.reason, refusal)
        try:
            await stream.write(frames.encode(frames.Error(refusal.code, str(refusal), refusal.status)))
            with trio.move_on_after(REFUSAL_GRACE):
                dropped = 0
                while dropped < REFUSAL_DRAIN:
                    data = await stream.read(READ_SIZE, timeout=math.inf)
                    if not data:
                        break
                    dropped += len(data)
        except P2PError:
            pass  # the peer reset it (or the write failed and reset it)
        await stream.reset()

    @staticmethod
    async def _send_error(stream: Stream, code: str, message: str, status: int) -> None:
        try:
            await stream.write(frames.encode(frames.Error(code, message, status)))
            await stream.close()
        except P2PError:
            await stream.reset()

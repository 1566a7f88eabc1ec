"""The serving side of ``/meshollama/blob/1``: what a peer can read of this node's models.

This faces every peer that reaches the libp2p port, so a request is admitted
in steps, each refusal an error line then a stream reset (the wire format is
in :mod:`.wire`):

1. **Slot**: streams per peer and in total (``busy``), before anything is read.
2. **Request line**: at most ``MAX_LINE`` bytes, all of it within
   ``request_timeout`` (a per-read timeout would let a peer trickle a byte
   just before each one ran out and hold its slot for ever), then decoded
   and checked (``bad_request``).
3. **Peer**: ``allow(peer_id)`` (``forbidden``).
4. **Store**: only what the store serves, by name or digest in its own index
   (``not_found``, whether or not some file exists). Nothing from the request
   is joined to a path: the digest goes to ``store.blob()`` and nowhere else.

Store calls and file reads block, so they run in threads; a file is read in
``CHUNK`` preads on one fd and written in ``WRITE_SLICE`` slices, each through
the shared :class:`TokenBucket` when ``rate`` is set. A failure after the
header resets the stream, so the client never mistakes a short body for a
whole one. Piece hashes are computed once per blob version and kept in a
small LRU (:class:`PieceCache`); concurrent requests for one blob share the work.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import trio

from ..errors import BadRequest, P2PError
from ..limits import InboundLimiter
from ..p2p.stream import Stream
from . import wire
from .store import Store

log = logging.getLogger("meshollama.models")

CHUNK = 4 * 1024 * 1024  # one pread in a worker thread (1 MiB: 10-15% of a holder's time went to thread hand-offs)
WRITE_SLICE = 256 * 1024  # measured: 64 KiB slices 133-152 MB/s on loopback, 256 KiB about 200
REQUEST_TIMEOUT = 10.0
# After an error line, how long (and how many bytes, dropped) we wait for the
# peer to end the stream before we reset it: long enough for it to read the error.
REFUSAL_GRACE = 0.25
REFUSAL_DRAIN = 256 * 1024
PIECE_CACHE_ENTRIES = 32


class TokenBucket:
    """``rate`` bytes per second shared by all callers, bursts up to ``burst``.

    :meth:`take` never refuses: it takes the bytes now, then sleeps off any
    debt, so concurrent takers queue behind each other in time. Uses
    ``trio.current_time`` (works under a ``MockClock``)."""

    def __init__(self, rate: float, burst: float) -> None:
        if rate < 0 or burst <= 0:
            raise ValueError("need rate >= 0 and burst > 0")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at: float | None = None

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = trio.current_time()
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= n
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self.rate)


class _Refusal(Exception):
    """A request answered with an error line (before any header went out)."""

    def __init__(self, code: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason or code  # the label given to ``on_refused``


class _Memory:
    """A blob held in memory (a manifest, small synthesised bytes)."""

    blocking = False

    def __init__(self, data: bytes, key: tuple) -> None:
        self._data = memoryview(data)
        self.size = len(data)
        self.key = key

    def read(self, offset: int, n: int) -> memoryview:
        return self._data[offset : offset + n]

    def dup(self) -> _Memory:
        return self

    def close(self) -> None:
        pass


class _File:
    """A blob file, opened once; ``key`` names its version (digest, size, mtime)."""

    blocking = True

    def __init__(self, fd: int, size: int, key: tuple) -> None:
        self._fd = fd
        self.size = size
        self.key = key

    def read(self, offset: int, n: int) -> bytes:
        return os.pread(self._fd, n, offset)

    def dup(self) -> _File:
        """A second fd on the same file, for a thread that may outlive this one's owner."""
        return _File(os.dup(self._fd), self.size, self.key)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _open(blob: Path | bytes, digest: str) -> _Memory | _File | None:
    """Blocking. ``None`` if the file the store named is gone."""
    if isinstance(blob, (bytes, bytearray, memoryview)):
        data = bytes(blob)
        return _Memory(data, (digest, len(data), None))
    try:  # O_NONBLOCK: a FIFO planted in the store must not hang the open
        fd = os.open(blob, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{blob} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return _File(fd, st.st_size, (digest, st.st_size, st.st_mtime_ns))


class _Stopped(Exception):
    pass


def piece_hashes(source: _Memory | _File, piece: int, stop: threading.Event) -> list[bytes]:
    """Blocking: the sha256 of each ``piece`` bytes of ``source``; closes ``source``."""
    out: list[bytes] = []
    pos = 0
    try:
        while pos < source.size:
            h = hashlib.sha256()
            end = min(pos + piece, source.size)
            while pos < end:
                if stop.is_set():
                    raise _Stopped
                data = source.read(pos, min(CHUNK, end - pos))
                if not data:
                    raise OSError("blob shrank while hashing")
                h.update(data)
                pos += len(data)
            out.append(h.digest())
    finally:
        source.close()
    return out


class _Job:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.stop = threading.Event()
        self.error: str | None = None


class PieceCache:
    """Piece hashes by blob version, an LRU of ``entries``; one computation per version at a time."""

    def __init__(self, entries: int = PIECE_CACHE_ENTRIES) -> None:
        self._entries = entries
        self._done: OrderedDict[tuple, list[bytes]] = OrderedDict()
        self._running: dict[tuple, _Job] = {}
        self.computed = 0  # computations finished (tests)

    async def hashes(self, source: _Memory | _File) -> list[bytes]:
        key = (*source.key, wire.PIECE_SIZE)
        while True:
            if key in self._done:
                self._done.move_to_end(key)
                return self._done[key]
            job = self._running.get(key)
            if job is None:
                break
            await job.done.wait()
            if job.error is not None:
                raise OSError(job.error)
            # else its computer was cancelled: compute it ourselves
        job = self._running[key] = _Job()
        try:
            # Abandoned on cancel (a big blob takes a while), told to stop, on its own fd.
            out = await trio.to_thread.run_sync(piece_hashes, source.dup(), wire.PIECE_SIZE, job.stop,
                                                abandon_on_cancel=True)
        except BaseException as exc:
            job.stop.set()
            if isinstance(exc, Exception):
                job.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            del self._running[key]
            job.done.set()
        self.computed += 1
        self._done[key] = out
        while len(self._done) > self._entries:
            self._done.popitem(last=False)
        return out


class BlobServer:
    """Answers ``/meshollama/blob/1`` streams from the current store.

    ``store()`` is the store now (None: nothing is served); ``allow(peer_id)``
    whether that peer may fetch; ``rate`` caps bytes per second for all
    streams together (0: no cap). ``on_served(peer_id, n)`` is called once per
    answer with the body bytes written (fewer than announced if the stream
    failed); ``on_refused(reason)`` for each error answer, ``reason`` being its
    code, or ``timeout`` / ``too_long`` for a request line that was.
    ``limiter`` is public: a draining node sets ``limiter.closed``.
    """

    def __init__(
        self,
        store: Callable[[], Store | None],
        allow: Callable[[str], bool],
        *,
        max_streams: int = 16,
        max_per_peer: int = 4,
        rate: float = 0,
        request_timeout: float = REQUEST_TIMEOUT,
        on_served: Callable[[str, int], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        if rate < 0 or not request_timeout > 0:
            raise ValueError("need rate >= 0 and request_timeout > 0")
        self._store = store
        self._allow = allow
        self.limiter = InboundLimiter(max_streams, max_per_peer)
        self.bucket = TokenBucket(rate, max(float(WRITE_SLICE), rate))  # a burst of one second
        self.pieces = PieceCache()
        self._request_timeout = request_timeout
        self._on_served = on_served or (lambda peer, n: None)
        self._on_refused = on_refused or (lambda reason: None)

    async def handle(self, stream: Stream) -> None:
        peer = stream.peer_id
        if not self.limiter.try_acquire(peer):
            await self._refuse(stream, _Refusal("busy", "too many blob streams, try another peer"))
            return
        try:
            try:
                request = await self._request(stream)
                if request is not None:
                    await self._answer(stream, request)
            except _Refusal as refusal:
                await self._refuse(stream, refusal)
        finally:
            self.limiter.release(peer)

    async def _request(self, stream: Stream) -> wire.Request | None:
        """The checked request; None if the peer went away first."""
        buf = b""
        line = None
        try:
            with trio.move_on_after(self._request_timeout):
                while line is None:
                    data = await stream.read(wire.MAX_LINE - len(buf), timeout=math.inf)
                    if not data:
                        await stream.reset()
                        return None
                    buf += data
                    nl = buf.find(b"\n")
                    if nl >= 0:
                        line = buf[: nl + 1]  # anything after it is ignored
                    elif len(buf) >= wire.MAX_LINE:
                        raise _Refusal("bad_request", f"request line over {wire.MAX_LINE} bytes", "too_long")
        except P2PError:  # the stream is reset already
            return None
        if line is None:
            raise _Refusal("bad_request", f"request not complete within {self._request_timeout:g}s", "timeout")
        try:
            request = wire.decode_request(line)
        except wire.WireError as exc:
            raise _Refusal("bad_request", str(exc)) from None
        if not self._allow(stream.peer_id):
            log.info("refused a blob request from peer %s: not allowed", stream.peer_id)
            raise _Refusal("forbidden", "this node does not serve models to this peer")
        return request

    async def _answer(self, stream: Stream, request: wire.Request) -> None:
        store = self._store()
        if request.op == "manifest":
            manifest = None if store is None else await _call(store.manifest, request.model)
            if manifest is None:
                raise _Refusal("not_found", "no such model here")
            raw = manifest.raw
            await self._send(stream, wire.encode_header(len(raw)), _Memory(raw, ()), 0, len(raw))
            return
        blob = None if store is None else await _call(store.blob, request.digest)
        source = None if blob is None else await _call(_open, blob, request.digest)
        if source is None:
            raise _Refusal("not_found", "no such blob here")
        try:
            if request.op == "pieces":
                try:
                    hashes = await self.pieces.hashes(source)
                except OSError as exc:
                    log.warning("cannot hash blob %s: %s", request.digest, exc)
                    raise _Refusal("internal", "cannot read the blob") from None
                body = b"".join(hashes)
                header = wire.encode_header(len(body), size=source.size, piece=wire.PIECE_SIZE)
                await self._send(stream, header, _Memory(body, ()), 0, len(body))
            else:
                if request.offset + request.length > source.size:
                    raise _Refusal("bad_request", f"range past the end of a blob of {source.size} bytes")
                header = wire.encode_header(request.length, size=source.size)
                await self._send(stream, header, source, request.offset, request.length)
        finally:
            source.close()

    async def _send(self, stream: Stream, header: bytes, source: _Memory | _File, offset: int, length: int) -> None:
        """The header, then ``length`` bytes of ``source`` from ``offset``, then close; reset on failure."""
        sent = 0
        pending = header  # goes out with the first slice
        try:
            pos, end = offset, offset + length
            while pos < end:
                n = min(CHUNK, end - pos)
                chunk = await trio.to_thread.run_sync(source.read, pos, n) if source.blocking else source.read(pos, n)
                if not chunk:
                    raise OSError("blob shrank while being served")
                for i in range(0, len(chunk), WRITE_SLICE):
                    part = chunk[i : i + WRITE_SLICE]
                    await self.bucket.take(len(part))
                    await stream.write(pending + part)
                    pending = b""
                    sent += len(part)
                pos += len(chunk)
            if pending:
                await stream.write(pending)
            await stream.close()
        except P2PError as exc:  # the peer went away: the stream is reset already
            log.debug("blob stream to %s failed: %s", stream.peer_id, exc)
        except BaseException as exc:
            if isinstance(exc, OSError):
                log.warning("cannot read a blob for %s: %s", stream.peer_id, exc)
            await stream.reset()
            if not isinstance(exc, OSError):
                raise
        finally:
            self._on_served(stream.peer_id, sent)

    async def _refuse(self, stream: Stream, refusal: _Refusal) -> None:
        """Say why, then reset, never close: a peer must not keep sending into our buffers.

        In between, the peer gets a moment to read the error (a py-libp2p
        reader drops data it has not read yet when a reset arrives): we wait
        for it to end the stream, at most ``REFUSAL_GRACE``, dropping what it
        sends, at most ``REFUSAL_DRAIN`` bytes."""
        self._on_refused(refusal.reason)
        if refusal.code != "not_found":
            log.info("refused a blob request from peer %s (%s): %s", stream.peer_id, refusal.reason, refusal)
        try:
            await stream.write(wire.encode_error(refusal.code, str(refusal)))
            with trio.move_on_after(REFUSAL_GRACE):
                dropped = 0
                while dropped < REFUSAL_DRAIN:
                    data = await stream.read(64 * 1024, timeout=math.inf)
                    if not data:
                        break
                    dropped += len(data)
        except P2PError:
            pass
        await stream.reset()


async def _call(fn: Callable, *args):
    """``fn(*args)`` in a thread; a store's BadRequest is a bad_request, any other failure internal."""
    try:
        return await trio.to_thread.run_sync(fn, *args)
    except BadRequest as exc:
        raise _Refusal("bad_request", exc.message) from None
    except Exception:
        log.exception("blob store failed in %s", getattr(fn, "__name__", fn))
        raise _Refusal("internal", "internal error") from None

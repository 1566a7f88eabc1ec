"""The requesting side of ``/meshollama/blob/1``: one request on one already-open stream.

Each function writes its request, checks the answer's header against it
(:func:`.wire.decode_header`, then the sizes it asked for), reads exactly the
announced body, and closes the stream; on any failure it resets the stream.
An error answer, a malformed header or a body that ends early (or runs past
its length) raises :class:`BlobError`; read and write timeouts are the
stream's own (:class:`~meshollama.errors.P2PError`).
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import P2PError
from ..p2p.stream import Stream
from . import wire

READ_SIZE = 1024 * 1024  # what one read may take off the stream


class BlobError(P2PError):
    """The peer answered with an error, or with something that is not a whole answer.

    ``code`` is the server's (``not_found``, ``bad_request``, ``busy``,
    ``forbidden``, ``internal``; ``bad_request`` also for a request this side
    will not send, the stream then reset unused), ``malformed`` (a header that
    does not follow the protocol or does not match the request) or ``short``
    (the stream ended before the announced body did)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def get_manifest(stream: Stream, name: str) -> bytes:
    """The raw manifest of model ``name`` (the caller parses it and checks its digest)."""
    parts: list[bytes] = []
    await _exchange(stream, wire.Request("manifest", model=name), parts.append)
    return b"".join(parts)


async def get_pieces(stream: Stream, digest: str) -> tuple[int, list[bytes]]:
    """The blob's size and the sha256 of each of its ``PIECE_SIZE`` pieces."""
    parts: list[bytes] = []
    header = await _exchange(stream, wire.Request("pieces", digest=digest), parts.append)
    body = b"".join(parts)
    size = header.size
    assert size is not None  # decode_header checked it
    return size, [body[i : i + wire.HASH_SIZE] for i in range(0, len(body), wire.HASH_SIZE)]


async def get_range(stream: Stream, digest: str, offset: int, length: int, sink: Callable[[bytes], None]) -> int:
    """Bytes ``[offset, offset + length)`` of the blob, to ``sink`` chunk by chunk as
    they arrive; returns the blob's total size. On an error, ``sink`` may have
    had part of the range."""
    header = await _exchange(stream, wire.Request("get", digest=digest, offset=offset, length=length), sink)
    assert header.size is not None
    return header.size


async def _exchange(stream: Stream, request: wire.Request, sink: Callable[[bytes], None]) -> wire.Header:
    try:
        line = wire.encode_request(request)
    except wire.WireError as exc:  # never sent: no peer would take it
        await stream.reset()
        raise BlobError("bad_request", f"not a valid {request.op} request: {exc}") from None
    try:
        await stream.write(line)
        header, rest = await _header(stream, request)
        await _body(stream, header.length, rest, sink)
    except BaseException:
        await stream.reset()
        raise
    await stream.close()
    return header


async def _header(stream: Stream, request: wire.Request) -> tuple[wire.Header, bytes]:
    """The answer's header, checked against ``request``, and the bytes read past it."""
    buf = b""
    while True:
        data = await stream.read(wire.MAX_LINE - len(buf))
        if not data:
            raise BlobError("short", f"{stream.peer_id} ended the stream before its answer's header")
        buf += data
        nl = buf.find(b"\n")
        if nl >= 0:
            break
        if len(buf) >= wire.MAX_LINE:
            raise BlobError("malformed", f"{stream.peer_id} sent a header line over {wire.MAX_LINE} bytes")
    try:
        header = wire.decode_header(request.op, buf[: nl + 1])
    except wire.WireError as exc:
        raise BlobError("malformed", f"{stream.peer_id} sent a bad {request.op} header: {exc}") from None
    if isinstance(header, wire.ErrorAnswer):
        raise BlobError(header.code, f"{stream.peer_id}: {header.code}: {header.message}")
    if request.op == "get":
        assert header.size is not None
        if header.length != request.length or request.offset + request.length > header.size:
            raise BlobError("malformed", f"{stream.peer_id} answered a range of {header.length} bytes of a "
                                         f"{header.size}-byte blob to [{request.offset}, +{request.length})")
    return header, buf[nl + 1 :]


async def _body(stream: Stream, length: int, first: bytes, sink: Callable[[bytes], None]) -> None:
    """Exactly ``length`` bytes (``first`` then the stream's) to ``sink``."""
    if len(first) > length:
        raise BlobError("malformed", f"{stream.peer_id} sent more than the {length} bytes it announced")
    if first:
        sink(first)
    got = len(first)
    while got < length:
        data = await stream.read(min(READ_SIZE, length - got))
        if not data:
            raise BlobError("short", f"{stream.peer_id} ended the stream after {got} of {length} bytes")
        got += len(data)
        sink(data)

"""A peer's request stream, bytes to admitted frames (sans-IO).

The server's frame pump (``p2p.httpserver``) feeds :class:`Intake` each read
off a stream; it decodes frames and admits them before anything is kept: a
request body past ``max_request_bytes`` is refused before a byte past the
limit is kept, and every byte kept (heads, bodies, a partial head) is first
reserved in the node's byte budget. No stream here: tested with literal bytes.
"""

from __future__ import annotations

from ..errors import FrameError
from ..httpmsg import Headers
from ..limits import Reservation
from ..wire import frames


class Refusal(Exception):
    """A request this node will not take (any further): answered with an Error
    frame, then the stream is reset so nothing more of it is kept."""

    def __init__(self, code: str, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.reason = reason  # the label counted by ``on_reject`` ("" for none)


class Gone(Exception):
    """The caller reset or closed the stream."""


def head_size(head: frames.Request) -> int:
    """What a decoded head holds, roughly (its strings), for the byte budget."""
    return len(head.method) + len(head.path) + sum(len(k) + len(v) for k, v in head.headers)


def declared_length(headers: Headers) -> int:
    """The largest valid ``Content-Length`` among ``headers``, 0 if none.

    ASCII digits only (``int`` takes other scripts' digits, and refuses more
    than 4300 of them); a longer number than 19 digits counts as 10**19."""
    declared = 0
    for k, v in headers:
        v = v.strip()
        if k.lower() == "content-length" and v.isascii() and v.isdigit():
            declared = max(declared, int(v) if len(v) <= 19 else 10**19)
    return declared


class Intake:
    """Bytes off one stream into frames, each admitted before it is kept (sans-IO).

    :meth:`feed` returns the frames a read completed, or instead one
    ``Refusal`` (the stream is refused: nothing of this read is kept) or a
    stream-ending reason (``Gone``, ``FrameError``).

    A Data frame's payload comes out as it arrives, one piece per read, so
    a body is never held twice (as a partial frame and as frames) and its
    size is checked byte for byte: a body over ``max_request_bytes`` is
    refused before any byte past the limit is kept. Other frames (heads,
    End) go whole through the codec's :class:`~meshollama.wire.frames.FrameDecoder`.

    What it keeps is reserved in ``held``: heads (:func:`head_size`), body
    bytes, and a partial head; frame headers and JSON are given back as soon
    as they are decoded. The request loop gives back each request's head and
    body when it is answered; ``held.close()`` the rest when the stream ends.
    """

    def __init__(self, held: Reservation, max_request_bytes: int) -> None:
        self._decoder = frames.FrameDecoder()  # whole frames other than Data
        self._held = held
        self._max = max_request_bytes
        self._header = b""  # the start of the next frame's header
        self._data_left = 0  # payload bytes still to come of the Data frame being read
        self._frame_left = 0  # bytes still to come of the other frame the decoder is taking
        self._body = 0  # body bytes of the request being read

    @property
    def pending(self) -> int:
        """Bytes held that make no frame yet."""
        return len(self._header) + self._decoder.pending

    def feed(self, data: bytes) -> list:
        if not data:
            inside = self.pending or self._data_left or self._frame_left
            return [FrameError("stream ended inside a frame") if inside else Gone()]
        before = self.pending
        try:
            decoded = self._split(data)
        except FrameError as exc:
            return [exc.with_traceback(None)]  # its frames would keep this intake's buffers alive
        kept = 0
        body = self._body
        for frame in decoded:
            if isinstance(frame, frames.Request):
                kept += head_size(frame)
                body = 0
            elif isinstance(frame, frames.Data):
                kept += len(frame.data)
                body += len(frame.data)
                if body > self._max:
                    return [Refusal("bad_request", 413, "too_large", f"request body over {self._max} bytes")]
        delta = kept + self.pending - before
        if delta > 0 and not self._held.try_reserve(delta):
            return [Refusal("busy", 503, "budget", "this node's buffer for peer requests is full")]
        if delta < 0:
            self._held.release(-delta)
        self._body = body
        return decoded

    def _split(self, data: bytes) -> list:
        """The frames ``data`` completes, Data payloads in the pieces it holds."""
        view = memoryview(data)
        pos = 0
        out: list = []
        while pos < len(view):
            if self._data_left:
                n = min(self._data_left, len(view) - pos)
                out.append(frames.Data(data if n == len(view) else bytes(view[pos : pos + n])))
                self._data_left -= n
            elif self._frame_left:
                n = min(self._frame_left, len(view) - pos)
                out += self._decoder.feed(view[pos : pos + n])
                self._frame_left -= n
            else:  # a frame starts: its header says whether its payload is body
                n = min(frames.HEADER_SIZE - len(self._header), len(view) - pos)
                self._header += view[pos : pos + n]
                if len(self._header) == frames.HEADER_SIZE:
                    header, self._header = self._header, b""
                    length = int.from_bytes(header[1:], "big")
                    if header[0] == frames.Kind.DATA:
                        if length > frames.MAX_PAYLOAD:  # as the codec would
                            raise FrameError(f"frame length {length} over {frames.MAX_PAYLOAD}")
                        self._data_left = length
                    else:
                        out += self._decoder.feed(header)  # it checks the kind and length
                        self._frame_left = length
            pos += n
        return out

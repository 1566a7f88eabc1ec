"""HTTP over a libp2p stream: the frame codec (sans-IO).

A proxied request travels on a libp2p stream as a few frames (after a clean
``End`` the stream may carry the next request: see ``p2p.httpstream``)::

    client: Request, Data*, End
    server: Response, Data*, End      or Error at any point
                                      (after Response it means "broken mid-stream")

Each frame is ``kind`` (1 byte) + payload length (4 bytes, big-endian) +
payload. ``Data`` carries raw body bytes, so streamed tokens are forwarded as
they come; ``Request``/``Response``/``Error`` carry small JSON objects. This
module never touches a stream: :func:`encode` turns frames into bytes and
:class:`FrameDecoder` turns whatever bytes arrived into whole frames, so it
is tested with literal bytes.

The decoder faces a remote peer and is strict: an unknown kind or a length
over ``max_payload`` is rejected from the 5-byte header alone, before any
payload is buffered; JSON payloads must be UTF-8 objects with correctly
typed fields; header names and values may not smuggle CR/LF. Everything
wrong is :class:`~meshollama.errors.FrameError`, after which the decoder
stays failed (the caller resets the stream).
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import Any, Union

from ..errors import FrameError
from ..httpmsg import Headers

MAX_PAYLOAD = 1024 * 1024
HEADER_SIZE = 5
MAX_HEADERS = 256
ERROR_CODES = frozenset({"busy", "unavailable", "bad_request", "internal"})

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 token
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # controls except TAB
_BAD_PATH = re.compile(r"[\x00-\x20\x7f]")  # controls and space


class Kind(enum.IntEnum):
    REQUEST = 1
    DATA = 2
    END = 3
    RESPONSE = 4
    ERROR = 5


@dataclass(frozen=True)
class Request:
    """Head of an HTTP request. ``path`` includes the query string."""

    method: str
    path: str
    headers: Headers = ()


@dataclass(frozen=True)
class Data:
    """A piece of body."""

    data: bytes


@dataclass(frozen=True)
class End:
    """End of the body (and of the message)."""


@dataclass(frozen=True)
class Response:
    """Head of an HTTP response."""

    status: int
    headers: Headers = ()


@dataclass(frozen=True)
class Error:
    """The server could not serve (or finish) the request.

    ``code`` is one of :data:`ERROR_CODES`; ``status`` is the HTTP status the
    gateway would answer with if nothing was sent yet.
    """

    code: str
    message: str
    status: int = 502


Frame = Union[Request, Data, End, Response, Error]


# --- validation shared by encode and decode -------------------------------


def _check_str(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise FrameError(f"{what}: expected a string")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a JSON \ud800 escape
        raise FrameError(f"{what}: not valid unicode") from None
    return v


def _check_status(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise FrameError("status: expected an integer")
    if not 100 <= v <= 599:
        raise FrameError("status: outside 100..599")
    return v


def _check_headers(v: Any) -> Headers:
    if not isinstance(v, (list, tuple)):
        raise FrameError("headers: expected a list")
    if len(v) > MAX_HEADERS:
        raise FrameError(f"headers: more than {MAX_HEADERS}")
    out = []
    for h in v:
        if not isinstance(h, (list, tuple)) or len(h) != 2:
            raise FrameError("headers: each must be a [name, value] pair")
        name = _check_str(h[0], "header name")
        value = _check_str(h[1], "header value")
        if not _TOKEN.match(name):
            raise FrameError("header name: not an HTTP token")
        if _BAD_VALUE.search(value):
            raise FrameError("header value: control character")
        out.append((name, value))
    return tuple(out)


def _validate(frame: Frame) -> Frame:
    """Return ``frame`` with normalised fields, or raise FrameError."""
    if isinstance(frame, Request):
        method = _check_str(frame.method, "method")
        path = _check_str(frame.path, "path")
        if not _TOKEN.match(method):
            raise FrameError("method: not an HTTP token")
        if not path.startswith("/") or _BAD_PATH.search(path):
            raise FrameError("path: must start with '/' and have no spaces or controls")
        return Request(method, path, _check_headers(frame.headers))
    if isinstance(frame, Response):
        return Response(_check_status(frame.status), _check_headers(frame.headers))
    if isinstance(frame, Error):
        code = _check_str(frame.code, "code")
        if code not in ERROR_CODES:
            raise FrameError(f"code: not one of {sorted(ERROR_CODES)}")
        return Error(code, _check_str(frame.message, "message"), _check_status(frame.status))
    if isinstance(frame, Data):
        if not isinstance(frame.data, (bytes, bytearray, memoryview)):
            raise FrameError("data: expected bytes")
        return frame
    if isinstance(frame, End):
        return frame
    raise FrameError(f"not a frame: {type(frame).__name__}")


# --- encode ---------------------------------------------------------------


def _pack(kind: Kind, payload: bytes, max_payload: int = MAX_PAYLOAD) -> bytes:
    if len(payload) > max_payload:
        raise FrameError(f"payload of {len(payload)} bytes over {max_payload}")
    return bytes((kind,)) + len(payload).to_bytes(4, "big") + payload


def _json(obj: dict[str, Any]) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise FrameError("string is not valid unicode") from None


def encode(frame: Frame) -> bytes:
    """The bytes of one frame. Data over :data:`MAX_PAYLOAD` raises FrameError:
    split it with :func:`encode_data`."""
    frame = _validate(frame)
    if isinstance(frame, Data):
        return _pack(Kind.DATA, bytes(frame.data))
    if isinstance(frame, End):
        return _pack(Kind.END, b"")
    if isinstance(frame, Request):
        obj = {"method": frame.method, "path": frame.path, "headers": [list(h) for h in frame.headers]}
        return _pack(Kind.REQUEST, _json(obj))
    if isinstance(frame, Response):
        obj = {"status": frame.status, "headers": [list(h) for h in frame.headers]}
        return _pack(Kind.RESPONSE, _json(obj))
    assert isinstance(frame, Error)
    return _pack(Kind.ERROR, _json({"code": frame.code, "message": frame.message, "status": frame.status}))


def encode_data(data: bytes, max_payload: int = MAX_PAYLOAD) -> bytes:
    """``data`` as DATA frames of at most ``max_payload`` bytes each, concatenated.

    Empty ``data`` gives ``b""`` (no frame): an empty body is just ``End``.
    """
    if max_payload < 1:
        raise ValueError("max_payload must be >= 1")
    view = memoryview(data)
    return b"".join(
        _pack(Kind.DATA, bytes(view[i : i + max_payload]), max_payload) for i in range(0, len(view), max_payload)
    )


# --- decode ---------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise FrameError(f"non-finite number {name}")


def _load(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise FrameError("payload is not UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise FrameError("payload is not a JSON object")
    return obj


def _parse(kind: Kind, payload: bytes) -> Frame:
    if kind is Kind.DATA:
        return Data(payload)
    if kind is Kind.END:
        return End()
    obj = _load(payload)
    try:
        if kind is Kind.REQUEST:
            frame: Frame = Request(obj["method"], obj["path"], obj.get("headers", []))
        elif kind is Kind.RESPONSE:
            frame = Response(obj["status"], obj.get("headers", []))
        else:
            frame = Error(obj["code"], obj["message"], obj.get("status", 502))
    except KeyError as e:
        raise FrameError(f"{kind.name}: missing field {e.args[0]!r}") from None
    return _validate(frame)


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get whole frames back."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        if max_payload < 0:
            raise ValueError("max_payload must be >= 0")
        self.max_payload = max_payload
        self._buf = bytearray()
        self._failed: str | None = None

    @property
    def pending(self) -> int:
        """Bytes buffered that do not make a whole frame yet."""
        return len(self._buf)

    def _fail(self, message: str) -> FrameError:
        self._failed = message
        self._buf.clear()
        return FrameError(message)

    def feed(self, data: bytes) -> list[Frame]:
        """Buffer ``data`` and return every frame completed by it, in order."""
        if self._failed is not None:
            raise FrameError(f"decoder failed earlier: {self._failed}")
        self._buf += data
        frames: list[Frame] = []
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= HEADER_SIZE:
                try:
                    kind = Kind(buf[pos])
                except ValueError:
                    raise self._fail(f"unknown frame kind {buf[pos]}") from None
                length = int.from_bytes(buf[pos + 1 : pos + HEADER_SIZE], "big")
                if length > self.max_payload:
                    raise self._fail(f"frame length {length} over {self.max_payload}")
                if kind is Kind.END and length:
                    raise self._fail("END frame with a payload")
                end = pos + HEADER_SIZE + length
                if len(buf) < end:
                    break
                payload = bytes(buf[pos + HEADER_SIZE : end])
                pos = end
                try:
                    frames.append(_parse(kind, payload))
                except FrameError as e:
                    raise self._fail(str(e)) from None
        finally:
            if self._failed is None:
                del buf[:pos]
        return frames

"""``/meshollama/blob/1``: a model's manifest and blobs, fetched from a peer (pure encode/decode).

One request per stream. The client writes one JSON object and ``\\n`` (UTF-8,
at most ``MAX_LINE`` bytes with the newline)::

    {"op":"manifest","model":NAME}
    {"op":"pieces","digest":D}
    {"op":"get","digest":D,"offset":O,"length":L}

``D`` is ``sha256:<64 lower-case hex>`` (:func:`~.manifest.is_digest`), ``NAME``
a non-empty str of at most ``MAX_NAME`` characters, ``O`` and ``L`` integers
(not booleans) with ``O >= 0`` and ``1 <= L <= MAX_RANGE``. No other keys.

The server answers one JSON header line (at most ``MAX_LINE`` bytes), then
exactly ``length`` raw bytes:

* manifest: ``{"ok":true,"length":L}`` + the manifest's bytes as stored (its
  sha256 is the model digest).
* pieces: ``{"ok":true,"size":S,"piece":PIECE_SIZE,"length":32*n}`` + the ``n``
  raw 32-byte sha256 digests of the blob's consecutive ``PIECE_SIZE`` pieces
  (the last one shorter; a blob of size 0 has ``n = 0``).
* get: ``{"ok":true,"size":S,"length":L}`` + bytes ``[O, O+L)`` of the blob
  (``O + L > S`` is a ``bad_request``).
* error: ``{"error":MESSAGE,"code":CODE}``, ``CODE`` one of :data:`CODES`;
  the server then ends the stream. ``not_found`` never says whether the file
  exists on disk: only whether this node serves it.

A server that fails after its header resets the stream: a body is whole or
the client gets an error, never a silent short answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import ProtocolError
from .manifest import MAX_BLOB_BYTES, MAX_MANIFEST_BYTES, is_digest

PROTOCOL = "/meshollama/blob/1"
PIECE_SIZE = 8 * 1024 * 1024
MAX_RANGE = 64 * 1024 * 1024
MAX_LINE = 4096
MAX_NAME = 500
MAX_MESSAGE = 500  # an error message is cut to this many characters
HASH_SIZE = 32
CODES = ("not_found", "bad_request", "busy", "forbidden", "internal")
OPS = ("manifest", "pieces", "get")
_KEYS = {"manifest": {"op", "model"}, "pieces": {"op", "digest"}, "get": {"op", "digest", "offset", "length"}}
_ANSWER_KEYS = {"manifest": {"ok", "length"}, "pieces": {"ok", "size", "piece", "length"}, "get": {"ok", "size", "length"}}


class WireError(ProtocolError):
    """A request or answer line that does not follow ``/meshollama/blob/1``."""


@dataclass(frozen=True)
class Request:
    op: str
    model: str = ""
    digest: str = ""
    offset: int = 0
    length: int = 0


@dataclass(frozen=True)
class Header:
    """An ``ok`` answer's header: ``length`` body bytes follow. ``size`` is the
    blob's (pieces, get); ``piece`` the piece size (pieces)."""

    length: int
    size: int | None = None
    piece: int | None = None


@dataclass(frozen=True)
class ErrorAnswer:
    code: str
    message: str


def piece_count(size: int) -> int:
    """How many ``PIECE_SIZE`` pieces a blob of ``size`` bytes has (0 for an empty blob)."""
    return -(-size // PIECE_SIZE)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _line(obj: dict[str, Any]) -> bytes:
    try:
        out = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    except UnicodeEncodeError:  # a lone surrogate
        raise WireError("not encodable as UTF-8") from None
    if len(out) > MAX_LINE:
        raise WireError(f"line of {len(out)} bytes over {MAX_LINE}")
    return out


def _object(line: bytes) -> dict[str, Any]:
    """The JSON object of one line (with its ``\\n``), strictly UTF-8."""
    if len(line) > MAX_LINE:
        raise WireError(f"line over {MAX_LINE} bytes")
    if not line.endswith(b"\n") or b"\n" in line[:-1]:
        raise WireError("not one line")
    try:
        obj = json.loads(line.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise WireError("not JSON") from None
    if not isinstance(obj, dict):
        raise WireError("not a JSON object")
    return obj


def _check(request: Request) -> Request:
    if request.op == "manifest":
        if not isinstance(request.model, str) or not 0 < len(request.model) <= MAX_NAME:
            raise WireError(f"model must be a name of 1 to {MAX_NAME} characters")
        return request
    if request.op not in OPS:
        raise WireError("unknown op")
    if not is_digest(request.digest):
        raise WireError("digest must be sha256:<64 lower-case hex>")
    if request.op == "get":
        if not _is_int(request.offset) or not 0 <= request.offset <= MAX_BLOB_BYTES:
            raise WireError("offset must be an integer in [0, 2**44]")
        if not _is_int(request.length) or not 1 <= request.length <= MAX_RANGE:
            raise WireError(f"length must be an integer in [1, {MAX_RANGE}]")
    return request


def encode_request(request: Request) -> bytes:
    _check(request)
    obj: dict[str, Any] = {"op": request.op}
    if request.op == "manifest":
        obj["model"] = request.model
    else:
        obj["digest"] = request.digest
    if request.op == "get":
        obj["offset"], obj["length"] = request.offset, request.length
    return _line(obj)


def decode_request(line: bytes) -> Request:
    """A request line (with its ``\\n``); :class:`WireError` if it is not a valid one."""
    obj = _object(line)
    op = obj.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise WireError("unknown op")
    if set(obj) != _KEYS[op]:
        raise WireError(f"{op} takes exactly {sorted(_KEYS[op])}")
    return _check(Request(op, obj.get("model", ""), obj.get("digest", ""), obj.get("offset", 0), obj.get("length", 0)))


def encode_header(length: int, *, size: int | None = None, piece: int | None = None) -> bytes:
    obj: dict[str, Any] = {"ok": True}
    if size is not None:
        obj["size"] = size
    if piece is not None:
        obj["piece"] = piece
    obj["length"] = length
    return _line(obj)


def encode_error(code: str, message: str) -> bytes:
    if code not in CODES:
        raise ValueError(f"unknown error code {code!r}")
    return _line({"error": message[:MAX_MESSAGE], "code": code})


def decode_header(op: str, line: bytes) -> Header | ErrorAnswer:
    """The answer to an ``op`` request: its header, or the error the server sent.

    Checks what the header alone can: the keys ``op`` answers with, their
    types and bounds, ``piece == PIECE_SIZE`` and ``length == 32 * n``
    (pieces). The caller checks it against its request."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    obj = _object(line)
    if "error" in obj:
        code, message = obj.get("code"), obj.get("error")
        if set(obj) != {"error", "code"} or code not in CODES or not isinstance(message, str):
            raise WireError("malformed error answer")
        return ErrorAnswer(code, message)
    if obj.get("ok") is not True or set(obj) != _ANSWER_KEYS[op]:
        raise WireError(f"malformed {op} header")
    length, size, piece = obj["length"], obj.get("size"), obj.get("piece")
    if not _is_int(length) or length < 0:
        raise WireError("length must be a non-negative integer")
    if size is not None and (not _is_int(size) or not 0 <= size <= MAX_BLOB_BYTES):
        raise WireError("size must be an integer in [0, 2**44]")
    if op == "manifest" and length > MAX_MANIFEST_BYTES:
        raise WireError(f"manifest of {length} bytes over {MAX_MANIFEST_BYTES}")
    if op == "pieces":
        if not _is_int(piece) or piece != PIECE_SIZE:
            raise WireError(f"piece size {piece!r}, not {PIECE_SIZE}")
        if length != HASH_SIZE * piece_count(size):
            raise WireError(f"{length} bytes of hashes for a blob of {size} bytes")
    if op == "get" and not 1 <= length <= min(MAX_RANGE, size):
        raise WireError(f"range of {length} bytes from a blob of {size}")
    return Header(length, size, piece)

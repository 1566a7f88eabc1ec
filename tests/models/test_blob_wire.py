"""``/meshollama/blob/1`` lines: round trips, and every malformed request or header refused."""

from __future__ import annotations

import json

import pytest

from meshollama.models import wire
from meshollama.models.wire import ErrorAnswer, Header, Request, WireError

D = "sha256:" + "ab" * 32


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


@pytest.mark.parametrize("request_", [
    Request("manifest", model="llama3.2:1b"),
    Request("manifest", model="registry.ollama.ai/library/qwen2.5:0.5b"),
    Request("manifest", model="é" * wire.MAX_NAME),
    Request("manifest", model="\U0001f600" * wire.MAX_NAME),  # 4 UTF-8 bytes each: still one line
    Request("pieces", digest=D),
    Request("get", digest=D, offset=0, length=1),
    Request("get", digest=D, offset=2**44, length=wire.MAX_RANGE),
])
def test_request_round_trip(request_):
    encoded = wire.encode_request(request_)
    assert encoded.endswith(b"\n") and encoded.count(b"\n") == 1 and len(encoded) <= wire.MAX_LINE
    assert wire.decode_request(encoded) == request_


def test_request_exact_bytes():
    assert wire.encode_request(Request("get", digest=D, offset=5, length=7)) == (
        b'{"op":"get","digest":"' + D.encode() + b'","offset":5,"length":7}\n')
    assert wire.encode_request(Request("manifest", model="m")) == b'{"op":"manifest","model":"m"}\n'


BAD_REQUESTS = [
    b"",
    b"\n",
    b"not json\n",
    b'{"op":"pieces","digest":"' + D.encode() + b'"}',  # no newline
    b'{"op":"pieces",\n"digest":"' + D.encode() + b'"}\n',  # two lines
    b"[1,2]\n",
    b'"pieces"\n',
    b"\xff\xfe{}\n",
    '{"op":"manifest","model":"m"}\n'.encode("utf-16"),
    b'{"op":"get","digest":"' + D.encode() + b'","offset":NaN,"length":1}\n',
    b'{"op":"get","digest":"' + D.encode() + b'","offset":Infinity,"length":1}\n',
    b'{"op":"get","digest":"' + D.encode() + b'","offset":1' + b"0" * 4000 + b',"length":1}\n',
    line({"op": "delete", "digest": D}),
    line({"op": None}),
    line({"op": ["get"]}),
    line({"digest": D}),
    line({"op": "manifest"}),
    line({"op": "manifest", "model": ""}),
    line({"op": "manifest", "model": "x" * (wire.MAX_NAME + 1)}),
    line({"op": "manifest", "model": 5}),
    line({"op": "manifest", "model": ["a"]}),
    line({"op": "manifest", "model": "m", "digest": D}),  # extra key
    line({"op": "pieces"}),
    line({"op": "pieces", "digest": D, "extra": 1}),
    line({"op": "pieces", "digest": D.upper()}),
    line({"op": "pieces", "digest": "sha256:" + "AB" * 32}),
    line({"op": "pieces", "digest": "sha256-" + "ab" * 32}),
    line({"op": "pieces", "digest": "sha256:" + "ab" * 31}),
    line({"op": "pieces", "digest": "sha256:" + "ab" * 32 + "\n"}),
    line({"op": "pieces", "digest": "sha256:../../x"}),
    line({"op": "pieces", "digest": "../../etc/passwd"}),
    line({"op": "pieces", "digest": "/etc/passwd"}),
    line({"op": "pieces", "digest": "sha512:" + "ab" * 32}),
    line({"op": "pieces", "digest": 12}),
    line({"op": "get", "digest": D, "offset": 0}),
    line({"op": "get", "digest": D, "length": 1}),
    line({"op": "get", "digest": D, "offset": True, "length": 1}),
    line({"op": "get", "digest": D, "offset": 0, "length": True}),
    line({"op": "get", "digest": D, "offset": False, "length": 1}),
    line({"op": "get", "digest": D, "offset": -1, "length": 1}),
    line({"op": "get", "digest": D, "offset": 0, "length": 0}),
    line({"op": "get", "digest": D, "offset": 0, "length": -5}),
    line({"op": "get", "digest": D, "offset": 0, "length": wire.MAX_RANGE + 1}),
    line({"op": "get", "digest": D, "offset": 2**44 + 1, "length": 1}),
    line({"op": "get", "digest": D, "offset": 10**30, "length": 1}),
    line({"op": "get", "digest": D, "offset": 1.0, "length": 1}),
    line({"op": "get", "digest": D, "offset": "0", "length": 1}),
    line({"op": "get", "digest": D, "offset": 0, "length": 1.5}),
    line({"op": "get", "digest": D, "offset": 0, "length": None}),
    b'{"op":"manifest","model":"' + b"a" * wire.MAX_LINE + b'"}\n',  # over MAX_LINE
]


@pytest.mark.parametrize("raw", BAD_REQUESTS)
def test_bad_request_lines(raw):
    with pytest.raises(WireError):
        wire.decode_request(raw)


@pytest.mark.parametrize("request_", [
    Request("manifest", model=""),
    Request("manifest", model="x" * (wire.MAX_NAME + 1)),
    Request("manifest", model="\ud800"),  # a lone surrogate: not UTF-8
    Request("pieces", digest="sha256:../x"),
    Request("get", digest=D, offset=-1, length=1),
    Request("get", digest=D, offset=0, length=0),
    Request("get", digest=D, offset=0, length=wire.MAX_RANGE + 1),
    Request("get", digest=D, offset=True, length=1),
    Request("copy", digest=D),
])
def test_encode_refuses_what_decode_would(request_):
    with pytest.raises(WireError):
        wire.encode_request(request_)


@pytest.mark.parametrize("op,encoded,expected", [
    ("manifest", wire.encode_header(123), Header(123)),
    ("manifest", wire.encode_header(0), Header(0)),
    ("pieces", wire.encode_header(0, size=0, piece=wire.PIECE_SIZE), Header(0, 0, wire.PIECE_SIZE)),
    ("pieces", wire.encode_header(32, size=1, piece=wire.PIECE_SIZE), Header(32, 1, wire.PIECE_SIZE)),
    ("pieces", wire.encode_header(32, size=wire.PIECE_SIZE, piece=wire.PIECE_SIZE),
     Header(32, wire.PIECE_SIZE, wire.PIECE_SIZE)),
    ("pieces", wire.encode_header(64, size=wire.PIECE_SIZE + 1, piece=wire.PIECE_SIZE),
     Header(64, wire.PIECE_SIZE + 1, wire.PIECE_SIZE)),
    ("get", wire.encode_header(10, size=100), Header(10, 100)),
    ("get", wire.encode_header(wire.MAX_RANGE, size=2**44), Header(wire.MAX_RANGE, 2**44)),
])
def test_header_round_trip(op, encoded, expected):
    assert wire.decode_header(op, encoded) == expected


@pytest.mark.parametrize("code", wire.CODES)
def test_error_round_trip(code):
    assert wire.decode_header("get", wire.encode_error(code, "why")) == ErrorAnswer(code, "why")


def test_error_message_is_cut_to_fit():
    encoded = wire.encode_error("internal", "\U0001f600" * 5000)
    assert len(encoded) <= wire.MAX_LINE
    assert wire.decode_header("pieces", encoded) == ErrorAnswer("internal", "\U0001f600" * wire.MAX_MESSAGE)
    with pytest.raises(ValueError):
        wire.encode_error("teapot", "no")


BAD_HEADERS = [
    ("manifest", b""),
    ("manifest", b'{"ok":true,"length":3}'),  # no newline
    ("manifest", b"garbage\n"),
    ("manifest", b"[]\n"),
    ("manifest", line({"ok": True})),
    ("manifest", line({"ok": False, "length": 3})),
    ("manifest", line({"ok": 1, "length": 3})),
    ("manifest", line({"ok": True, "length": -1})),
    ("manifest", line({"ok": True, "length": True})),
    ("manifest", line({"ok": True, "length": "3"})),
    ("manifest", line({"ok": True, "length": 3.0})),
    ("manifest", line({"ok": True, "length": (1 << 20) + 1})),  # over MAX_MANIFEST_BYTES
    ("manifest", line({"ok": True, "length": 3, "size": 3})),
    ("pieces", line({"ok": True, "length": 32})),
    ("pieces", line({"ok": True, "size": 1, "piece": 1024, "length": 32})),
    ("pieces", line({"ok": True, "size": 1, "piece": True, "length": 32})),
    ("pieces", line({"ok": True, "size": 1, "piece": wire.PIECE_SIZE, "length": 0})),
    ("pieces", line({"ok": True, "size": 1, "piece": wire.PIECE_SIZE, "length": 64})),
    ("pieces", line({"ok": True, "size": 0, "piece": wire.PIECE_SIZE, "length": 32})),
    ("pieces", line({"ok": True, "size": -1, "piece": wire.PIECE_SIZE, "length": 0})),
    ("pieces", line({"ok": True, "size": 2**44 + 1, "piece": wire.PIECE_SIZE, "length": 32 * (2**21 + 1)})),
    ("get", line({"ok": True, "length": 10})),
    ("get", line({"ok": True, "size": 5, "length": 10})),  # more than the blob
    ("get", line({"ok": True, "size": 100, "length": 0})),
    ("get", line({"ok": True, "size": 2**40, "length": wire.MAX_RANGE + 1})),
    ("get", line({"ok": True, "size": "100", "length": 10})),
    ("get", line({"ok": True, "size": False, "length": 10})),
    ("get", line({"ok": True, "size": 100, "length": 10, "piece": wire.PIECE_SIZE})),
    ("get", line({"error": "x"})),
    ("get", line({"error": "x", "code": "teapot"})),
    ("get", line({"error": 5, "code": "busy"})),
    ("get", line({"error": "x", "code": "busy", "ok": True})),
    ("get", b'{"ok":true,"size":100,"length":' + b"1" * wire.MAX_LINE + b"}\n"),
]


@pytest.mark.parametrize("op,raw", BAD_HEADERS)
def test_bad_headers(op, raw):
    with pytest.raises(WireError):
        wire.decode_header(op, raw)


def test_piece_count():
    p = wire.PIECE_SIZE
    assert [wire.piece_count(n) for n in (0, 1, p - 1, p, p + 1, 3 * p)] == [0, 1, 1, 1, 2, 3]


def test_piece_size_is_read_at_call_time(monkeypatch):
    """Tests shrink PIECE_SIZE; every check follows it."""
    monkeypatch.setattr(wire, "PIECE_SIZE", 4)
    assert wire.piece_count(9) == 3
    assert wire.decode_header("pieces", wire.encode_header(96, size=9, piece=4)) == Header(96, 9, 4)

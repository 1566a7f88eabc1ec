from __future__ import annotations

import json
import random
import struct

import pytest

from meshollama.errors import FrameError
from meshollama.wire.frames import (
    MAX_PAYLOAD,
    Data,
    End,
    Error,
    Frame,
    FrameDecoder,
    Kind,
    Request,
    Response,
    encode,
    encode_data,
)


def hdr(kind: int, n: int) -> bytes:
    return struct.pack(">BI", kind, n)


def framed(kind: int, payload: bytes) -> bytes:
    return hdr(kind, len(payload)) + payload


# --- literal bytes ---------------------------------------------------------------

REQ = Request("POST", "/api/chat?x=1", (("content-type", "application/json"), ("x-a", "b")))
REQ_JSON = (
    b'{"method":"POST","path":"/api/chat?x=1",'
    b'"headers":[["content-type","application/json"],["x-a","b"]]}'
)
RESP = Response(200, (("content-type", "application/x-ndjson"),))
RESP_JSON = b'{"status":200,"headers":[["content-type","application/x-ndjson"]]}'
ERR = Error("busy", "at capacity", 503)
ERR_JSON = b'{"code":"busy","message":"at capacity","status":503}'

LITERALS: list[tuple[Frame, bytes]] = [
    (REQ, b"\x01" + len(REQ_JSON).to_bytes(4, "big") + REQ_JSON),
    (Data(b"hello"), b"\x02\x00\x00\x00\x05hello"),
    (Data(b""), b"\x02\x00\x00\x00\x00"),
    (End(), b"\x03\x00\x00\x00\x00"),
    (RESP, b"\x04" + len(RESP_JSON).to_bytes(4, "big") + RESP_JSON),
    (ERR, b"\x05" + len(ERR_JSON).to_bytes(4, "big") + ERR_JSON),
    (Request("GET", "/"), b'\x01\x00\x00\x00\x28{"method":"GET","path":"/","headers":[]}'),
    (Error("internal", "x"), b'\x05\x00\x00\x00\x2e{"code":"internal","message":"x","status":502}'),
]


@pytest.mark.parametrize("frame, data", LITERALS)
def test_literal_bytes(frame: Frame, data: bytes) -> None:
    assert encode(frame) == data
    assert FrameDecoder().feed(data) == [frame]


def test_kind_values() -> None:
    assert [int(k) for k in Kind] == [1, 2, 3, 4, 5]
    assert [k.name for k in Kind] == ["REQUEST", "DATA", "END", "RESPONSE", "ERROR"]


def test_non_ascii_header_value_round_trip() -> None:
    f = Response(200, (("x-name", "café ☕"),))
    data = encode(f)
    assert "café".encode() in data
    assert FrameDecoder().feed(data) == [f]


def test_decoder_defaults_for_optional_fields() -> None:
    d = FrameDecoder()
    assert d.feed(framed(1, b'{"method":"GET","path":"/x"}')) == [Request("GET", "/x", ())]
    assert d.feed(framed(4, b'{"status":204}')) == [Response(204, ())]
    assert d.feed(framed(5, b'{"code":"unavailable","message":"m"}')) == [Error("unavailable", "m", 502)]
    assert d.feed(framed(5, b'{"code":"bad_request","message":"m","status":400,"extra":1}')) == [
        Error("bad_request", "m", 400)
    ]


def test_decoded_headers_are_tuples() -> None:
    (f,) = FrameDecoder().feed(encode(REQ))
    assert isinstance(f, Request) and isinstance(f.headers, tuple) and isinstance(f.headers[0], tuple)


# --- incremental decoding ---------------------------------------------------------

EXCHANGE: list[Frame] = [
    *(REQ, Data(b'{"model":"llama3"}'), End()),
    *(RESP, Data(b"x" * 1000), Data(b"y"), End(), ERR),
]
EXCHANGE_BYTES = b"".join(encode(f) for f in EXCHANGE)


def test_byte_at_a_time() -> None:
    d = FrameDecoder()
    out: list[Frame] = []
    done = 0  # bytes of the frames decoded so far
    for i in range(len(EXCHANGE_BYTES)):
        new = d.feed(EXCHANGE_BYTES[i : i + 1])
        done += sum(len(encode(f)) for f in new)
        out += new
        assert d.pending == i + 1 - done
    assert out == EXCHANGE
    assert d.pending == 0


def test_pending_counts_partial_frame() -> None:
    d = FrameDecoder()
    assert d.feed(b"\x02\x00\x00") == [] and d.pending == 3
    assert d.feed(b"\x00\x03ab") == [] and d.pending == 7
    assert d.feed(b"c\x03") == [Data(b"abc")] and d.pending == 1
    assert d.feed(b"\x00\x00\x00\x00") == [End()] and d.pending == 0


def test_many_frames_in_one_feed() -> None:
    d = FrameDecoder()
    assert d.feed(EXCHANGE_BYTES * 50) == EXCHANGE * 50
    assert d.pending == 0


@pytest.mark.parametrize("seed", range(5))
def test_random_split_points(seed: int) -> None:
    rng = random.Random(seed)
    d = FrameDecoder()
    out: list[Frame] = []
    i = 0
    data = EXCHANGE_BYTES * 3
    while i < len(data):
        n = rng.randint(0, 40)
        out += d.feed(data[i : i + n])
        i += n
    assert out == EXCHANGE * 3 and d.pending == 0


def test_feed_empty() -> None:
    d = FrameDecoder()
    assert d.feed(b"") == [] and d.pending == 0


# --- encode_data and payload limits ---------------------------------------------


def test_encode_data_splits() -> None:
    data = bytes(range(256)) * 10
    out = encode_data(data, max_payload=1000)
    assert out == b"".join(encode(Data(data[i : i + 1000])) for i in (0, 1000, 2000))
    d = FrameDecoder(max_payload=1000)
    frames = d.feed(out)
    assert [len(f.data) for f in frames] == [1000, 1000, 560]  # type: ignore[union-attr]
    assert b"".join(f.data for f in frames) == data  # type: ignore[union-attr]


def test_encode_data_default_limit_and_empty() -> None:
    assert encode_data(b"") == b""
    assert encode_data(b"abc") == encode(Data(b"abc"))
    big = b"z" * (MAX_PAYLOAD + 1)
    out = encode_data(big)
    assert out[:5] == hdr(2, MAX_PAYLOAD)
    assert out[5 + MAX_PAYLOAD : 10 + MAX_PAYLOAD] == hdr(2, 1)
    assert FrameDecoder().feed(out) == [Data(b"z" * MAX_PAYLOAD), Data(b"z")]


def test_encode_refuses_oversize_data() -> None:
    encode(Data(b"x" * MAX_PAYLOAD))
    with pytest.raises(FrameError):
        encode(Data(b"x" * (MAX_PAYLOAD + 1)))


def test_encode_refuses_oversize_json() -> None:
    with pytest.raises(FrameError):
        encode(Error("internal", "m" * MAX_PAYLOAD))


def test_oversize_length_rejected_from_header_alone() -> None:
    d = FrameDecoder(max_payload=100)
    with pytest.raises(FrameError, match="over"):
        d.feed(hdr(2, 101))  # no payload sent at all
    assert d.pending == 0


def test_max_payload_boundary() -> None:
    d = FrameDecoder(max_payload=100)
    assert d.feed(framed(2, b"x" * 100)) == [Data(b"x" * 100)]
    with pytest.raises(FrameError):
        FrameDecoder().feed(hdr(2, MAX_PAYLOAD + 1))
    with pytest.raises(FrameError):
        FrameDecoder().feed(hdr(1, 0xFFFFFFFF))


def test_decoder_stays_failed() -> None:
    d = FrameDecoder()
    with pytest.raises(FrameError):
        d.feed(b"\x09\x00\x00\x00\x00")
    with pytest.raises(FrameError, match="failed earlier"):
        d.feed(encode(End()))


# --- rejection ------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        # unknown kinds, detected from the header
        b"\x00\x00\x00\x00\x00",
        b"\x06\x00\x00\x00\x00",
        b"\xff\x00\x00\x00\x01",
        # END with payload, detected from the header
        b"\x03\x00\x00\x00\x01",
        # not JSON / not UTF-8 / not an object
        framed(1, b""),
        framed(1, b"{"),
        framed(1, b"\xff\xfe"),
        framed(4, b'{"status":200,"headers":[["a","\xc3"]]}'),
        framed(4, b"[]"),
        framed(4, b"200"),
        framed(4, b"null"),
        framed(5, b'"busy"'),
        framed(4, b"[" * 100_000),
        framed(4, b'{"status":NaN}'),
        framed(4, b'{"status":' + b"9" * 5000 + b"}"),
        # missing fields
        framed(1, b'{"path":"/"}'),
        framed(1, b'{"method":"GET"}'),
        framed(4, b'{"headers":[]}'),
        framed(5, b'{"code":"busy"}'),
        framed(5, b'{"message":"m"}'),
        # wrong types / values
        framed(1, b'{"method":1,"path":"/"}'),
        framed(1, b'{"method":"","path":"/"}'),
        framed(1, b'{"method":"G T","path":"/"}'),
        framed(1, b'{"method":"GET","path":null}'),
        framed(1, b'{"method":"GET","path":"api/tags"}'),
        framed(1, b'{"method":"GET","path":"http://evil/"}'),
        framed(1, b'{"method":"GET","path":"/a b"}'),
        framed(1, b'{"method":"GET","path":"/a\\r\\nX: y"}'),
        framed(1, b'{"method":"GET","path":"/","headers":{}}'),
        framed(1, b'{"method":"GET","path":"/","headers":null}'),
        framed(1, b'{"method":"GET","path":"/","headers":"a: b"}'),
        framed(1, b'{"method":"GET","path":"/","headers":[["a"]]}'),
        framed(1, b'{"method":"GET","path":"/","headers":[["a","b","c"]]}'),
        framed(1, b'{"method":"GET","path":"/","headers":[["a",1]]}'),
        framed(1, b'{"method":"GET","path":"/","headers":[[1,"b"]]}'),
        framed(1, b'{"method":"GET","path":"/","headers":["ab"]}'),
        framed(1, b'{"method":"GET","path":"/","headers":[{"a":"b"}]}'),
        framed(1, b'{"method":"GET","path":"/","headers":[["",""]]}'),
        framed(1, b'{"method":"GET","path":"/","headers":[["a b","c"]]}'),
        framed(1, b'{"method":"GET","path":"/","headers":[["a:","c"]]}'),
        framed(1, b'{"method":"GET","path":"/","headers":[["a","b\\r\\nx: y"]]}'),
        framed(1, b'{"method":"GET","path":"/","headers":[["a","b\\u0000"]]}'),
        framed(1, b'{"method":"GET","path":"/","headers":[["a","\\ud800"]]}'),
        framed(1, json.dumps({"method": "GET", "path": "/", "headers": [["a", "b"]] * 257}).encode()),
        framed(4, b'{"status":"200"}'),
        framed(4, b'{"status":200.0}'),
        framed(4, b'{"status":true}'),
        framed(4, b'{"status":99}'),
        framed(4, b'{"status":600}'),
        framed(4, b'{"status":-200}'),
        framed(5, b'{"code":"nope","message":"m"}'),
        framed(5, b'{"code":1,"message":"m"}'),
        framed(5, b'{"code":"busy","message":null}'),
        framed(5, b'{"code":"busy","message":"m","status":700}'),
        framed(5, b'{"code":"busy","message":"m","status":null}'),
    ],
)
def test_decoder_rejects(data: bytes) -> None:
    with pytest.raises(FrameError):
        FrameDecoder().feed(data)


def test_rejects_after_good_frames_in_same_feed() -> None:
    with pytest.raises(FrameError):
        FrameDecoder().feed(encode(End()) + b"\x07\x00\x00\x00\x00")


def test_unknown_kind_detected_before_payload_arrives() -> None:
    d = FrameDecoder()
    with pytest.raises(FrameError):
        d.feed(b"\x08\x00\x00\x10\x00")  # promises 4 KiB, sends none


@pytest.mark.parametrize(
    "frame",
    [
        Request("GET", "no-slash"),
        Request("BAD METHOD", "/"),
        Request("GET", "/", (("bad name", "v"),)),
        Request("GET", "/", (("a", "line\nbreak"),)),
        Request("GET", "/", (("a", "\ud800"),)),
        Response(42),
        Response(True),  # type: ignore[arg-type]
        Error("whatever", "m"),
        Error("busy", "m", 600),
        Data("text"),  # type: ignore[arg-type]
        "not a frame",  # type: ignore[list-item]
    ],
)
def test_encode_validates(frame: Frame) -> None:
    with pytest.raises(FrameError):
        encode(frame)


def test_tab_allowed_in_header_values() -> None:
    f = Response(200, (("a", "x\ty"),))
    assert FrameDecoder().feed(encode(f)) == [f]


# --- fuzz -----------------------------------------------------------------------


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif op == 1:
            b[i:i] = rng.randbytes(rng.randint(1, 6))
        elif op == 2 and b:
            del b[i : i + rng.randint(1, 8)]
        else:
            j = rng.randrange(len(b) + 1)
            b[i:i] = b[min(i, j) : max(i, j)][:64]
    return bytes(b)


def test_fuzz_only_frame_error() -> None:
    rng = random.Random(20240501)
    seeds = [encode(f) for f, _ in LITERALS] + [EXCHANGE_BYTES]
    outcomes = {"ok": 0, "error": 0}
    for i in range(4000):
        if i % 4 == 0:
            data = rng.randbytes(rng.randrange(0, 200))
        else:
            data = mutate(rng.choice(seeds), rng)
        d = FrameDecoder(max_payload=4096)
        try:
            pos = 0
            while pos < len(data):  # random chunking too
                n = rng.randint(1, 64)
                for f in d.feed(data[pos : pos + n]):
                    # whatever is accepted re-encodes to the same frame
                    assert FrameDecoder().feed(encode(f)) == [f]
                pos += n
            outcomes["ok"] += 1
        except FrameError:
            outcomes["error"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > 0

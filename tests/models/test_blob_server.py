"""BlobServer against in-memory streams: admission steps, path escapes, bodies, pieces, rate cap."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from meshollama.errors import BadRequest, P2PError, StreamReset
from meshollama.models import blob_client, blob_server, manifest, wire
from meshollama.models.blob_client import BlobError
from meshollama.models.blob_server import BlobServer

MiB = 1024 * 1024


class _Pipe:
    """One direction of a fake stream."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.closed = False
        self.reset = False
        self.changed = trio.Event()

    def poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class FakeStream:
    """What handlers and clients use of :class:`meshollama.p2p.stream.Stream`, in memory.

    Like py-libp2p, a reset drops what the other side has not read yet."""

    def __init__(self, peer_id: str, inbound: _Pipe, outbound: _Pipe, timeout: float = math.inf) -> None:
        self.peer_id = peer_id
        self.timeout = timeout
        self._in, self._out = inbound, outbound
        self.ended: str | None = None  # "close" or "reset", whichever this side did first

    async def read(self, max_bytes: int = 65536, *, timeout: float | None = None) -> bytes:
        try:
            with trio.fail_after(self.timeout if timeout is None else timeout):
                while True:
                    if self._in.reset:
                        raise StreamReset("reset")
                    if self._in.buf:
                        out = bytes(self._in.buf[:max_bytes])
                        del self._in.buf[:max_bytes]
                        await trio.lowlevel.checkpoint()
                        return out
                    if self._in.closed:
                        return b""
                    await self._in.changed.wait()
        except trio.TooSlowError:
            await self.reset()
            raise P2PError("read timed out") from None

    async def write(self, data: bytes, *, timeout: float | None = None) -> None:
        await trio.lowlevel.checkpoint()
        if self.ended or self._out.reset:
            raise StreamReset("write on an ended stream")
        self._out.buf += data
        self._out.poke()

    async def close(self) -> None:
        if not self.ended:
            self.ended = "close"
            self._out.closed = True
            self._out.poke()

    async def reset(self) -> None:
        if not self.ended:
            self.ended = "reset"
        for pipe in (self._in, self._out):
            pipe.reset = True
            pipe.buf.clear()
            pipe.poke()


def stream_pair(peer: str = "peerA") -> tuple[FakeStream, FakeStream]:
    """(client end, server end); the server sees ``peer``."""
    up, down = _Pipe(), _Pipe()
    return FakeStream("server", down, up), FakeStream(peer, up, down)


class FakeStore:
    kind = "ollama"
    root = Path("/nonexistent")

    def __init__(self, manifests=None, blobs=None) -> None:
        self.manifests = manifests or {}
        self.blobs = blobs or {}
        self.calls: list[tuple[str, str]] = []

    def manifest(self, name):
        self.calls.append(("manifest", name))
        if name == "bad name":
            raise BadRequest("invalid model name")
        return self.manifests.get(name)

    def blob(self, digest):
        self.calls.append(("blob", digest))
        return self.blobs.get(digest)


def make_server(store: FakeStore | None = None, **kw) -> tuple[BlobServer, list]:
    events: list = []
    kw.setdefault("allow", lambda peer: peer != "stranger")
    server = BlobServer(lambda: store, on_served=lambda p, n: events.append(("served", p, n)),
                        on_refused=lambda r: events.append(("refused", r)), **kw)
    return server, events


async def raw_exchange(server: BlobServer, data: bytes, *, peer: str = "peerA") -> tuple[bytes, str]:
    """Send ``data`` as the request; everything the server sent back, and how it
    ended. Like a client, it resets the stream once it has read an error line."""
    client, end = stream_pair(peer)
    got = bytearray()
    how = "close"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, end)
        await client.write(data)
        try:
            while chunk := await client.read():
                got += chunk
                if got.startswith(b'{"error"') and got.endswith(b"\n"):
                    how = "reset"
                    break
        except StreamReset:
            how = "reset"
        await client.reset()
    return bytes(got), how


async def error_of(server: BlobServer, data: bytes, *, peer: str = "peerA") -> str:
    got, how = await raw_exchange(server, data, peer=peer)
    answer = json.loads(got)
    assert set(answer) == {"error", "code"} and got.endswith(b"\n")
    return answer["code"]


def blob(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(size))


MANIFEST = manifest.build(None, [manifest.Layer(manifest.sha256_digest(b"weights"), 7, manifest.MODEL)])


@pytest.fixture
def store(tmp_path: Path) -> FakeStore:
    data = blob(100_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return FakeStore({"llama3.2:1b": MANIFEST},
                     {manifest.sha256_digest(data): path, manifest.sha256_digest(b"small"): b"small"})


FILE_D = manifest.sha256_digest(blob(100_000))
SMALL_D = manifest.sha256_digest(b"small")
ABSENT_D = "sha256:" + "0" * 64


async def client_call(server: BlobServer, fn, *args, peer: str = "peerA"):
    """``fn(stream, *args)`` against ``server``; its exception comes out bare, not in a group."""
    client, end = stream_pair(peer)
    failed: Exception | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, end)
        try:
            result = await fn(client, *args)
        except Exception as exc:
            failed = exc
    if failed is not None:
        raise failed
    return result


async def test_manifest_and_ranges(store):
    server, events = make_server(store)
    with trio.fail_after(5):
        assert await client_call(server, blob_client.get_manifest, "llama3.2:1b") == MANIFEST.raw
        parts: list[bytes] = []
        assert await client_call(server, blob_client.get_range, FILE_D, 1000, 50_000, parts.append) == 100_000
        assert b"".join(parts) == blob(100_000)[1000:51_000]
        parts.clear()
        assert await client_call(server, blob_client.get_range, FILE_D, 99_999, 1, parts.append) == 100_000
        assert b"".join(parts) == blob(100_000)[-1:]
        parts.clear()
        assert await client_call(server, blob_client.get_range, SMALL_D, 1, 4, parts.append) == 5
        assert b"".join(parts) == b"mall"
    assert events == [("served", "peerA", len(MANIFEST.raw)), ("served", "peerA", 50_000),
                      ("served", "peerA", 1), ("served", "peerA", 4)]
    assert server.limiter.in_use == 0


async def test_not_found_never_says_why(store, tmp_path):
    (tmp_path / "blobs").mkdir()
    held_elsewhere = "sha256:" + hashlib.sha256(b"on disk, not held").hexdigest()
    (tmp_path / "blobs" / held_elsewhere.replace(":", "-")).write_bytes(b"on disk, not held")
    server, events = make_server(store)
    with trio.fail_after(5):
        for request in (wire.Request("manifest", model="nope"), wire.Request("pieces", digest=ABSENT_D),
                        wire.Request("get", digest=held_elsewhere, offset=0, length=1),
                        wire.Request("manifest", model="../../../etc/passwd"),
                        wire.Request("manifest", model="llama3.2:1b/../../x")):
            got, how = await raw_exchange(server, wire.encode_request(request))
            assert json.loads(got)["code"] == "not_found" and how == "reset"
        # Without a store, everything is not_found; a path from the request never reaches a file.
        empty, _ = make_server(None)
        assert await error_of(empty, wire.encode_request(wire.Request("pieces", digest=FILE_D))) == "not_found"
    assert [c for c in store.calls if "passwd" in c[1] or "/x" in c[1]] == [
        ("manifest", "../../../etc/passwd"), ("manifest", "llama3.2:1b/../../x")]


@pytest.mark.parametrize("digest", ["../../etc/passwd", "sha256:../../x", "/etc/passwd", "sha256-" + "ab" * 32,
                                    "sha256:" + "AB" * 32, "sha256:" + "ab" * 32 + "/../x", "sha256:" + "a" * 63])
async def test_path_escapes_are_bad_requests_that_never_reach_the_store(store, digest):
    server, events = make_server(store)
    with trio.fail_after(5):
        for obj in ({"op": "get", "digest": digest, "offset": 0, "length": 1}, {"op": "pieces", "digest": digest}):
            assert await error_of(server, json.dumps(obj).encode() + b"\n") == "bad_request"
    assert store.calls == []
    assert events == [("refused", "bad_request")] * 2


@pytest.mark.parametrize("raw", [
    b"not json\n",
    b"[]\n",
    b'{"op":"get","digest":"' + FILE_D.encode() + b'","offset":true,"length":1}\n',
    b'{"op":"get","digest":"' + FILE_D.encode() + b'","offset":0,"length":false}\n',
    b'{"op":"get","digest":"' + FILE_D.encode() + b'","offset":"0","length":1}\n',
    b'{"op":"get","digest":"' + FILE_D.encode() + b'","offset":0,"length":67108865}\n',
    b'{"op":"get","digest":"' + FILE_D.encode() + b'","offset":99999999999999999999,"length":1}\n',
    b'{"op":"manifest","model":12}\n',
    b'{"op":"rm","digest":"' + FILE_D.encode() + b'"}\n',
])
async def test_malformed_requests(store, raw):
    server, _ = make_server(store)
    with trio.fail_after(5):
        assert await error_of(server, raw) == "bad_request"
    assert store.calls == []


async def test_range_past_the_end_and_store_errors(store):
    server, events = make_server(store)
    with trio.fail_after(5):
        for offset, length in ((0, 100_001), (100_000, 1), (99_999, 2), (2**40, 1)):
            with pytest.raises(BlobError) as info:
                await client_call(server, blob_client.get_range, FILE_D, offset, length, lambda b: None)
            assert info.value.code == "bad_request"
        with pytest.raises(BlobError) as info:
            await client_call(server, blob_client.get_manifest, "bad name")
        assert info.value.code == "bad_request"

        def broken(digest):
            raise RuntimeError("disk on fire")

        store.blob = broken
        with pytest.raises(BlobError) as info:
            await client_call(server, blob_client.get_pieces, FILE_D)
        assert info.value.code == "internal" and "fire" not in info.value.message


async def test_oversized_line(store):
    server, events = make_server(store)
    with trio.fail_after(5):
        assert await error_of(server, b"{" + b" " * wire.MAX_LINE) == "bad_request"
        assert await error_of(server, b'{"op":"manifest","model":"' + b"a" * 5000 + b'"}\n') == "bad_request"
    assert events == [("refused", "too_long")] * 2
    assert store.calls == []


async def test_not_allowed_peer_is_forbidden(store):
    server, events = make_server(store)
    with trio.fail_after(5):
        request = wire.encode_request(wire.Request("get", digest=FILE_D, offset=0, length=1))
        assert await error_of(server, request, peer="stranger") == "forbidden"
    assert store.calls == [] and events == [("refused", "forbidden")]


async def test_a_peer_that_leaves_before_its_line_is_not_answered(store):
    server, events = make_server(store)
    client, end = stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle, end)
            await client.write(b'{"op":')
            await client.close()
        assert end.ended == "reset" and events == [] and server.limiter.in_use == 0


async def test_slowloris_is_cut_off_at_request_timeout(store, autojump_clock: MockClock):
    server, events = make_server(store, request_timeout=10.0)
    client, end = stream_pair()
    request = wire.encode_request(wire.Request("pieces", digest=FILE_D))
    got = bytearray()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle, end)
            start = trio.current_time()

            async def trickle():
                try:
                    for byte in request:
                        await client.write(bytes([byte]))
                        await trio.sleep(1.0)  # each byte well within any per-read timeout
                except StreamReset:
                    pass

            nursery.start_soon(trickle)
            try:
                while chunk := await client.read():
                    got += chunk
            except StreamReset:
                pass
            refused_at = trio.current_time() - start
    assert json.loads(got)["code"] == "bad_request"
    assert 10.0 <= refused_at <= 10.0 + blob_server.REFUSAL_GRACE + 0.01
    assert events == [("refused", "timeout")] and store.calls == []


async def test_busy_at_max_streams_and_per_peer(store):
    server, events = make_server(store, max_streams=3, max_per_peer=2)
    request = wire.encode_request(wire.Request("get", digest=SMALL_D, offset=0, length=1))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            held = []
            for peer in ("peerA", "peerA", "peerB"):  # they never send a line: each holds its slot
                client, end = stream_pair(peer)
                held.append(client)
                nursery.start_soon(server.handle, end)
            await trio.testing.wait_all_tasks_blocked()
            assert server.limiter.in_use == 3
            assert await error_of(server, request, peer="peerC") == "busy"  # all slots taken
            await held.pop().reset()  # peerB leaves
            await trio.testing.wait_all_tasks_blocked()
            assert await error_of(server, request, peer="peerA") == "busy"  # peerA is at its own limit
            parts: list[bytes] = []
            assert await client_call(server, blob_client.get_range, SMALL_D, 0, 5, parts.append, peer="peerC") == 5
            for client in held:
                await client.reset()
    assert server.limiter.in_use == 0
    assert events.count(("refused", "busy")) == 2 and store.calls == [("blob", SMALL_D)]


async def test_busy_is_answered_before_anything_is_read(store):
    server, events = make_server(store, max_streams=1, max_per_peer=1)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            hog, end = stream_pair("peerA")
            nursery.start_soon(server.handle, end)
            await trio.testing.wait_all_tasks_blocked()
            client, end = stream_pair("peerB")
            nursery.start_soon(server.handle, end)
            answer = await client.read()  # nothing sent, yet answered
            assert json.loads(answer)["code"] == "busy"
            await client.reset()
            await hog.reset()


@pytest.mark.parametrize("size_in_pieces", [(0, 0), (0, 1), (1, -1), (1, 0), (1, 1), (3, 0), (3, 5)])
@pytest.mark.parametrize("as_bytes", [False, True])
async def test_pieces(monkeypatch, tmp_path, size_in_pieces, as_bytes):
    monkeypatch.setattr(wire, "PIECE_SIZE", 4096)
    monkeypatch.setattr(blob_server, "CHUNK", 1000)  # pieces span several reads
    n, extra = size_in_pieces
    data = blob(n * 4096 + extra, seed=n + extra)
    digest = manifest.sha256_digest(data)
    path = tmp_path / "b"
    path.write_bytes(data)
    server, _ = make_server(FakeStore(blobs={digest: data if as_bytes else path}))
    with trio.fail_after(5):
        size, hashes = await client_call(server, blob_client.get_pieces, digest)
    assert size == len(data)
    assert hashes == [hashlib.sha256(data[i : i + 4096]).digest() for i in range(0, len(data), 4096)]
    assert len(hashes) == wire.piece_count(len(data))


async def test_pieces_are_cached_and_shared(monkeypatch, tmp_path):
    monkeypatch.setattr(wire, "PIECE_SIZE", 4096)
    data = blob(50_000)
    digest = manifest.sha256_digest(data)
    path = tmp_path / "b"
    path.write_bytes(data)
    server, _ = make_server(FakeStore(blobs={digest: path}), max_per_peer=16)
    results = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                async def one():
                    results.append(await client_call(server, blob_client.get_pieces, digest))
                nursery.start_soon(one)
        assert server.pieces.computed == 1 and len(results) == 8 and len({repr(r) for r in results}) == 1
        await client_call(server, blob_client.get_pieces, digest)
        assert server.pieces.computed == 1
        path.write_bytes(data[:-1])  # a new version of the file: hashed again
        os.utime(path, ns=(1, 1))
        size, hashes = await client_call(server, blob_client.get_pieces, digest)
        assert server.pieces.computed == 2 and size == len(data) - 1


async def test_a_blob_that_shrinks_mid_body_resets_the_stream(monkeypatch, tmp_path):
    monkeypatch.setattr(blob_server, "CHUNK", 1000)
    data = blob(10_000)
    path = tmp_path / "b"
    path.write_bytes(data)
    digest = manifest.sha256_digest(data)
    server, events = make_server(FakeStore(blobs={digest: path}))
    parts: list[bytes] = []

    def sink(chunk: bytes) -> None:
        parts.append(chunk)
        if len(parts) == 1:
            os.truncate(path, 3000)

    with trio.fail_after(5):
        with pytest.raises(P2PError):
            await client_call(server, blob_client.get_range, digest, 0, 10_000, sink)
    assert sum(map(len, parts)) < 10_000
    assert events == [("served", "peerA", 3000)]


async def test_rate_cap_takes_virtual_time(store, autojump_clock: MockClock):
    rate = 100_000.0  # bytes/s; its burst is one second of it
    data = blob(2 * MiB)
    digest = manifest.sha256_digest(data)
    server, events = make_server(FakeStore(blobs={digest: data}), rate=rate, max_per_peer=4)
    parts: list[bytes] = []
    # No fail_after here: the autojump clock would jump to its deadline while a
    # store call runs in a thread (trio sees every task blocked).
    start = trio.current_time()
    await client_call(server, blob_client.get_range, digest, 0, len(data), parts.append)
    one = trio.current_time() - start
    assert b"".join(parts) == data
    burst = server.bucket.burst
    assert (len(data) - burst) / rate - 0.01 <= one <= len(data) / rate + 0.01
    # Two streams at once share the same rate: twice the bytes, about twice the time.
    await trio.sleep(10)  # the bucket refills
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(client_call, server, blob_client.get_range, digest, 0, len(data), lambda b: None)
    two = trio.current_time() - start
    assert (2 * len(data) - burst) / rate - 0.01 <= two <= 2 * len(data) / rate + 0.01


async def test_token_bucket_alone(autojump_clock: MockClock):
    bucket = blob_server.TokenBucket(1000.0, 500.0)
    start = trio.current_time()
    await bucket.take(500)  # the burst: at once
    assert trio.current_time() == start
    await bucket.take(1000)
    assert trio.current_time() - start == pytest.approx(1.0)
    await trio.sleep(100)
    start = trio.current_time()
    await bucket.take(400)  # refilled, but never past the burst
    await bucket.take(400)
    assert trio.current_time() - start == pytest.approx(0.3)
    unlimited = blob_server.TokenBucket(0, 1)
    start = trio.current_time()
    await unlimited.take(10**12)
    assert trio.current_time() == start


async def test_client_refuses_a_short_or_long_body():
    async def serve(answer: bytes, how: str):
        client, end = stream_pair()
        failed: Exception | None = None
        async with trio.open_nursery() as nursery:
            async def server():
                await end.read()
                await end.write(answer)
                await (end.close() if how == "close" else end.reset())
            nursery.start_soon(server)
            try:
                await blob_client.get_range(client, FILE_D, 0, 10, lambda b: None)
            except Exception as exc:
                failed = exc
        if failed is not None:
            raise failed

    with trio.fail_after(5):
        for answer, code in ((wire.encode_header(10, size=100) + b"x" * 9, "short"),
                             (wire.encode_header(10, size=100) + b"x" * 11, "malformed"),
                             (wire.encode_header(9, size=100) + b"x" * 9, "malformed"),
                             (wire.encode_header(10, size=5) + b"x" * 10, "malformed"),
                             (b'{"ok":true}\n', "malformed"),
                             (b"x" * 5000, "malformed"),
                             (b"", "short"),
                             (wire.encode_error("busy", "later"), "busy")):
            with pytest.raises(BlobError) as info:
                await serve(answer, "close")
            assert info.value.code == code, answer[:40]
        with pytest.raises(BlobError) as info:
            await blob_client.get_range(stream_pair()[0], FILE_D, 0, 0, lambda b: None)
        assert info.value.code == "bad_request"

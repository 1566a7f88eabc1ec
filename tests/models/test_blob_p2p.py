"""``/meshollama/blob/1`` between two real libp2p hosts on loopback."""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from meshollama.models import blob_client, manifest, wire
from meshollama.models.blob_client import BlobError
from meshollama.models.blob_server import BlobServer

from ..p2p.helpers import running_hosts, settings

MiB = 1024 * 1024


class Store:
    kind = "ollama"

    def __init__(self, root: Path, manifests: dict, blobs: dict) -> None:
        self.root = root
        self._manifests, self._blobs = manifests, blobs

    def manifest(self, name):
        return self._manifests.get(name)

    def blob(self, digest):
        return self._blobs.get(digest)


def make_blob(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return manifest.sha256_digest(data)


@asynccontextmanager
async def serving(store: Store, **kw):
    """Host ``a`` serves ``store``; yields (server, a, b) with ``b`` connected to ``a``."""
    kw.setdefault("allow", lambda peer: True)
    server = BlobServer(lambda: store, **kw)
    async with running_hosts(settings(), settings(), handlers={wire.PROTOCOL: server.handle}) as (a, b):
        await b.connect(a.addrs())
        yield server, a, b


async def test_manifest_pieces_and_a_blob_in_ranges(tmp_path):
    path = tmp_path / "blob"
    digest = make_blob(path, 20 * MiB + 12345)
    model = manifest.build(None, [manifest.Layer(digest, path.stat().st_size, manifest.MODEL)])
    store = Store(tmp_path, {"m:latest": model}, {digest: path})
    served: list[tuple[str, int]] = []
    with trio.fail_after(60):
        async with serving(store, on_served=lambda p, n: served.append((p, n))) as (server, a, b):
            raw = await blob_client.get_manifest(await b.open_stream(a.peer_id, wire.PROTOCOL), "m:latest")
            assert raw == model.raw and manifest.parse(raw).matches(model.digest)

            size, hashes = await blob_client.get_pieces(await b.open_stream(a.peer_id, wire.PROTOCOL), digest)
            data = path.read_bytes()
            assert size == len(data)
            assert hashes == [hashlib.sha256(data[i : i + wire.PIECE_SIZE]).digest()
                              for i in range(0, size, wire.PIECE_SIZE)]
            assert len(hashes) == 3

            got = bytearray()
            for offset in range(0, size, 6 * MiB):  # ranges across piece boundaries
                length = min(6 * MiB, size - offset)
                stream = await b.open_stream(a.peer_id, wire.PROTOCOL)
                assert await blob_client.get_range(stream, digest, offset, length, got.extend) == size
            assert hashlib.sha256(got).hexdigest() == digest.removeprefix("sha256:")
    assert sum(n for _, n in served) == len(model.raw) + 32 * 3 + size
    assert {p for p, _ in served} == {b.peer_id}


async def test_refusals_reach_the_client_whole(tmp_path):
    path = tmp_path / "blob"
    digest = make_blob(path, 1000)
    store = Store(tmp_path, {}, {digest: path})
    with trio.fail_after(30):
        async with serving(store, allow=lambda peer: False) as (server, a, b):
            with pytest.raises(BlobError) as info:
                await blob_client.get_pieces(await b.open_stream(a.peer_id, wire.PROTOCOL), digest)
            assert info.value.code == "forbidden"
        async with serving(store) as (server, a, b):
            for fetch, code in (
                (lambda s: blob_client.get_manifest(s, "absent"), "not_found"),
                (lambda s: blob_client.get_range(s, "sha256:" + "1" * 64, 0, 1, lambda c: None), "not_found"),
                (lambda s: blob_client.get_range(s, digest, 999, 2, lambda c: None), "bad_request"),
            ):
                with pytest.raises(BlobError) as info:
                    await fetch(await b.open_stream(a.peer_id, wire.PROTOCOL))
                assert info.value.code == code
            # The stream still works afterwards, and every slot came back.
            got = bytearray()
            await blob_client.get_range(await b.open_stream(a.peer_id, wire.PROTOCOL), digest, 0, 1000, got.extend)
            assert bytes(got) == path.read_bytes()
            assert server.limiter.in_use == 0


async def test_busy_over_libp2p(tmp_path):
    path = tmp_path / "blob"
    digest = make_blob(path, 1000)
    with trio.fail_after(30):
        async with serving(Store(tmp_path, {}, {digest: path}), max_streams=4, max_per_peer=1) as (server, a, b):
            hog = await b.open_stream(a.peer_id, wire.PROTOCOL)  # holds b's one slot, sends nothing
            await hog.write(b'{"op":')
            while server.limiter.in_use == 0:
                await trio.sleep(0.01)
            with pytest.raises(BlobError) as info:
                await blob_client.get_pieces(await b.open_stream(a.peer_id, wire.PROTOCOL), digest)
            assert info.value.code == "busy"
            await hog.reset()
            while server.limiter.in_use:
                await trio.sleep(0.01)
            size, hashes = await blob_client.get_pieces(await b.open_stream(a.peer_id, wire.PROTOCOL), digest)
            assert size == 1000 and len(hashes) == 1


async def test_throughput_of_one_max_range(tmp_path):
    """Prints MB/s of one MAX_RANGE get_range over loopback libp2p; asserts only the bytes."""
    path = tmp_path / "blob"
    digest = make_blob(path, wire.MAX_RANGE)
    with trio.fail_after(120):
        async with serving(Store(tmp_path, {}, {digest: path})) as (server, a, b):
            h = hashlib.sha256()
            stream = await b.open_stream(a.peer_id, wire.PROTOCOL)
            start = time.perf_counter()
            await blob_client.get_range(stream, digest, 0, wire.MAX_RANGE, h.update)
            took = time.perf_counter() - start
    assert "sha256:" + h.hexdigest() == digest
    print(f"\nget_range of {wire.MAX_RANGE // MiB} MiB over loopback libp2p: "
          f"{took:.2f} s, {wire.MAX_RANGE / took / 1e6:.1f} MB/s")

"""BlobFetch and pull() against real BlobServers over in-memory streams: the
faults the review found (a write error inside a worker, two pulls sharing a
blob, a tie between piece lists lost to a holder that then fails, a bogus
layer size, a holder busy for good)."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import trio

from meshollama.models import manifest, wire
from meshollama.models import pull as pullmod
from meshollama.models.blob_fetch import BlobFetch, PullError
from meshollama.models.blob_server import BlobServer, _Memory, _Refusal
from meshollama.models.ollama_dir import OllamaDir
from tests.models.test_blob_server import FakeStore, stream_pair

MIB = 1024 * 1024


class Sources:
    """Each peer a BlobServer answering over in-memory streams."""

    def __init__(self, nursery, servers: dict, holders=()):
        self.nursery, self.servers, self._holders = nursery, servers, list(holders)

    async def open(self, peer_id):
        client, end = stream_pair("me")
        self.nursery.start_soon(self.servers[peer_id].handle, end)
        return client

    def label(self, peer_id):
        return peer_id

    def holders(self, name):
        return list(self._holders)

    async def dht_holders(self, name):
        return []

    async def providers(self, digest):
        return []


def holder(root: Path, name: str, data: bytes):
    digest = manifest.sha256_digest(data)
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / digest.replace(":", "-")).write_bytes(data)
    m = manifest.build(None, [manifest.Layer(digest, len(data), manifest.MODEL)])
    store = OllamaDir(root)
    store.install(name, m)
    return store, m


def server(store, cls=BlobServer):
    return cls(lambda: store, allow=lambda peer: True)


async def nothing(*_):
    pass


async def test_a_write_error_inside_a_worker_ends_the_fetch_as_itself(tmp_path, monkeypatch):
    src, m = holder(tmp_path / "a", "m:latest", os.urandom(20 * MIB))
    (tmp_path / "b").mkdir()

    def full(fd, buf, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            sources = Sources(nursery, {"A": server(src)})
            monkeypatch.setattr(os, "pwrite", full)
            with pytest.raises(PullError, match="no space left on device"):
                await BlobFetch(OllamaDir(tmp_path / "b"), m.layers[0], sources).run(["A"], nothing)
            nursery.cancel_scope.cancel()
    assert not list((tmp_path / "b" / ".meshollama" / "partial").iterdir())  # the claimed space is given back


async def test_two_pulls_of_names_sharing_a_blob_both_succeed(tmp_path):
    src, m = holder(tmp_path / "a", "m:latest", os.urandom(20 * MIB))
    src.install("m:1b", m)
    (tmp_path / "b").mkdir()
    dst = OllamaDir(tmp_path / "b")
    results = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            sources = Sources(nursery, {"A": server(src)}, holders=[("A", m.digest)])

            async def one(name):
                await pullmod.pull(name, dst, sources, nothing)
                results[name] = "ok"

            async with trio.open_nursery() as both:
                both.start_soon(one, "m:latest")
                both.start_soon(one, "m:1b")
            nursery.cancel_scope.cancel()
    assert results == {"m:latest": "ok", "m:1b": "ok"}
    assert sorted(name for name, _ in dst.models()) == ["m:1b", "m:latest"]


async def test_a_tie_lost_to_a_holder_that_then_fails_its_piece_switches_to_the_live_list(tmp_path):
    data = os.urandom(24 * MIB)
    src, m = holder(tmp_path / "a", "m:latest", data)
    (tmp_path / "p").mkdir()

    class Hostile(BlobServer):  # answers its (wrong) list first, then cannot serve that piece
        async def _answer(self, stream, request):
            if request.op == "pieces":
                hashes = [hashlib.sha256(data[i:i + wire.PIECE_SIZE]).digest()
                          for i in range(0, len(data), wire.PIECE_SIZE)]
                hashes[1] = b"\0" * 32
                body = b"".join(hashes)
                await self._send(stream, wire.encode_header(len(body), size=len(data), piece=wire.PIECE_SIZE),
                                 _Memory(body, ()), 0, len(body))
                return
            if request.op == "get" and request.offset == wire.PIECE_SIZE:
                raise _Refusal("internal", "cannot read the blob")
            return await super()._answer(stream, request)

    class Slow(BlobServer):
        async def _answer(self, stream, request):
            if request.op == "pieces":
                await trio.sleep(0.2)
            return await super()._answer(stream, request)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            sources = Sources(nursery, {"HONEST": server(src, Slow), "EVIL": server(src, Hostile)})
            fetch = BlobFetch(OllamaDir(tmp_path / "p"), m.layers[0], sources)
            await fetch.run(["HONEST", "EVIL"], nothing)
            nursery.cancel_scope.cancel()
    assert (tmp_path / "p" / "blobs" / m.layers[0].digest.replace(":", "-")).read_bytes() == data
    assert fetch.plan.peers["EVIL"].dropped and not fetch.plan.peers["HONEST"].dropped


async def test_a_layer_claiming_all_our_space_is_refused_before_any_is_claimed(tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    m = manifest.build(None, [manifest.Layer("sha256:" + "ab" * 32, free - 4096, manifest.MODEL)])
    (tmp_path / "p").mkdir()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            sources = Sources(nursery, {"EVIL": server(FakeStore({"bait:latest": m}, {}))},
                              holders=[("EVIL", m.digest)])
            with pytest.raises(PullError, match="no space left on device"):
                await pullmod.pull("bait:latest", OllamaDir(tmp_path / "p"), sources, nothing, reserve=1 << 20)
            # A size that fits: the space is claimed only once a holder lists the blob; this one cannot.
            half = manifest.build(None, [manifest.Layer("sha256:" + "cd" * 32, free // 2, manifest.MODEL)])
            sources.servers["EVIL"] = server(FakeStore({"bait:latest": half}, {}))
            sources._holders = [("EVIL", half.digest)]
            with pytest.raises(PullError, match="could not list|no holder"):
                await pullmod.pull("bait:latest", OllamaDir(tmp_path / "p"), sources, nothing)
            nursery.cancel_scope.cancel()
    assert not list((tmp_path / "p" / ".meshollama" / "partial").iterdir())


def test_leaf_finds_the_error_inside_nested_groups():
    from meshollama.models.blob_fetch import leaf

    full = PullError("no space left on device")
    two = ExceptionGroup("outer", [ExceptionGroup("workers", [full, PullError("no space left on device")])])
    assert leaf(two) is full  # two workers hit one full disk: the first error, bare
    mixed = ExceptionGroup("g", [PullError("x"), OSError("y")])
    assert leaf(mixed) is mixed  # different errors: kept as a group
    assert leaf(ExceptionGroup("g", [ValueError("only")])).args == ("only",)

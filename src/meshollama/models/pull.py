"""One model pulled from peers, with Ollama's progress lines.

What ``ollama pull`` prints comes from these objects, in Ollama's order::

    {"status": "pulling manifest"}
    {"status": "pulling 6a0746a1ec1a", "digest": "sha256:6a07…", "total": N, "completed": M,
     "meshollama": {"from": {"<peer id>": bytes, ...}}}          (repeated, every blob)
    {"status": "verifying sha256 digest"}
    {"status": "writing manifest"}
    {"status": "success"}

The manifest comes from a holder of the digest most holders announce, and
must be the one announced (:meth:`~.manifest.Manifest.matches`): a peer cannot
slip another model in under a name. Each missing blob is fetched by
:class:`~.blob_fetch.BlobFetch` from every holder of that digest at once.
Blobs already here are not fetched again; nothing is visible as a model
until every blob is verified and committed and the manifest (or Modelfile)
is written in one rename (:meth:`~.store.Store.install`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol

import trio

from .. import names
from ..errors import BadRequest, P2PError
from .blob_client import get_manifest
from .blob_fetch import BlobFetch, PullError
from .manifest import Layer, Manifest, blob_filename, parse
from .store import Store

log = logging.getLogger("meshollama.models")

Emit = Callable[[dict], Awaitable[None]]


class NotInMesh(Exception):
    """No peer announces the model: the pull goes to the backend's registry."""


class MeshSources(Protocol):
    def holders(self, name: str) -> list[tuple[str, str]]:
        """(peer id, announced digest) of the peers, not us, that serve ``name``; best first."""
        ...

    async def dht_holders(self, name: str) -> list[tuple[str, str]]: ...

    async def providers(self, digest: str) -> list[str]: ...

    async def open(self, peer_id: str): ...

    def label(self, peer_id: str) -> str: ...


def _groups(holders: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """Holders by digest, the digest most of them announce first."""
    by_digest: dict[str, list[str]] = {}
    for peer, digest in holders:
        by_digest.setdefault(digest.lower().removeprefix("sha256:"), []).append(peer)
    return sorted(by_digest.items(), key=lambda kv: -len(kv[1]))


async def fetch_manifest(name: str, sources: MeshSources) -> tuple[Manifest, list[str]]:
    """The manifest of ``name`` from a holder, and the holders of that digest.
    Raises NotInMesh when nobody holds it, PullError when no holder gave a good one."""
    holders = sources.holders(name) or await sources.dht_holders(name)
    if not holders:
        raise NotInMesh(name)
    problems: list[str] = []
    for digest, peers in _groups(holders):
        for peer in peers:
            try:
                with trio.fail_after(30):
                    manifest = parse(await get_manifest(await sources.open(peer), name))
            except (P2PError, BadRequest, trio.TooSlowError) as exc:
                problems.append(f"{sources.label(peer)}: {exc or 'timed out'}")
                continue
            if digest and not manifest.matches(digest):  # "": found in the DHT, no digest announced
                problems.append(f"{sources.label(peer)}: its manifest is not the digest it announces")
                continue
            return manifest, peers
    raise PullError(f"no peer could send the manifest of {names.shortest(name)} ({'; '.join(problems)})")


_BLOB_LOCKS: dict[tuple[str, str], trio.Lock] = {}


@asynccontextmanager
async def _blob_lock(store: Store, digest: str) -> AsyncIterator[None]:
    """One fetch of a blob per store at a time: two models can share one (``llama3.2`` and
    ``llama3.2:3b`` are the same manifest), and two fetches would share its partial file."""
    key = (str(store.root), digest)
    lock = _BLOB_LOCKS.setdefault(key, trio.Lock())
    try:
        async with lock:
            yield
    finally:
        if not lock.locked() and lock.statistics().tasks_waiting == 0:
            _BLOB_LOCKS.pop(key, None)


def _check_space(store: Store, missing: list[Layer], reserve: int) -> None:
    partial = store.partial_dir()
    need = 0
    for layer in missing:
        have = partial / blob_filename(layer.digest)
        need += max(0, layer.size - (have.stat().st_size if have.is_file() else 0))
    free = store.free_bytes()
    if need > free - reserve:
        kept = f", {reserve / 1e9:.2f} GB of which models.min_free_bytes keeps free" if reserve else ""
        raise PullError(f"no space left on device: the model needs {need / 1e9:.2f} GB more, "
                        f"{free / 1e9:.2f} GB free in {store.root}{kept}")


async def pull(name: str, store: Store, sources: MeshSources, emit: Emit, *, reserve: int = 0) -> Manifest:
    """Pull ``name`` from peers into ``store``; progress goes to ``emit``.
    Raises NotInMesh before emitting anything if no peer holds it."""
    manifest, peers = await fetch_manifest(name, sources)
    await emit({"status": "pulling manifest"})
    check = getattr(store, "check", None)
    if check is not None:
        check(manifest)  # BadRequest: a model this store cannot take (an adapter for the embedded engine)
    blobs = manifest.blobs()
    present = {la.digest for la in blobs if await trio.to_thread.run_sync(store.has_blob, la.digest)}
    missing = [la for la in blobs if la.digest not in present]
    await trio.to_thread.run_sync(_check_space, store, missing, reserve)
    log.info("pulling %s (%s) from %d peer(s): %d of %d blobs to fetch", names.shortest(name),
             manifest.digest[:19], len(peers), len(missing), len(blobs))
    for layer in blobs:
        status = {"status": f"pulling {layer.digest.removeprefix('sha256:')[:12]}", "digest": layer.digest,
                  "total": layer.size}
        if layer.digest in present:
            await emit({**status, "completed": layer.size})
            continue

        async def progress(done: int, by_peer: dict[str, int], status: dict = status) -> None:
            await emit({**status, "completed": done, "meshollama": {"from": by_peer}})

        async with _blob_lock(store, layer.digest):
            if await trio.to_thread.run_sync(store.has_blob, layer.digest):  # another pull fetched it meanwhile
                await emit({**status, "completed": layer.size})
                continue
            # The DHT only when heartbeats name few holders: it costs up to a few seconds.
            extra = [p for p in await sources.providers(layer.digest) if p not in peers] if len(peers) < 2 else []
            await BlobFetch(store, layer, sources).run(
                peers + extra, progress,
                more_peers=lambda: [p for p, d in sources.holders(name) if manifest.matches(d)])
    await emit({"status": "verifying sha256 digest"})
    await emit({"status": "writing manifest"})
    await trio.to_thread.run_sync(store.install, name, manifest)
    return manifest

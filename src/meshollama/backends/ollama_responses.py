"""Answers in the exact bytes real Ollama sends (sans-IO).

*Shapers* turn generated text deltas plus the final :class:`GenStats` into
NDJSON for native streams or SSE for ``/v1`` (one JSON object when not
streamed); :class:`StopScanner` cuts generated text at stop strings; the rest
builds complete replies for embeddings, model listings and pulls. Section
numbers in comments point into ``shared/reference/ollama-api.md``.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .. import names
from ..catalog import ModelInfo
from .ollama_api import JSON, JSON_UTF8, NDJSON, SSE, SSE_DONE, Endpoint, Reply, dumps, ndjson, rfc3339, sse
from .ollama_requests import EmbedJob, GenerateJob


# --- generation output ----------------------------------------------------------------


@dataclass(frozen=True)
class GenStats:
    """How one generation ended, in Ollama's units (nanoseconds, token counts)."""

    done_reason: str
    total_ns: int
    load_ns: int
    prompt_n: int
    prompt_ns: int
    eval_n: int
    eval_ns: int
    context: tuple[int, ...] = ()

    def metrics(self) -> dict[str, int]:
        return {
            "total_duration": self.total_ns,
            "load_duration": self.load_ns,
            "prompt_eval_count": self.prompt_n,
            "prompt_eval_duration": self.prompt_ns,
            "eval_count": self.eval_n,
            "eval_duration": self.eval_ns,
        }

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_n,
            "completion_tokens": self.eval_n,
            "total_tokens": self.prompt_n + self.eval_n,
        }


class Shaper:
    """Turns deltas into wire bytes for one response. Subclasses per API."""

    content_type: str = NDJSON

    def __init__(self, model: str, stream: bool) -> None:
        self.model = model
        self.stream = stream
        self.text: list[str] = []

    def delta(self, text: str, now_ns: int) -> bytes:
        """Bytes to send for a text delta now (``b""`` when buffering or empty)."""
        if not text:
            return b""
        if not self.stream:
            self.text.append(text)
            return b""
        return self._chunk(text, now_ns)

    def finish(self, stats: GenStats, now_ns: int) -> bytes:
        raise NotImplementedError

    def fail(self, message: str, now_ns: int) -> bytes:
        """A mid-stream error line (after the status was sent). §1.5."""
        return ndjson({"error": message})

    def _chunk(self, text: str, now_ns: int) -> bytes:
        raise NotImplementedError


class NativeGenerate(Shaper):
    def __init__(self, model: str, stream: bool, want_context: bool) -> None:
        super().__init__(model, stream)
        self.want_context = want_context
        self.content_type = NDJSON if stream else JSON_UTF8

    def _chunk(self, text: str, now_ns: int) -> bytes:
        return ndjson({"model": self.model, "created_at": rfc3339(now_ns), "response": text, "done": False})

    def finish(self, stats: GenStats, now_ns: int) -> bytes:
        obj: dict[str, Any] = {
            "model": self.model,
            "created_at": rfc3339(now_ns),
            "response": "" if self.stream else "".join(self.text),
            "done": True,
            "done_reason": stats.done_reason,
        }
        if self.want_context:
            obj["context"] = list(stats.context)
        obj.update(stats.metrics())
        return ndjson(obj) if self.stream else dumps(obj)


class NativeChat(Shaper):
    def __init__(self, model: str, stream: bool) -> None:
        super().__init__(model, stream)
        self.content_type = NDJSON if stream else JSON_UTF8

    def _chunk(self, text: str, now_ns: int) -> bytes:
        return ndjson({
            "model": self.model, "created_at": rfc3339(now_ns),
            "message": {"role": "assistant", "content": text}, "done": False,
        })

    def finish(self, stats: GenStats, now_ns: int) -> bytes:
        obj: dict[str, Any] = {
            "model": self.model,
            "created_at": rfc3339(now_ns),
            "message": {"role": "assistant", "content": "" if self.stream else "".join(self.text)},
            "done": True,
            "done_reason": stats.done_reason,
        }
        obj.update(stats.metrics())
        return ndjson(obj) if self.stream else dumps(obj)


class _OpenAIShaper(Shaper):
    prefix = ""

    def __init__(self, model: str, stream: bool, include_usage: bool, seq: int, created: int) -> None:
        super().__init__(model, stream)
        self.include_usage = include_usage
        self.id = f"{self.prefix}{seq}"
        self.created = created
        self.content_type = SSE if stream else JSON

    def fail(self, message: str, now_ns: int) -> bytes:
        # Ollama ends the stream without [DONE] here (§3.1); an SSE error object is what
        # the OpenAI SDKs turn into an APIError, so the client learns what happened.
        return sse({"error": {"message": message, "type": "api_error", "param": None, "code": None}})


class OpenAIChat(_OpenAIShaper):
    prefix = "chatcmpl-"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._role_sent = False

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "fp_ollama"}

    def _chunk(self, text: str, now_ns: int) -> bytes:
        delta: dict[str, Any] = {"content": text}
        if not self._role_sent:
            delta = {"role": "assistant", "content": text}
            self._role_sent = True
        return sse({**self._head("chat.completion.chunk"),
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})

    def finish(self, stats: GenStats, now_ns: int) -> bytes:
        if not self.stream:
            return dumps({
                **self._head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(self.text)},
                             "finish_reason": stats.done_reason}],
                "usage": stats.usage(),
            })
        out = sse({**self._head("chat.completion.chunk"),
                   "choices": [{"index": 0, "delta": {}, "finish_reason": stats.done_reason}]})
        if self.include_usage:
            out += sse({**self._head("chat.completion.chunk"), "choices": [], "usage": stats.usage()})
        return out + SSE_DONE


class OpenAICompletion(_OpenAIShaper):
    prefix = "cmpl-"
    _ZERO = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

    def _obj(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        obj: dict[str, Any] = {"id": self.id, "object": "text_completion", "created": self.created,
                               "model": self.model, "system_fingerprint": "fp_ollama", "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        return obj

    def _chunk(self, text: str, now_ns: int) -> bytes:
        usage = dict(self._ZERO) if self.include_usage else None
        return sse(self._obj([{"text": text, "index": 0, "finish_reason": None}], usage))

    def finish(self, stats: GenStats, now_ns: int) -> bytes:
        if not self.stream:
            return dumps(self._obj([{"text": "".join(self.text), "index": 0,
                                     "finish_reason": stats.done_reason}], stats.usage()))
        usage = dict(self._ZERO) if self.include_usage else None
        out = sse(self._obj([{"text": "", "index": 0, "finish_reason": stats.done_reason}], usage))
        if self.include_usage:
            out += sse(self._obj([], stats.usage()))
        return out + SSE_DONE


def make_shaper(job: GenerateJob, *, seq: int, created: int) -> Shaper:
    """The shaper for ``job``'s API. ``seq`` numbers /v1 ids (Ollama: 0..998), ``created`` is unix s."""
    if job.endpoint is Endpoint.GENERATE:
        return NativeGenerate(job.model, job.stream, job.want_context)
    if job.endpoint is Endpoint.CHAT:
        return NativeChat(job.model, job.stream)
    if job.endpoint is Endpoint.V1_CHAT:
        return OpenAIChat(job.model, job.stream, job.include_usage, seq, created)
    if job.endpoint is Endpoint.V1_COMPLETIONS:
        return OpenAICompletion(job.model, job.stream, job.include_usage, seq, created)
    raise ValueError(f"no shaper for {job.endpoint}")


def load_reply(job: GenerateJob, now_ns: int, reason: str = "load") -> Reply:
    """Empty prompt / no messages: one object with ``done_reason`` load or unload (§2.3, §2.4)."""
    obj: dict[str, Any] = {"model": job.model, "created_at": rfc3339(now_ns)}
    if job.endpoint is Endpoint.CHAT:
        obj["message"] = {"role": "assistant", "content": ""}
    else:
        obj["response"] = ""
    obj.update(done=True, done_reason=reason)
    return Reply(200, JSON_UTF8, dumps(obj))


class StopScanner:
    """Cuts generated text at the first stop string, holding back possible prefixes.

    ``feed`` returns ``(text safe to send, stopped)``; after a stop the rest is
    dropped. ``flush`` returns what was held back when generation ends otherwise.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self.stopped = True
            return buf[:cut], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


# --- embeddings (§2.5, §2.6, §3.4) ------------------------------------------------------


def normalise(vec: Sequence[float]) -> list[float]:
    """L2-normalised copy; a zero vector stays zero."""
    norm = math.sqrt(math.fsum(x * x for x in vec))
    return [float(x) / norm for x in vec] if norm > 0 else [float(x) for x in vec]


def shape_vector(vec: Sequence[float], dimensions: int = 0) -> list[float]:
    """Ollama's /api/embed treatment: truncate to ``dimensions`` (if smaller), then normalise."""
    if 0 < dimensions < len(vec):
        vec = vec[:dimensions]
    return normalise(vec)


def embed_reply(job: EmbedJob, vectors: Sequence[Sequence[float]], *, prompt_n: int,
                total_ns: int, load_ns: int) -> Reply:
    """The answer for any embedding endpoint, given raw (unnormalised) vectors."""
    if job.endpoint is Endpoint.EMBEDDINGS:
        vec = [float(x) for x in vectors[0]] if vectors else []
        return Reply(200, JSON_UTF8, dumps({"embedding": vec}))
    shaped = [shape_vector(v, job.dimensions) for v in vectors]
    if job.endpoint is Endpoint.V1_EMBEDDINGS:
        data = []
        for i, vec in enumerate(shaped):
            emb: Any = vec
            if job.encoding_format == "base64":
                emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
            data.append({"object": "embedding", "embedding": emb, "index": i})
        return Reply(200, JSON, dumps({
            "object": "list", "data": data, "model": job.model,
            "usage": {"prompt_tokens": prompt_n, "total_tokens": prompt_n},
        }))
    obj: dict[str, Any] = {"model": job.model, "embeddings": shaped}
    if vectors:
        obj.update(total_duration=total_ns, load_duration=load_ns, prompt_eval_count=prompt_n)
    return Reply(200, JSON_UTF8, dumps(obj))


# --- model listings (§2.7-2.9, §3.5-3.6) -----------------------------------------------


def _details(info: ModelInfo) -> dict[str, Any]:
    d = {"parent_model": "", "format": "gguf", "family": "", "families": None,
         "parameter_size": "", "quantization_level": ""}
    d.update(info.details)
    return d


def tags_reply(models: Iterable[ModelInfo]) -> Reply:
    """``GET /api/tags``: newest first, ``[]`` never ``null``."""
    items = sorted(models, key=lambda m: m.modified_at, reverse=True)
    out = [{"name": m.name, "model": m.name, "modified_at": m.modified_at, "size": m.size,
            "digest": m.digest, "details": _details(m)} for m in items]
    return Reply(200, JSON_UTF8, dumps({"models": out}))


@dataclass(frozen=True)
class Running:
    """A loaded model as ``/api/ps`` shows it."""

    info: ModelInfo
    expires_ns: int
    context_length: int
    size_vram: int = 0


def ps_reply(running: Iterable[Running]) -> Reply:
    """``GET /api/ps``: sorted by ``expires_at`` descending."""
    items = sorted(running, key=lambda r: r.expires_ns, reverse=True)
    out = [{"name": r.info.name, "model": r.info.name, "size": r.info.size, "digest": r.info.digest,
            "details": _details(r.info), "expires_at": rfc3339(r.expires_ns), "size_vram": r.size_vram,
            "context_length": r.context_length} for r in items]
    return Reply(200, JSON_UTF8, dumps({"models": out}))


def show_reply(info: ModelInfo, *, template: str, model_info: Mapping[str, Any],
               stop: Sequence[str] = (), license: str = "", source: str = "") -> Reply:
    """``POST /api/show``: ``model_info`` always present (ollama-python requires it)."""
    parameters = "\n".join(f'{"stop":<30} {json.dumps(s, ensure_ascii=False)}' for s in stop)
    modelfile = (
        f'# Modelfile generated by "ollama show"\n# To build a new Modelfile based on this, replace FROM with:\n'
        f"# FROM {info.name}\n\nFROM {source}\nTEMPLATE {json.dumps(template, ensure_ascii=False)}\n"
        + "".join(f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}\n" for s in stop)
    )
    obj = {
        "license": license,
        "modelfile": modelfile,
        "parameters": parameters,
        "template": template,
        "details": _details(info),
        "model_info": dict(model_info),
        "capabilities": list(info.capabilities),
        "modified_at": info.modified_at,
    }
    return Reply(200, JSON_UTF8, dumps(obj))


def _owner_and_created(info: ModelInfo) -> tuple[str, int]:
    ns = names.parse(info.name).namespace if names.is_valid(info.name) else names.DEFAULT_NAMESPACE
    try:
        created = int(datetime.fromisoformat(info.modified_at.replace("Z", "+00:00")).timestamp())
    except ValueError:
        created = 0
    return ns, created


def v1_models_reply(models: Iterable[ModelInfo]) -> Reply:
    """``GET /v1/models`` in ``/api/tags`` order (``[]`` rather than Ollama's ``null`` when empty)."""
    items = sorted(models, key=lambda m: m.modified_at, reverse=True)
    data = []
    for m in items:
        owner, created = _owner_and_created(m)
        data.append({"id": m.name, "object": "model", "created": created, "owned_by": owner})
    return Reply(200, JSON, dumps({"object": "list", "data": data}))


def v1_model_reply(model_id: str, info: ModelInfo) -> Reply:
    """``GET /v1/models/{model}``: ``id`` echoes the path segment verbatim."""
    owner, created = _owner_and_created(info)
    return Reply(200, JSON, dumps({"id": model_id, "object": "model", "created": created, "owned_by": owner}))


def pull_reply(stream: bool) -> Reply:
    """``/api/pull`` of a model already here: the progress Ollama shows, ending in success."""
    if not stream:
        return Reply(200, JSON, dumps({"status": "success"}))
    lines = [ndjson({"status": s}) for s in ("pulling manifest", "verifying sha256 digest",
                                             "writing manifest", "success")]
    return Reply(200, NDJSON, b"".join(lines))


def pull_missing_reply(model: str, stream: bool) -> Reply:
    """``/api/pull`` of a model this node does not have: it cannot download models."""
    message = f"pull model manifest: the embedded backend cannot download {model!r}; put a .gguf file in the model directory"
    if not stream:
        return Reply(500, JSON_UTF8, dumps({"error": message}))
    return Reply(200, NDJSON, ndjson({"status": "pulling manifest"}) + ndjson({"error": message}))
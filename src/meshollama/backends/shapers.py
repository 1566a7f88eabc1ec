"""Generated text as the bytes real Ollama sends (sans-IO).

A *shaper* turns the pieces a generation produces (text deltas, later tool
calls and log-probabilities) plus the final :class:`GenStats` into NDJSON for
native streams or SSE for ``/v1`` (one JSON object when not streamed);
:class:`StopScanner` cuts generated text at stop strings. Section numbers in
comments point into ``shared/reference/ollama-api.md``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .ollama_api import JSON, JSON_UTF8, NDJSON, SSE, SSE_DONE, Endpoint, Reply, dumps, ndjson, rfc3339, sse
from .ollama_requests import GenerateJob

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

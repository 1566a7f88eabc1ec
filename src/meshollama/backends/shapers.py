"""Generated text as the bytes real Ollama sends (sans-IO).

A *shaper* turns the pieces a generation produces (text deltas, later tool
calls and log-probabilities) plus the final :class:`GenStats` into NDJSON for
native streams or SSE for ``/v1`` (one JSON object when not streamed);
:class:`StopScanner` cuts generated text at stop strings. Section numbers in
comments point into ``shared/reference/ollama-api.md``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .ollama_api import JSON, JSON_UTF8, NDJSON, SSE, SSE_DONE, Endpoint, Reply, dumps, ndjson, rfc3339, sse
from .ollama_requests import GenerateJob
from .toolcalls import ToolCall, ToolCallParser, tool_names

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


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability, and the likeliest alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()

    def wire(self) -> dict[str, Any]:
        """Ollama's ``logprobs[i]`` (also used unchanged in OpenAI's ``logprobs.content``)."""
        obj = _token_obj(self.token, self.logprob)
        if self.top:
            obj["top_logprobs"] = [_token_obj(t, lp) for t, lp in self.top]
        return obj


def _token_obj(token: str, logprob: float) -> dict[str, Any]:
    obj: dict[str, Any] = {"token": token, "logprob": logprob}
    if token:
        obj["bytes"] = list(token.encode("utf-8"))
    return obj


@dataclass(frozen=True)
class Piece:
    """What the engine hands over per step: a text delta, with its tokens' logprobs when asked."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


class Shaper:
    """Turns pieces into wire bytes for one response. Subclasses per API.

    With a :class:`~.toolcalls.ToolCallParser` (the request had tools), text
    goes through it first: tool calls come out as calls, never as text.
    """

    content_type: str = NDJSON

    def __init__(self, model: str, stream: bool, *, parser: ToolCallParser | None = None) -> None:
        self.model = model
        self.stream = stream
        self.parser = parser
        self.text: list[str] = []
        self.calls: list[ToolCall] = []
        self.logprobs: list[TokenLogprob] = []

    def delta(self, piece: Piece | str, now_ns: int) -> bytes:
        """Bytes to send for a piece now (``b""`` when buffering or empty)."""
        if isinstance(piece, str):
            piece = Piece(piece)
        text, calls = piece.text, []
        if self.parser is not None:
            text, calls = self.parser.feed(text)
        return self._emit(text, calls, piece.logprobs, now_ns)

    def finish(self, stats: GenStats, now_ns: int) -> bytes:
        """The rest the tool parser held back, then the final chunk."""
        tail = b""
        if self.parser is not None:
            text, calls = self.parser.finish()
            tail = self._emit(text, calls, (), now_ns)
        return tail + self._final(stats, now_ns)

    def fail(self, message: str, now_ns: int) -> bytes:
        """A mid-stream error line (after the status was sent). §1.5."""
        return ndjson({"error": message})

    def _emit(self, text: str, calls: list[ToolCall], logprobs: tuple[TokenLogprob, ...], now_ns: int) -> bytes:
        if not (text or calls or logprobs):
            return b""
        if not self.stream:
            self.text.append(text)
            self.calls.extend(calls)
            self.logprobs.extend(logprobs)
            return b""
        self.calls.extend(calls)
        return self._chunk(text, calls, logprobs, now_ns)

    def _chunk(self, text: str, calls: list[ToolCall], logprobs: tuple[TokenLogprob, ...], now_ns: int) -> bytes:
        raise NotImplementedError

    def _final(self, stats: GenStats, now_ns: int) -> bytes:
        raise NotImplementedError


def _with_logprobs(obj: dict[str, Any], logprobs: Iterable[TokenLogprob]) -> dict[str, Any]:
    wire = [lp.wire() for lp in logprobs]
    if wire:
        obj["logprobs"] = wire
    return obj


class NativeGenerate(Shaper):
    def __init__(self, model: str, stream: bool, want_context: bool) -> None:
        super().__init__(model, stream)
        self.want_context = want_context
        self.content_type = NDJSON if stream else JSON_UTF8

    def _chunk(self, text: str, calls: list[ToolCall], logprobs: tuple[TokenLogprob, ...], now_ns: int) -> bytes:
        return ndjson(_with_logprobs({"model": self.model, "created_at": rfc3339(now_ns), "response": text,
                                      "done": False}, logprobs))

    def _final(self, stats: GenStats, now_ns: int) -> bytes:
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
        if not self.stream:
            _with_logprobs(obj, self.logprobs)
        return ndjson(obj) if self.stream else dumps(obj)


class NativeChat(Shaper):
    def __init__(self, model: str, stream: bool, *, parser: ToolCallParser | None = None) -> None:
        super().__init__(model, stream, parser=parser)
        self.content_type = NDJSON if stream else JSON_UTF8

    @staticmethod
    def _message(text: str, calls: Iterable[ToolCall]) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        wire = [c.native() for c in calls]
        if wire:
            msg["tool_calls"] = wire
        return msg

    def _chunk(self, text: str, calls: list[ToolCall], logprobs: tuple[TokenLogprob, ...], now_ns: int) -> bytes:
        return ndjson(_with_logprobs({"model": self.model, "created_at": rfc3339(now_ns),
                                      "message": self._message(text, calls), "done": False}, logprobs))

    def _final(self, stats: GenStats, now_ns: int) -> bytes:
        whole = not self.stream
        obj: dict[str, Any] = {
            "model": self.model,
            "created_at": rfc3339(now_ns),
            "message": self._message("".join(self.text) if whole else "", self.calls if whole else ()),
            "done": True,
            "done_reason": stats.done_reason,
        }
        if whole:
            _with_logprobs(obj, self.logprobs)
        obj.update(stats.metrics())
        return ndjson(obj) if self.stream else dumps(obj)


class _OpenAIShaper(Shaper):
    prefix = ""

    def __init__(self, model: str, stream: bool, include_usage: bool, seq: int, created: int,
                 *, parser: ToolCallParser | None = None) -> None:
        super().__init__(model, stream, parser=parser)
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

    def _reason(self, stats: GenStats) -> str:
        return "tool_calls" if self.calls and stats.done_reason == "stop" else stats.done_reason

    def _chunk(self, text: str, calls: list[ToolCall], logprobs: tuple[TokenLogprob, ...], now_ns: int) -> bytes:
        delta: dict[str, Any] = {"content": text}
        if not self._role_sent:
            delta = {"role": "assistant", "content": text}
            self._role_sent = True
        if calls:
            delta["tool_calls"] = [c.openai() for c in calls]
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
        if logprobs:
            choice["logprobs"] = {"content": [lp.wire() for lp in logprobs]}
        return sse({**self._head("chat.completion.chunk"), "choices": [choice]})

    def _final(self, stats: GenStats, now_ns: int) -> bytes:
        if not self.stream:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text)}
            if self.calls:
                message["tool_calls"] = [c.openai() for c in self.calls]
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": self._reason(stats)}
            if self.logprobs:
                choice["logprobs"] = {"content": [lp.wire() for lp in self.logprobs]}
            return dumps({**self._head("chat.completion"), "choices": [choice], "usage": stats.usage()})
        out = sse({**self._head("chat.completion.chunk"),
                   "choices": [{"index": 0, "delta": {}, "finish_reason": self._reason(stats)}]})
        if self.include_usage:
            out += sse({**self._head("chat.completion.chunk"), "choices": [], "usage": stats.usage()})
        return out + SSE_DONE


class OpenAICompletion(_OpenAIShaper):
    """``/v1/completions``. Like Ollama, it answers no logprobs (the legacy
    completions shape differs, and Ollama never fills it)."""

    prefix = "cmpl-"
    _ZERO = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

    def _obj(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        obj: dict[str, Any] = {"id": self.id, "object": "text_completion", "created": self.created,
                               "model": self.model, "system_fingerprint": "fp_ollama", "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        return obj

    def _emit(self, text: str, calls: list[ToolCall], logprobs: tuple[TokenLogprob, ...], now_ns: int) -> bytes:
        return super()._emit(text, calls, (), now_ns)

    def _chunk(self, text: str, calls: list[ToolCall], logprobs: tuple[TokenLogprob, ...], now_ns: int) -> bytes:
        usage = dict(self._ZERO) if self.include_usage else None
        return sse(self._obj([{"text": text, "index": 0, "finish_reason": None}], usage))

    def _final(self, stats: GenStats, now_ns: int) -> bytes:
        if not self.stream:
            return dumps(self._obj([{"text": "".join(self.text), "index": 0,
                                     "finish_reason": stats.done_reason}], stats.usage()))
        usage = dict(self._ZERO) if self.include_usage else None
        out = sse(self._obj([{"text": "", "index": 0, "finish_reason": stats.done_reason}], usage))
        if self.include_usage:
            out += sse(self._obj([], stats.usage()))
        return out + SSE_DONE


def make_shaper(job: GenerateJob, *, seq: int, created: int, tool_tag: str = "<tool_call>",
                rng: random.Random | None = None) -> Shaper:
    """The shaper for ``job``'s API. ``seq`` numbers /v1 ids (Ollama: 0..998), ``created`` is unix s.

    A chat with tools gets a tool-call parser looking for ``tool_tag`` (the
    model's template says which, :func:`.toolcalls.tool_tag`).
    """
    parser = ToolCallParser(tool_tag, tool_names(job.tools), rng=rng) if job.tools else None
    if job.endpoint is Endpoint.GENERATE:
        return NativeGenerate(job.model, job.stream, job.want_context)
    if job.endpoint is Endpoint.CHAT:
        return NativeChat(job.model, job.stream, parser=parser)
    if job.endpoint is Endpoint.V1_CHAT:
        return OpenAIChat(job.model, job.stream, job.include_usage, seq, created, parser=parser)
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

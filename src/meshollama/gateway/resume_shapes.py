"""The four streamed formats that mid-stream resume speaks (pure: data in, data out).

Reading: :func:`read` says what one parsed chunk carries (text, thinking,
tool calls, its end) in any of the four formats. Writing: the continuation
request for each format (:func:`continuation_request`), what a native chat
continuation's chunks become in the client's format, and the final objects
whose counts cover the whole answer. :mod:`.resume` holds the state machine
that uses them; nothing here keeps state.

Chunk shapes follow ``shared/reference/ollama-api.md`` §2.3, §2.4, §3.2, §3.3.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import dumps

CHAT = "/api/chat"
GENERATE = "/api/generate"
V1_CHAT = "/v1/chat/completions"
V1_COMPLETIONS = "/v1/completions"
RESUMABLE = frozenset({CHAT, GENERATE, V1_CHAT, V1_COMPLETIONS})
SSE_PATHS = frozenset({V1_CHAT, V1_COMPLETIONS})

# What every OpenAI chunk of one answer shares; continuation chunks get the original's.
TEMPLATE_KEYS = ("id", "object", "created", "model", "system_fingerprint")
MESH_KEY = "meshollama"  # on the final object of a resumed answer: {"peers": [...], "resumed": n}
SSE_DONE = b"data: [DONE]\n\n"
_EVENT_END = re.compile(rb"\n\r?\n")  # an SSE event ends with an empty line
_METRICS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
            "eval_count", "eval_duration")
# Native generate fields that mean the same on /api/chat (the rest is the prompt, or refused).
_GENERATE_TO_CHAT = ("options", "keep_alive", "think", "truncate", "shift")


@dataclass(frozen=True, slots=True)
class Piece:
    """What one chunk says, whatever its format."""

    text: str = ""
    thinking: str = ""
    tools: bool = False  # it carries tool calls
    error: str | None = None  # the upstream's own error (its message)
    final: bool = False  # native ``done: true``; SSE ``data: [DONE]``
    finish: str | None = None  # OpenAI ``finish_reason`` when set
    usage: bool = False  # OpenAI usage chunk (``choices: []``)


OPAQUE = Piece()  # not a chunk we understand: relayed, not tracked
DONE = Piece(final=True)


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int | None:
    """An integral JSON number (Go decodes ``10.0`` into an int option too), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def error_text(error: Any) -> str:
    """The message of a native (``"boom"``) or OpenAI (``{"message": ...}``) error value."""
    if isinstance(error, str):
        return error
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return dumps(error).decode("utf-8", "replace")


def read(fmt: str, obj: Any) -> Piece:
    """What the parsed chunk ``obj`` of a ``fmt`` stream (a request path) carries."""
    if not isinstance(obj, dict):
        return OPAQUE
    if obj.get("error"):
        return Piece(error=error_text(obj["error"]))
    if fmt == CHAT:
        msg = _dict(obj.get("message"))
        return Piece(_str(msg.get("content")), _str(msg.get("thinking")), bool(msg.get("tool_calls")),
                     final=obj.get("done") is True)
    if fmt == GENERATE:
        return Piece(_str(obj.get("response")), _str(obj.get("thinking")), bool(obj.get("tool_calls")),
                     final=obj.get("done") is True)
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return OPAQUE
    if not choices:
        return Piece(usage=isinstance(obj.get("usage"), dict))
    choice = _dict(choices[0])
    finish = choice.get("finish_reason") if isinstance(choice.get("finish_reason"), str) else None
    if fmt == V1_CHAT:
        delta = _dict(choice.get("delta"))
        thinking = _str(delta.get("reasoning")) or _str(delta.get("reasoning_content"))
        return Piece(_str(delta.get("content")), thinking, bool(delta.get("tool_calls")), finish=finish or None)
    return Piece(_str(choice.get("text")), finish=finish or None)


# --- framing ------------------------------------------------------------------


class Cutter:
    """Holds back the incomplete end of a byte stream: ``push`` returns the
    longest prefix ending at a line (NDJSON) or event (SSE) boundary.

    Each byte is searched once (the search starts where the held-back part
    ended), so a long line arriving in small pieces costs linear time.
    """

    def __init__(self, sse: bool) -> None:
        self.sse = sse
        self.buf = bytearray()

    def push(self, data: bytes) -> bytes:
        buf = self.buf
        if not buf and data.endswith(b"\n\n" if self.sse else b"\n"):
            return data  # the usual case: whole lines or events, no copy
        start = len(buf)
        buf += data
        if self.sse:
            frm = max(0, start - 2)  # a boundary may straddle the held-back part and ``data``
            lf, crlf = buf.rfind(b"\n\n", frm), buf.rfind(b"\n\r\n", frm)
            end = max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
        else:
            end = buf.rfind(b"\n", start) + 1
        if not end:
            return b""
        out = bytes(buf[:end])
        del buf[:end]
        return out

    def take(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def units(self, region: bytes) -> list[bytes]:
        """The lines / events of a cut region, without their terminators."""
        if self.sse:
            return [e for e in _EVENT_END.split(region) if e.strip()]
        return region.split(b"\n")[:-1]

    def unit_bytes(self, unit: bytes) -> bytes:
        return unit + (b"\n\n" if self.sse else b"\n")


def _event_data(event: bytes) -> bytes | None:
    """The ``data`` of one SSE event, or None if it has none."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:].rstrip(b"\r")
    data = []
    for raw in event.split(b"\n"):
        raw = raw.rstrip(b"\r")
        if raw.startswith(b"data:"):
            value = raw[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(data) if data else None


def parse(unit: bytes, sse: bool, fmt: str) -> tuple[Piece, Any]:
    """One line (NDJSON) or event (SSE) of a ``fmt`` stream: what it says, and its JSON (None if not JSON)."""
    if sse:
        data = _event_data(unit)
        if data is None:
            return OPAQUE, None
        if data.strip() == b"[DONE]":
            return DONE, None
    else:
        data = unit
        if not data.strip():
            return OPAQUE, None
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return OPAQUE, None
    return read(fmt, obj), obj


# --- requests ---------------------------------------------------------------


def refusal(path: str, payload: dict) -> str | None:
    """Why an answer to this request cannot be continued from its text, or None.

    Tool calls and structured output are not plain text a model can pick up
    mid-way; several choices, log-probabilities, echo, suffix and token
    contexts are answers the continuation request cannot express.
    """
    if payload.get("tools") or payload.get("functions"):
        return "the request uses tools"
    if path in (CHAT, GENERATE) and payload.get("format"):
        return "the request asks for structured output (format)"
    fmt = payload.get("response_format")
    plain = fmt is None or (isinstance(fmt, dict) and str(fmt.get("type") or "text").strip().lower() == "text")
    if path in SSE_PATHS and not plain:
        return "the request asks for structured output (response_format)"
    n = _int(payload.get("n"))
    if n is not None and n > 1:
        return "the request asks for several choices (n)"
    if payload.get("logprobs") or payload.get("top_logprobs"):
        return "the request asks for logprobs"
    if payload.get("suffix"):
        return "the request has a suffix"
    if path == GENERATE and (payload.get("context") or payload.get("template")):
        return "the request has a context or template"
    if payload.get("echo"):
        return "the request asks for echo"
    return None


def length_limit(path: str, payload: dict) -> int | None:
    """The request's positive token limit (``options.num_predict``, ``max_tokens``), or None."""
    if path in SSE_PATHS:
        value = _int(payload.get("max_tokens"))
    else:
        value = _int(_dict(payload.get("options")).get("num_predict"))
    return value if value is not None and value > 0 else None


def _assistant(messages: Any, text: str, thinking: str, thinking_key: str) -> list:
    """``messages`` plus the answer so far as the final assistant message.

    If the request already ends with an assistant message (the client's own
    prefill, which Ollama continues), the answer so far extends that one:
    a second assistant message would make the model continue only the second.
    """
    messages = list(messages) if isinstance(messages, list) else []
    last = messages[-1] if messages else None
    if (isinstance(last, dict) and str(last.get("role", "")).lower() == "assistant"
            and isinstance(last.get("content") or "", str) and isinstance(last.get(thinking_key) or "", str)):
        merged = {**last, "content": (last.get("content") or "") + text}
        if thinking:
            merged[thinking_key] = (last.get(thinking_key) or "") + thinking
        return [*messages[:-1], merged]
    message = {"role": "assistant", "content": text}
    if thinking:
        message[thinking_key] = thinking
    return [*messages, message]


def _with_limit(options: Any, left: int | None) -> dict:
    options = dict(options) if isinstance(options, dict) else {}
    if left is not None:
        options["num_predict"] = left
    return options


def continuation_request(path: str, payload: dict, text: str, thinking: str, left: int | None) -> tuple[str, dict]:
    """The request that continues an answer to ``payload`` (sent to ``path``)
    from ``text`` and ``thinking`` relayed so far; ``left`` the reduced length
    limit (None: the request had none). Returns (path, JSON object)."""
    if path == CHAT:
        body = {**payload, "messages": _assistant(payload.get("messages"), text, thinking, "thinking"), "stream": True}
        if left is not None:
            body["options"] = _with_limit(payload.get("options"), left)
        return CHAT, body
    if path == V1_CHAT:
        # Ollama reads an assistant message's ``reasoning`` as its thinking.
        body = {**payload, "messages": _assistant(payload.get("messages"), text, thinking, "reasoning"), "stream": True}
        if left is not None:
            body["max_tokens"] = left
        return V1_CHAT, body
    if path == GENERATE and payload.get("raw"):
        body = {**payload, "prompt": _str(payload.get("prompt")) + text, "stream": True}
        if left is not None:
            body["options"] = _with_limit(payload.get("options"), left)
        return GENERATE, body
    if path == GENERATE:
        messages: list[dict] = []
        if payload.get("system"):
            messages.append({"role": "system", "content": payload["system"]})
        user: dict[str, Any] = {"role": "user", "content": _str(payload.get("prompt"))}
        if payload.get("images"):
            user["images"] = payload["images"]
        messages.append(user)
        body = {"model": payload.get("model"), "messages": _assistant(messages, text, thinking, "thinking")}
        body.update((k, payload[k]) for k in _GENERATE_TO_CHAT if k in payload)
        if left is not None:
            body["options"] = _with_limit(payload.get("options"), left)
        body["stream"] = True
        return CHAT, body
    if path == V1_COMPLETIONS:
        messages = [{"role": "user", "content": _str(payload.get("prompt"))}]
        body = {"model": payload.get("model"), "messages": _assistant(messages, text, "", "thinking"),
                "options": completion_options(payload, left), "stream": True}
        return CHAT, body
    raise ValueError(f"no continuation for {path}")


def completion_options(payload: dict, left: int | None) -> dict:
    """The native options of a /v1/completions request, as Ollama's OpenAI layer
    maps them (``openai.FromCompleteRequest``: temperature and top_p default to 1)."""
    options: dict[str, Any] = {}
    stop = payload.get("stop")
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif isinstance(stop, list):
        options["stop"] = stop
    if left is not None:
        options["num_predict"] = left
    elif payload.get("max_tokens") is not None:
        options["num_predict"] = payload["max_tokens"]
    temperature = payload.get("temperature")
    options["temperature"] = 1.0 if temperature is None else temperature
    if payload.get("seed") is not None:
        options["seed"] = payload["seed"]
    options["frequency_penalty"] = payload.get("frequency_penalty") or 0
    options["presence_penalty"] = payload.get("presence_penalty") or 0
    options["top_p"] = payload.get("top_p") or 1.0
    return options


# --- writing ------------------------------------------------------------------


def line(obj: Any) -> bytes:
    return dumps(obj) + b"\n"


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def mesh_field(peers: list[str], resumes: int) -> dict:
    return {"peers": list(peers), "resumed": resumes}


def patch_native_final(obj: dict, before: int, spent_ns: int, mesh: dict | None) -> dict:
    """A continuation's native final object with counts for the whole answer:
    ``before`` pieces were relayed before the continuation started, so they are
    added to ``eval_count`` and taken off ``prompt_eval_count`` (the
    continuation's prompt held them as its assistant message: an estimate of the
    original prompt's size); ``spent_ns`` (the broken upstreams' time) is added
    to ``total_duration``."""
    out = dict(obj)
    out["eval_count"] = before + (_int(obj.get("eval_count")) or 0)
    prompt = _int(obj.get("prompt_eval_count"))
    if prompt is not None:
        out["prompt_eval_count"] = max(0, prompt - before)
    total = _int(obj.get("total_duration"))
    if spent_ns or total is not None:
        out["total_duration"] = (total or 0) + spent_ns
    if mesh is not None:
        out[MESH_KEY] = mesh
    return out


def openai_usage(usage: dict, before: int) -> dict:
    """A continuation's usage with counts for the whole answer (see :func:`patch_native_final`)."""
    completion = before + (_int(usage.get("completion_tokens")) or 0)
    prompt = max(0, (_int(usage.get("prompt_tokens")) or 0) - before)
    return {**usage, "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def generate_chunk(model: str, chat: dict, piece: Piece) -> dict:
    """A native chat continuation chunk as the /api/generate chunk it stands for."""
    out: dict[str, Any] = {"model": model, "created_at": _str(chat.get("created_at")), "response": piece.text}
    if piece.thinking:
        out["thinking"] = piece.thinking
    out["done"] = False
    return out


def generate_final(model: str, chat: dict, piece: Piece) -> dict:
    """A native chat final object as a generate one (no ``context``: the
    continuation's tokens are not the original prompt's)."""
    out = generate_chunk(model, chat, piece)
    out["done"] = True
    if chat.get("done_reason"):
        out["done_reason"] = chat["done_reason"]
    out.update((k, chat[k]) for k in _METRICS if k in chat)
    return out


def completion_chunk(template: dict, text: str, finish: str | None, zero_usage: bool) -> dict:
    """A text_completion chunk; ``zero_usage``: Ollama's zero usage on every chunk under include_usage."""
    out = {**template, "choices": [{"text": text, "index": 0, "finish_reason": finish}]}
    if zero_usage:
        out["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return out


def usage_chunk(template: dict, usage: dict, mesh: dict | None) -> dict:
    out = {**template, "choices": [], "usage": usage}
    if mesh is not None:
        out[MESH_KEY] = mesh
    return out


def closing(path: str, *, model: str, created_at: str, template: dict, reason: str, pieces: int,
            spent_ns: int, include_usage: bool, mesh: dict | None, finish_sent: bool) -> bytes:
    """The end of an answer written here, not by a model: its final object
    (native) or finish chunk, usage chunk and ``[DONE]`` (OpenAI), with what is
    known: ``pieces`` as the output count, the prompt's size unknown (absent
    natively, 0 in usage). ``finish_sent``: the OpenAI finish chunk already went out."""
    if path in (CHAT, GENERATE):
        out: dict[str, Any] = {"model": model, "created_at": created_at}
        if path == CHAT:
            out["message"] = {"role": "assistant", "content": ""}
        else:
            out["response"] = ""
        out.update({"done": True, "done_reason": reason})
        if spent_ns:
            out["total_duration"] = spent_ns
        out["eval_count"] = pieces
        if mesh is not None:
            out[MESH_KEY] = mesh
        return line(out)
    parts = []
    if not finish_sent:
        if path == V1_CHAT:
            finish = {**template, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}
        else:
            finish = completion_chunk(template, "", reason, include_usage)
        if mesh is not None and not include_usage:
            finish[MESH_KEY] = mesh
        parts.append(sse(finish))
    if include_usage:
        usage = {"prompt_tokens": 0, "completion_tokens": pieces, "total_tokens": pieces}
        parts.append(sse(usage_chunk(template, usage, mesh)))
    parts.append(SSE_DONE)
    return b"".join(parts)

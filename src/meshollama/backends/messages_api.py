"""Anthropic's Messages API (``POST /v1/messages``) on top of chat completions (sans-IO).

Real Ollama serves ``/v1/messages`` by converting the request into a chat
request and each chat answer back into Anthropic messages and events
(``anthropic/anthropic.go``, ``middleware/anthropic.go``). Like
:mod:`.responses_api`, we convert to and from the OpenAI *chat completions*
wire format, which every backend here speaks, so nothing here depends on
backend internals. No I/O; ids are injected so tests are exact.

* :func:`to_chat`: Messages request body -> ``/v1/chat/completions`` request
  dict, or :class:`~meshollama.errors.BadRequest` with Ollama's text;
* :class:`MessagesStream`: decoded ``chat.completion.chunk`` dicts -> the
  Anthropic SSE events (``message_start`` ... ``message_stop``);
* :func:`from_chat`: a ``chat.completion`` dict -> the Anthropic ``message``;
* :func:`error_body` / :func:`error_reply`: Anthropic's error envelope;
* :func:`estimate_input_tokens`: Ollama's len/4 guess for ``message_start``.

Where Ollama and the official ``anthropic`` client disagree, the client wins;
comments say where.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import BadRequest, RequestError
from .ollama_api import JSON, SSE, Reply, dumps, json_type
from .ollama_requests import decode_body
from .responses_api import Ids, chat_reasoning, chat_text, new_id

# Fields Go type-checks while binding MessagesRequest: (JSON type wanted, Go type named).
_FIELDS = {
    "model": ("string", "string"), "max_tokens": ("number", "int"), "messages": ("array", "[]anthropic.MessageParam"),
    "stream": ("bool", "bool"), "temperature": ("number", "float64"), "top_p": ("number", "float64"),
    "top_k": ("number", "int"), "stop_sequences": ("array", "[]string"), "tools": ("array", "[]anthropic.Tool"),
    "tool_choice": ("object", "anthropic.ToolChoice"), "thinking": ("object", "anthropic.ThinkingConfig"),
    "metadata": ("object", "anthropic.Metadata"), "output_config": ("object", "anthropic.OutputConfig"),
}
# ContentBlock fields that must be strings (json.Unmarshal into anthropic.ContentBlock).
_BLOCK_STRINGS = ("type", "text", "id", "name", "tool_use_id", "thinking", "signature")
_MEDIA_TYPES = ("image/jpeg", "image/jpg", "image/png", "image/webp")  # what chat's data URLs may name
_B64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def _go_type_error(found: Any, field: str, gotype: str) -> BadRequest:
    return BadRequest(f"json: cannot unmarshal {json_type(found)} into Go struct field {field} of type {gotype}")


def to_chat(body: bytes) -> dict[str, Any]:
    """A ``/v1/messages`` body -> the equivalent ``/v1/chat/completions`` request dict.

    Checks and conversion in Ollama's order (``AnthropicMessagesMiddleware``,
    ``FromMessagesRequest``): bind errors, then ``model`` / ``max_tokens`` /
    ``messages`` required, then per-block errors. ``system`` leads as a system
    message; ``tool_use`` blocks become assistant ``tool_calls``,
    ``tool_result`` blocks ``tool`` messages (before the user's text, as
    Ollama orders them), ``thinking`` the assistant's ``reasoning``.
    Sampling values are passed only when given (Anthropic has no defaults to
    force); ``top_k`` rides along as the llama.cpp/vLLM extension field.
    """
    d = decode_body(body, "anthropic.MessagesRequest", openai=True)
    for key, (want, gotype) in _FIELDS.items():
        if d.get(key) is not None and json_type(d[key]) != want:
            raise _go_type_error(d[key], f"MessagesRequest.{key}", gotype)
    for stop in d.get("stop_sequences") or ():
        if not isinstance(stop, str):
            raise _go_type_error(stop, "MessagesRequest.stop_sequences", "string")
    raw_messages = [(m.get("role"), _blocks(m)) for m in d.get("messages") or ()]
    if not d.get("model"):
        raise BadRequest("model is required")
    if not isinstance(d.get("max_tokens"), int) or d["max_tokens"] <= 0:
        raise BadRequest("max_tokens is required and must be positive")
    if not raw_messages:
        raise BadRequest("messages is required")
    messages = _system(d.get("system"))
    for role, blocks in raw_messages:
        messages += _convert(str(role or "").lower(), blocks)
    chat: dict[str, Any] = {"model": d["model"], "messages": messages}
    tools = _tools(d.get("tools") or [])
    if tools:
        chat["tools"] = tools
    chat["max_tokens"] = d["max_tokens"]
    for key in ("temperature", "top_p", "top_k"):
        if d.get(key) is not None:
            chat[key] = d[key]
    if d.get("stop_sequences"):
        chat["stop"] = list(d["stop_sequences"])
    if (effort := _think(d.get("thinking"), d.get("output_config"))) is not None:
        chat["reasoning_effort"] = effort
    chat["stream"] = d.get("stream") is True
    if chat["stream"]:
        chat["stream_options"] = {"include_usage": True}
    return chat


def _blocks(m: Any) -> list[dict[str, Any]]:
    """A message's content as blocks (a string is one text block), or Go's bind error."""
    if not isinstance(m, dict):
        raise _go_type_error(m, "MessagesRequest.messages", "anthropic.MessageParam")
    if "content" not in m:
        raise BadRequest("unexpected end of JSON input")
    content = m["content"]
    if content is None or isinstance(content, str):
        return [{"type": "text", "text": content or ""}]
    if not isinstance(content, list):
        raise BadRequest(f"json: cannot unmarshal {json_type(content)} into Go value of type []anthropic.ContentBlock")
    for block in content:
        if not isinstance(block, dict):
            raise BadRequest(f"json: cannot unmarshal {json_type(block)} into Go value of type anthropic.ContentBlock")
        for key in _BLOCK_STRINGS:
            if block.get(key) is not None and not isinstance(block[key], str):
                raise _go_type_error(block[key], f"ContentBlock.{key}", "string")
    return content


def _system(system: Any) -> list[dict[str, Any]]:
    """A string, or text blocks joined without separator; any other type is ignored (Ollama)."""
    if isinstance(system, list):
        system = "".join(b["text"] for b in system
                         if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str))
    return [{"role": "system", "content": system}] if isinstance(system, str) and system else []


def _convert(role: str, blocks: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Ollama's ``convertMessage``: one chat message plus a ``tool`` message per result."""
    text, images, calls, results, thinking = "", [], [], [], ""
    for b in blocks:
        kind = b.get("type")
        if kind == "text":
            text += b.get("text") or ""
        elif kind == "image":
            images.append(_image(b.get("source"), "invalid image source"))
        elif kind in ("tool_use", "server_tool_use"):
            for key in ("id", "name") if kind == "tool_use" else ():
                if not b.get(key):
                    raise BadRequest(f"tool_use block missing required '{key}' field")
            arguments = b.get("input") if isinstance(b.get("input"), dict) else {}
            calls.append({"id": b.get("id") or "", "type": "function",
                          "function": {"name": b.get("name") or "", "arguments": dumps(arguments).decode()}})
        elif kind == "tool_result":
            result_text, result_images = _tool_result(b.get("content"))
            results.append({"role": "tool", "tool_call_id": b.get("tool_use_id") or "",
                            "content": _content(result_text, result_images)})
        elif kind == "web_search_tool_result":
            results.append({"role": "tool", "tool_call_id": b.get("tool_use_id") or "",
                            "content": _web_results(b.get("content"))})
        elif kind == "thinking" and b.get("thinking") is not None:
            thinking = b["thinking"]
        # anything else (redacted_thinking, document, ...) is ignored, as in Ollama
    out = results if role == "user" else []
    if text or images or calls or thinking:
        msg: dict[str, Any] = {"role": role, "content": _content(text, images)}
        if calls:
            msg["tool_calls"] = calls
        if thinking:
            msg["reasoning"] = thinking
        out = out + [msg]
    return out if role == "user" else out + results


def _content(text: str, images: Sequence[str]) -> str | list[dict[str, Any]]:
    if not images:
        return text
    head = [{"type": "text", "text": text}] if text else []
    return head + [{"type": "image_url", "image_url": {"url": url}} for url in images]


def _image(source: Any, missing: str) -> str:
    """A base64 image source as a data URL, with Ollama's ``resolveImageSource`` errors."""
    if not isinstance(source, dict):
        raise BadRequest(missing)
    if source.get("type") != "base64":
        raise BadRequest(f"invalid image source type: {source.get('type') or ''}. Only base64 images are supported.")
    data = str(source.get("data") or "")
    if (bad := _base64_error(data)) is not None:
        raise BadRequest(f"invalid base64 image data: illegal base64 data at input byte {bad}")
    media = source.get("media_type")
    return f"data:{media if media in _MEDIA_TYPES else ''};base64,{data}"


def _base64_error(s: str) -> int | None:
    """Where Go's ``base64.StdEncoding.DecodeString`` fails (its ``CorruptInputError``), or None."""
    raw, i, n = s.encode(), 0, 0  # n: characters in the current 4-character quantum
    while i < len(raw):
        c = raw[i]
        i += 1
        if c in b"\r\n":
            continue
        if c in _B64:
            n = (n + 1) % 4
            continue
        if c != ord("=") or n < 2:
            return i - 1
        if n == 2:  # "==" expected; the first is read
            while i < len(raw) and raw[i] in b"\r\n":
                i += 1
            if i == len(raw):
                return len(raw)
            if raw[i] != ord("="):
                return i - 1
            i += 1
        while i < len(raw) and raw[i] in b"\r\n":
            i += 1
        return i if i < len(raw) else None
    return None if n == 0 else len(raw) - n


def _tool_result(content: Any) -> tuple[str, list[str]]:
    """``tool_result`` content: a string, or text blocks joined plus images; else empty."""
    if isinstance(content, str):
        return content, []
    text, images = "", []
    for b in content if isinstance(content, list) else ():
        if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str):
            text += b["text"]
        elif isinstance(b, dict) and b.get("type") == "image":
            images.append(_image(b.get("source"), "invalid tool_result image source"))
    return text, images


def _web_results(content: Any) -> str:
    """Ollama's ``formatWebSearchToolResultContent``: ``- title: url`` lines, or the error code."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict) and content.get("type") != "web_search_tool_result_error":
        return dumps(content).decode()
    lines = []
    for item in content if isinstance(content, list) else [content] if isinstance(content, dict) else ():
        if isinstance(item, dict) and item.get("type") == "web_search_tool_result_error":
            code = item.get("error_code") or ""
            return f"web_search_tool_result_error: {code}" if code else "web_search_tool_result_error"
        if isinstance(item, dict) and item.get("type") == "web_search_result":
            lines.append(f"- {item.get('title') or ''}: {item.get('url') or ''}\n")
    return "".join(lines) if isinstance(content, list) else dumps(content).decode()


def _tools(raw: Sequence[Any]) -> list[dict[str, Any]]:
    """Anthropic tools -> chat function tools (``input_schema`` -> ``parameters``).

    Server tools (``web_search_*``) are dropped: Ollama runs those searches
    through ollama.com, which a mesh node cannot do.
    """
    out = []
    for t in raw:
        if not isinstance(t, dict):
            raise _go_type_error(t, "MessagesRequest.tools", "anthropic.Tool")
        if str(t.get("type") or "").startswith("web_search"):
            continue
        name, schema = str(t.get("name") or ""), t.get("input_schema")
        if schema is not None and not isinstance(schema, dict):
            raise BadRequest(f"invalid input_schema for tool {json.dumps(name)}: json: cannot unmarshal "
                             f"{json_type(schema)} into Go value of type api.ToolFunctionParameters")
        out.append({"type": "function", "function": {
            "name": name, "description": str(t.get("description") or ""),
            "parameters": schema if schema is not None else {"type": "object", "properties": {}}}})
    return out


def _think(thinking: Any, output_config: Any) -> str | None:
    """Ollama's think value as chat's ``reasoning_effort``: thinking wins over output_config.effort.

    ``thinking.type`` enabled is Ollama's ``think: true``, which is "medium"
    in chat's vocabulary; disabled is "none". Ollama also *relaxes* thinking on
    this route (``relax_thinking``: dropped, not a 400, for a model that cannot
    think); chat has no way to say so, so the caller has to drop it.
    """
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind in ("enabled", "disabled"):
        return "medium" if kind == "enabled" else "none"
    effort = output_config.get("effort") if isinstance(output_config, dict) else None
    effort = effort.strip().lower() if isinstance(effort, str) else ""
    effort = "high" if effort == "xhigh" else effort
    return effort if effort in ("high", "medium", "low", "max") else None


# --- chat -> Anthropic ------------------------------------------------------------------


def _stop_reason(finish: str | None, tool_calls: bool) -> str:
    """Ollama's ``mapStopReason`` over chat finish reasons (content_filter is Anthropic's refusal)."""
    if tool_calls or finish in ("tool_calls", "function_call"):
        return "tool_use"
    return {"length": "max_tokens", "content_filter": "refusal"}.get(finish or "", "end_turn")


def _input_object(arguments: Any) -> dict[str, Any]:
    try:
        value = json.loads(arguments) if isinstance(arguments, str) and arguments.strip() else {}
    except json.JSONDecodeError:
        value = {}
    return value if isinstance(value, dict) else {}


def from_chat(completion: Mapping[str, Any], *, ids: Ids | None = None, model: str | None = None) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` -> the Anthropic ``message`` object.

    Blocks in Ollama's order (``ToMessagesResponse``): thinking, text,
    tool_use. Unlike Ollama, ``content`` is ``[]`` rather than ``null`` when
    empty, ``stop_sequence`` is always present (``null``) and thinking blocks
    carry an empty ``signature``, as the anthropic SDK's types require.
    """
    new = ids or new_id
    message_id, choice = new("msg"), (completion.get("choices") or [{}])[0]
    msg, usage = choice.get("message") or {}, completion.get("usage") or {}
    content: list[dict[str, Any]] = []
    if thinking := chat_reasoning(msg):
        content.append({"type": "thinking", "thinking": thinking, "signature": ""})
    if text := chat_text(msg.get("content")):
        content.append({"type": "text", "text": text})
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": str(call.get("id") or new("toolu")),
                        "name": str(fn.get("name") or ""), "input": _input_object(fn.get("arguments"))})
    return {"id": message_id, "type": "message", "role": "assistant",
            "model": model if model is not None else str(completion.get("model") or ""), "content": content,
            "stop_reason": _stop_reason(choice.get("finish_reason"), bool(msg.get("tool_calls"))),
            "stop_sequence": None,
            "usage": {"input_tokens": int(usage.get("prompt_tokens") or 0),
                      "output_tokens": int(usage.get("completion_tokens") or 0)}}


class MessagesStream:
    """Chat completion chunks in, Anthropic SSE events out, for one streamed message.

    Thinking, text and each tool call become content blocks, opened on their
    first delta and stopped when another begins, so block indexes only grow
    (the SDK accumulates by index). Tool-call argument pieces are passed on as
    ``input_json_delta`` as they come. No ``ping`` events: Ollama sends none.
    ``input_tokens`` is what ``message_start`` reports before the real count
    arrives with the usage chunk (Ollama uses :func:`estimate_input_tokens`).
    """

    content_type = SSE

    def __init__(self, model: str, *, input_tokens: int = 0, ids: Ids | None = None) -> None:
        self.model, self.input_tokens = model, input_tokens
        self._ids = ids or new_id
        self.id = self._ids("msg")
        self._started = self._done = self._tool_used = False
        self._next = 0  # index of the next content block
        self._open: dict[str, Any] | None = None  # the block now streaming
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> its block
        self._finish: str | None = None
        self._usage: Mapping[str, Any] | None = None

    @staticmethod
    def _event(kind: str, **data: Any) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + dumps({"type": kind, **data}) + b"\n\n"

    def start(self) -> bytes:
        """``message_start``, once (``feed`` sends it when due)."""
        if self._started:
            return b""
        self._started = True
        # stop_reason / stop_sequence as explicit nulls, as Anthropic sends them (Ollama omits them).
        return self._event("message_start", message={
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0}})

    def _begin(self, kind: str, **fields: Any) -> bytes:
        out = self._stop()
        self._open = {"type": kind, "index": self._next, **fields}
        self._next += 1
        block = {"text": {"type": "text", "text": ""},
                 "thinking": {"type": "thinking", "thinking": "", "signature": ""},
                 "tool_use": {"type": "tool_use", "id": fields.get("id"), "name": fields.get("name"), "input": {}}}[kind]
        return out + self._event("content_block_start", index=self._open["index"], content_block=block)

    def _stop(self) -> bytes:
        block, self._open = self._open, None
        return self._event("content_block_stop", index=block["index"]) if block else b""

    def _delta(self, kind: str, delta: dict[str, Any]) -> bytes:
        out = b"" if self._open and self._open["type"] == kind else self._begin(kind)
        assert self._open is not None
        return out + self._event("content_block_delta", index=self._open["index"], delta=delta)

    def feed(self, chunk: Mapping[str, Any]) -> bytes:
        """The events for one decoded chat chunk (``b""`` when it adds nothing)."""
        if self._done:
            return b""
        if err := chunk.get("error"):
            return self.fail(str(err.get("message") if isinstance(err, dict) else err))
        out = self.start()
        self._usage = chunk.get("usage") or self._usage
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if thinking := chat_reasoning(delta):
                out += self._delta("thinking", {"type": "thinking_delta", "thinking": thinking})
            if text := chat_text(delta.get("content")):
                out += self._delta("text", {"type": "text_delta", "text": text})
            for call in delta.get("tool_calls") or ():
                out += self._tool_call(call)
            self._finish = choice.get("finish_reason") or self._finish
        return out

    def _tool_call(self, call: Mapping[str, Any]) -> bytes:
        fn, index, out = call.get("function") or {}, call.get("index", 0), b""
        block = self._calls.get(index)
        if block is None or (call.get("id") and call["id"] != block["id"]):
            out = self._begin("tool_use", id=str(call.get("id") or self._ids("toolu")), name=str(fn.get("name") or ""))
            block = self._calls[index] = self._open or {}
            self._tool_used = True
        pieces = fn.get("arguments")
        if isinstance(pieces, str) and pieces and block is self._open:
            out += self._event("content_block_delta", index=block["index"],
                               delta={"type": "input_json_delta", "partial_json": pieces})
        # Pieces for a call stopped already (another block began since) cannot be streamed: dropped.
        return out

    def finish(self) -> bytes:
        """Stop the open block, then ``message_delta`` (stop_reason, usage) and ``message_stop``."""
        if self._done:
            return b""
        out = self.start() + self._stop()
        self._done = True
        usage = self._usage or {}
        return (out + self._event("message_delta",
                                  delta={"stop_reason": _stop_reason(self._finish, self._tool_used), "stop_sequence": None},
                                  usage={"input_tokens": int(usage.get("prompt_tokens") or self.input_tokens),
                                         "output_tokens": int(usage.get("completion_tokens") or 0)})
                + self._event("message_stop"))

    def fail(self, message: str, status: int = 500) -> bytes:
        """Anthropic's mid-stream ``error`` event (the SDKs raise it as an API error)."""
        if self._done:
            return b""
        self._done = True
        return self._event("error", error={"type": _error_type(status), "message": message})


def estimate_input_tokens(request: Mapping[str, Any]) -> int:
    """Ollama's ``EstimateInputTokens``: UTF-8 length of system, messages and tools over 4."""
    def count(content: Any) -> int:
        if content is None:
            return 0
        if isinstance(content, str):
            return len(content.encode())
        if isinstance(content, list):
            return sum(len(str(b.get("text") or "").encode()) + len(str(b.get("thinking") or "").encode())
                       + (len(dumps(b)) if b.get("type") in ("tool_use", "tool_result") else 0)
                       for b in content if isinstance(b, dict))
        return len(dumps(content))

    messages = [m for m in request.get("messages") or () if isinstance(m, dict)]
    total = count(request.get("system")) + sum(len(str(m.get("role") or "").encode()) + count(m.get("content"))
                                               for m in messages)
    for t in request.get("tools") or ():
        if isinstance(t, dict):
            total += len(str(t.get("name") or "").encode()) + len(str(t.get("description") or "").encode())
            total += len(dumps(t["input_schema"])) if t.get("input_schema") is not None else 0
    tokens = total // 4
    return 1 if tokens == 0 and (messages or request.get("system") is not None) else tokens


# --- errors ---------------------------------------------------------------------------------

# Ollama's anthropic.NewError types; 413 is Anthropic's own request_too_large.
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                503: "overloaded_error", 529: "overloaded_error"}


def _error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error")


def error_body(status: int, message: str, request_id: str | None = None) -> bytes:
    """Anthropic's error envelope; ``request_id`` defaults to a fresh ``req_...`` as in Ollama."""
    return dumps({"type": "error", "error": {"type": _error_type(status), "message": message},
                  "request_id": request_id if request_id is not None else new_id("req")})


def error_reply(err: RequestError, request_id: str | None = None) -> Reply:
    """A :class:`~meshollama.errors.RequestError` as a complete Messages-API error reply."""
    return Reply(err.status, JSON, error_body(err.status, err.message, request_id))


"""Anthropic's Messages API (``POST /v1/messages``) on top of chat completions (sans-IO).

Real Ollama serves ``/v1/messages`` by converting the request into a chat
request and each chat answer back into Anthropic messages and events
(``anthropic/anthropic.go``, ``middleware/anthropic.go``). Like
:mod:`.responses_api`, we convert to and from the OpenAI *chat completions*
wire format, which every backend here speaks, so nothing here depends on
backend internals. No I/O; ids are injected so tests are exact.

* :func:`to_chat` (:mod:`.messages_request`): Messages request body ->
  ``/v1/chat/completions`` request dict, or :class:`~meshollama.errors.BadRequest`
  with Ollama's text;
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
from collections.abc import Mapping
from typing import Any

from ..errors import RequestError
from .messages_request import to_chat
from .ollama_api import JSON, SSE, Reply, dumps
from .responses_api import ChatChunks, Ids, chat_reasoning, chat_text, new_id

# to_chat lives in messages_request; callers (translate) reach it here.
__all__ = ["MessagesStream", "error_body", "error_reply", "estimate_input_tokens", "from_chat", "to_chat"]

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


class MessagesStream(ChatChunks):
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

    def _thinking(self, text: str) -> bytes:
        return self._delta("thinking", {"type": "thinking_delta", "thinking": text})

    def _text(self, text: str) -> bytes:
        return self._delta("text", {"type": "text_delta", "text": text})

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

"""OpenAI's Responses API (``POST /v1/responses``) on top of chat completions (sans-IO).

Real Ollama serves ``/v1/responses`` by turning the request into a chat
request and each chat answer back into Responses objects and events
(``openai/responses.go``, ``middleware/openai.go``). We convert to and from the
OpenAI *chat completions* wire format instead of Ollama's internal
``api.ChatRequest``: every backend here speaks it already, so this module
needs nothing from backend internals. No I/O; ids and clocks are injected.

* :func:`to_chat` (:mod:`.responses_request`): Responses request body ->
  ``/v1/chat/completions`` request dict, or :class:`~meshollama.errors.BadRequest`
  with Ollama's text;
* :class:`ResponsesStream`: decoded ``chat.completion.chunk`` dicts -> the
  Responses SSE events (``event: <type>`` / ``data: <json>``);
* :func:`from_chat`: a ``chat.completion`` dict -> the ``response`` object;
* :func:`error_body` / :func:`error_reply`: OpenAI's error envelope.

Where Ollama and the official ``openai`` client disagree, the client wins;
comments say where.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import RequestError
from .ollama_api import JSON, SSE, Reply, dumps
from .responses_request import to_chat

# to_chat lives in responses_request; callers (translate) reach it here.
__all__ = ["Ids", "ResponsesStream", "chat_reasoning", "chat_text", "error_body", "error_reply", "from_chat",
           "new_id", "response_object", "to_chat"]

Ids = Callable[[str], str]
"""Makes a fresh id from a prefix: ``resp``, ``msg``, ``rs``, ``fc`` or ``call``."""


def new_id(prefix: str) -> str:
    """``<prefix>_`` and 24 random hex digits: the default for every ``ids`` argument."""
    return f"{prefix}_{secrets.token_hex(12)}"


# --- chat -> Responses -------------------------------------------------------------------

# finish_reason -> incomplete_details.reason (Ollama calls every answer "completed").
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": [_part(text)]}


def _reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    # As Ollama: encrypted_content is the plain text, so it comes back as thinking next turn.
    return {"id": item_id, "type": "reasoning", "summary": [{"type": "summary_text", "text": text}],
            "encrypted_content": text}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def _usage(u: Mapping[str, Any] | None) -> dict[str, Any]:
    u = u or {}
    inp, out = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (u.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    # cache_write_tokens: openai-python's InputTokensDetails requires it (Ollama leaves it out).
    return {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": reasoning}}


def chat_reasoning(delta: Mapping[str, Any]) -> str:
    """Thinking text of a chat message or delta: ``reasoning`` (Ollama) or ``reasoning_content`` (llama.cpp)."""
    value = delta.get("reasoning_content") or delta.get("reasoning")
    return value if isinstance(value, str) else ""


def chat_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def response_object(*, response_id: str, model: str, created_at: int, status: str, output: list[Any],
                    usage: dict[str, Any] | None, request: Mapping[str, Any] | None = None,
                    completed_at: int | None = None, incomplete: str | None = None,
                    error: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``response`` object with every field Ollama sends, echoing the request's settings."""
    req = request or {}
    reasoning = req.get("reasoning") if isinstance(req.get("reasoning"), dict) else {}
    effort, summary = reasoning.get("effort") or None, reasoning.get("summary") or None
    text = req.get("text") if isinstance(req.get("text"), dict) else {}
    choice = req.get("tool_choice")
    return {
        "id": response_id, "object": "response", "created_at": created_at, "completed_at": completed_at,
        "status": status, "incomplete_details": {"reason": incomplete} if incomplete else None,
        "model": model, "previous_response_id": None, "instructions": req.get("instructions") or None,
        "output": output, "error": error, "tools": list(req.get("tools") or []),
        "tool_choice": choice if choice in ("auto", "none", "required") or isinstance(choice, dict) else "auto",
        "truncation": req.get("truncation") or "disabled", "parallel_tool_calls": True,
        "text": {"format": text.get("format") or {"type": "text"}},
        "top_p": 1.0 if req.get("top_p") is None else req["top_p"],
        "presence_penalty": 0, "frequency_penalty": 0, "top_logprobs": 0,
        "temperature": 1.0 if req.get("temperature") is None else req["temperature"],
        "reasoning": {"effort": effort, "summary": summary} if effort or summary else None,
        "usage": usage, "max_output_tokens": req.get("max_output_tokens"), "max_tool_calls": None,
        "store": False, "background": req.get("background") is True, "service_tier": "default",
        "metadata": {}, "safety_identifier": None, "prompt_cache_key": None,
    }


def from_chat(completion: Mapping[str, Any], *, request: Mapping[str, Any] | None = None,
              ids: Ids | None = None, created_at: int | None = None,
              completed_at: int | None = None) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` -> the Responses ``response`` object.

    Output in Ollama's order (``ToResponse``): a reasoning item, the message,
    one ``function_call`` per tool call. Unlike Ollama, text that came with
    tool calls is kept as a message item, as OpenAI does. ``finish_reason``
    ``length`` gives status ``incomplete`` with ``incomplete_details``.
    """
    new = ids or new_id
    choice = (completion.get("choices") or [{}])[0]
    msg, incomplete = choice.get("message") or {}, _INCOMPLETE.get(choice.get("finish_reason") or "")
    response_id, output = new("resp"), []
    if thinking := chat_reasoning(msg):
        output.append(_reasoning_item(new("rs"), thinking))
    calls, text = msg.get("tool_calls") or [], chat_text(msg.get("content"))
    if text or not calls:
        output.append(_message_item(new("msg"), text, "incomplete" if incomplete else "completed"))
    for call in calls:
        fn = call.get("function") or {}
        output.append(_call_item(new("fc"), str(call.get("id") or new("call")), str(fn.get("name") or ""),
                                 str(fn.get("arguments") or "{}"), "completed"))
    created = int(completion.get("created") or 0) if created_at is None else created_at
    return response_object(response_id=response_id, model=str(completion.get("model") or ""),
                           created_at=created, status="incomplete" if incomplete else "completed",
                           output=output, usage=_usage(completion.get("usage")), request=request,
                           completed_at=created if completed_at is None else completed_at, incomplete=incomplete)


class ChatChunks:
    """Walks decoded ``chat.completion.chunk`` dicts for a stream translator.

    Subclasses turn each piece into their API's events: ``start`` (sent before
    the first), ``_thinking``, ``_text``, ``_tool_call`` and ``fail``; this
    keeps the usage and the finish reason for their ``finish``.
    """

    _done: bool
    _usage: Mapping[str, Any] | None
    _finish: str | None

    def start(self) -> bytes:
        raise NotImplementedError

    def fail(self, message: str) -> bytes:
        raise NotImplementedError

    def _thinking(self, text: str) -> bytes:
        raise NotImplementedError

    def _text(self, text: str) -> bytes:
        raise NotImplementedError

    def _tool_call(self, call: Mapping[str, Any]) -> bytes:
        raise NotImplementedError

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
                out += self._thinking(thinking)
            if text := chat_text(delta.get("content")):
                out += self._text(text)
            for call in delta.get("tool_calls") or ():
                out += self._tool_call(call)
            self._finish = choice.get("finish_reason") or self._finish
        return out


class ResponsesStream(ChatChunks):
    """Chat completion chunks in, Responses SSE events out, for one streamed response.

    Text, reasoning and each tool call become separate output items, opened
    on their first delta and closed when another begins (or at the end), so
    indexes only grow and every item is done before ``response.completed``,
    which the openai-python accumulator checks. Events carry Ollama's running
    ``sequence_number``.
    """

    content_type = SSE

    def __init__(self, model: str, created: int, *, request: Mapping[str, Any] | None = None,
                 ids: Ids | None = None, clock: Callable[[], float] = time.time) -> None:
        self.model, self.created, self.request = model, created, request
        self._ids, self._clock = ids or new_id, clock
        self.id = self._ids("resp")
        self._seq = 0
        self._started = self._done = False
        self._output: list[dict[str, Any]] = []  # closed items, in output_index order
        self._open: dict[str, Any] | None = None  # the item now streaming
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> its item
        self._finish: str | None = None
        self._usage: Mapping[str, Any] | None = None

    def _event(self, kind: str, **data: Any) -> bytes:
        obj = {"type": kind, **data, "sequence_number": self._seq}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + dumps(obj) + b"\n\n"

    def _snapshot(self, status: str, **kw: Any) -> dict[str, Any]:
        return response_object(response_id=self.id, model=self.model, created_at=self.created, status=status,
                               request=self.request, **{"output": [], "usage": None, **kw})

    def start(self) -> bytes:
        """``response.created`` and ``response.in_progress``, once (``feed`` sends them when due)."""
        if self._started:
            return b""
        self._started = True
        return (self._event("response.created", response=self._snapshot("in_progress"))
                + self._event("response.in_progress", response=self._snapshot("in_progress")))

    def _begin(self, kind: str, **fields: Any) -> bytes:
        """Close the open item and open one of ``kind`` at the next output index."""
        out = self._close("completed")
        prefix = {"message": "msg", "reasoning": "rs", "function_call": "fc"}[kind]
        item = self._open = {"type": kind, "id": self._ids(prefix), "index": len(self._output), "text": "", **fields}
        ref = {"item_id": item["id"], "output_index": item["index"]}
        if kind == "function_call":
            added = _call_item(item["id"], item["call_id"], item["name"], "", "in_progress")
            return out + self._event("response.output_item.added", output_index=item["index"], item=added)
        if kind == "message":
            added = {"id": item["id"], "type": "message", "status": "in_progress", "role": "assistant", "content": []}
            part_event, part = ("response.content_part.added", {"content_index": 0, "part": _part("")})
        else:
            added = {"id": item["id"], "type": "reasoning", "summary": []}
            part_event, part = ("response.reasoning_summary_part.added",
                                {"summary_index": 0, "part": {"type": "summary_text", "text": ""}})
        return (out + self._event("response.output_item.added", output_index=item["index"], item=added)
                + self._event(part_event, **ref, **part))

    def _close(self, status: str) -> bytes:
        item, self._open = self._open, None
        if item is None:
            return b""
        ref, text = {"item_id": item["id"], "output_index": item["index"]}, item["text"]
        if item["type"] == "message":
            done = _message_item(item["id"], text, status)
            out = (self._event("response.output_text.done", **ref, content_index=0, text=text, logprobs=[])
                   + self._event("response.content_part.done", **ref, content_index=0, part=_part(text)))
        elif item["type"] == "reasoning":
            done = _reasoning_item(item["id"], text)
            out = (self._event("response.reasoning_summary_text.done", **ref, summary_index=0, text=text)
                   + self._event("response.reasoning_summary_part.done", **ref, summary_index=0,
                                 part={"type": "summary_text", "text": text}))
        else:
            done = _call_item(item["id"], item["call_id"], item["name"], text, "completed")
            out = self._event("response.function_call_arguments.done", **ref, name=item["name"], arguments=text)
        self._output.append(done)
        return out + self._event("response.output_item.done", output_index=item["index"], item=done)

    def _thinking(self, text: str) -> bytes:
        return self._delta("reasoning", text)

    def _text(self, text: str) -> bytes:
        return self._delta("message", text)

    def _delta(self, kind: str, text: str) -> bytes:
        out = b"" if self._open and self._open["type"] == kind else self._begin(kind)
        item = self._open
        assert item is not None
        item["text"] += text
        ref = {"item_id": item["id"], "output_index": item["index"]}
        if kind == "message":
            return out + self._event("response.output_text.delta", **ref, content_index=0, delta=text, logprobs=[])
        return out + self._event("response.reasoning_summary_text.delta", **ref, summary_index=0, delta=text)

    def _tool_call(self, call: Mapping[str, Any]) -> bytes:
        fn, index, out = call.get("function") or {}, call.get("index", 0), b""
        item = self._calls.get(index)
        if item is None or (call.get("id") and call["id"] != item["call_id"]):
            out = self._begin("function_call", call_id=str(call.get("id") or self._ids("call")),
                              name=str(fn.get("name") or ""))
            item = self._calls[index] = self._open or {}
        pieces = fn.get("arguments")
        if isinstance(pieces, str) and pieces and item is self._open:
            item["text"] += pieces
            out += self._event("response.function_call_arguments.delta", item_id=item["id"],
                               output_index=item["index"], delta=pieces)
        # Pieces for a call closed already (another item began since) cannot be streamed: dropped.
        return out

    def finish(self) -> bytes:
        """Close what is open and send ``response.completed`` with the output and usage.

        After a ``length`` finish the event stays ``response.completed`` (what
        Ollama sends, and what openai-python's ``get_final_response`` waits for)
        but the response says ``incomplete`` with ``incomplete_details``.
        """
        if self._done:
            return b""
        incomplete = _INCOMPLETE.get(self._finish or "")
        out = self.start() + self._close("incomplete" if incomplete else "completed")
        self._done = True
        resp = self._snapshot("incomplete" if incomplete else "completed", output=list(self._output),
                              usage=_usage(self._usage), completed_at=int(self._clock()), incomplete=incomplete)
        return out + self._event("response.completed", response=resp)

    def fail(self, message: str) -> bytes:
        """``response.failed`` after the stream began (the event Ollama's web-search path sends)."""
        if self._done:
            return b""
        out = self.start()
        self._done = True
        resp = self._snapshot("failed", output=list(self._output), usage=_usage(self._usage) if self._usage else None,
                              error={"code": "server_error", "message": message})
        return out + self._event("response.failed", response=resp)


# --- errors ---------------------------------------------------------------------------------


def error_body(status: int, message: str) -> bytes:
    """OpenAI's error envelope, typed by status as Ollama's ``openai.NewError`` does."""
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})


def error_reply(err: RequestError) -> Reply:
    """A :class:`~meshollama.errors.RequestError` as a complete Responses-API error reply."""
    return Reply(err.status, JSON, error_body(err.status, err.message))

"""OpenAI's Responses API (``POST /v1/responses``) on top of chat completions (sans-IO).

Real Ollama serves ``/v1/responses`` by turning the request into a chat
request and each chat answer back into Responses objects and events
(``openai/responses.go``, ``middleware/openai.go``). We convert to and from the
OpenAI *chat completions* wire format instead of Ollama's internal
``api.ChatRequest``: every backend here speaks it already, so this module
needs nothing from backend internals. No I/O; ids and clocks are injected.

* :func:`to_chat`: Responses request body -> ``/v1/chat/completions`` request
  dict, or :class:`~meshollama.errors.BadRequest` with Ollama's text;
* :class:`ResponsesStream`: decoded ``chat.completion.chunk`` dicts -> the
  Responses SSE events (``event: <type>`` / ``data: <json>``);
* :func:`from_chat`: a ``chat.completion`` dict -> the ``response`` object;
* :func:`error_body` / :func:`error_reply`: OpenAI's error envelope.

Where Ollama and the official ``openai`` client disagree, the client wins;
comments say where.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import BadRequest, RequestError
from .ollama_api import JSON, SSE, Reply, dumps, json_type
from .ollama_requests import decode_body

Ids = Callable[[str], str]
"""Makes a fresh id from a prefix: ``resp``, ``msg``, ``rs``, ``fc`` or ``call``."""


def new_id(prefix: str) -> str:
    """``<prefix>_`` and 24 random hex digits: the default for every ``ids`` argument."""
    return f"{prefix}_{secrets.token_hex(12)}"


# --- request -> chat ------------------------------------------------------------------

# Fields Go type-checks while binding ResponsesRequest: (JSON type wanted, Go type named).
_FIELDS = {
    "model": ("string", "string"), "background": ("bool", "bool"), "include": ("array", "[]string"),
    "instructions": ("string", "string"), "max_output_tokens": ("number", "int"),
    "reasoning": ("object", "openai.ResponsesReasoning"), "temperature": ("number", "float64"),
    "text": ("object", "openai.ResponsesText"), "top_p": ("number", "float64"),
    "truncation": ("string", "string"), "tools": ("array", "[]openai.ResponsesTool"), "stream": ("bool", "bool"),
}
# reasoning.effort -> Ollama's think value (openai.go thinkFromReasoningEffort), sent as reasoning_effort.
_EFFORT = {"none": "none", "minimal": "low", "low": "low", "medium": "medium", "high": "high",
           "max": "max", "xhigh": "max", "ultra": "max"}
_IMAGE_PREFIXES = tuple(f"data:image/{t};base64," for t in ("jpeg", "jpg", "png", "webp")) + ("data:;base64,",)
_CONTENT_TYPES = ("input_text", "output_text", "input_image", "input_file")
_RAW_ARRAY = "json: cannot unmarshal {} into Go value of type []json.RawMessage"


def _go_type_error(found: Any, field: str, gotype: str) -> BadRequest:
    return BadRequest(f"json: cannot unmarshal {json_type(found)} into Go struct field {field} of type {gotype}")


def to_chat(body: bytes) -> dict[str, Any]:
    """A ``/v1/responses`` body -> the equivalent ``/v1/chat/completions`` request dict.

    Follows Ollama's ``FromResponsesRequest``: ``instructions`` lead as a system
    message; ``function_call`` items become assistant ``tool_calls`` (merged
    into the assistant turn before them), ``function_call_output`` a ``tool``
    message, ``reasoning`` the next assistant turn's ``reasoning``;
    temperature defaults to 1.0, top_p is left to the model. Streams ask for
    usage so that ``response.completed`` can report it.
    """
    d = decode_body(body, "openai.ResponsesRequest", openai=True)
    for key, (want, gotype) in _FIELDS.items():
        if d.get(key) is not None and json_type(d[key]) != want:
            raise _go_type_error(d[key], f"ResponsesRequest.{key}", gotype)
    effort = (d.get("reasoning") or {}).get("effort")
    if effort is not None and not isinstance(effort, str):
        raise _go_type_error(effort, "ResponsesRequest.reasoning.effort", "string")
    items = _unmarshal_input(d.get("input"))  # every bind error comes before conversion errors
    tools = _tools(d.get("tools") or [])
    messages = [{"role": "system", "content": d["instructions"]}] if d.get("instructions") else []
    chat: dict[str, Any] = {"model": d.get("model") or "", "messages": messages + _messages(items)}
    if tools:
        chat["tools"] = tools
    chat["temperature"] = 1.0 if d.get("temperature") is None else d["temperature"]
    if d.get("top_p") is not None:
        chat["top_p"] = d["top_p"]
    if d.get("max_output_tokens") is not None:
        chat["max_tokens"] = d["max_output_tokens"]
    if effort:
        if effort not in _EFFORT:
            raise BadRequest(f'invalid reasoning value: {json.dumps(effort)} (must be "minimal", "low", '
                             '"medium", "high", "xhigh", "ultra", "max", or "none")')
        chat["reasoning_effort"] = _EFFORT[effort]
    if (fmt := _response_format(d.get("text"))) is not None:
        chat["response_format"] = fmt
    chat["stream"] = d.get("stream") is True
    if chat["stream"]:
        chat["stream_options"] = {"include_usage": True}
    return chat


def _unmarshal_input(value: Any) -> list[dict[str, Any]]:
    """``input`` as typed items with list content, or the error Go's unmarshalers give."""
    if value is None or isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}] if value else []
    if not isinstance(value, list):
        raise BadRequest("input must be a string or array: " + _RAW_ARRAY.format(json_type(value)))
    items = []
    for i, raw in enumerate(value):
        if not isinstance(raw, dict):
            raise BadRequest(f"input[{i}]: json: cannot unmarshal {json_type(raw)} into Go value of type "
                             'struct { Type string "json:\\"type\\""; Role string "json:\\"role\\"" }')
        kind = raw.get("type") or ("message" if raw.get("role") else "")
        try:
            if kind == "message":
                items.append({**raw, "type": kind, "content": _unmarshal_content(raw.get("content"), "content")})
            elif kind == "function_call_output":
                items.append({**raw, "output": _unmarshal_content(raw.get("output"), "output")})
            elif kind in ("function_call", "reasoning", "web_search_call"):
                if kind == "function_call" and not isinstance(raw.get("arguments") or "", str):
                    raise _go_type_error(raw["arguments"], "ResponsesFunctionCall.arguments", "string")
                items.append(raw)
            else:
                raise BadRequest(f"unknown input item type: {json.dumps(kind)}" if kind
                                 else "input item missing required 'type' field")
        except BadRequest as e:
            raise BadRequest(f"input[{i}]: {e.message}") from None
    return items


def _unmarshal_content(value: Any, key: str) -> list[dict[str, Any]]:
    """A string (shorthand for one ``input_text`` part) or a list of known content parts."""
    if value is None or isinstance(value, str):
        return [{"type": "input_text", "text": value or ""}]
    if not isinstance(value, list):
        raise BadRequest(f"{key} must be a string or array: " + _RAW_ARRAY.format(json_type(value)))
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _CONTENT_TYPES:
            raise BadRequest(f"{key}[{j}]: unknown content type: {kind or ''}")
    return value


def _messages(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama's walk over the history items, producing chat messages."""
    out: list[dict[str, Any]] = []
    pending = ""  # reasoning waiting for the next assistant turn
    for i, item in enumerate(items):
        kind, last = item["type"], out[-1] if out else {}
        if kind == "reasoning":
            pending = str(item.get("encrypted_content") or "")
        elif kind == "message":
            msg = {"role": str(item.get("role") or ""), "content": _content(item["content"])}
            if msg["role"] == "assistant" and pending:
                msg["reasoning"], pending = pending, ""
            # An assistant message replayed between a function_call and its output joins the
            # call's chat message, so that the tool result follows the call it answers.
            nxt = items[i + 1] if i + 1 < len(items) else {}
            if (msg["role"] == "assistant" and nxt.get("type") == "function_call_output" and nxt.get("call_id")
                    and last.get("role") == "assistant"
                    and any(c["id"] == nxt["call_id"] for c in last.get("tool_calls", ()))):
                _merge(last, msg)
            else:
                out.append(msg)
        elif kind == "function_call":
            call = {"id": item.get("call_id") or "", "type": "function",
                    "function": {"name": item.get("name") or "", "arguments": _arguments(item.get("arguments"))}}
            if last.get("role") != "assistant":
                out.append(last := {"role": "assistant", "content": ""})
            last.setdefault("tool_calls", []).append(call)
            if pending:
                last["reasoning"], pending = pending, ""
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item.get("call_id") or "", "content": _content(item["output"])})
        # web_search_call items are history metadata: the next assistant turn holds the result.
    if pending:
        out.append({"role": "assistant", "content": "", "reasoning": pending})
    return out


def _content(parts: Sequence[Mapping[str, Any]]) -> str | list[dict[str, Any]]:
    """Chat ``content``: the joined text, or text and ``image_url`` parts when there are images."""
    text, images = "", []
    for part in parts:
        kind = part.get("type")
        if kind in ("input_text", "output_text"):
            text += str(part.get("text") or "")
        elif kind == "input_image" and part.get("image_url"):  # a file_id alone is skipped
            images.append({"type": "image_url", "image_url": {"url": _image_url(str(part["image_url"]))}})
        elif kind == "input_file":
            raise BadRequest("file inputs are not currently supported")
    return _parts(text) + images if images else text


def _parts(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return content if isinstance(content, list) else [{"type": "text", "text": content}] if content else []


def _merge(last: dict[str, Any], msg: Mapping[str, Any]) -> None:
    """Ollama joins the two texts with a newline and appends the images."""
    old, new = last["content"], msg["content"]
    if isinstance(old, str) and isinstance(new, str):
        last["content"] = f"{old}\n{new}" if old and new else old + new
    else:
        last["content"] = _parts(old) + _parts(new)
    if msg.get("reasoning"):
        last["reasoning"] = msg["reasoning"]


def _image_url(url: str) -> str:
    """Ollama's ``decodeImageURL`` checks: base64 data URLs of jpeg/png/webp (or no type) only."""
    if url.startswith(("http://", "https://")):
        raise BadRequest("image URLs are not currently supported, please use base64 encoded data instead")
    prefix = next((p for p in _IMAGE_PREFIXES if url.startswith(p)), None)
    try:
        if prefix is None:
            raise ValueError
        base64.b64decode(url[len(prefix):], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("invalid image input") from None
    return url


def _arguments(text: str | None) -> str:
    """A function_call's arguments: must be a JSON object, as Ollama parses it ("" is ``{}``)."""
    if not text:
        return "{}"
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        why = ("unexpected end of JSON input" if e.pos >= len(text.rstrip())
               else f"invalid character {text[e.pos]!r} looking for beginning of value")
        raise BadRequest(f"failed to parse function call arguments: {why}") from None
    if not isinstance(parsed, dict):
        raise BadRequest("failed to parse function call arguments: json: cannot unmarshal "
                         f"{json_type(parsed)} into Go value of type map[string]interface {{}}")
    return text


def _tools(raw: Sequence[Any]) -> list[dict[str, Any]]:
    """Responses tools -> chat function tools; a ``namespace`` expands to ``ns.member`` functions.

    The built-in ``web_search`` tool is dropped: Ollama runs those searches
    itself through ollama.com, which a mesh node cannot do.
    """
    out: list[dict[str, Any]] = []
    for t in raw:
        if not isinstance(t, dict):
            raise _go_type_error(t, "ResponsesRequest.tools", "openai.ResponsesTool")
        params, name = t.get("parameters"), str(t.get("name") or "")
        if params is not None and not isinstance(params, dict):
            raise _go_type_error(params, "ResponsesRequest.tools.parameters", "map[string]interface {}")
        if t.get("type") == "namespace":
            for member in _tools(t.get("tools") or []):
                if name and not member["function"]["name"].startswith(name + "."):
                    member["function"]["name"] = f"{name}.{member['function']['name']}"
                out.append(member)
        elif t.get("type") != "web_search":
            out.append({"type": "function", "function": {
                "name": name, "description": str(t.get("description") or ""),
                "parameters": params if params is not None else {"type": "object", "properties": {}}}})
    return out


def _response_format(text: Any) -> dict[str, Any] | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_schema" and fmt.get("schema") is not None:
        schema = {"name": fmt.get("name") or "response", "schema": fmt["schema"]}
        if isinstance(fmt.get("strict"), bool):
            schema["strict"] = fmt["strict"]
        return {"type": "json_schema", "json_schema": schema}
    return {"type": "json_object"} if fmt.get("type") == "json_object" else None  # Ollama ignores json_object


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


class ResponsesStream:
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
                out += self._delta("reasoning", thinking)
            if text := chat_text(delta.get("content")):
                out += self._delta("message", text)
            for call in delta.get("tool_calls") or ():
                out += self._tool_call(call)
            self._finish = choice.get("finish_reason") or self._finish
        return out

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

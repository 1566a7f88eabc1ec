"""Responses API requests (``POST /v1/responses``) as chat completions requests (sans-IO).

:func:`to_chat` follows Ollama's ``FromResponsesRequest`` (``openai/responses.go``):
a Responses request body becomes the equivalent ``/v1/chat/completions``
request dict, or :class:`~meshollama.errors.BadRequest` with Ollama's text.
The answers going the other way are :mod:`.responses_api`'s.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import BadRequest
from .ollama_api import json_type
from .ollama_requests import decode_body

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

"""Anthropic Messages API requests (``POST /v1/messages``) as chat completions requests (sans-IO).

:func:`to_chat` follows Ollama's ``AnthropicMessagesMiddleware`` and
``FromMessagesRequest`` (``anthropic/anthropic.go``): a Messages request body
becomes the equivalent ``/v1/chat/completions`` request dict, or
:class:`~meshollama.errors.BadRequest` with Ollama's text. The answers going
the other way are :mod:`.messages_api`'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import BadRequest
from .ollama_api import dumps, json_type
from .ollama_requests import decode_body

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

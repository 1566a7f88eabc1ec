"""Incoming OpenAI-compatible request bodies (``/v1/*``), as Ollama converts them (sans-IO).

Each parser returns the same frozen job as its native twin in
:mod:`.ollama_requests`, with OpenAI's defaults and field names mapped the
way Ollama's ``openai`` middleware maps them (§3 of
``shared/reference/ollama-api.md``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..errors import BadRequest
from .ollama_api import Endpoint, json_type
from .ollama_requests import (
    EmbedJob,
    GenerateJob,
    _embed_inputs,
    _model_field,
    check_types,
    decode_body,
    parse_tools,
)
from .toolcalls import arguments_object, names_by_id


def _openai_options(d: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI fields -> Ollama options; temperature and top_p default to 1.0 (§3.1)."""
    opts: dict[str, Any] = {
        "temperature": 1.0 if d.get("temperature") is None else d["temperature"],
        "top_p": 1.0 if d.get("top_p") is None else d["top_p"],
    }
    if d.get("max_tokens") is not None:
        opts["num_predict"] = d["max_tokens"]
    for key in ("seed", "frequency_penalty", "presence_penalty"):
        if d.get(key) is not None:
            opts[key] = d[key]
    stop = d.get("stop")
    if isinstance(stop, str):
        opts["stop"] = [stop]
    elif isinstance(stop, list):
        if not all(isinstance(s, str) for s in stop):
            raise BadRequest("invalid type for 'stop' field")
        opts["stop"] = stop
    elif stop is not None:
        raise BadRequest("invalid type for 'stop' field")
    return opts


def _openai_stream(d: Mapping[str, Any]) -> tuple[bool, bool]:
    opts = d.get("stream_options")
    usage = isinstance(opts, dict) and opts.get("include_usage") is True
    return d.get("stream") is True, usage


_REASONING = {"none": False, "minimal": True, "low": True, "medium": True, "high": True,
              "max": True, "xhigh": True, "ultra": True}


def parse_openai_chat(body: bytes) -> GenerateJob:
    """``POST /v1/chat/completions`` (§3.2), converted to a chat job."""
    d = decode_body(body, "openai.ChatCompletionRequest", openai=True)
    check_types(d, "ChatCompletionRequest", {
        "model": "string", "messages": "array", "stream": "bool", "max_tokens": "int",
        "seed": "int", "temperature": "float", "top_p": "float", "frequency_penalty": "float",
        "presence_penalty": "float", "tools": "array", "logprobs": "bool", "top_logprobs": "int",
    })
    raw_messages = d.get("messages")
    if not raw_messages:
        raise BadRequest("[] is too short - 'messages'")
    messages = _openai_messages(raw_messages)
    fmt = None
    rf = d.get("response_format")
    if isinstance(rf, dict):
        if rf.get("type") == "json_object":
            fmt = "json"
        elif rf.get("type") == "json_schema":
            js = rf.get("json_schema")
            fmt = js.get("schema") if isinstance(js, dict) else None
    effort = d.get("reasoning_effort")
    if effort is None and isinstance(d.get("reasoning"), dict):
        effort = d["reasoning"].get("effort")
    if effort is not None and effort not in _REASONING:
        raise BadRequest(f"invalid reasoning value: '{effort}' (must be \"none\", \"minimal\", \"low\", \"medium\", \"high\", or \"max\")")
    stream, usage = _openai_stream(d)
    return GenerateJob(
        endpoint=Endpoint.V1_CHAT,
        model=_model_field(d, "model"),
        stream=stream,
        include_usage=usage,
        messages=tuple(messages),
        options=_openai_options(d),
        format=fmt,
        think=_REASONING.get(effort, False) if effort is not None else False,
        tools=parse_tools(d.get("tools"), "ChatCompletionRequest"),
        logprobs=bool(d.get("logprobs")),
        top_logprobs=int(d.get("top_logprobs") or 0),
    )


def _openai_messages(raw_messages: list[Any]) -> tuple[dict[str, Any], ...]:
    """OpenAI messages -> Ollama's: assistant ``tool_calls`` with object arguments,
    and a ``tool`` message's function name found from its ``tool_call_id``."""
    messages: list[dict[str, Any]] = []
    for m in raw_messages:
        if not isinstance(m, dict):
            raise BadRequest(f"invalid message format: {json_type(m)}")
        msg: dict[str, Any] = {"role": str(m.get("role") or "").lower(), "content": _openai_content(m)}
        calls = m.get("tool_calls")
        if isinstance(calls, list) and calls:
            msg["tool_calls"] = [_openai_call(c, i) for i, c in enumerate(calls)]
        if isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
            name = names_by_id(messages).get(m["tool_call_id"])
            if name:
                msg["tool_name"] = name
        if isinstance(m.get("name"), str) and msg["role"] == "tool" and "tool_name" not in msg:
            msg["tool_name"] = m["name"]
        reasoning = m.get("reasoning") or m.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            msg["thinking"] = reasoning
        messages.append(msg)
    return tuple(messages)


def _openai_call(call: Any, index: int) -> dict[str, Any]:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise BadRequest("invalid tool call")
    fn = call["function"]
    raw = fn.get("arguments")
    if isinstance(raw, str) and raw.strip():
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError:
            raise BadRequest("invalid tool call arguments") from None  # Ollama's answer
        if not isinstance(parsed, dict):
            raise BadRequest("invalid tool call arguments")
    out: dict[str, Any] = {"function": {"index": index, "name": str(fn.get("name") or ""),
                                        "arguments": arguments_object(raw)}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _openai_content(m: Mapping[str, Any]) -> str:
    content = m.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict):
                raise BadRequest("invalid message format")
            if part.get("type") == "text":
                texts.append(str(part.get("text") or ""))
            elif part.get("type") == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if isinstance(url, str) and url.startswith(("http://", "https://")):
                    raise BadRequest("image URLs are not currently supported, please use base64 encoded data instead")
        return "".join(texts)
    gotype = {"number": "float64", "bool": "bool", "object": "map[string]interface {}"}.get(json_type(content), json_type(content))
    raise BadRequest(f"invalid message content type: {gotype}")


def parse_openai_completion(body: bytes) -> GenerateJob:
    """``POST /v1/completions`` (§3.3): the prompt is templated like ``/api/generate``."""
    d = decode_body(body, "openai.CompletionRequest", openai=True)
    check_types(d, "CompletionRequest", {
        "model": "string", "prompt": "string", "suffix": "string", "stream": "bool",
        "max_tokens": "int", "seed": "int", "temperature": "float", "top_p": "float",
        "frequency_penalty": "float", "presence_penalty": "float", "logprobs": "int",
    })
    stream, usage = _openai_stream(d)
    top = int(d.get("logprobs") or 0)  # /v1/completions: the number of alternatives wanted
    return GenerateJob(
        endpoint=Endpoint.V1_COMPLETIONS,
        logprobs=d.get("logprobs") is not None,
        top_logprobs=max(0, top),
        model=_model_field(d, "model"),
        stream=stream,
        include_usage=usage,
        messages=({"role": "user", "content": d.get("prompt") or ""},),
        options=_openai_options(d),
        suffix=bool(d.get("suffix")),
    )


def parse_openai_embeddings(body: bytes) -> EmbedJob:
    """``POST /v1/embeddings`` (§3.4)."""
    d = decode_body(body, "openai.EmbedRequest", openai=True)
    check_types(d, "EmbedRequest", {"model": "string", "dimensions": "int", "encoding_format": "string"})
    value = d.get("input")
    if value is None or value == []:
        raise BadRequest("invalid input")
    if value == "":
        value = [""]
    inputs = _embed_inputs(value)
    fmt = d.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise BadRequest(f"Invalid value for 'encoding_format' = {fmt}. Supported values: ['float', 'base64'].")
    return EmbedJob(
        endpoint=Endpoint.V1_EMBEDDINGS,
        model=_model_field(d, "model"),
        inputs=inputs,
        dimensions=max(0, int(d.get("dimensions") or 0)),
        encoding_format=fmt,
    )

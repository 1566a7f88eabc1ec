"""Incoming Ollama and OpenAI request bodies, parsed into frozen jobs (sans-IO).

Bodies are decoded like gin's ``ShouldBindJSON`` and type-checked like Go's
``encoding/json``, so a bad request gets the status and text real Ollama
answers (a :class:`~meshollama.errors.RequestError`). A good one becomes a
:class:`GenerateJob` or :class:`EmbedJob`, whatever API it came through; option
values are checked in :mod:`.ollama_options`. Section numbers in comments point
into ``shared/reference/ollama-api.md``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadRequest, RequestError
from .ollama_api import Endpoint, json_type
from .ollama_options import parse_keep_alive, parse_think
from .toolcalls import arguments_object


# --- request bodies (§1.3) --------------------------------------------------------


def decode_body(body: bytes, struct_name: str, *, openai: bool = False) -> dict[str, Any]:
    """Decode a JSON object body like gin's ShouldBindJSON (first value only).

    Empty -> 400 ``missing request body`` (``EOF`` on /v1); ``null`` -> ``{}``;
    bad JSON -> 400 with a Go-like message; another JSON type -> 400.
    """
    text = body.decode("utf-8", errors="replace").lstrip(" \t\r\n")
    if not text:
        raise BadRequest("EOF" if openai else "missing request body")
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError as e:
        if e.pos >= len(text.rstrip()):
            raise BadRequest("unexpected EOF") from None
        raise BadRequest(f"invalid character {text[e.pos]!r} looking for beginning of value") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"json: cannot unmarshal {json_type(value)} into Go value of type {struct_name}")
    return value


# Field kinds for the Go-like type check: JSON types each accepts, Go type shown in errors.
_KINDS: dict[str, tuple[tuple[str, ...], str]] = {
    "string": (("string",), "string"),
    "bool": (("bool",), "bool"),
    "int": (("number",), "int"),
    "float": (("number",), "float64"),
    "object": (("object",), "map[string]interface {}"),
    "strings": (("array",), "[]string"),
    "ints": (("array",), "[]int"),
    "messages": (("array",), "[]api.Message"),
    "array": (("array",), "[]interface {}"),
    "any": ((), ""),
}


def check_types(body: Mapping[str, Any], struct_name: str, spec: Mapping[str, str]) -> None:
    """Raise Go's 400 ``json: cannot unmarshal X into Go struct field S.f of type T``."""
    for key, kind in spec.items():
        value = body.get(key)
        if value is None or kind == "any":
            continue
        accepted, gotype = _KINDS[kind]
        jt = json_type(value)
        if jt not in accepted or (kind == "int" and isinstance(value, float) and not value.is_integer()):
            raise BadRequest(
                f"json: cannot unmarshal {jt} into Go struct field {struct_name}.{key} of type {gotype}"
            )
        if kind in ("strings", "ints"):
            want = "string" if kind == "strings" else "number"
            for item in value:
                if json_type(item) != want:
                    raise BadRequest(
                        f"json: cannot unmarshal {json_type(item)} into Go struct field "
                        f"{struct_name}.{key} of type {gotype[2:]}"
                    )


def _model_field(body: Mapping[str, Any], *keys: str) -> str:
    for key in keys:
        value = body.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


# --- jobs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateJob:
    """One text-generation request, whatever API it came through.

    ``messages`` are rendered with the model's chat template; ``raw_prompt``
    (``/api/generate`` with ``raw:true``) is tokenised as is. Neither set means
    "just load the model" (empty prompt / no messages).
    """

    endpoint: Endpoint
    model: str
    stream: bool
    messages: tuple[Mapping[str, Any], ...] = ()
    raw_prompt: str | None = None
    context: tuple[int, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    format: Any = None
    keep_alive: float | None = None
    think: bool = False
    tools: tuple[Mapping[str, Any], ...] = ()
    suffix: bool = False
    raw_conflict: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    include_usage: bool = False

    @property
    def load_only(self) -> bool:
        return not self.messages and self.raw_prompt is None

    @property
    def want_context(self) -> bool:
        return self.endpoint is Endpoint.GENERATE and self.raw_prompt is None


@dataclass(frozen=True)
class EmbedJob:
    """One embedding request (``/api/embed``, ``/api/embeddings`` or ``/v1/embeddings``)."""

    endpoint: Endpoint
    model: str
    inputs: tuple[str, ...]
    truncate: bool = True
    dimensions: int = 0
    encoding_format: str = "float"
    options: Mapping[str, Any] = field(default_factory=dict)
    keep_alive: float | None = None


def _common(body: Mapping[str, Any]) -> dict[str, Any]:
    return {"keep_alive": parse_keep_alive(body.get("keep_alive")), "options": body.get("options") or {}}


def _no_empty_format(fmt: Any) -> Any:
    """``"format": ""`` is no format (LangChain's OllamaLLM always sends it; Ollama ignores it)."""
    return None if fmt == "" else fmt


def check_format(fmt: Any) -> Any:
    """``"json"``, a schema object, or None; anything else is Ollama's 500."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json" or isinstance(fmt, dict):
        return fmt
    raise RequestError(
        f'invalid format: {json.dumps(fmt)}; expected "json" or a valid JSON Schema object', 500
    )


def _check_images(images: Any, struct_name: str) -> None:
    if images is None:
        return
    if not isinstance(images, list):
        raise BadRequest(f"json: cannot unmarshal {json_type(images)} into Go struct field {struct_name}.images of type []api.ImageData")
    for img in images:
        try:
            base64.b64decode(img if isinstance(img, str) else "!", validate=True)
        except (ValueError, TypeError):
            raise BadRequest("illegal base64 data at input byte 0") from None


def parse_generate(body: bytes) -> GenerateJob:
    """``POST /api/generate`` (§2.3)."""
    d = decode_body(body, "api.GenerateRequest")
    check_types(d, "GenerateRequest", {
        "model": "string", "prompt": "string", "suffix": "string", "system": "string",
        "template": "string", "stream": "bool", "raw": "bool", "context": "ints",
        "options": "object", "top_logprobs": "int", "logprobs": "bool", "images": "any",
    })
    _check_images(d.get("images"), "GenerateRequest")
    prompt = d.get("prompt") or ""
    system = d.get("system") or ""
    raw = bool(d.get("raw"))
    messages: tuple[Mapping[str, Any], ...] = ()
    raw_prompt = None
    if prompt:
        if raw:
            raw_prompt = prompt
        else:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            messages = tuple(msgs)
    return GenerateJob(
        endpoint=Endpoint.GENERATE,
        model=_model_field(d, "model", "name"),
        stream=d.get("stream") is not False,
        messages=messages,
        raw_prompt=raw_prompt,
        context=tuple(int(t) for t in d.get("context") or ()),
        format=_no_empty_format(d.get("format")),
        think=parse_think(d.get("think")),
        suffix=bool(d.get("suffix")),
        raw_conflict=raw and bool(d.get("template") or system or d.get("context")),
        logprobs=bool(d.get("logprobs")),
        top_logprobs=int(d.get("top_logprobs") or 0),
        **_common(d),
    )


def _chat_messages(raw: Any, struct_name: str) -> tuple[dict[str, Any], ...]:
    """Messages as the template sees them: role (lower-cased), content, and the tool fields."""
    out = []
    for m in raw or ():
        if not isinstance(m, dict):
            raise BadRequest(f"json: cannot unmarshal {json_type(m)} into Go struct field {struct_name}.messages of type api.Message")
        check_types(m, "Message", {"role": "string", "content": "string", "tool_calls": "array",
                                   "tool_name": "string", "tool_call_id": "string", "thinking": "string"})
        _check_images(m.get("images"), "Message")
        msg: dict[str, Any] = {"role": (m.get("role") or "").lower(), "content": m.get("content") or ""}
        calls = [_tool_call(c) for c in m.get("tool_calls") or ()]
        if calls:
            msg["tool_calls"] = calls
        for key in ("tool_name", "tool_call_id", "thinking"):
            if m.get(key):
                msg[key] = m[key]
        out.append(msg)
    return tuple(out)


def _tool_call(call: Any) -> dict[str, Any]:
    """One ``tool_calls`` entry of a history message, arguments as an object."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        raise BadRequest(f"json: cannot unmarshal {json_type(call)} into Go struct field Message.tool_calls of type api.ToolCall")
    out: dict[str, Any] = {"function": {"name": str(fn.get("name") or ""),
                                        "arguments": arguments_object(fn.get("arguments"))}}
    if isinstance(fn.get("index"), int):
        out["function"]["index"] = fn["index"]
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def parse_tools(raw: Any, struct_name: str) -> tuple[dict[str, Any], ...]:
    """A request's ``tools``; ``[]`` (what ollama-python always sends) is no tools."""
    tools = []
    for tool in raw or ():
        if not isinstance(tool, dict):
            raise BadRequest(f"json: cannot unmarshal {json_type(tool)} into Go struct field {struct_name}.tools of type api.Tool")
        fn = tool.get("function")
        if fn is not None and not isinstance(fn, dict):
            raise BadRequest(f"json: cannot unmarshal {json_type(fn)} into Go struct field Tool.tools.function of type api.ToolFunction")
        tools.append(tool)
    return tuple(tools)


def parse_chat(body: bytes) -> GenerateJob:
    """``POST /api/chat`` (§2.4)."""
    d = decode_body(body, "api.ChatRequest")
    check_types(d, "ChatRequest", {
        "model": "string", "messages": "messages", "stream": "bool", "options": "object",
        "tools": "array", "top_logprobs": "int", "logprobs": "bool",
    })
    return GenerateJob(
        endpoint=Endpoint.CHAT,
        model=_model_field(d, "model", "name"),
        stream=d.get("stream") is not False,
        messages=_chat_messages(d.get("messages"), "ChatRequest"),
        format=_no_empty_format(d.get("format")),
        think=parse_think(d.get("think")),
        tools=parse_tools(d.get("tools"), "ChatRequest"),
        logprobs=bool(d.get("logprobs")),
        top_logprobs=int(d.get("top_logprobs") or 0),
        **_common(d),
    )


def _embed_inputs(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise BadRequest("invalid input type")


def parse_embed(body: bytes) -> EmbedJob:
    """``POST /api/embed`` (§2.5)."""
    d = decode_body(body, "api.EmbedRequest")
    check_types(d, "EmbedRequest", {"model": "string", "truncate": "bool", "dimensions": "int", "options": "object"})
    dims = int(d.get("dimensions") or 0)
    if dims < 0:
        raise BadRequest("dimensions must be a positive number")
    return EmbedJob(
        endpoint=Endpoint.EMBED,
        model=_model_field(d, "model"),
        inputs=_embed_inputs(d.get("input")),
        truncate=d.get("truncate") is not False,
        dimensions=dims,
        **_common(d),
    )


def parse_embeddings(body: bytes) -> EmbedJob:
    """``POST /api/embeddings`` (§2.6, deprecated)."""
    d = decode_body(body, "api.EmbeddingRequest")
    check_types(d, "EmbeddingRequest", {"model": "string", "prompt": "string", "options": "object"})
    prompt = d.get("prompt") or ""
    return EmbedJob(
        endpoint=Endpoint.EMBEDDINGS,
        model=_model_field(d, "model"),
        inputs=(prompt,) if prompt else (),
        **_common(d),
    )


def parse_show(body: bytes) -> tuple[str, bool]:
    """``POST /api/show`` -> (model, verbose)."""
    d = decode_body(body, "api.ShowRequest")
    check_types(d, "ShowRequest", {"model": "string", "name": "string", "verbose": "bool"})
    return _model_field(d, "model", "name"), bool(d.get("verbose"))


def parse_pull(body: bytes) -> tuple[str, bool]:
    """``POST /api/pull`` -> (model, stream)."""
    d = decode_body(body, "api.PullRequest")
    check_types(d, "PullRequest", {"model": "string", "name": "string", "stream": "bool", "insecure": "bool"})
    return _model_field(d, "model", "name"), d.get("stream") is not False


def validate_for_model(job: GenerateJob, full: str, capabilities: Collection[str] = ("completion",)) -> None:
    """Checks Ollama makes after finding the model (§2.3 step 3): 400s, in Ollama's order.

    ``capabilities`` are the model's, as ``/api/show`` lists them: tools are
    refused only for a model whose template cannot carry them.
    """
    if job.raw_conflict:
        raise BadRequest("raw mode does not support template, system, or context")
    if not 0 <= job.top_logprobs <= 20:
        raise BadRequest("top_logprobs must be between 0 and 20")
    if job.think and "thinking" not in capabilities:
        raise BadRequest(f'"{job.model}" does not support thinking')
    if job.tools and "tools" not in capabilities:
        raise BadRequest(f"{full} does not support tools")
    if job.suffix and "insert" not in capabilities:
        raise BadRequest(f"{full} does not support insert")
    check_format(job.format)

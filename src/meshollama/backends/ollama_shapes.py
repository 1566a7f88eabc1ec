"""Ollama and OpenAI request/response shapes for a local model server (sans-IO).

Everything the embedded backend says on the wire is built here, without a
model, a thread or a clock: parsers turn request bodies into frozen jobs (or
raise a :class:`~meshollama.errors.RequestError` carrying Ollama's status and
text), and *shapers* turn token deltas plus final :class:`GenStats` into the
exact bytes real Ollama sends (NDJSON for native streams, SSE for ``/v1``).
The texts and status codes follow ``shared/reference/ollama-api.md``; the
section numbers in comments point there.

Time enters only as ``now_ns`` arguments (wall-clock nanoseconds since the
epoch), so every shape is testable with literal values.
"""

from __future__ import annotations

import base64
import enum
import json
import math
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .. import names
from ..catalog import ModelInfo
from ..errors import BadRequest, ModelNotFound, RequestError

BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
JSON_UTF8 = "application/json; charset=utf-8"
JSON = "application/json"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
TEXT = "text/plain; charset=utf-8"
SSE_DONE = b"data: [DONE]\n\n"
# Go's time.Now().Add(math.MaxInt64) (add to now): /api/ps's expires_at for keep_alive < 0.
FOREVER_NS = 2**63 - 1


# --- encoding -----------------------------------------------------------------


def dumps(obj: Any) -> bytes:
    """Compact JSON as Go's ``json.Marshal`` writes it (UTF-8, no spaces)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def ndjson(obj: Any) -> bytes:
    return dumps(obj) + b"\n"


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def rfc3339(now_ns: int) -> str:
    """Go's RFC3339Nano in UTC: ``2024-05-01T12:00:00.1234567Z`` (zeros trimmed)."""
    secs, frac = divmod(int(now_ns), 1_000_000_000)
    stamp = datetime.fromtimestamp(secs, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        stamp += "." + f"{frac:09d}".rstrip("0")
    return stamp + "Z"


# --- model names (§1.8): see meshollama.names ---------------------------------------


def full_name(name: str) -> str:
    """``registry.ollama.ai/library/m:tag``: how Ollama names a model in capability errors."""
    return names.parse(name).full()


# --- routing (§1.2) -------------------------------------------------------------


class Endpoint(enum.Enum):
    ROOT = "/"
    VERSION = "/api/version"
    GENERATE = "/api/generate"
    CHAT = "/api/chat"
    EMBED = "/api/embed"
    EMBEDDINGS = "/api/embeddings"
    TAGS = "/api/tags"
    PS = "/api/ps"
    SHOW = "/api/show"
    PULL = "/api/pull"
    UNSUPPORTED = "unsupported"  # push, create, copy, delete, blobs: not for a read-only model dir
    V1_CHAT = "/v1/chat/completions"
    V1_COMPLETIONS = "/v1/completions"
    V1_EMBEDDINGS = "/v1/embeddings"
    V1_MODELS = "/v1/models"
    V1_MODEL = "/v1/models/{model}"

    @property
    def openai(self) -> bool:
        return self.value.startswith("/v1/")


_ROUTES: dict[str, tuple[frozenset[str], Endpoint]] = {
    "/": (frozenset({"GET", "HEAD"}), Endpoint.ROOT),
    "/api/version": (frozenset({"GET", "HEAD"}), Endpoint.VERSION),
    "/api/generate": (frozenset({"POST"}), Endpoint.GENERATE),
    "/api/chat": (frozenset({"POST"}), Endpoint.CHAT),
    "/api/embed": (frozenset({"POST"}), Endpoint.EMBED),
    "/api/embeddings": (frozenset({"POST"}), Endpoint.EMBEDDINGS),
    "/api/tags": (frozenset({"GET", "HEAD"}), Endpoint.TAGS),
    "/api/ps": (frozenset({"GET"}), Endpoint.PS),
    "/api/show": (frozenset({"POST"}), Endpoint.SHOW),
    "/api/pull": (frozenset({"POST"}), Endpoint.PULL),
    "/api/push": (frozenset({"POST"}), Endpoint.UNSUPPORTED),
    "/api/create": (frozenset({"POST"}), Endpoint.UNSUPPORTED),
    "/api/copy": (frozenset({"POST"}), Endpoint.UNSUPPORTED),
    "/api/delete": (frozenset({"DELETE"}), Endpoint.UNSUPPORTED),
    "/v1/chat/completions": (frozenset({"POST"}), Endpoint.V1_CHAT),
    "/v1/completions": (frozenset({"POST"}), Endpoint.V1_COMPLETIONS),
    "/v1/embeddings": (frozenset({"POST"}), Endpoint.V1_EMBEDDINGS),
    "/v1/models": (frozenset({"GET"}), Endpoint.V1_MODELS),
}


@dataclass(frozen=True)
class Reply:
    """A complete, non-streamed answer."""

    status: int
    content_type: str
    body: bytes


@dataclass(frozen=True)
class Route:
    endpoint: Endpoint
    arg: str = ""  # the model id of /v1/models/{model}


def route(method: str, path: str) -> Route | Reply:
    """Match ``path`` (query string allowed) like gin: a Route, or a 404/405 Reply."""
    path = path.split("?", 1)[0] or "/"
    method = method.upper()
    if path.startswith("/v1/models/") and path.count("/") == 3 and path[len("/v1/models/"):]:
        allowed, ep, arg = frozenset({"GET"}), Endpoint.V1_MODEL, path[len("/v1/models/"):]
    elif path.startswith("/api/blobs/") and path.count("/") == 3:
        allowed, ep, arg = frozenset({"POST", "HEAD"}), Endpoint.UNSUPPORTED, ""
    elif path in _ROUTES:
        (allowed, ep), arg = _ROUTES[path], ""
    else:
        return Reply(404, TEXT, b"404 page not found")
    if method not in allowed:
        return Reply(405, TEXT, b"405 method not allowed")
    return Route(ep, arg)


# --- errors (§1.7, §3.1) --------------------------------------------------------


def error_reply(err: RequestError, endpoint: Endpoint | None = None) -> Reply:
    """The one place errors become bytes: Ollama's envelope, or OpenAI's on ``/v1``."""
    if endpoint is not None and endpoint.openai:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(err.status, "api_error")
        body = {"error": {"message": err.message, "type": kind, "param": None, "code": None}}
        return Reply(err.status, JSON, dumps(body))
    return Reply(err.status, JSON_UTF8, dumps({"error": err.message}))


def missing_model_error(endpoint: Endpoint) -> RequestError:
    """What Ollama answers when ``model`` is empty or absent (table in §1.8)."""
    if endpoint in (Endpoint.GENERATE, Endpoint.EMBED, Endpoint.V1_COMPLETIONS, Endpoint.V1_EMBEDDINGS):
        return ModelNotFound("model '' not found")
    return BadRequest("model is required")


def not_found_error(endpoint: Endpoint, model: str) -> RequestError:
    """What Ollama answers when ``model`` is well formed but not served here (§1.8)."""
    if endpoint in (Endpoint.EMBED, Endpoint.EMBEDDINGS, Endpoint.V1_EMBEDDINGS):
        return ModelNotFound(f'model "{model}" not found, try pulling it first')
    if endpoint in (Endpoint.SHOW, Endpoint.V1_MODEL):
        if names.is_valid(model):
            model = names.shortest(model)
    return ModelNotFound(f"model '{model}' not found")


# --- request bodies (§1.3) --------------------------------------------------------

_JSON_TYPES = {str: "string", bool: "bool", int: "number", float: "number", dict: "object", list: "array"}


def _jtype(value: Any) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), "value")


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
        raise BadRequest(f"json: cannot unmarshal {_jtype(value)} into Go value of type {struct_name}")
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
        jt = _jtype(value)
        if jt not in accepted or (kind == "int" and isinstance(value, float) and not value.is_integer()):
            raise BadRequest(
                f"json: cannot unmarshal {jt} into Go struct field {struct_name}.{key} of type {gotype}"
            )
        if kind in ("strings", "ints"):
            want = "string" if kind == "strings" else "number"
            for item in value:
                if _jtype(item) != want:
                    raise BadRequest(
                        f"json: cannot unmarshal {_jtype(item)} into Go struct field "
                        f"{struct_name}.{key} of type {gotype[2:]}"
                    )


def _model_field(body: Mapping[str, Any], *keys: str) -> str:
    for key in keys:
        value = body.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


# --- durations and think (§1.9) --------------------------------------------------

_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """Go's ``time.ParseDuration`` in seconds; raises ValueError with Go's text."""
    s = text.strip()
    sign = -1.0 if s.startswith("-") else 1.0
    body = s.lstrip("+-")
    if body == "0":
        return 0.0
    total, pos = 0.0, 0
    for m in _DURATION.finditer(body):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if not body or pos != len(body):
        raise ValueError(f'time: invalid duration "{text}"')
    return sign * total


def parse_keep_alive(value: Any) -> float | None:
    """Seconds; ``None`` when absent; negative means forever. 400 on a bad value."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest("Unsupported type: 'bool'")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        if value == "":
            return None
        try:
            return parse_go_duration(value)
        except ValueError as e:
            raise BadRequest(str(e)) from None
    raise BadRequest(f"Unsupported type: '{_jtype(value)}'")


_THINK_LEVELS = ("high", "medium", "low", "max")


def parse_think(value: Any) -> bool:
    """True when thinking is asked for; 400 ``invalid think value`` on nonsense."""
    if value is None or value is False:
        return False
    if value is True:
        return True
    if isinstance(value, str):
        if value in _THINK_LEVELS:
            return True
        if value == "":
            return False
    raise BadRequest(f'invalid think value: {json.dumps(value)} (must be "high", "medium", "low", true, or false)')


# --- sampling options (§1.9) ------------------------------------------------------

_FLOAT_OPTIONS = (
    "temperature", "top_p", "min_p", "typical_p", "repeat_penalty",
    "presence_penalty", "frequency_penalty",
)
_INT_OPTIONS = (
    "top_k", "seed", "num_predict", "num_ctx", "num_keep", "repeat_last_n",
    "num_batch", "num_gpu", "main_gpu", "num_thread", "draft_num_predict",
)
_BOOL_OPTIONS = ("use_mmap",)


@dataclass(frozen=True)
class Sampling:
    """Sampling settings for one request, with Ollama's defaults.

    ``max_tokens`` None means "until the context is full" (num_predict < 0).
    ``num_ctx`` is recorded but the embedded backend keeps the context it was
    loaded with (it does not reload per request; see embedded.py).
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    num_ctx: int | None = None


def sampling(options: Mapping[str, Any] | None) -> Sampling:
    """Map Ollama ``options`` to :class:`Sampling`; 500 on a wrong value type, like Ollama."""
    opts = dict(options or {})
    kw: dict[str, Any] = {}
    for key in _FLOAT_OPTIONS:
        if key in opts and opts[key] is not None:
            v = opts[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RequestError(f'option "{key}" must be of type float32', 500)
            kw[key] = float(v)
    ints: dict[str, int] = {}
    for key in _INT_OPTIONS:
        if key in opts and opts[key] is not None:
            v = opts[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RequestError(f'option "{key}" must be of type integer', 500)
            ints[key] = int(v)
    for key in _BOOL_OPTIONS:
        if key in opts and opts[key] is not None and not isinstance(opts[key], bool):
            raise RequestError(f'option "{key}" must be of type boolean', 500)
    if opts.get("stop") is not None:
        stop = opts["stop"]
        if not isinstance(stop, list):
            raise RequestError('option "stop" must be of type array', 500)
        if not all(isinstance(s, str) for s in stop):
            raise RequestError('option "stop" must be of an array of strings', 500)
        kw["stop"] = tuple(s for s in stop if s)
    if "top_k" in ints:
        kw["top_k"] = ints["top_k"]
    if ints.get("seed", -1) >= 0:
        kw["seed"] = ints["seed"] & 0xFFFFFFFF
    if ints.get("num_predict", -1) >= 0:
        kw["max_tokens"] = ints["num_predict"]
    if ints.get("num_ctx", 0) > 0:
        kw["num_ctx"] = ints["num_ctx"]
    return Sampling(**kw)


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
    tools: bool = False
    suffix: bool = False
    raw_conflict: bool = False
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


def _check_format(fmt: Any) -> Any:
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
        raise BadRequest(f"json: cannot unmarshal {_jtype(images)} into Go struct field {struct_name}.images of type []api.ImageData")
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
        format=d.get("format"),
        think=parse_think(d.get("think")),
        suffix=bool(d.get("suffix")),
        raw_conflict=raw and bool(d.get("template") or system or d.get("context")),
        top_logprobs=int(d.get("top_logprobs") or 0),
        **_common(d),
    )


def _chat_messages(raw: Any, struct_name: str) -> tuple[dict[str, Any], ...]:
    out = []
    for m in raw or ():
        if not isinstance(m, dict):
            raise BadRequest(f"json: cannot unmarshal {_jtype(m)} into Go struct field {struct_name}.messages of type api.Message")
        check_types(m, "Message", {"role": "string", "content": "string"})
        _check_images(m.get("images"), "Message")
        out.append({"role": (m.get("role") or "").lower(), "content": m.get("content") or ""})
    return tuple(out)


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
        format=d.get("format"),
        think=parse_think(d.get("think")),
        tools=bool(d.get("tools")),
        top_logprobs=int(d.get("top_logprobs") or 0),
        **_common(d),
    )


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
        "presence_penalty": "float", "tools": "array",
    })
    raw_messages = d.get("messages")
    if not raw_messages:
        raise BadRequest("[] is too short - 'messages'")
    messages = []
    for m in raw_messages:
        if not isinstance(m, dict):
            raise BadRequest(f"invalid message format: {_jtype(m)}")
        messages.append({"role": str(m.get("role") or "").lower(), "content": _openai_content(m)})
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
        tools=bool(d.get("tools")),
    )


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
    gotype = {"number": "float64", "bool": "bool", "object": "map[string]interface {}"}.get(_jtype(content), _jtype(content))
    raise BadRequest(f"invalid message content type: {gotype}")


def parse_openai_completion(body: bytes) -> GenerateJob:
    """``POST /v1/completions`` (§3.3): the prompt is templated like ``/api/generate``."""
    d = decode_body(body, "openai.CompletionRequest", openai=True)
    check_types(d, "CompletionRequest", {
        "model": "string", "prompt": "string", "suffix": "string", "stream": "bool",
        "max_tokens": "int", "seed": "int", "temperature": "float", "top_p": "float",
        "frequency_penalty": "float", "presence_penalty": "float",
    })
    stream, usage = _openai_stream(d)
    return GenerateJob(
        endpoint=Endpoint.V1_COMPLETIONS,
        model=_model_field(d, "model"),
        stream=stream,
        include_usage=usage,
        messages=({"role": "user", "content": d.get("prompt") or ""},),
        options=_openai_options(d),
        suffix=bool(d.get("suffix")),
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


def validate_for_model(job: GenerateJob, full: str) -> None:
    """Checks Ollama makes after finding the model (§2.3 step 3): 400s, in Ollama's order."""
    if job.raw_conflict:
        raise BadRequest("raw mode does not support template, system, or context")
    if not 0 <= job.top_logprobs <= 20:
        raise BadRequest("top_logprobs must be between 0 and 20")
    if job.think:
        raise BadRequest(f'"{job.model}" does not support thinking')
    if job.tools:
        raise BadRequest(f"{full} does not support tools")
    if job.suffix:
        raise BadRequest(f"{full} does not support insert")
    _check_format(job.format)


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


class Shaper:
    """Turns deltas into wire bytes for one response. Subclasses per API."""

    content_type: str = NDJSON

    def __init__(self, model: str, stream: bool) -> None:
        self.model = model
        self.stream = stream
        self.text: list[str] = []

    def delta(self, text: str, now_ns: int) -> bytes:
        """Bytes to send for a text delta now (``b""`` when buffering or empty)."""
        if not text:
            return b""
        if not self.stream:
            self.text.append(text)
            return b""
        return self._chunk(text, now_ns)

    def finish(self, stats: GenStats, now_ns: int) -> bytes:
        raise NotImplementedError

    def fail(self, message: str, now_ns: int) -> bytes:
        """A mid-stream error line (after the status was sent). §1.5."""
        return ndjson({"error": message})

    def _chunk(self, text: str, now_ns: int) -> bytes:
        raise NotImplementedError


class NativeGenerate(Shaper):
    def __init__(self, model: str, stream: bool, want_context: bool) -> None:
        super().__init__(model, stream)
        self.want_context = want_context
        self.content_type = NDJSON if stream else JSON_UTF8

    def _chunk(self, text: str, now_ns: int) -> bytes:
        return ndjson({"model": self.model, "created_at": rfc3339(now_ns), "response": text, "done": False})

    def finish(self, stats: GenStats, now_ns: int) -> bytes:
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
        return ndjson(obj) if self.stream else dumps(obj)


class NativeChat(Shaper):
    def __init__(self, model: str, stream: bool) -> None:
        super().__init__(model, stream)
        self.content_type = NDJSON if stream else JSON_UTF8

    def _chunk(self, text: str, now_ns: int) -> bytes:
        return ndjson({
            "model": self.model, "created_at": rfc3339(now_ns),
            "message": {"role": "assistant", "content": text}, "done": False,
        })

    def finish(self, stats: GenStats, now_ns: int) -> bytes:
        obj: dict[str, Any] = {
            "model": self.model,
            "created_at": rfc3339(now_ns),
            "message": {"role": "assistant", "content": "" if self.stream else "".join(self.text)},
            "done": True,
            "done_reason": stats.done_reason,
        }
        obj.update(stats.metrics())
        return ndjson(obj) if self.stream else dumps(obj)


class _OpenAIShaper(Shaper):
    prefix = ""

    def __init__(self, model: str, stream: bool, include_usage: bool, seq: int, created: int) -> None:
        super().__init__(model, stream)
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

    def _chunk(self, text: str, now_ns: int) -> bytes:
        delta: dict[str, Any] = {"content": text}
        if not self._role_sent:
            delta = {"role": "assistant", "content": text}
            self._role_sent = True
        return sse({**self._head("chat.completion.chunk"),
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})

    def finish(self, stats: GenStats, now_ns: int) -> bytes:
        if not self.stream:
            return dumps({
                **self._head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(self.text)},
                             "finish_reason": stats.done_reason}],
                "usage": stats.usage(),
            })
        out = sse({**self._head("chat.completion.chunk"),
                   "choices": [{"index": 0, "delta": {}, "finish_reason": stats.done_reason}]})
        if self.include_usage:
            out += sse({**self._head("chat.completion.chunk"), "choices": [], "usage": stats.usage()})
        return out + SSE_DONE


class OpenAICompletion(_OpenAIShaper):
    prefix = "cmpl-"
    _ZERO = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

    def _obj(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        obj: dict[str, Any] = {"id": self.id, "object": "text_completion", "created": self.created,
                               "model": self.model, "system_fingerprint": "fp_ollama", "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        return obj

    def _chunk(self, text: str, now_ns: int) -> bytes:
        usage = dict(self._ZERO) if self.include_usage else None
        return sse(self._obj([{"text": text, "index": 0, "finish_reason": None}], usage))

    def finish(self, stats: GenStats, now_ns: int) -> bytes:
        if not self.stream:
            return dumps(self._obj([{"text": "".join(self.text), "index": 0,
                                     "finish_reason": stats.done_reason}], stats.usage()))
        usage = dict(self._ZERO) if self.include_usage else None
        out = sse(self._obj([{"text": "", "index": 0, "finish_reason": stats.done_reason}], usage))
        if self.include_usage:
            out += sse(self._obj([], stats.usage()))
        return out + SSE_DONE


def make_shaper(job: GenerateJob, *, seq: int, created: int) -> Shaper:
    """The shaper for ``job``'s API. ``seq`` numbers /v1 ids (Ollama: 0..998), ``created`` is unix s."""
    if job.endpoint is Endpoint.GENERATE:
        return NativeGenerate(job.model, job.stream, job.want_context)
    if job.endpoint is Endpoint.CHAT:
        return NativeChat(job.model, job.stream)
    if job.endpoint is Endpoint.V1_CHAT:
        return OpenAIChat(job.model, job.stream, job.include_usage, seq, created)
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


# --- embeddings (§2.5, §2.6, §3.4) ------------------------------------------------------


def normalise(vec: Sequence[float]) -> list[float]:
    """L2-normalised copy; a zero vector stays zero."""
    norm = math.sqrt(math.fsum(x * x for x in vec))
    return [float(x) / norm for x in vec] if norm > 0 else [float(x) for x in vec]


def shape_vector(vec: Sequence[float], dimensions: int = 0) -> list[float]:
    """Ollama's /api/embed treatment: truncate to ``dimensions`` (if smaller), then normalise."""
    if 0 < dimensions < len(vec):
        vec = vec[:dimensions]
    return normalise(vec)


def embed_reply(job: EmbedJob, vectors: Sequence[Sequence[float]], *, prompt_n: int,
                total_ns: int, load_ns: int) -> Reply:
    """The answer for any embedding endpoint, given raw (unnormalised) vectors."""
    if job.endpoint is Endpoint.EMBEDDINGS:
        vec = [float(x) for x in vectors[0]] if vectors else []
        return Reply(200, JSON_UTF8, dumps({"embedding": vec}))
    shaped = [shape_vector(v, job.dimensions) for v in vectors]
    if job.endpoint is Endpoint.V1_EMBEDDINGS:
        data = []
        for i, vec in enumerate(shaped):
            emb: Any = vec
            if job.encoding_format == "base64":
                emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
            data.append({"object": "embedding", "embedding": emb, "index": i})
        return Reply(200, JSON, dumps({
            "object": "list", "data": data, "model": job.model,
            "usage": {"prompt_tokens": prompt_n, "total_tokens": prompt_n},
        }))
    obj: dict[str, Any] = {"model": job.model, "embeddings": shaped}
    if vectors:
        obj.update(total_duration=total_ns, load_duration=load_ns, prompt_eval_count=prompt_n)
    return Reply(200, JSON_UTF8, dumps(obj))


# --- model listings (§2.7-2.9, §3.5-3.6) -----------------------------------------------


def _details(info: ModelInfo) -> dict[str, Any]:
    d = {"parent_model": "", "format": "gguf", "family": "", "families": None,
         "parameter_size": "", "quantization_level": ""}
    d.update(info.details)
    return d


def tags_reply(models: Iterable[ModelInfo]) -> Reply:
    """``GET /api/tags``: newest first, ``[]`` never ``null``."""
    items = sorted(models, key=lambda m: m.modified_at, reverse=True)
    out = [{"name": m.name, "model": m.name, "modified_at": m.modified_at, "size": m.size,
            "digest": m.digest, "details": _details(m)} for m in items]
    return Reply(200, JSON_UTF8, dumps({"models": out}))


@dataclass(frozen=True)
class Running:
    """A loaded model as ``/api/ps`` shows it."""

    info: ModelInfo
    expires_ns: int
    context_length: int
    size_vram: int = 0


def ps_reply(running: Iterable[Running]) -> Reply:
    """``GET /api/ps``: sorted by ``expires_at`` descending."""
    items = sorted(running, key=lambda r: r.expires_ns, reverse=True)
    out = [{"name": r.info.name, "model": r.info.name, "size": r.info.size, "digest": r.info.digest,
            "details": _details(r.info), "expires_at": rfc3339(r.expires_ns), "size_vram": r.size_vram,
            "context_length": r.context_length} for r in items]
    return Reply(200, JSON_UTF8, dumps({"models": out}))


def show_reply(info: ModelInfo, *, template: str, model_info: Mapping[str, Any],
               stop: Sequence[str] = (), license: str = "", source: str = "") -> Reply:
    """``POST /api/show``: ``model_info`` always present (ollama-python requires it)."""
    parameters = "\n".join(f'{"stop":<30} {json.dumps(s, ensure_ascii=False)}' for s in stop)
    modelfile = (
        f'# Modelfile generated by "ollama show"\n# To build a new Modelfile based on this, replace FROM with:\n'
        f"# FROM {info.name}\n\nFROM {source}\nTEMPLATE {json.dumps(template, ensure_ascii=False)}\n"
        + "".join(f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}\n" for s in stop)
    )
    obj = {
        "license": license,
        "modelfile": modelfile,
        "parameters": parameters,
        "template": template,
        "details": _details(info),
        "model_info": dict(model_info),
        "capabilities": list(info.capabilities),
        "modified_at": info.modified_at,
    }
    return Reply(200, JSON_UTF8, dumps(obj))


def _owner_and_created(info: ModelInfo) -> tuple[str, int]:
    ns = names.parse(info.name).namespace if names.is_valid(info.name) else names.DEFAULT_NAMESPACE
    try:
        created = int(datetime.fromisoformat(info.modified_at.replace("Z", "+00:00")).timestamp())
    except ValueError:
        created = 0
    return ns, created


def v1_models_reply(models: Iterable[ModelInfo]) -> Reply:
    """``GET /v1/models`` in ``/api/tags`` order (``[]`` rather than Ollama's ``null`` when empty)."""
    items = sorted(models, key=lambda m: m.modified_at, reverse=True)
    data = []
    for m in items:
        owner, created = _owner_and_created(m)
        data.append({"id": m.name, "object": "model", "created": created, "owned_by": owner})
    return Reply(200, JSON, dumps({"object": "list", "data": data}))


def v1_model_reply(model_id: str, info: ModelInfo) -> Reply:
    """``GET /v1/models/{model}``: ``id`` echoes the path segment verbatim."""
    owner, created = _owner_and_created(info)
    return Reply(200, JSON, dumps({"id": model_id, "object": "model", "created": created, "owned_by": owner}))


def pull_reply(stream: bool) -> Reply:
    """``/api/pull`` of a model already here: the progress Ollama shows, ending in success."""
    if not stream:
        return Reply(200, JSON, dumps({"status": "success"}))
    lines = [ndjson({"status": s}) for s in ("pulling manifest", "verifying sha256 digest",
                                             "writing manifest", "success")]
    return Reply(200, NDJSON, b"".join(lines))


def pull_missing_reply(model: str, stream: bool) -> Reply:
    """``/api/pull`` of a model this node does not have: it cannot download models."""
    message = f"pull model manifest: the embedded backend cannot download {model!r}; put a .gguf file in the model directory"
    if not stream:
        return Reply(500, JSON_UTF8, dumps({"error": message}))
    return Reply(200, NDJSON, ndjson({"status": "pulling manifest"}) + ndjson({"error": message}))

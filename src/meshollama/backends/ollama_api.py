"""The Ollama/OpenAI API vocabulary both directions share (sans-IO).

Content types, JSON/NDJSON/SSE encoding, the endpoints and gin-like routing,
the :class:`Reply` type, and the one place a
:class:`~meshollama.errors.RequestError` becomes Ollama's (or OpenAI's) error
envelope. Requests are parsed in :mod:`.ollama_requests` (options in
:mod:`.ollama_options`) and answers shaped in :mod:`.ollama_responses`. The
texts and status codes follow ``shared/reference/ollama-api.md``; the section
numbers in comments point there.

Time enters only as ``now_ns`` arguments (wall-clock nanoseconds since the
epoch), so every shape is testable with literal values.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .. import names
from ..errors import BadRequest, ModelNotFound, RequestError

# The Ollama release whose API we speak, for /api/version: /v1/responses came in
# 0.13.3, /v1/messages (Anthropic) in 0.14.0, logprobs in 0.12.11. Clients gate
# features on it, so it names what we serve, not meshollama's own version.
OLLAMA_VERSION = "0.14.0"
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
    UNSUPPORTED = "unsupported"  # push: the embedded backend has no registry to push to
    CREATE = "/api/create"
    COPY = "/api/copy"
    DELETE = "/api/delete"
    BLOBS = "/api/blobs/{digest}"
    V1_CHAT = "/v1/chat/completions"
    V1_COMPLETIONS = "/v1/completions"
    V1_EMBEDDINGS = "/v1/embeddings"
    V1_MODELS = "/v1/models"
    V1_MODEL = "/v1/models/{model}"
    V1_RESPONSES = "/v1/responses"
    V1_MESSAGES = "/v1/messages"

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
    "/api/create": (frozenset({"POST"}), Endpoint.CREATE),
    "/api/copy": (frozenset({"POST"}), Endpoint.COPY),
    "/api/delete": (frozenset({"DELETE"}), Endpoint.DELETE),
    "/v1/chat/completions": (frozenset({"POST"}), Endpoint.V1_CHAT),
    "/v1/completions": (frozenset({"POST"}), Endpoint.V1_COMPLETIONS),
    "/v1/embeddings": (frozenset({"POST"}), Endpoint.V1_EMBEDDINGS),
    "/v1/models": (frozenset({"GET"}), Endpoint.V1_MODELS),
    "/v1/responses": (frozenset({"POST"}), Endpoint.V1_RESPONSES),
    "/v1/messages": (frozenset({"POST"}), Endpoint.V1_MESSAGES),
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
        allowed, ep, arg = frozenset({"POST", "HEAD"}), Endpoint.BLOBS, path[len("/api/blobs/"):]
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


# --- JSON value types as Go's errors name them (§1.3) ------------------------------

_JSON_TYPES = {str: "string", bool: "bool", int: "number", float: "number", dict: "object", list: "array"}


def json_type(value: Any) -> str:
    """The JSON type of a decoded value, as ``encoding/json`` names it in errors."""
    return "null" if value is None else _JSON_TYPES.get(type(value), "value")

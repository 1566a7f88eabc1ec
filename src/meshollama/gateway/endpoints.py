"""The proxied routes, Ollama's per-endpoint texts, request validation (pure).

Each endpoint the gateway forwards is one :class:`Endpoint`: which methods
it takes, whether it is routed across the mesh by ``model`` or sent to this
node's own backend, which envelope its errors use, and the exact words
Ollama answers with when ``model`` is missing or unknown (they differ per
endpoint, see ``shared/reference/ollama-api.md`` §1.8).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .. import names
from ..backends.ollama_options import sampling
from ..backends.ollama_requests import check_format
from ..errors import BadRequest, RequestError

_NATIVE_NOT_FOUND = "model '{sent}' not found"
_EMBED_NOT_FOUND = 'model "{sent}" not found, try pulling it first'
_SHOW_NOT_FOUND = "model '{short}' not found"


@dataclass(frozen=True)
class Endpoint:
    """One proxied route."""

    path: str  # exact path, or a prefix ending in "/" when ``prefix``
    methods: frozenset[str]
    routed: bool = True  # by model across the mesh; False: this node's own backend
    envelope: str = "ollama"  # the error envelope: "ollama", "openai" or "anthropic"
    prefix: bool = False  # path + one more segment (/api/blobs/<digest>)
    # The request body is streamed to the backend, not read first: model blobs
    # are gigabytes (``ollama create`` uploads the GGUF here).
    stream_body: bool = False
    model_fields: tuple[str, ...] = ("model",)  # first non-absent one names the model
    struct: str = ""  # Go request type, for Ollama-like type-error texts
    missing_status: int = 400  # answer when ``model`` is empty or absent
    missing_message: str = "model is required"
    not_found: str = _NATIVE_NOT_FOUND  # format(sent=..., short=...)
    # Boolean fields of the Go request type: a wrong type fails Ollama's bind,
    # before the model is looked up, so it must be a 400 here too, not a 404.
    bool_fields: tuple[str, ...] = ()
    # Fields Ollama checks only on the serving node, answering 500 (a wrong
    # ``options`` value type, a bad ``format``): checked here before routing,
    # so a request that would fail the same way on every peer is answered
    # once, not retried across the mesh.
    checked: tuple[str, ...] = ()

    @property
    def openai(self) -> bool:
        return self.envelope == "openai"

    @property
    def label(self) -> str:
        """Metrics label: the route, without the variable part."""
        return self.path.rstrip("/") if self.prefix else self.path

    def not_found_message(self, sent: str) -> str:
        return self.not_found.format(sent=sent, short=names.shortest(sent))


def _routed(path: str, struct: str, missing: tuple[int, str], not_found: str, **kw) -> Endpoint:
    status, message = missing
    return Endpoint(
        path=path,
        methods=frozenset({"POST"}),
        struct=struct,
        missing_status=status,
        missing_message=message,
        not_found=not_found,
        **kw,
    )


_REQUIRED = (400, "model is required")
_EMPTY_NOT_FOUND = (404, "model '' not found")
_STREAM = ("stream",)

_OPTIONS_FORMAT = ("options", "format")

ENDPOINTS: tuple[Endpoint, ...] = (
    _routed("/api/generate", "GenerateRequest", _EMPTY_NOT_FOUND, _NATIVE_NOT_FOUND, bool_fields=("stream", "raw"),
            checked=_OPTIONS_FORMAT),
    _routed("/api/chat", "ChatRequest", _REQUIRED, _NATIVE_NOT_FOUND, bool_fields=_STREAM, checked=_OPTIONS_FORMAT),
    _routed("/api/embed", "EmbedRequest", _EMPTY_NOT_FOUND, _EMBED_NOT_FOUND, checked=("options",)),
    _routed("/api/embeddings", "EmbeddingRequest", _REQUIRED, _EMBED_NOT_FOUND, checked=("options",)),
    # /api/show still accepts the deprecated "name".
    _routed("/api/show", "ShowRequest", _REQUIRED, _SHOW_NOT_FOUND, model_fields=("model", "name")),
    _routed("/v1/chat/completions", "ChatCompletionRequest", _REQUIRED, _NATIVE_NOT_FOUND, envelope="openai",
            bool_fields=_STREAM),
    _routed("/v1/completions", "CompletionRequest", _EMPTY_NOT_FOUND, _NATIVE_NOT_FOUND, envelope="openai",
            bool_fields=_STREAM),
    _routed("/v1/embeddings", "EmbedRequest", _EMPTY_NOT_FOUND, _NATIVE_NOT_FOUND, envelope="openai"),
    # The OpenAI Responses and Anthropic Messages APIs, as Ollama >= 0.14 serves them.
    _routed("/v1/responses", "ResponsesRequest", _REQUIRED, _NATIVE_NOT_FOUND, envelope="openai",
            bool_fields=_STREAM),
    _routed("/v1/messages", "MessagesRequest", _REQUIRED, _NATIVE_NOT_FOUND, envelope="anthropic",
            bool_fields=_STREAM),
    # Model management acts on this node's own backend, streamed as it streams.
    Endpoint("/api/pull", frozenset({"POST"}), routed=False),
    Endpoint("/api/push", frozenset({"POST"}), routed=False),
    Endpoint("/api/create", frozenset({"POST"}), routed=False),
    Endpoint("/api/copy", frozenset({"POST"}), routed=False),
    Endpoint("/api/delete", frozenset({"DELETE"}), routed=False),
    Endpoint("/api/blobs/", frozenset({"HEAD", "POST"}), routed=False, prefix=True, stream_body=True),
)

_EXACT = {e.path: e for e in ENDPOINTS if not e.prefix}
_PREFIXES = tuple(e for e in ENDPOINTS if e.prefix)


def match(path: str) -> Endpoint | None:
    """The proxied endpoint for ``path`` (any method), or None if it is not one."""
    found = _EXACT.get(path)
    if found is not None:
        return found
    for e in _PREFIXES:
        rest = path[len(e.path) :]
        if path.startswith(e.path) and rest and "/" not in rest:
            return e
    return None


def peer_may_call(method: str, path: str) -> bool:
    """What a node serves to other peers over the mesh: the routed (inference and
    read-only) endpoints, nothing else. Model management acts on this node's own
    backend and only through its own gateway, never for a stranger on port 4001:
    it writes and deletes files in the model directory."""
    found = match(path.split("?", 1)[0])
    return found is not None and found.routed and method.upper() in found.methods


def peer_policy(admission):
    """``allow(peer_id, method, path)`` for the mesh protocol's server: the routed
    endpoints for every admitted peer, model management too for a peer the mesh
    authority admitted as ``admin`` (``meshollama admit --role admin``). In an open
    mesh (``admission`` None) nobody manages another node's models."""

    def allow(peer_id: str, method: str, path: str) -> bool:
        # Every request, not just the connection: a stream kept alive from before a
        # revocation serves nothing after it, even if the disconnect is slow.
        role = admission.role(peer_id) if admission is not None else "serve"
        if role is None:
            return False
        if peer_may_call(method, path):
            return True
        if role != "admin":
            return False
        found = match(path.split("?", 1)[0])
        return found is not None and method.upper() in found.methods

    return allow


# --- validating a routed request's body --------------------------------------

_DECODER = json.JSONDecoder()


def _go_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def parse_payload(body: bytes, endpoint: Endpoint) -> dict[str, Any]:
    """The request's JSON object; raises :class:`BadRequest` with Ollama-like texts.

    Like Ollama: no Content-Type needed, ``null`` is an empty request, only
    the first JSON value counts (trailing bytes are ignored), and a boolean
    field of another type is a 400 whether or not the model exists.
    """
    if not body:
        raise BadRequest("missing request body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("invalid character in request body: not UTF-8") from None
    try:
        value, _ = _DECODER.raw_decode(text.lstrip(" \t\r\n"))
    except json.JSONDecodeError as exc:
        raise BadRequest(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("invalid JSON: nested too deeply") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"json: cannot unmarshal {_go_type(value)} into Go value of type api.{endpoint.struct}")
    for field in endpoint.bool_fields:
        flag = value.get(field)
        if flag is not None and not isinstance(flag, bool):
            raise BadRequest(
                f"json: cannot unmarshal {_go_type(flag)} into Go struct field {endpoint.struct}.{field} of type bool"
            )
    return value


def check_fields(payload: dict[str, Any], endpoint: Endpoint) -> None:
    """Ollama's 500s for values that fail on any node (see ``Endpoint.checked``)."""
    if "options" in endpoint.checked and isinstance(payload.get("options"), dict):
        sampling(payload["options"])
    if "format" in endpoint.checked:
        check_format(payload.get("format"))


def model_of(payload: dict[str, Any], endpoint: Endpoint) -> str:
    """The model the request names; Ollama's per-endpoint error if none or invalid."""
    for field in endpoint.model_fields:
        value = payload.get(field)
        if value is None:
            continue
        if not isinstance(value, str):
            raise BadRequest(
                f"json: cannot unmarshal {_go_type(value)} into Go struct field "
                f"{endpoint.struct}.{field} of type string"
            )
        if value:
            names.parse(value)  # BadRequest("invalid model name")
            return value
    raise RequestError(endpoint.missing_message, endpoint.missing_status)

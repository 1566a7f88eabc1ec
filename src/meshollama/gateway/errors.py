"""The one place that turns errors into HTTP answers.

Everything else in the gateway raises :mod:`meshollama.errors` exceptions
(or gets one from an upstream) and asks this module what to send. Two
envelopes exist, chosen by the route, never by the error:

* native Ollama: ``{"error": "<message>"}``;
* OpenAI (``/v1/*``): ``{"error": {"message", "type", "param": null, "code": null}}``
  with ``type`` derived from the status the way Ollama >= 0.18 does it.

An :class:`Answer` is a complete, small response (status, headers, body) as
plain data, so the same value can be sent from the raw ASGI layer or from a
Quart view, and tested without HTTP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import (
    RequestError,
    UpstreamBroken,
    UpstreamBusy,
    UpstreamError,
    UpstreamUnavailable,
)
from ..httpmsg import Headers

JSON = "application/json; charset=utf-8"
OPENAI_JSON = "application/json"
TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Answer:
    """A whole HTTP response held in memory: errors, listings, relayed error bodies."""

    status: int
    headers: Headers = ()
    body: bytes = b""

    def with_headers(self, *extra: tuple[str, str]) -> Answer:
        return Answer(self.status, self.headers + tuple(extra), self.body)


def dumps(obj: object) -> bytes:
    """Compact JSON as Ollama writes it (Go's encoding/json keeps non-ASCII as is)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def json_answer(obj: object, status: int = 200) -> Answer:
    return Answer(status, (("content-type", JSON),), dumps(obj))


def text_answer(status: int, text: str) -> Answer:
    return Answer(status, (("content-type", TEXT),), text.encode("utf-8"))


def empty_answer(status: int) -> Answer:
    """Ollama's CORS/Host rejections: a status and nothing else."""
    return Answer(status, (), b"")


NOT_FOUND_PAGE = text_answer(404, "404 page not found")


def envelope_for(path: str) -> str:
    """The error envelope a path's clients parse: Anthropic's, OpenAI's or Ollama's."""
    if path.startswith("/v1/messages"):
        return "anthropic"
    return "openai" if path.startswith("/v1/") else "ollama"


def not_found_answer(path: str) -> Answer:
    """An unknown route: Ollama's words, but as JSON in the path's envelope (Ollama
    sends plain text, which the OpenAI SDK turns into a NotFoundError with no message)."""
    return error_answer(404, "404 page not found", envelope=envelope_for(path))
METHOD_NOT_ALLOWED_PAGE = text_answer(405, "405 method not allowed")


def openai_type(status: int) -> str:
    if status == 400:
        return "invalid_request_error"
    if status == 404:
        return "not_found_error"
    return "api_error"


def openai_error_object(status: int, message: str) -> dict:
    return {"message": message, "type": openai_type(status), "param": None, "code": None}


# Anthropic's error types by status (``/v1/messages``), as Ollama's anthropic.NewError maps them.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error_object(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}


def error_answer(status: int, message: str, *, envelope: str = "ollama") -> Answer:
    """``message`` at ``status`` in the envelope the route speaks: ``ollama``,
    ``openai`` (``/v1/*``) or ``anthropic`` (``/v1/messages``)."""
    if envelope == "openai":
        body = dumps({"error": openai_error_object(status, message)})
        return Answer(status, (("content-type", OPENAI_JSON),), body)
    if envelope == "anthropic":
        return Answer(status, (("content-type", OPENAI_JSON),), dumps(anthropic_error_object(status, message)))
    return Answer(status, (("content-type", JSON),), dumps({"error": message}))


def status_of(exc: BaseException) -> int:
    """The HTTP status an exception stands for when it reaches a client."""
    if isinstance(exc, RequestError):
        return exc.status
    if isinstance(exc, UpstreamBusy):
        return 503
    if isinstance(exc, (UpstreamUnavailable, UpstreamBroken, UpstreamError)):
        return 502
    return 500


def message_of(exc: BaseException) -> str:
    if isinstance(exc, RequestError):
        return exc.message
    if isinstance(exc, UpstreamError):
        return str(exc) or type(exc).__name__
    # Unexpected exceptions are bugs: name the type, keep internals out of answers.
    return f"internal error ({type(exc).__name__})"


def answer_for(exc: BaseException, *, envelope: str = "ollama") -> Answer:
    """The answer for an exception raised before any response byte was sent."""
    answer = error_answer(status_of(exc), message_of(exc), envelope=envelope)
    retry_after = getattr(exc, "retry_after", None)
    return answer.with_headers(("retry-after", str(retry_after))) if retry_after else answer


def ndjson_error_line(message: str) -> bytes:
    """What Ollama writes when a stream fails after it started (spec §1.5)."""
    return dumps({"error": message}) + b"\n"


def sse_error_event(message: str, envelope: str = "openai") -> bytes:
    """An SSE event the client's SDK turns into an API error: OpenAI's check
    ``data.error``; Anthropic's raise on an ``error`` event."""
    if envelope == "anthropic":
        return b"event: error\ndata: " + dumps(anthropic_error_object(500, message)) + b"\n\n"
    return b"data: " + dumps({"error": openai_error_object(500, message)}) + b"\n\n"

"""HTTP messages as they travel between the gateway and an upstream.

An *upstream* is anything that can answer one Ollama-API HTTP request: this
node's own backend (Ollama, embedded llama.cpp) or a remote peer reached over a
libp2p stream. The gateway only knows this interface, so routing and retries
are tested with fakes and the transport can change without touching them.

Contract of ``Upstream.open(request)``:

* it is an async context manager yielding a :class:`ProxyResponse`;
* if the upstream cannot be reached, is overloaded, or fails before the
  response status is known, it raises :class:`~meshollama.errors.UpstreamUnavailable`
  or :class:`~meshollama.errors.UpstreamBusy` (the gateway retries elsewhere);
* once it yields, ``response.status``/``headers`` are final; iterating
  ``response.body`` yields raw body bytes as they arrive (never re-chunked
  or buffered); a failure while iterating raises
  :class:`~meshollama.errors.UpstreamBroken`;
* leaving the context early (client went away, cancellation) aborts the
  upstream work: the backend request is closed, the libp2p stream reset.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

Headers = tuple[tuple[str, str], ...]

# Hop-by-hop and transport headers that must not be copied across a proxy hop.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
        "content-encoding",
        "accept-encoding",
    }
)


def forwardable(headers: Headers) -> Headers:
    """Headers minus hop-by-hop ones, names lower-cased."""
    return tuple((k.lower(), v) for k, v in headers if k.lower() not in HOP_BY_HOP)


# Credentials a client sent to *this* gateway: another peer never needs them and
# must never see them (a key typed for one node, or a real OpenAI/Anthropic key
# an SDK sends by default). ``x-api-key``/``api-key`` are how the Anthropic and
# Azure OpenAI SDKs send theirs.
CREDENTIALS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key"})
OUR_PREFIX = "x-meshollama-"  # our own control headers: they mean something only on this hop


def peer_safe(headers: Headers) -> Headers:
    """:func:`forwardable` headers minus credentials and ``x-meshollama-*``.

    Used on both sides of a peer hop: by the client before a request leaves
    for another peer, and by the server before a peer's request reaches this
    node's backend (a peer running other code may send anything)."""
    return tuple(
        (k, v) for k, v in forwardable(headers) if k not in CREDENTIALS and not k.startswith(OUR_PREFIX)
    )


def content_length(headers: Headers) -> Headers:
    """The Content-Length header, if valid: it may travel with a body relayed
    unchanged (``forwardable`` drops it, since a re-framed body needs its own)."""
    for k, v in headers:
        if k.lower() == "content-length" and v.strip().isdigit():
            return (("content-length", v.strip()),)
    return ()


def error_text(body: bytes, limit: int = 300) -> str:
    """The message of an error body in any envelope we speak (Ollama's
    ``{"error": "..."}``, OpenAI's and Anthropic's ``{"error": {"message": ...}}``),
    or the body's start."""
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError, UnicodeDecodeError):
        err = None
    if isinstance(err, dict):
        err = err.get("message")
    text = err if isinstance(err, str) and err else body.decode("utf-8", errors="replace")
    return text[:limit]


def header(headers: Headers, name: str, default: str | None = None) -> str | None:
    """First value of header ``name`` (case-insensitive)."""
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return default


@dataclass(frozen=True)
class ProxyRequest:
    """One HTTP request to forward. ``path`` includes the query string.

    A large upload can come as ``stream`` (read once, by the upstream) instead
    of ``body``, with its declared length if the client sent one.
    """

    method: str
    path: str
    headers: Headers = ()
    body: bytes = b""
    stream: AsyncIterable[bytes] | None = field(default=None, compare=False, repr=False)
    stream_length: int | None = None


@dataclass
class ProxyResponse:
    """The head of an upstream's answer plus its body as an async byte iterator."""

    status: int
    headers: Headers
    body: AsyncIterator[bytes] = field(repr=False)

    async def read_all(self, limit: int = 64 * 1024 * 1024) -> bytes:
        """Collect the whole body (for small, non-streamed answers)."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.body:
            size += len(chunk)
            if size > limit:
                raise ValueError("upstream body over limit")
            parts.append(chunk)
        return b"".join(parts)


class Upstream(Protocol):
    """Something that answers one HTTP request: a backend or a remote peer."""

    def open(self, request: ProxyRequest) -> AbstractAsyncContextManager[ProxyResponse]: ...

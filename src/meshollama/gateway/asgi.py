"""Raw ASGI plumbing shared by the gateway's layers.

The proxied routes are served straight on ASGI, not through Quart views (see
``proxy.py`` for why); these helpers read a bounded request body, send an
:class:`~meshollama.gateway.errors.Answer`, and wrap ``send`` so a client
that went away surfaces as one exception, :class:`ClientGone`.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..errors import BodyTooLarge
from ..httpmsg import Headers
from .errors import Answer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE = re.compile(r"[\x00\r\n]")


class ClientGone(Exception):
    """The HTTP client disconnected; nothing more can be sent to it."""


def scope_headers(scope: Scope) -> Headers:
    """Request headers as (lower-case name, value) strings."""
    return tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", ()))


def scope_header(scope: Scope, name: str) -> str | None:
    raw = name.lower().encode("latin-1")
    for k, v in scope.get("headers", ()):
        if k.lower() == raw:
            return v.decode("latin-1")
    return None


def body_expected(scope: Scope) -> bool:
    """True if the request announces a body (which an early answer leaves unread)."""
    length = scope_header(scope, "content-length")
    if length is not None:
        return length.strip() != "0"
    return scope_header(scope, "transfer-encoding") is not None


def encode_headers(headers: Headers) -> list[tuple[bytes, bytes]]:
    """Headers for ``http.response.start``; drops any that HTTP/1.1 cannot carry.

    Upstream headers come from other machines: a bad one must cost that
    header, not the response (Hypercorn raises on it).
    """
    out = []
    for k, v in headers:
        if not _TOKEN.match(k) or _BAD_VALUE.search(v):
            continue
        try:
            out.append((k.lower().encode("latin-1"), v.encode("latin-1")))
        except UnicodeEncodeError:
            continue
    return out


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes.

    Content-Length is checked first so an oversized upload is refused before
    it is read; the limit is enforced again while reading (chunked bodies).
    Raises :class:`BodyTooLarge` or :class:`ClientGone`.
    """
    declared = scope_header(scope, "content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body too large (limit {limit} bytes)")
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("client disconnected while sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body too large (limit {limit} bytes)")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


class BodyStream:
    """The request body as an async iterator, read from ``receive`` as the
    upstream consumes it (nothing is held in memory). ``on_done()`` runs once
    the whole body has been read. A client that leaves mid-upload raises
    :class:`ClientGone`."""

    def __init__(self, receive: Receive, on_done: Callable[[], None]) -> None:
        self._receive = receive
        self._on_done = on_done
        self.done = False
        self.size = 0

    async def __aiter__(self):  # type: ignore[override]
        if self.done:
            return
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGone("client disconnected while sending the body")
            chunk = message.get("body", b"")
            self.size += len(chunk)
            if not message.get("more_body", False):
                self.done = True
                self._on_done()
                if chunk:
                    yield chunk
                return
            if chunk:
                yield chunk


class Responder:
    """One response on ``send``: start, body chunks, end. Tracks what went out.

    Every failure of ``send`` means the client is gone and is raised as
    :class:`ClientGone`, so callers tell a dead client from a dead upstream.
    """

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.ending = False  # the last message is on its way: a disconnect now is the normal end
        self.finished = False
        self.status = 0
        self.bytes_sent = 0
        self.declared: int | None = None  # the answer's Content-Length, when it has one
        self.tail = b""  # last bytes sent, to close a half-written line cleanly

    @property
    def delivered(self) -> bool:
        """Everything is on its way: the last message, or every declared byte handed
        to the server (a client that has them all may close before the empty last
        message). ASGI cannot prove delivery: bytes the server accepted may still
        be lost with the socket, so this errs towards a 200 only after the send."""
        return self.ending or (self.declared is not None and self.bytes_sent >= self.declared)

    async def _out(self, message: Message) -> None:
        try:
            await self._send(message)
        except Exception as exc:  # Hypercorn raises assorted errors on a closed stream
            raise ClientGone(str(exc) or type(exc).__name__) from exc

    async def start(self, status: int, headers: Headers) -> None:
        self.started = True
        self.status = status
        for name, value in headers:
            if name.lower() == "content-length" and value.strip().isdigit():
                self.declared = int(value)
        await self._out({"type": "http.response.start", "status": status, "headers": encode_headers(headers)})

    async def body(self, data: bytes) -> None:
        if not data:
            return
        self.tail = (self.tail + data)[-2:]
        await self._out({"type": "http.response.body", "body": data, "more_body": True})
        self.bytes_sent += len(data)  # after the send: a client reset while it blocks has not had them

    async def end(self, data: bytes = b"") -> None:
        self.bytes_sent += len(data)
        self.ending = True
        await self._out({"type": "http.response.body", "body": data, "more_body": False})
        self.finished = True

    async def answer(self, answer: Answer, *, close: bool = False) -> None:
        """Send ``answer`` whole. ``close``: the request body was not (fully)
        read, so the connection cannot carry another request; saying so stops
        the client from reusing a connection the server is about to close."""
        headers = answer.headers + ((("connection", "close"),) if close else ())
        await self.start(answer.status, headers)
        await self.end(answer.body)


async def send_answer(send: Send, answer: Answer, *, close: bool = False) -> None:
    """Send a whole answer; a gone client is not an error here."""
    try:
        await Responder(send).answer(answer, close=close)
    except ClientGone:
        pass

"""The gate in front of every route: CORS first, then API keys.

One ASGI middleware, so the Quart views and the raw proxied routes get the
same checks from the same code, in Ollama's order (its CORS middleware runs
before any handler).
"""

from __future__ import annotations

from ..httpmsg import Headers
from .asgi import ASGIApp, Message, Receive, Scope, Send, body_expected, scope_header, send_answer
from .auth import ApiKeys
from .cors import CorsPolicy
from .errors import empty_answer, envelope_for, error_answer


def _adding_headers(send: Send, extra: Headers) -> Send:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra]
    names = {k for k, _ in raw}

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
            message = {**message, "headers": kept + raw}
        await send(message)

    return wrapped


class Gate:
    """Refuse foreign origins (403, empty, like Ollama) and requests without our key (401)."""

    def __init__(self, app: ASGIApp, *, cors: CorsPolicy, keys: ApiKeys) -> None:
        self.app = app
        self.cors = cors
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        path = scope["path"]
        origin = scope_header(scope, "origin")
        if origin is not None and not self.cors.same_origin(origin, scope_header(scope, "host")):
            if not self.cors.allowed(origin):
                await send_answer(send, empty_answer(403), close=body_expected(scope))
                return
            if method == "OPTIONS" and scope_header(scope, "access-control-request-method"):
                headers = self.cors.preflight_headers(origin, scope_header(scope, "access-control-request-headers"))
                await send_answer(send, empty_answer(204).with_headers(*headers))
                return
            send = _adding_headers(send, self.cors.response_headers(origin))
        if self.keys and not self.keys.exempt(method, path):
            if not self.keys.check(scope_header(scope, "authorization")):
                answer = error_answer(401, "unauthorized", envelope=envelope_for(path))
                answer = answer.with_headers(("www-authenticate", "Bearer"))
                await send_answer(send, answer, close=body_expected(scope))
                return
            # The key is ours, not the upstream's: it must not travel on.
            headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() != b"authorization"]
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)

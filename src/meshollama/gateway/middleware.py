"""The gate in front of every route: CORS, Host, credentials, role; the audit log.

One ASGI middleware, so the Quart views and the raw proxied routes get the
same checks from the same code, in Ollama's order (CORS, then the Host
allow-list, before any handler), then ours: who is calling
(:mod:`.auth`) and whether their role may send this request
(:mod:`.roles`). The decisions are pure; this module only reads the scope
and sends what they say, in the path's error envelope.

Credentials stop here: ``Authorization``, ``Proxy-Authorization`` and
``Cookie`` are removed from every request, checked or not, so a key or a
token given to this gateway never reaches a peer or a backend.

Every request that needs the admin role is written to the
``meshollama.audit`` logger once its status is known, refused ones too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ..httpmsg import Headers
from .asgi import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    body_expected,
    scope_header,
    send_answer,
)
from .auth import Authenticator, Caller, Refusal, audit_message, authorize
from .cors import CorsPolicy
from .errors import empty_answer, envelope_for, error_answer
from .hosts import HostPolicy
from .metrics import GatewayMetrics
from .roles import Role, required_role

audit = logging.getLogger("meshollama.audit")
if audit.level == logging.NOTSET:
    # Security records should not vanish with --log-level warning; a logging
    # config that sets this logger's level explicitly still wins.
    audit.setLevel(logging.INFO)

CREDENTIALS = frozenset({b"authorization", b"proxy-authorization", b"cookie"})
CALLER_KEY = "meshollama.caller"  # the scope key holding the authenticated auth.Caller
HOST_REFUSED = "forbidden: this Host is not allowed (see gateway.allowed_hosts)"


def _adding_headers(send: Send, extra: Headers) -> Send:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra]
    names = {k for k, _ in raw}

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
            message = {**message, "headers": kept + raw}
        await send(message)

    return wrapped


def without_credentials(scope: Scope) -> Scope:
    headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() not in CREDENTIALS]
    return {**scope, "headers": headers}


def client_of(scope: Scope) -> str:
    client = scope.get("client")
    if not client:
        return "-"
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class Gate:
    """CORS (403, empty, like Ollama), Host (403), credential (401), role (403)."""

    def __init__(self, app: ASGIApp, *, cors: CorsPolicy, auth: Authenticator, hosts: HostPolicy,
                 metrics: GatewayMetrics | None = None, clock: Callable[[], float] = trio.current_time) -> None:
        self.app = app
        self.cors = cors
        self.auth = auth
        self.hosts = hosts
        self.metrics = metrics
        self.clock = clock

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
        if not self.hosts.allowed(scope_header(scope, "host")):
            await self._refuse(scope, send, Refusal(403, HOST_REFUSED, "host"))
            return
        authorization = scope_header(scope, "authorization")
        scope = without_credentials(scope)
        required = required_role(method, path)
        if required is None:
            await self.app(scope, receive, send)
            return
        caller = self.auth.authenticate(authorization, self.clock())
        refusal = caller if isinstance(caller, Refusal) else authorize(caller, required, method, path)
        audited = required is Role.ADMIN
        if refusal is not None:
            if audited:
                who = caller.who if isinstance(caller, Caller) else refusal.who
                audit.info(audit_message(who, client_of(scope), method, path, refusal.status))
            await self._refuse(scope, send, refusal)
            return
        assert isinstance(caller, Caller)
        scope = {**scope, CALLER_KEY: caller}  # who asked, for views such as /api/mesh/whoami
        if self.metrics is not None:
            self.metrics.requests_by_key.labels(caller.label, str(caller.role)).inc()
        if not audited:
            await self.app(scope, receive, send)
            return
        await self._audited(caller, scope, receive, send)

    async def _audited(self, caller: Caller, scope: Scope, receive: Receive, send: Send) -> None:
        written = False

        def write(status: int | None) -> None:
            nonlocal written
            if not written:
                written = True
                audit.info(audit_message(caller.who, client_of(scope), scope["method"], scope["path"], status))

        async def recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Now, not when a pull that streams for an hour ends: the record
                # should exist while the action runs.
                write(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording)
        finally:  # failed or cancelled before any answer: the action may still have begun
            write(None)

    async def _refuse(self, scope: Scope, send: Send, refusal: Refusal) -> None:
        if self.metrics is not None:
            self.metrics.refused.labels(refusal.reason).inc()
        answer = error_answer(refusal.status, refusal.message, envelope=envelope_for(scope["path"]))
        if refusal.challenge:
            answer = answer.with_headers(("www-authenticate", "Bearer"))
        await send_answer(send, answer, close=body_expected(scope))

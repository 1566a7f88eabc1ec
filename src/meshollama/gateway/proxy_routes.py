"""The ASGI app in front: the proxied endpoints go to ``proxy.Proxy``, a wrong
method on one gets a 405 with ``Allow``, everything else goes to Quart."""

from __future__ import annotations

from .asgi import ASGIApp, Receive, Scope, Send, body_expected, send_answer
from .endpoints import match
from .errors import METHOD_NOT_ALLOWED_PAGE
from .proxy import Proxy


class ProxyRoutes:
    """ASGI app serving the proxied endpoints; everything else goes to ``fallback`` (Quart)."""

    def __init__(self, proxy: Proxy, fallback: ASGIApp) -> None:
        self.proxy = proxy
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            endpoint = match(scope["path"])
            if endpoint is not None:
                if scope["method"] not in endpoint.methods:
                    allow = ", ".join(sorted(endpoint.methods))
                    answer = METHOD_NOT_ALLOWED_PAGE.with_headers(("allow", allow))
                    await send_answer(send, answer, close=body_expected(scope))
                    return
                await self.proxy.serve(endpoint, scope, receive, send)
                return
        await self.fallback(scope, receive, send)

"""Where trace context crosses a hop: the gateway's client, the mesh, the backend.

* :func:`from_scope` reads the client's context off an ASGI scope.
* :func:`with_context` gives a request the context of the span that sends
  it (the client's own ``traceparent``/``tracestate`` never travel as
  received: they are parsed, and re-formatted from the parsed value).
* :func:`send_trace_id` adds ``X-Meshollama-Trace-Id`` to the response head,
  so a user can find the trace of any answer.
* :class:`ServedBackend` is this node's backend as peers reach it through
  the stream server: each request gets a ``serve`` span (the inbound mesh
  request, a child of the calling gateway's ``peer stream`` span) and a
  ``backend`` span under it, whose context goes to Ollama in its
  ``traceparent``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import trio

from ..httpmsg import ProxyRequest, ProxyResponse, Upstream
from .context import SpanContext, extract, inject, without
from .spans import CLIENT, SERVER, AnySpan, Tracer

TRACE_ID_HEADER = "x-meshollama-trace-id"
_TRACE_ID_RAW = TRACE_ID_HEADER.encode()
_NAMES = (b"traceparent", b"tracestate")


def from_scope(scope: MutableMapping[str, Any]) -> SpanContext | None:
    """The client's trace context (None: none, or not valid)."""
    found = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", ()) if k.lower() in _NAMES]
    return extract(found) if found else None


def with_context(request: ProxyRequest, ctx: SpanContext | None) -> ProxyRequest:
    """``request`` carrying ``ctx`` (and no other trace context) to the next hop."""
    if ctx is None:
        return request
    return dataclasses.replace(request, headers=without(request.headers) + inject(ctx))


Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def send_trace_id(send: Send, ctx: SpanContext | None) -> Send:
    """``send`` adding ``X-Meshollama-Trace-Id`` to the response head (unchanged without a trace)."""
    if ctx is None:
        return send
    value = ctx.trace_id.encode()

    async def traced(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (_TRACE_ID_RAW, value)]}
        await send(message)

    return traced


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _only_cancelled(exc: BaseException) -> bool:
    """``exc`` is a cancellation, or a group of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


@contextmanager
def ending(span: AnySpan) -> Iterator[AnySpan]:
    """End ``span`` on leaving; an exception marks it failed, a cancellation only
    sets ``meshollama.cancelled`` (status unset: being cancelled is not an error)."""
    try:
        yield span
    except BaseException as exc:
        if _only_cancelled(exc):
            span.set("meshollama.cancelled", True)
        else:
            span.end(describe(exc))
        raise
    finally:
        span.end()


def end_request(span: AnySpan, status: int, *, model: str, peer: str, error: str) -> None:
    """End a ``gateway`` span with what the request came to (5xx: failed)."""
    if span.recording:
        span.set("http.response.status_code", status)
        span.set("meshollama.model", model or None)
        span.set("meshollama.peer", peer or None)
        span.end((error or f"HTTP {status}") if status >= 500 else None)


class ServedBackend:
    """An :class:`~meshollama.httpmsg.Upstream` around this node's backend, for
    requests peers send: ``serve`` and ``backend`` spans, and the trace
    context passed on to the backend (unchanged when tracing is off)."""

    def __init__(self, backend: Upstream, tracer: Tracer) -> None:
        self.backend = backend
        self.tracer = tracer
        self.kind = str(getattr(backend, "kind", "") or "")

    @asynccontextmanager
    async def open(self, request: ProxyRequest) -> AsyncIterator[ProxyResponse]:
        parent = extract(request.headers)
        if not self.tracer.enabled:
            if parent is None:  # nothing valid to pass on; nothing invalid may pass
                request = dataclasses.replace(request, headers=without(request.headers))
            async with self.backend.open(with_context(request, parent)) as resp:
                yield resp
            return
        path = request.path.split("?", 1)[0]
        serve = self.tracer.start("serve", parent, SERVER, {"http.request.method": request.method, "url.path": path})
        call = serve.child("backend", CLIENT, {"meshollama.backend": self.kind, "url.path": path})
        error: str | None = None
        cancelled = False
        body: _Watched | None = None
        try:
            async with self.backend.open(with_context(request, call.context)) as resp:
                for span in (serve, call):
                    span.set("http.response.status_code", resp.status)
                if resp.status >= 500:
                    error = f"answered {resp.status}"
                body = _Watched(resp.body, call)
                yield ProxyResponse(resp.status, resp.headers, body)
        except BaseException as exc:
            if _only_cancelled(exc):  # not an error, as in ending(): the caller went away or we shut down
                cancelled = True
            else:
                error = describe(exc)
            raise
        finally:
            if body is not None:
                call.set("meshollama.response_bytes", body.size)
            for span in (call, serve):
                if cancelled:
                    span.set("meshollama.cancelled", True)
                span.end(error)  # a 5xx answer before the cancellation still counts


class _Watched:
    """A response body that notes its first byte and its size on ``span``."""

    def __init__(self, body: AsyncIterator[bytes], span: AnySpan) -> None:
        self._body = body
        self._span = span
        self.size = 0

    def __aiter__(self) -> _Watched:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._body.__anext__()
        if chunk:
            if not self.size:
                self._span.event("first byte")
            self.size += len(chunk)
        return chunk

    async def aclose(self) -> None:
        aclose = getattr(self._body, "aclose", None)
        if aclose is not None:
            await aclose()

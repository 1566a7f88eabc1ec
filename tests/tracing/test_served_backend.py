"""The serving node's side: what reaches the backend from a peer's request, and its spans."""

from __future__ import annotations

import trio

from meshollama.httpmsg import ProxyRequest, header
from meshollama.tracing import InMemoryExporter, ServedBackend, Tracer, parse_traceparent

from tests.gateway.fakes import FakeUpstream, Script

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
VALID = f"00-{TRACE}-00f067aa0ba902b7-01"


async def ask(served: ServedBackend, *headers: tuple[str, str]) -> bytes:
    async with served.open(ProxyRequest("POST", "/api/chat?x=1", headers, b"{}")) as resp:
        return b"".join([chunk async for chunk in resp.body])


async def test_off_passes_a_valid_context_and_drops_anything_else():
    backend = FakeUpstream("b")
    served = ServedBackend(backend, Tracer())
    await ask(served, ("traceparent", VALID), ("tracestate", "a=1"), ("x-other", "kept"))
    await ask(served, ("traceparent", VALID + "\x00"), ("tracestate", "a=1"))
    await ask(served, ("traceparent", VALID), ("traceparent", VALID))
    first, second, third = (r.headers for r in backend.requests)
    assert header(first, "traceparent") == VALID and header(first, "tracestate") == "a=1"
    assert header(first, "x-other") == "kept"
    assert header(second, "traceparent") is None and header(second, "tracestate") is None
    assert header(third, "traceparent") is None


async def test_on_serve_and_backend_spans():
    backend = FakeUpstream("b", Script(body=[b'{"a":1}\n', b'{"done":true}\n']))
    mem = InMemoryExporter()
    served = ServedBackend(backend, Tracer(mem))
    with trio.fail_after(5):
        body = await ask(served, ("traceparent", VALID))
    assert body == b'{"a":1}\n{"done":true}\n'
    call, serve = mem.spans
    assert (serve.name, serve.kind, call.name, call.kind) == ("serve", 2, "backend", 3)
    assert serve.parent_id == "00f067aa0ba902b7" and call.parent_id == serve.context.span_id
    assert serve.attributes["url.path"] == "/api/chat" and call.attributes["meshollama.response_bytes"] == len(body)
    sent = parse_traceparent(header(backend.requests[0].headers, "traceparent"))
    assert (sent.trace_id, sent.span_id) == (TRACE, call.context.span_id)


async def test_a_backend_failure_marks_both_spans():
    backend = FakeUpstream("b", Script(fail=RuntimeError("down")))
    mem = InMemoryExporter()
    served = ServedBackend(backend, Tracer(mem))
    try:
        await ask(served)
    except RuntimeError:
        pass
    assert [(s.name, s.status, s.message) for s in mem.spans] == [
        ("backend", 2, "RuntimeError: down"), ("serve", 2, "RuntimeError: down")]
    assert mem.spans[1].parent_id == ""  # no caller context: a new trace

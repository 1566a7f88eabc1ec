"""Spans on one node: a real gateway (Hypercorn) over scripted upstreams."""

from __future__ import annotations

import json

import httpx
import trio

from meshollama.httpmsg import header
from meshollama.tracing import InMemoryExporter, Tracer, parse_traceparent

from tests.gateway.fakes import FakeMesh, FakeUpstream, Script, model, ollama_like, running_gateway

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CLIENT = f"00-{TRACE}-{CLIENT_SPAN}-01"
BODY = json.dumps({"model": "llama3", "prompt": "hi"}).encode()


def two_peers() -> tuple[FakeMesh, FakeUpstream, FakeUpstream]:
    mesh = FakeMesh()
    busy = mesh.add("pa", [model("llama3:latest")], FakeUpstream("pa", Script(status=503, body=[b'{"error":"x"}'])))
    ok = mesh.add("pb", [model("llama3:latest")], FakeUpstream("pb", ollama_like))
    return mesh, busy, ok


async def test_span_tree_of_a_retried_request():
    mesh, busy, ok = two_peers()
    mem = InMemoryExporter()
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            gw.proxy.tracer = Tracer(mem)
            r = await client.post("/api/generate", content=BODY,
                                  headers={"traceparent": CLIENT, "tracestate": "vendor=abc"})
            await mem.wait_for(lambda: mem.named("gateway"))
    assert r.status_code == 200 and r.headers["x-meshollama-peer"] == "pb"
    assert r.headers["x-meshollama-trace-id"] == TRACE
    (gateway,) = mem.named("gateway")
    (route,) = mem.named("route")
    tries = mem.named("peer stream")
    assert {s.context.trace_id for s in mem.spans} == {TRACE}
    assert gateway.parent_id == CLIENT_SPAN and gateway.kind == 2
    assert gateway.attributes["http.response.status_code"] == 200
    assert gateway.attributes["meshollama.model"] == "llama3:latest" and gateway.attributes["meshollama.peer"] == "pb"
    assert gateway.attributes["meshollama.endpoint"] == "/api/generate"
    assert route.parent_id == gateway.context.span_id and route.attributes["meshollama.model"] == "llama3:latest"
    events = {name: attrs for _, name, attrs in route.events}
    assert events["order"]["tries"] == ["pa", "pb"]
    assert events["attempt failed"]["peer"] == "pa" and events["attempt failed"]["kind"] == "http_503"
    assert [s.attributes["meshollama.peer"] for s in tries] == ["pa", "pb"]
    assert all(s.parent_id == route.context.span_id and s.kind == 3 for s in tries)
    assert tries[0].status == 2 and tries[0].attributes["meshollama.outcome"] == "http_503"
    assert tries[1].status == 0 and tries[1].attributes["meshollama.outcome"] == "ok"
    assert any(name == "first byte" for _, name, _ in tries[1].events)
    # Each upstream saw the context of its own try, and the client's tracestate.
    for upstream, span in ((busy, tries[0]), (ok, tries[1])):
        sent = upstream.requests[0].headers
        assert [k for k, _ in sent].count("traceparent") == 1
        assert parse_traceparent(header(sent, "traceparent")).span_id == span.context.span_id
        assert header(sent, "tracestate") == "vendor=abc"


async def test_invalid_or_absent_traceparent_starts_a_new_trace():
    mesh, _, ok = two_peers()
    mem = InMemoryExporter()
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            gw.proxy.tracer = Tracer(mem)
            bad = await client.post("/api/generate", content=BODY,
                                    headers={"traceparent": CLIENT.upper(), "tracestate": "a=1"})
            none = await client.post("/api/generate", content=BODY)
            await mem.wait_for(lambda: len(mem.named("gateway")) == 2)
    assert bad.status_code == none.status_code == 200
    roots = mem.named("gateway")
    assert all(s.parent_id == "" for s in roots)
    assert {bad.headers["x-meshollama-trace-id"], none.headers["x-meshollama-trace-id"]} == \
        {s.context.trace_id for s in roots}
    assert TRACE not in {s.context.trace_id for s in roots}
    for request in ok.requests:  # the invalid header, and its tracestate, went nowhere
        assert header(request.headers, "tracestate") is None
        assert parse_traceparent(header(request.headers, "traceparent")).trace_id != TRACE


async def test_errors_are_spans_too():
    mesh = FakeMesh()
    mem = InMemoryExporter()
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            gw.proxy.tracer = Tracer(mem)
            r = await client.post("/api/generate", content=BODY, headers={"traceparent": CLIENT})
            await mem.wait_for(lambda: mem.named("gateway"))
    assert r.status_code == 404 and r.headers["x-meshollama-trace-id"] == TRACE
    (gateway,) = mem.named("gateway")
    (route,) = mem.named("route")
    assert gateway.attributes["http.response.status_code"] == 404 and gateway.status == 0  # a 4xx is the client's
    assert route.status == 2 and "ModelNotFound" in route.message


async def test_local_management_request_is_one_try_under_the_gateway_span():
    mesh = FakeMesh()
    backend = FakeUpstream("self", ollama_like)
    mem = InMemoryExporter()
    with trio.fail_after(10):
        async with running_gateway(mesh, backend) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            gw.proxy.tracer = Tracer(mem)
            r = await client.post("/api/copy", json={"source": "a", "destination": "b"})
            await mem.wait_for(lambda: mem.named("gateway"))
    assert r.status_code == 200
    (gateway,) = mem.named("gateway")
    (attempt,) = mem.named("peer stream")
    assert not mem.named("route")
    assert attempt.parent_id == gateway.context.span_id and attempt.attributes["meshollama.local"] is True
    assert parse_traceparent(header(backend.requests[0].headers, "traceparent")).span_id == attempt.context.span_id


async def test_tracing_off_passes_a_valid_traceparent_through_and_nothing_else():
    mesh, _, ok = two_peers()
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            assert not gw.proxy.tracer.enabled  # the default: no endpoint configured
            valid = await client.post("/api/generate", content=BODY,
                                      headers={"traceparent": CLIENT, "tracestate": "a=1"})
            bad = await client.post("/api/generate", content=BODY, headers={"traceparent": f"{CLIENT}\tjunk"})
            none = await client.post("/api/generate", content=BODY)
    assert valid.headers["x-meshollama-trace-id"] == TRACE
    assert "x-meshollama-trace-id" not in bad.headers and "x-meshollama-trace-id" not in none.headers
    first, second, third = ok.requests[-3:]
    assert header(first.headers, "traceparent") == CLIENT and header(first.headers, "tracestate") == "a=1"
    assert header(second.headers, "traceparent") is None and header(third.headers, "traceparent") is None

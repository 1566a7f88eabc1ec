"""The tracer, sampling, the OTLP JSON encoding and the exporter's queue (no network)."""

from __future__ import annotations

import itertools
import json
import random

import httpx
import trio

from meshollama.tracing import (
    CLIENT,
    SERVER,
    InMemoryExporter,
    OtlpExporter,
    SpanContext,
    Tracer,
    encode,
    with_context,
)
from meshollama.httpmsg import ProxyRequest

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = SpanContext(TRACE, "00f067aa0ba902b7", 1, "k=v")


def tracer(ratio: float = 1.0, exporter=None) -> tuple[Tracer, InMemoryExporter]:
    exporter = exporter or InMemoryExporter()
    ticks = itertools.count(1_700_000_000_000_000_000, 1000)
    return Tracer(exporter, sample_ratio=ratio, clock=lambda: next(ticks), rng=random.Random(7)), exporter


def test_off_tracer_passes_the_callers_context_on_unchanged():
    off = Tracer()
    span = off.start("gateway", PARENT, SERVER)
    assert not span.recording and span.context is PARENT
    assert span.child("route").child("peer stream").context is PARENT
    assert off.start("gateway", None).context is None  # no trace is started when off
    request = ProxyRequest("POST", "/api/chat", (("traceparent", "junk"), ("x", "1")))
    assert with_context(request, None) is request


def test_a_tree_of_spans_under_the_callers_context():
    t, mem = tracer()
    root = t.start("gateway", PARENT, SERVER, {"url.path": "/api/chat"})
    child = root.child("peer stream", CLIENT)
    child.set("meshollama.peer", "B")
    child.event("first byte", size=3)
    child.end()
    root.end("HTTP 502")
    root.end()  # a second end changes nothing
    assert [s.name for s in mem.spans] == ["peer stream", "gateway"]
    assert root.context.trace_id == child.context.trace_id == TRACE
    assert root.parent_id == PARENT.span_id and child.parent_id == root.context.span_id
    assert root.context.state == "k=v"  # vendors' state travels with the trace
    assert root.status == 2 and root.message == "HTTP 502"
    assert child.status == 0 and child.events[0][1:] == ("first byte", {"size": 3})
    assert child.start_ns < child.end_ns <= root.end_ns


def test_new_trace_when_the_caller_sent_none():
    t, mem = tracer()
    span = t.start("gateway", None, SERVER)
    assert span.parent_id == "" and len(span.context.trace_id) == 32 and span.context.sampled


def test_sampling_is_parent_based():
    t, mem = tracer(ratio=0.0)  # new traces are never sampled...
    unsampled = t.start("gateway", None, SERVER)
    assert not unsampled.recording and not unsampled.context.sampled
    assert unsampled.context.span_id  # ...but still propagated, with the flag clear
    kid = unsampled.child("route")
    assert kid.context.trace_id == unsampled.context.trace_id and not kid.context.sampled
    assert t.start("gateway", PARENT).recording  # a sampled caller wins
    t1, _ = tracer(ratio=1.0)
    assert not t1.start("gateway", SpanContext(TRACE, "00f067aa0ba902b7", 0)).recording  # and an unsampled one
    kid.end()
    unsampled.end()
    assert mem.spans == []


def test_ratio_sampling_is_about_right_and_by_trace_id():
    t, _ = tracer(ratio=0.25)
    sampled = sum(t.start("x", None).recording for _ in range(4000))
    assert 800 < sampled < 1200
    low = SpanContext("0" * 31 + "1", "1" * 16, 0)
    assert int(low.trace_id[16:], 16) < t._bound  # the decision is the trace id's, same on every node


def test_otlp_json_shape():
    t, mem = tracer()
    root = t.start("gateway", PARENT, SERVER, {"s": "x", "b": True, "i": 3, "f": 0.5, "l": ["a", "b"]})
    root.event("queued", seconds=0.25)
    root.end("boom")
    doc = json.loads(json.dumps(encode(mem.spans, {"service.name": "meshollama"})))
    resource = doc["resourceSpans"][0]
    assert resource["resource"]["attributes"] == [{"key": "service.name", "value": {"stringValue": "meshollama"}}]
    span = resource["scopeSpans"][0]["spans"][0]
    assert resource["scopeSpans"][0]["scope"]["name"] == "meshollama"
    assert span["traceId"] == TRACE and span["parentSpanId"] == PARENT.span_id and len(span["spanId"]) == 16
    assert span["kind"] == 2 and span["traceState"] == "k=v"
    assert int(span["startTimeUnixNano"]) <= int(span["endTimeUnixNano"])
    assert isinstance(span["startTimeUnixNano"], str)
    values = {a["key"]: a["value"] for a in span["attributes"]}
    assert values == {"s": {"stringValue": "x"}, "b": {"boolValue": True}, "i": {"intValue": "3"},
                      "f": {"doubleValue": 0.5},
                      "l": {"arrayValue": {"values": [{"stringValue": "a"}, {"stringValue": "b"}]}}}
    assert span["events"][0]["name"] == "queued" and span["status"] == {"code": 2, "message": "boom"}


def test_a_full_queue_drops_and_counts_never_blocks():
    counted = []
    exporter = OtlpExporter("http://collector.invalid", resource={}, queue_size=3,
                            on_count=lambda outcome, n: counted.append((outcome, n)))
    t, _ = tracer(exporter=exporter)
    for _ in range(5):
        t.start("x", None).end()
    assert len(exporter._queue) == 3
    assert exporter.counts["dropped"] == 2 and counted == [("dropped", 1), ("dropped", 1)]


async def test_export_batches_and_flushes_on_cancel():
    posted: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/traces" and request.headers["content-type"] == "application/json"
        assert request.headers["authorization"] == "Bearer k"
        posted.append(json.loads(request.content))
        return httpx.Response(200, json={})

    exporter = OtlpExporter("http://collector:4318/", resource={"service.name": "m"}, batch_size=2, interval=60,
                            headers=[("authorization", "Bearer k")], transport=httpx.MockTransport(handler))
    t, _ = tracer(exporter=exporter)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.serve)
            for _ in range(2):
                t.start("x", None).end()  # a full batch goes at once, not after the 60 s interval
            while not posted:
                await trio.sleep(0.01)
            t.start("last", None).end()
            nursery.cancel_scope.cancel()  # shutdown: what is left is flushed
    names = [s["name"] for doc in posted for s in doc["resourceSpans"][0]["scopeSpans"][0]["spans"]]
    assert names == ["x", "x", "last"] and exporter.counts == {"exported": 3, "dropped": 0, "failed": 0}


async def test_a_failing_collector_costs_only_the_spans():
    exporter = OtlpExporter("http://collector:4318", resource={}, interval=0.01,
                            transport=httpx.MockTransport(lambda r: httpx.Response(503)))
    t, _ = tracer(exporter=exporter)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.serve)
            t.start("x", None).end()
            while not exporter.counts["failed"]:
                await trio.sleep(0.01)
            await exporter.close()
    assert exporter.counts["failed"] == 1

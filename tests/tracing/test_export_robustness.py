"""The exporter survives anything one batch can throw, shuts down in time, and ids are unpredictable."""

from __future__ import annotations

import logging
import random
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from meshollama.httpmsg import ProxyRequest
from meshollama.tracing import (
    InMemoryExporter,
    OtlpExporter,
    ServedBackend,
    Tracer,
    ending,
)
from meshollama.tracing.otlp import shown_url, traces_url
from meshollama.tracing.wiring import tracer_from_config


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={})


async def wait_until(predicate) -> None:
    while not predicate():
        await trio.sleep(0.01)


async def test_a_header_httpx_cannot_encode_fails_the_batch_not_the_exporter(caplog):
    exporter = OtlpExporter("http://c:4318", resource={}, interval=0.01, headers=[("x-team", "caf\u00e9")],
                            transport=httpx.MockTransport(ok))
    t = Tracer(exporter)
    with trio.fail_after(5), caplog.at_level(logging.WARNING, "meshollama.tracing"):
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.serve)
            for n in (1, 2, 3):
                t.start("x", None).end()
                await wait_until(lambda n=n: exporter.counts["failed"] == n)
            assert exporter._running  # still serving
            await exporter.close()
    assert exporter.counts == {"exported": 0, "dropped": 0, "failed": 3}
    failures = [r for r in caplog.records if "cannot export" in r.getMessage()]
    assert len(failures) == 1 and "UnicodeEncodeError" in failures[0].getMessage()  # once, not per batch


async def test_any_error_in_one_batch_is_counted_and_the_next_batch_goes():
    calls = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise RuntimeError("a bug somewhere below")
        return httpx.Response(200, json={})

    exporter = OtlpExporter("http://c:4318", resource={}, interval=0.01, transport=httpx.MockTransport(flaky))
    t = Tracer(exporter)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.serve)
            t.start("x", None).end()
            await wait_until(lambda: exporter.counts["failed"] == 1)
            t.start("y", None).end()
            await wait_until(lambda: exporter.counts["exported"] == 1)
            nursery.cancel_scope.cancel()
    assert exporter.counts == {"exported": 1, "dropped": 0, "failed": 1}


async def test_close_cuts_off_a_hanging_post_and_counts_what_was_not_sent(autojump_clock):
    posts = 0

    async def hang(request: httpx.Request) -> httpx.Response:
        nonlocal posts
        posts += 1
        await trio.sleep_forever()
        raise AssertionError

    exporter = OtlpExporter("http://c:4318", resource={}, batch_size=2, interval=1.0, timeout=10.0,
                            flush_timeout=3.0, transport=httpx.MockTransport(hang))
    t = Tracer(exporter)
    with trio.fail_after(30):  # the mock transport has no timeout: a serve left running would hang the test
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.serve)
            for _ in range(2):
                t.start("x", None).end()  # a full batch: its POST starts and hangs
            await wait_until(lambda: posts == 1)
            t.start("queued", None).end()
            start = trio.current_time()
            await exporter.close()
            took = trio.current_time() - start
            assert not exporter._running  # close() returned because serve ended, not on its own timeout
    assert took <= 3.0 + 1e-6  # the flush's bound, not the 10 s POST timeout on top
    assert posts == 2  # the cut-off batch was tried again in the flush
    assert exporter.counts == {"exported": 0, "dropped": 0, "failed": 3}  # none lost uncounted
    assert not exporter._queue and not exporter._sending


async def test_a_cancelled_exporter_flushes_the_cut_off_batch(autojump_clock):
    answered = trio.Event()
    bodies = []

    async def slow_then_ok(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        if len(bodies) == 1:
            answered.set()
            await trio.sleep_forever()
        return httpx.Response(200, json={})

    exporter = OtlpExporter("http://c:4318", resource={}, batch_size=1, interval=1.0,
                            transport=httpx.MockTransport(slow_then_ok))
    t = Tracer(exporter)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.serve)
            t.start("x", None).end()
            await answered.wait()
            nursery.cancel_scope.cancel()  # the app's nursery going away
    assert len(bodies) == 2 and bodies[0] == bodies[1]
    assert exporter.counts == {"exported": 1, "dropped": 0, "failed": 0}


def test_traces_url_keeps_the_path_before_any_query():
    assert traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert traces_url("http://c:4318/otel/") == "http://c:4318/otel/v1/traces"
    assert traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"
    assert traces_url("http://c:4318/otel?tenant=a") == "http://c:4318/otel/v1/traces?tenant=a"


def test_credentials_in_an_endpoint_never_reach_the_log(caplog):
    assert shown_url("http://alice:hunter2@c:4318/v1/traces") == "http://***@c:4318/v1/traces"
    assert shown_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"

    class Section:
        otlp_endpoint = "http://alice:hunter2@c:4318"
        service_name = "m"
        sample_ratio = 1.0
        headers = ("authorization=Bearer sk-SECRET",)

    with caplog.at_level(logging.INFO, "meshollama.tracing"):
        tracer = tracer_from_config(Section(), "peer", registry=None)
    assert tracer.enabled and caplog.records
    assert all("hunter2" not in r.getMessage() and "sk-SECRET" not in r.getMessage() for r in caplog.records)


def test_ids_come_from_the_os_csprng_unless_a_test_seeds_them():
    tracer = Tracer(InMemoryExporter())
    assert isinstance(tracer._rng, random.SystemRandom)
    ids = {tracer.start("x", None).context.trace_id for _ in range(200)}
    assert len(ids) == 200
    seeded = [Tracer(InMemoryExporter(), rng=random.Random(3)).start("x", None).context.trace_id for _ in range(2)]
    assert seeded[0] == seeded[1]


async def test_cancellation_is_not_a_span_error_in_ending_and_in_served_backend():
    mem = InMemoryExporter()
    tracer = Tracer(mem)
    with trio.move_on_after(0.01):
        with ending(tracer.start("route", None)):
            await trio.sleep_forever()
    (route,) = mem.spans
    assert route.status == 0 and route.attributes["meshollama.cancelled"] is True

    class Hanging:
        kind = "ollama"

        @asynccontextmanager
        async def open(self, request):
            await trio.sleep_forever()
            yield  # pragma: no cover

    mem.spans.clear()
    served = ServedBackend(Hanging(), tracer)
    with trio.move_on_after(0.01):
        async with served.open(ProxyRequest("POST", "/api/chat", (), b"{}")):
            pass  # pragma: no cover
    assert [(s.name, s.status, s.message) for s in mem.spans] == [("backend", 0, ""), ("serve", 0, "")]
    assert all(s.attributes["meshollama.cancelled"] is True for s in mem.spans)


def test_an_error_is_still_an_error_in_ending():
    mem = InMemoryExporter()
    with pytest.raises(RuntimeError), ending(Tracer(mem).start("route", None)):
        raise RuntimeError("down")
    assert mem.spans[0].status == 2 and "meshollama.cancelled" not in mem.spans[0].attributes

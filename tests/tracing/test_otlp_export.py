"""The exporter's life with the gateway app: started when it serves, flushed when it stops."""

from __future__ import annotations

import dataclasses
import json
from functools import partial

import httpx
import trio
from prometheus_client import CollectorRegistry

from meshollama.config import Config, TracingConfig
from meshollama.gateway import create_app, serve_gateway

from tests.gateway.fakes import FakeMesh, model, make_config

from .otlp_receiver import serve_receiver


async def test_spans_are_flushed_when_the_gateway_stops():
    registry = CollectorRegistry()
    with trio.fail_after(20):
        async with trio.open_nursery() as outer:
            receiver = await outer.start(serve_receiver)
            mesh = FakeMesh()
            mesh.add("pb", [model("llama3:latest")])
            config: Config = dataclasses.replace(make_config(), tracing=TracingConfig(
                otlp_endpoint=receiver.url + "/", service_name="gw", headers=("authorization=Bearer t",)))
            app = create_app(config, mesh, None, registry)
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(partial(serve_gateway, app, "127.0.0.1:0", grace_period=1.0))
                async with httpx.AsyncClient(base_url=f"http://{bound}") as client:
                    r = await client.post("/api/generate", content=json.dumps({"model": "llama3", "prompt": "x"}))
                assert r.status_code == 200
                trace_id = r.headers["x-meshollama-trace-id"]
                nursery.cancel_scope.cancel()  # well before the export interval: only the flush can send them
            await receiver.wait_for(lambda: any(s["name"] == "gateway" for _, s in receiver.spans()))
            outer.cancel_scope.cancel()
    assert receiver.problems == []
    spans = receiver.spans()
    assert {s["name"] for _, s in spans} == {"gateway", "route", "peer stream"}
    assert {s["traceId"] for _, s in spans} == {trace_id}
    resource = spans[0][0]
    assert resource["service.name"] == "gw" and resource["service.instance.id"] == "peer-self"
    assert registry.get_sample_value("meshollama_tracing_spans_total", {"outcome": "exported"}) == 3

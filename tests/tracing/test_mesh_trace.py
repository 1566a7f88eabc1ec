"""THE tracing test: one request through a real 2-node mesh, spans exported to a real OTLP receiver.

Two in-process :class:`~meshollama.node.Node` s on loopback (real libp2p,
real Hypercorn), each with its own stand-in Ollama; node A's gateway routes
a request for a model only B holds over a libp2p stream. Both nodes export
to one OTLP/HTTP receiver (``otlp_receiver``), which checks every export's
JSON shape. The spans of the request, on A and on B, must make one tree
under the client's trace, and B's Ollama must have been handed a
``traceparent`` naming B's ``backend`` span.
"""

from __future__ import annotations

import json
from functools import partial

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry

from meshollama.config import load_config
from meshollama.node import Node
from meshollama.tracing import parse_traceparent

from tests.fakes.fake_ollama import serve_fake

from .otlp_receiver import serve_receiver

pytestmark = pytest.mark.slow

TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


def node_config(tmp_path, name: str, ollama_url: str, otlp: str, bootstrap: tuple[str, ...] = ()):
    (tmp_path / name).mkdir()
    return load_config(env={}, overrides={
        "node.data_dir": str(tmp_path / name), "p2p.listen": ["/ip4/127.0.0.1/tcp/0"], "p2p.mdns": False,
        "p2p.heartbeat_interval": 0.2, "p2p.bootstrap": list(bootstrap), "gateway.listen": "127.0.0.1:0",
        "backend.kind": "ollama", "ollama.url": ollama_url, "ollama.refresh_interval": 0.2,
        "tracing.otlp_endpoint": otlp, "tracing.service_name": f"mesh-{name}",
    })


async def test_one_trace_across_two_nodes(tmp_path):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            receiver = await nursery.start(serve_receiver)
            fake_a = await nursery.start(partial(serve_fake, ["alpha:latest"], name="A", token_delay=0.0))
            fake_b = await nursery.start(partial(serve_fake, ["beta:latest"], name="B", token_delay=0.0))
            a = Node(node_config(tmp_path, "a", fake_a.url, receiver.url), registry=CollectorRegistry())
            info_a = await nursery.start(a.serve)
            b = Node(node_config(tmp_path, "b", fake_b.url, receiver.url, (info_a.p2p_addrs[0],)),
                     registry=CollectorRegistry())
            info_b = await nursery.start(b.serve)
            async with httpx.AsyncClient(base_url=info_a.api_url, timeout=10) as client:
                while "beta:latest" not in {m["name"] for m in (await client.get("/api/tags")).json()["models"]}:
                    await trio.sleep(0.1)
                r = await client.post("/api/chat", json={
                    "model": "beta", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
                    headers={"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01", "tracestate": "acme=1"})
            assert r.status_code == 200, r.text
            assert r.headers["x-meshollama-peer"] == info_b.peer_id
            assert r.headers["x-meshollama-trace-id"] == TRACE
            assert json.loads(r.text.splitlines()[-1])["done"] is True

            names = {"gateway", "route", "peer stream", "serve", "backend"}
            await receiver.wait_for(lambda: names <= {s["name"] for _, s in receiver.spans()
                                                       if s["traceId"] == TRACE})
            nursery.cancel_scope.cancel()

    assert receiver.problems == []
    spans = {s["name"]: (resource, s) for resource, s in receiver.spans() if s["traceId"] == TRACE}
    assert set(spans) == names  # one of each: the first try answered
    on = {name: resource["service.instance.id"] for name, (resource, _) in spans.items()}
    assert on == {"gateway": info_a.peer_id, "route": info_a.peer_id, "peer stream": info_a.peer_id,
                  "serve": info_b.peer_id, "backend": info_b.peer_id}
    assert spans["gateway"][0]["service.name"] == "mesh-a" and spans["serve"][0]["service.name"] == "mesh-b"
    span = {name: s for name, (_, s) in spans.items()}
    # The tree, across the hop: client > gateway > route > peer stream =mesh=> serve > backend.
    assert span["gateway"]["parentSpanId"] == CLIENT_SPAN
    assert span["route"]["parentSpanId"] == span["gateway"]["spanId"]
    assert span["peer stream"]["parentSpanId"] == span["route"]["spanId"]
    assert span["serve"]["parentSpanId"] == span["peer stream"]["spanId"]
    assert span["backend"]["parentSpanId"] == span["serve"]["spanId"]
    assert [span[n]["kind"] for n in ("gateway", "route", "peer stream", "serve", "backend")] == [2, 1, 3, 2, 3]
    assert all(s.get("traceState") == "acme=1" for s in span.values())
    attrs = {name: {a["key"]: a["value"] for a in s["attributes"]} for name, s in span.items()}
    assert attrs["gateway"]["http.response.status_code"] == {"intValue": "200"}
    assert attrs["peer stream"]["meshollama.peer"] == {"stringValue": info_b.peer_id}
    assert attrs["backend"]["meshollama.backend"] == {"stringValue": "ollama"}
    # B's Ollama got the trace, with B's backend span as the parent; A's Ollama got nothing.
    chats = [q for q in fake_b.requests if q.path == "/api/chat"]
    assert len(chats) == 1
    sent = parse_traceparent(chats[0].header("traceparent"))
    assert (sent.trace_id, sent.span_id) == (TRACE, span["backend"]["spanId"])
    assert chats[0].header("tracestate") == "acme=1"
    assert not [q for q in fake_a.requests if q.path == "/api/chat"]

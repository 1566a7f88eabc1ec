"""Three ``meshollama start`` processes, each with its own stand-in Ollama; the real
``ollama``, ``openai`` and ``httpx`` clients talk only to node A."""

from __future__ import annotations

import collections
import json
import re
import signal
from contextlib import asynccontextmanager
from functools import partial

import httpx
import pytest
import trio

from tests.fakes.fake_ollama import INFERENCE_PATHS, serve_fake

from .cluster import cluster

pytestmark = pytest.mark.slow

PEER = "x-meshollama-peer"


@asynccontextmanager
async def three_nodes(tmp_path, **fake_kw):
    async with trio.open_nursery() as fn, cluster(tmp_path) as c:
        fa = await fn.start(partial(serve_fake, ["alpha:latest"], name="A", **fake_kw))
        fb = await fn.start(partial(serve_fake, ["shared:latest", "beta:latest"], name="B", **fake_kw))
        fc = await fn.start(partial(serve_fake, ["shared:latest", "gamma:latest", "nomic-embed-text:latest"],
                                    name="C", **fake_kw))
        a = await c.start("a", "--backend", "ollama", "--ollama-url", fa.url)
        b = await c.start("b", "--backend", "ollama", "--ollama-url", fb.url, bootstrap=a)
        cc = await c.start("c", "--backend", "ollama", "--ollama-url", fc.url, bootstrap=a)
        want = {"alpha:latest", "beta:latest", "gamma:latest", "shared:latest", "nomic-embed-text:latest"}

        async def ready():
            r = await c.client.get(a.api + "/api/tags")
            names = {m["name"] for m in r.json()["models"]}
            view = await c.view(a)
            shared = [p for p in view.values() if any(m["name"] == "shared:latest" for m in p["models"])]
            return want <= names and len(shared) == 2

        with trio.fail_after(20):
            await c.wait_until(ready)
        try:
            yield c, (a, b, cc), (fa, fb, fc)
        finally:
            fn.cancel_scope.cancel()


async def test_clients_through_node_a(tmp_path):
    import ollama
    import openai

    with trio.fail_after(120):
        async with three_nodes(tmp_path) as (c, (a, b, cc), fakes):
            client = ollama.Client(host=a.api)

            def ollama_calls():
                out = {}
                out["chat"] = client.chat(model="gamma", messages=[{"role": "user", "content": "hi"}])
                out["chat_stream"] = list(client.chat(model="gamma", messages=[{"role": "user", "content": "hi"}],
                                                      stream=True))
                out["generate"] = client.generate(model="gamma:latest", prompt="hi")
                out["gen_stream"] = list(client.generate(model="GAMMA", prompt="hi", stream=True))
                out["embed"] = client.embed(model="nomic-embed-text", input=["a", "b"])
                out["list"] = client.list()
                out["show"] = client.show("gamma")
                try:
                    client.chat(model="nobody-has-this", messages=[{"role": "user", "content": "x"}])
                except ollama.ResponseError as exc:
                    out["missing"] = exc
                return out

            out = await trio.to_thread.run_sync(ollama_calls)
            assert "from C" in out["chat"].message.content
            assert out["chat"].model == "gamma"
            parts = out["chat_stream"]
            assert len(parts) > 2 and parts[-1].done and all(p.message.role == "assistant" for p in parts)
            assert "from C" in "".join(p.message.content for p in parts)
            assert "from C" in out["generate"].response
            assert out["gen_stream"][-1].done and out["gen_stream"][0].model == "GAMMA"
            assert len(out["embed"].embeddings) == 2
            names = {m.model for m in out["list"].models}
            assert {"alpha:latest", "beta:latest", "gamma:latest", "shared:latest"} <= names
            assert len([m for m in out["list"].models if m.model == "shared:latest"]) == 1  # de-duplicated
            assert out["show"].modelinfo is not None or out["show"].details is not None
            assert out["missing"].status_code == 404 and "not found" in out["missing"].error

            # the peer that served it is named in a header: C for gamma
            r = await c.client.post(a.api + "/api/chat", content=json.dumps(
                {"model": "gamma", "messages": [{"role": "user", "content": "x"}], "stream": False}))
            assert r.status_code == 200 and r.headers[PEER] == cc.peer_id
            r = await c.client.post(a.api + "/api/generate", content=b'{"model":"alpha","prompt":"x","stream":false}')
            assert r.headers[PEER] == a.peer_id  # local model: served by A itself

            oa = openai.OpenAI(base_url=a.api + "/v1", api_key="unused")

            def openai_calls():
                full = oa.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "hi"}])
                chunks = list(oa.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "hi"}],
                                                         stream=True))
                models = oa.models.list()
                try:
                    oa.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
                except openai.NotFoundError as exc:
                    missing = exc
                return full, chunks, models, missing

            full, chunks, models, missing = await trio.to_thread.run_sync(openai_calls)
            assert "from C" in full.choices[0].message.content
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            assert "from C" in text
            assert {"gamma:latest", "alpha:latest"} <= {m.id for m in models.data}
            assert missing.status_code == 404

            # Requests to C went over kept-alive streams, and /metrics says so.
            metrics = (await c.client.get(a.api + "/metrics")).text
            reused = re.search(r'^meshollama_p2p_request_streams_total\{how="reused"\} (\d+)', metrics, re.M)
            assert reused and int(reused.group(1)) > 0, metrics


def _got(fake) -> bool:
    return any(r.path == "/api/generate" for r in fake.requests)


async def _stream_once(client, api, model):
    async with client.stream("POST", api + "/api/generate",
                             content=json.dumps({"model": model, "prompt": "x"})) as r:
        assert r.status_code == 200
        lines = [json.loads(line) async for line in r.aiter_lines() if line]
        assert lines[-1].get("done") is True, lines[-1]
        return r.headers[PEER]


async def test_load_is_split_and_a_slowed_peer_avoided(tmp_path):
    with trio.fail_after(180):
        async with three_nodes(tmp_path, token_delay=0.05) as (c, (a, b, cc), (fa, fb, fc)):
            counts = collections.Counter()
            limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:

                async def one():
                    counts[await _stream_once(client, a.api, "shared")] += 1

                async with trio.open_nursery() as n:
                    for _ in range(40):
                        n.start_soon(one)
                share = counts[b.peer_id] / 40
                assert 0.35 <= share <= 0.65, counts

                # Slow B down 20x per token. With steady load from 4 clients both
                # peers stay busy, so counting requests alone would split ~50/50;
                # the router's per-token speed estimate sends most to C.
                fb.set(token_delay=1.0)
                counts.clear()

                async def worker():
                    for _ in range(5):
                        await one()

                async with trio.open_nursery() as n:
                    for _ in range(4):
                        n.start_soon(worker)
                assert counts[cc.peer_id] >= 2 * counts[b.peer_id], counts


async def test_faults_retry_error_and_route_around(tmp_path):
    with trio.fail_after(180):
        async with three_nodes(tmp_path) as (c, (a, b, cc), (fa, fb, fc)):
            client = c.client
            # 1. backend down on one peer: requests route around it
            fb.set(fail_before_first_byte={"status": 502, "body": "upstream down"}, fault_paths=("/api/generate",))
            for _ in range(6):
                assert await _stream_once(client, a.api, "shared") == cc.peer_id
            fb.clear_faults()

            # 2. mid-stream failure on every holder (the continuation breaks too): an explicit error line, not a hang
            fc.set(fail_after_n_chunks={"n": 2, "mode": "close"}, fault_paths=INFERENCE_PATHS)
            fb.set(fail_after_n_chunks={"n": 2, "mode": "close"}, fault_paths=INFERENCE_PATHS)
            async with client.stream("POST", a.api + "/api/generate", content=b'{"model":"shared","prompt":"x"}') as r:
                lines = [json.loads(x) async for x in r.aiter_lines() if x]
            assert r.status_code == 200
            assert "error" in lines[-1] and not lines[-1].get("done")
            fb.clear_faults()
            fc.clear_faults()

            # 3. SIGKILL the serving peer before the first byte: completes on the other
            fb.requests.clear()
            fc.requests.clear()
            fb.set(hang_before_first_byte=True)
            fc.set(hang_before_first_byte=True)
            result = {}

            async def request():
                result["peer"] = await _stream_once(client, a.api, "shared")

            async with trio.open_nursery() as n:
                n.start_soon(request)
                while not (_got(fb) or _got(fc)):
                    await trio.sleep(0.02)
                victim, survivor, survivor_fake = (b, cc, fc) if _got(fb) else (cc, b, fb)
                survivor_fake.clear_faults()
                c.signal(victim, signal.SIGKILL)
            assert result["peer"] == survivor.peer_id


async def test_a_pulled_model_is_announced_at_once_and_routed(tmp_path):
    """Heartbeats every 10 s and Ollama polled every 60 s: a model pulled on B shows
    in A's /api/tags well before either timer could have carried it, because the
    pull itself triggers B's refresh and an immediate heartbeat."""
    env = {"MESHOLLAMA_OLLAMA_REFRESH_INTERVAL": "60"}
    with trio.fail_after(120):
        async with trio.open_nursery() as fn, cluster(tmp_path) as c:
            fa = await fn.start(partial(serve_fake, ["alpha:latest"], name="A"))
            fb = await fn.start(partial(serve_fake, ["beta:latest"], name="B"))
            a = await c.start("a", "--backend", "ollama", "--ollama-url", fa.url, heartbeat=10.0, env=env)
            b = await c.start("b", "--backend", "ollama", "--ollama-url", fb.url, heartbeat=10.0, env=env,
                              bootstrap=a)

            async def tags(node) -> set[str]:
                r = await c.client.get(node.api + "/api/tags")
                return {m["name"] for m in r.json()["models"]}

            with trio.fail_after(60):
                await c.wait_until(lambda: _has(tags(a), "beta:latest"))
            r = await c.client.post(b.api + "/api/pull", content=b'{"model":"fresh-model","stream":false}')
            assert r.status_code == 200 and r.json() == {"status": "success"}
            with trio.fail_after(8):  # < one 10 s heartbeat interval, far below the 60 s poll
                await c.wait_until(lambda: _has(tags(a), "fresh-model:latest"))
            r = await c.client.post(a.api + "/api/generate",
                                    content=b'{"model":"fresh-model","prompt":"x","stream":false}')
            assert r.status_code == 200 and r.headers[PEER] == b.peer_id
            fn.cancel_scope.cancel()


async def _has(names, name: str) -> bool:
    return name in await names

"""Regressions found by the independent review of issue 11, each fixed.

They use short sleeps to stand for slow work (a pull, a hash); nothing here asserts a duration."""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest
import trio

from meshollama.catalog import LoadInfo
from meshollama.mesh.peertable import PeerState
from tests.gateway.fakes import (
    JSON,
    Break,
    FakeMesh,
    FakeUpstream,
    Script,
    Wait,
    model,
    running_gateway,
)


# --- found in review: local timeouts ---
async def test_a_non_streamed_pull_is_not_bounded_by_first_byte_timeout():
    mesh = FakeMesh()
    done = trio.Event()
    backend = FakeUpstream("local", Script(headers=JSON, body=[Wait(done), b'{"status":"success"}']))
    with trio.fail_after(10):
        async with running_gateway(mesh, backend, first_byte_timeout=0.2) as gw, \
                httpx.AsyncClient(base_url=gw.url) as client:
            async with trio.open_nursery() as n:
                async def pull_finishes():
                    await trio.sleep(0.5)  # a pull of a big model: minutes
                    done.set()
                n.start_soon(pull_finishes)
                r = await client.post("/api/pull", json={"model": "llama3", "stream": False})
    print(r.status_code, r.text, "backend exits:", backend.exits)
    assert r.status_code == 200


class SlowReader(FakeUpstream):
    """Reads the upload slowly, as a backend writing a big blob to disk does."""

    async def open(self, request):
        async for _ in request.stream:
            await trio.sleep(0.1)
        async with super().open(request.__class__(request.method, request.path, request.headers, b"")) as resp:
            yield resp


async def test_a_slow_blob_upload_is_not_bounded_by_first_byte_timeout():
    import contextlib
    SlowReader.open = contextlib.asynccontextmanager(SlowReader.open)
    mesh = FakeMesh()
    backend = SlowReader("local", Script(status=201, headers=(), body=[]))
    chunks = [b"x" * 1024] * 6  # 6 reads of 0.1 s: 0.6 s > first_byte_timeout
    async def body():
        for c in chunks:
            yield c
    with trio.fail_after(10):
        async with running_gateway(mesh, backend, first_byte_timeout=0.2) as gw, \
                httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/blobs/sha256:" + "0" * 64, content=body())
    print(r.status_code, r.text)
    assert r.status_code == 201


async def test_a_streamed_pull_silent_while_verifying_is_not_cut_by_stall_timeout():
    from tests.gateway.fakes import NDJSON
    mesh = FakeMesh()
    done = trio.Event()
    backend = FakeUpstream("local", Script(headers=NDJSON, body=[
        b'{"status":"verifying sha256 digest"}\n', Wait(done), b'{"status":"success"}\n']))
    with trio.fail_after(10):
        async with running_gateway(mesh, backend, stall_timeout=0.2) as gw, \
                httpx.AsyncClient(base_url=gw.url) as client:
            async with trio.open_nursery() as n:
                async def verified():
                    await trio.sleep(0.5)  # hashing 40 GB: a minute or more, no progress line
                    done.set()
                n.start_soon(verified)
                r = await client.post("/api/pull", json={"model": "llama3"})
    print(r.status_code, r.text)
    assert r.text.strip().endswith('{"status":"success"}')


# --- found in review: resume digest ---
DIGEST_A, DIGEST_B = "a" * 64, "b" * 64


def chat_line(content: str) -> bytes:
    return json.dumps({"model": "llama3", "created_at": "t", "message": {"role": "assistant", "content": content},
                       "done": False}).encode() + b"\n"


def chat_final(n: int) -> bytes:
    return json.dumps({"model": "llama3", "created_at": "t", "message": {"role": "assistant", "content": ""},
                       "done": True, "done_reason": "stop", "eval_count": n, "prompt_eval_count": 5}).encode() + b"\n"


async def test_a_peer_that_left_before_its_stream_broke_is_never_continued_on_other_weights():
    mesh = FakeMesh()
    go = trio.Event()
    mesh.add("peer-a", [model("llama3:latest", DIGEST_A)],
             FakeUpstream("a", Script(body=[chat_line("one"), Wait(go), Break("reset")])))
    b = mesh.add("peer-b", [model("llama3:latest", DIGEST_B)],  # other weights: must never continue
                 FakeUpstream("b", Script(body=[chat_line(" zwei"), chat_final(1)])))
    body = {"model": "llama3", "messages": [{"role": "user", "content": "count"}]}
    with trio.fail_after(10):
        async with running_gateway(mesh, routing="round_robin") as gw, httpx.AsyncClient(base_url=gw.url) as client:
            async with client.stream("POST", "/api/chat", json=body) as r:
                it = r.aiter_lines()
                first = await it.__anext__()
                del mesh._peers["peer-a"]  # its "leaving" heartbeat (drain timeout, shutdown) removed it
                go.set()
                rest = [line async for line in it]
    print([first, *rest])
    print("peer-b asked:", [json.loads(q.body)["messages"][-1] for q in b.requests])
    assert b.requests == [], "continued on a holder with a different digest"


# --- found in review: queue stale stats ---
LLAMA = model("llama3:latest")
DONE = b'{"model":"llama3","response":"","done":true,"done_reason":"stop","eval_count":2}\n'
PART = b'{"model":"llama3","response":"a","done":false}\n'


async def test_a_slot_freed_by_our_own_request_is_seen_at_once():
    mesh = FakeMesh()
    release = trio.Event()
    a = mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(body=[PART, Wait(release), DONE]), Script(body=[DONE])),
                 load=LoadInfo(capacity=1))
    results = []
    with trio.fail_after(10):
        async with running_gateway(mesh, queue_timeout=2.0) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            async def call():
                results.append(await client.post("/api/generate", json={"model": "llama3", "prompt": "x"}))

            async with trio.open_nursery() as n:
                n.start_soon(call)
                await a.wait_until(lambda: len(a.requests) == 1)
                # peer-a's next heartbeat: it now counts our request (in_flight 1)
                view = mesh._peers["peer-a"]
                mesh._peers["peer-a"] = dataclasses.replace(view, seq=2, load=LoadInfo(in_flight=1, capacity=1))
                n.start_soon(call)
                while gw.proxy.queues.total() != 1:
                    await trio.sleep(0.01)
                t0 = trio.current_time()
                release.set()  # our request ends: the slot is free now (poke)
            waited = trio.current_time() - t0
    print([r.status_code for r in results], f"second waited {waited:.2f}s", [r.text[:80] for r in results])
    assert [r.status_code for r in results] == [200, 200]


# --- found in review: queue holder gone ---
LLAMA = model("llama3:latest")


async def test_a_queued_request_whose_only_holder_went_down_is_answered_at_once():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], load=LoadInfo(in_flight=1, capacity=1))  # busy by its heartbeat
    with trio.fail_after(20):
        async with running_gateway(mesh, queue_timeout=3.0) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            async with trio.open_nursery() as n:
                out = {}

                async def call():
                    out["r"] = await client.post("/api/generate", json={"model": "llama3", "prompt": "x"})
                    out["t"] = trio.current_time()
                n.start_soon(call)
                while gw.proxy.queues.total() != 1:
                    await trio.sleep(0.01)
                t0 = trio.current_time()
                mesh._peers["peer-a"] = dataclasses.replace(mesh._peers["peer-a"], state=PeerState.DOWN)
    waited = out["t"] - t0
    print(out["r"].status_code, out["r"].text, f"answered {waited:.2f}s after the holder went down")
    assert waited < 1.0, "kept in line for a model nobody reachable serves"


async def test_queue_size_zero_sends_at_once_as_before_the_queue():
    mesh = FakeMesh()
    a = mesh.add("peer-a", [LLAMA], load=LoadInfo(in_flight=1, capacity=1))  # Ollama would queue it itself
    with trio.fail_after(10):
        async with running_gateway(mesh, queue_size=0) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/generate", json={"model": "llama3", "prompt": "x"})
    print(r.status_code, r.text, "upstream asked:", len(a.requests))
    assert r.status_code == 200, "queue_size 0 ('no queue') refuses every request while the estimate says busy"


# --- found in review: relay buffer ---
pytestmark = pytest.mark.filterwarnings("ignore")
LLAMA = model("llama3:latest")



class Trickle(FakeUpstream):
    """Sends a line start, then one byte every 0.05 s, never a newline."""

    async def _body(self, script):
        yield b'{"model":"llama3","message":{"role":"assistant","content":"'
        while True:
            await trio.sleep(0.05)
            yield b"a"


class Flood(FakeUpstream):
    """One line that never ends: 1 MiB pieces, no newline."""

    async def _body(self, script):
        while True:
            yield b"x" * (1 << 20)
            await trio.sleep(0)


async def test_a_line_longer_than_the_relay_holds_is_a_broken_stream():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], Flood("a", Script()))
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    with trio.fail_after(30):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/chat", json=body)
    assert r.status_code == 200
    assert "a line of over" in json.loads(r.text.strip().splitlines()[-1])["error"]


async def test_a_trickle_without_a_whole_line_is_a_stall():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], Trickle("a", Script()))
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    got = b""
    with trio.move_on_after(3) as timer:  # stall_timeout is 0.3 s
        async with running_gateway(mesh, stall_timeout=0.3) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            async with client.stream("POST", "/api/chat", json=body) as r:
                async for part in r.aiter_bytes():
                    got += part
    print("client got", len(got), "bytes; timed out:", timer.cancelled_caught)
    assert not timer.cancelled_caught, "the client waited 10x stall_timeout with no byte and no error"

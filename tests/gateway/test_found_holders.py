"""Routing to holders no announcement lists, found through the DHT (``mesh.holders``):
the gateway's side, over real Hypercorn with scripted upstreams."""

from __future__ import annotations

import json

import httpx
import trio

from meshollama.catalog import LoadInfo
from meshollama.errors import UpstreamBusy, UpstreamUnavailable
from meshollama.mesh.holders import Found, Holders

from .fakes import JSON, Break, FakeMesh, FakeUpstream, Script, model, running_gateway
from .test_resilience import chat_final, chat_line

CHAT = b'{"model":"hidden:1b","messages":[{"role":"user","content":"hi"}],"stream":false}'
ANSWER = b'{"model":"hidden:1b","message":{"role":"assistant","content":"hello"},"done":true}'
BUSY_BODY = b'{"error":"server busy, please try again.  maximum pending requests exceeded"}'


class HidingMesh(FakeMesh):
    """A mesh whose announcements leave ``hidden:1b`` out; the DHT knows its holders."""

    def __init__(self, *, finds: bool = True) -> None:
        super().__init__()
        self.finds = finds
        self.found: list[Found] = []
        self.unanswered = 0
        self.asked: list[str] = []

    def finds_holders(self, snapshot) -> bool:
        return self.finds

    async def find_holders(self, name: str) -> Holders:
        self.asked.append(name)
        return Holders(list(self.found), self.unanswered)


def holder(mesh: HidingMesh, pid: str, *scripts: Script, busy: int = 0) -> FakeUpstream:
    """A peer in the table (it announces another model) that says it holds the hidden one."""
    up = mesh.add(pid, [model("shown:1b")], FakeUpstream(pid, *scripts))
    mesh.found.append(Found(pid, "c" * 64, True, LoadInfo(in_flight=busy, capacity=4)))
    return up


async def test_a_model_only_the_dht_knows_is_routed_to_the_holder_that_said_so():
    mesh = HidingMesh()
    up = holder(mesh, "peer-a", Script(headers=JSON, body=[ANSWER]))
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/chat", content=CHAT)
    assert r.status_code == 200 and r.content == ANSWER
    assert r.headers["x-meshollama-peer"] == "peer-a" and len(up.requests) == 1
    assert mesh.asked == ["hidden:1b"]


async def test_the_least_busy_found_holder_goes_first_and_a_failing_one_is_retried_elsewhere():
    mesh = HidingMesh()
    down = holder(mesh, "peer-a", Script(fail=UpstreamUnavailable("gone")), busy=0)
    busy = holder(mesh, "peer-b", Script(headers=JSON, body=[ANSWER]), busy=3)
    mesh.found.reverse()  # the gateway orders them itself
    with trio.fail_after(10):
        async with running_gateway(mesh, retries=1) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/chat", content=CHAT)
    assert r.status_code == 200 and r.headers["x-meshollama-peer"] == "peer-b"
    assert len(down.requests) == 1 and len(busy.requests) == 1


async def test_found_holders_that_all_answer_busy_give_the_client_their_answer():
    mesh = HidingMesh()
    holder(mesh, "peer-a", Script(status=503, headers=JSON, body=[BUSY_BODY]))
    with trio.fail_after(20):
        async with running_gateway(mesh, queue_size=0) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/chat", content=CHAT)
    assert r.status_code == 503 and r.content == BUSY_BODY


async def test_nobody_found_is_ollamas_404_and_a_small_mesh_never_asks_the_dht():
    for finds in (True, False):
        mesh = HidingMesh(finds=finds)
        mesh.add("peer-a", [model("shown:1b")])
        with trio.fail_after(10):
            async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
                r = await client.post("/api/chat", content=CHAT)
        assert r.status_code == 404 and r.json() == {"error": "model 'hidden:1b' not found"}
        assert mesh.asked == (["hidden:1b"] if finds else [])


async def test_a_model_the_table_lists_never_waits_for_the_dht():
    mesh = HidingMesh()
    up = mesh.add("peer-a", [model("hidden:1b")], FakeUpstream("a", Script(headers=JSON, body=[ANSWER])))
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/chat", content=CHAT)
    assert r.status_code == 200 and len(up.requests) == 1 and mesh.asked == []



async def test_providers_that_did_not_answer_are_a_503_not_a_404():
    mesh = HidingMesh()
    mesh.add("peer-a", [model("shown:1b")])
    mesh.unanswered = 2
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/chat", content=CHAT)
    assert r.status_code == 503 and "did not answer" in r.json()["error"]


async def test_busy_found_holders_are_asked_again_not_sent_the_request_again():
    """Every found holder answered busy: the gateway asks again (answers are fresh for a
    second) until one says a slot is free, and only then sends the request."""
    mesh = HidingMesh()
    up = holder(mesh, "peer-a", Script(fail=UpstreamBusy("at capacity")), Script(headers=JSON, body=[ANSWER]), busy=0)

    async def free_after_three_questions(name: str) -> Holders:
        mesh.asked.append(name)
        busy = 4 if 1 < len(mesh.asked) < 4 else 0
        return Holders([Found("peer-a", "c" * 64, True, LoadInfo(in_flight=busy, capacity=4))])

    mesh.find_holders = free_after_three_questions
    with trio.fail_after(20):
        async with running_gateway(mesh, queue_timeout=10) as gw, \
                httpx.AsyncClient(base_url=gw.url, timeout=20) as client:  # rechecks take 1 to 2 s each
            r = await client.post("/api/chat", content=CHAT)
    assert r.status_code == 200 and r.content == ANSWER
    assert len(up.requests) == 2 and len(mesh.asked) == 4  # busy, (asked: busy, busy, free), answered


async def test_busy_found_holders_end_in_a_503_with_retry_after_at_the_queue_timeout():
    mesh = HidingMesh()
    up = holder(mesh, "peer-a", Script(fail=UpstreamBusy("at capacity")), busy=4)
    with trio.fail_after(20):
        async with running_gateway(mesh, queue_timeout=2) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/chat", content=CHAT)
    assert r.status_code == 503 and "retry-after" in r.headers
    assert up.requests == []  # it said it was full every time: never sent


async def test_a_stream_broken_on_a_found_holder_continues_on_another_of_the_same_digest():
    mesh = HidingMesh()
    a = holder(mesh, "peer-a", Script(body=[chat_line("one"), chat_line(" two"), Break("reset")]))
    c = holder(mesh, "peer-c", Script(body=[chat_line(" three"), chat_final(1, prompt_eval_count=3)]), busy=2)
    mesh.add("peer-b", [model("shown:1b")])
    mesh.found.append(Found("peer-b", "d" * 64, True, LoadInfo(in_flight=1, capacity=4)))  # other weights
    body = {"model": "hidden:1b", "messages": [{"role": "user", "content": "count"}]}
    with trio.fail_after(10):
        async with running_gateway(mesh, retries=0) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/chat", json=body)
    got = [json.loads(line) for line in r.text.splitlines()]
    assert "".join(g["message"]["content"] for g in got) == "one two three"
    assert got[-1]["meshollama"] == {"peers": ["peer-a", "peer-c"], "resumed": 1}
    assert len(a.requests) == 1 and len(c.requests) == 1


async def test_a_lookup_cut_short_is_a_503_with_retry_after_not_a_404():
    mesh = HidingMesh()
    mesh.add("peer-a", [model("shown:1b")])

    async def cut(name: str) -> Holders:
        mesh.asked.append(name)
        return Holders([], 0, complete=False)

    mesh.find_holders = cut
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/chat", content=CHAT)
    assert r.status_code == 503 and "retry later" in r.json()["error"] and int(r.headers["retry-after"]) >= 1

"""Routing to holders no announcement lists, found through the DHT (``mesh.holders``):
the gateway's side, over real Hypercorn with scripted upstreams."""

from __future__ import annotations

import httpx
import trio

from meshollama.catalog import LoadInfo
from meshollama.errors import UpstreamUnavailable
from meshollama.mesh.holders import Found

from .fakes import JSON, FakeMesh, FakeUpstream, Script, model, running_gateway

CHAT = b'{"model":"hidden:1b","messages":[{"role":"user","content":"hi"}],"stream":false}'
ANSWER = b'{"model":"hidden:1b","message":{"role":"assistant","content":"hello"},"done":true}'
BUSY_BODY = b'{"error":"server busy, please try again.  maximum pending requests exceeded"}'


class HidingMesh(FakeMesh):
    """A mesh whose announcements leave ``hidden:1b`` out; the DHT knows its holders."""

    def __init__(self, *, finds: bool = True) -> None:
        super().__init__()
        self.finds = finds
        self.found: list[Found] = []
        self.asked: list[str] = []

    def finds_holders(self, snapshot) -> bool:
        return self.finds

    async def find_holders(self, name: str) -> list[Found]:
        self.asked.append(name)
        return list(self.found)


def holder(mesh: HidingMesh, pid: str, script: Script, *, busy: int = 0) -> FakeUpstream:
    """A peer in the table (it announces another model) that says it holds the hidden one."""
    up = mesh.add(pid, [model("shown:1b")], FakeUpstream(pid, script))
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
    mesh.found.sort(key=Found.busy)
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


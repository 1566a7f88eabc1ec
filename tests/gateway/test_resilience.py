"""Requests that outlive a failing upstream: timeouts, queueing, drain, disconnects.

Real Hypercorn, scripted upstreams (``fakes``). Timeouts are set small so a
test takes a fraction of a second; nothing here asserts how long anything took.
"""

from __future__ import annotations

import json
from functools import partial

import httpx
import trio

from meshollama.catalog import LoadInfo
from meshollama.errors import UpstreamBusy

from .fakes import NDJSON, SSE, Break, FakeMesh, FakeUpstream, Hang, Script, Wait, model, running_gateway

LLAMA = model("llama3:latest")
DONE = b'{"model":"llama3","response":"","done":true,"done_reason":"stop","eval_count":2}\n'


def gen(**extra) -> bytes:
    return json.dumps({"model": "llama3", "prompt": "hi", **extra}).encode()


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line]


# --- first byte ---------------------------------------------------------------------


async def test_a_peer_silent_before_its_first_byte_is_given_up_and_the_next_one_answers():
    mesh = FakeMesh()
    a = mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(hang_before_head=True)))
    b = mesh.add("peer-b", [LLAMA])
    with trio.fail_after(10):
        async with running_gateway(mesh, first_byte_timeout=0.2) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/generate", content=gen())
            await gw.proxy.wait_idle()
            assert gw.metric("meshollama_upstream_timeouts_total", kind="first_byte") == 1
            assert gw.metric("meshollama_retries_total", reason="timeout") == 1
    assert r.status_code == 200 and r.headers["x-meshollama-peer"] == "peer-b"
    assert lines(r.text)[-1]["done"] is True
    assert a.aborted == 1 and len(b.requests) == 1  # the silent one's request was cancelled


async def test_a_head_without_a_first_byte_counts_as_silent_too():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(body=[Hang()])))
    mesh.add("peer-b", [LLAMA])
    with trio.fail_after(10):
        async with running_gateway(mesh, first_byte_timeout=0.2) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/generate", content=gen())
    assert r.status_code == 200 and r.headers["x-meshollama-peer"] == "peer-b"


async def test_a_non_streamed_answer_past_first_byte_timeout_is_a_504_and_not_rerun_elsewhere():
    mesh = FakeMesh()
    a = mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(hang_before_head=True)))
    b = mesh.add("peer-b", [LLAMA], FakeUpstream("b", Script(hang_before_head=True)))
    with trio.fail_after(10):
        async with running_gateway(mesh, first_byte_timeout=0.2) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/generate", content=gen(stream=False))
            o = await client.post("/v1/chat/completions", json={"model": "llama3", "messages": []})  # not streamed
    assert r.status_code == 504 and "gateway.first_byte_timeout" in r.json()["error"]
    assert o.status_code == 504 and "non-streamed" in o.json()["error"]["message"]
    assert len(a.requests) + len(b.requests) == 2  # each tried once: the work is not repeated on every peer


async def test_every_peer_silent_ends_in_an_explicit_503():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(hang_before_head=True)))
    mesh.add("peer-b", [LLAMA], FakeUpstream("b", Script(hang_before_head=True)))
    with trio.fail_after(10):
        async with running_gateway(mesh, first_byte_timeout=0.2) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/generate", content=gen())
    assert r.status_code == 503
    assert "busy or failing (tried 2)" in r.json()["error"]


# --- stalls -----------------------------------------------------------------------


async def test_a_stream_that_stalls_with_nobody_to_continue_ends_with_an_error_line():
    mesh = FakeMesh()
    a = mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(body=[
        b'{"model":"llama3","response":"Hel","done":false}\n', Hang()])))
    with trio.fail_after(10):
        async with running_gateway(mesh, stall_timeout=0.2) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/generate", content=gen())
            await gw.proxy.wait_idle()
            assert gw.metric("meshollama_upstream_timeouts_total", kind="stall") == 1
    assert r.status_code == 200
    got = lines(r.text)
    assert got[0]["response"] == "Hel"
    assert "gateway.stall_timeout" in got[-1]["error"]
    assert a.body_closed_early == 1  # the stalled upstream was let go


async def test_a_stalled_sse_stream_ends_with_an_error_event():
    mesh = FakeMesh()
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "llama3",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": None}]}
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(headers=SSE, body=[
        b"data: " + json.dumps(chunk).encode() + b"\n\n", Hang()])))
    body = {"model": "llama3", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with trio.fail_after(10):
        async with running_gateway(mesh, stall_timeout=0.2, resume=False) as gw, \
                httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/v1/chat/completions", json=body)
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "Hel"
    assert "gateway.stall_timeout" in json.loads(events[-1])["error"]["message"]


# --- queueing -----------------------------------------------------------------------


async def test_busy_everywhere_waits_in_line_and_goes_when_a_slot_frees():
    mesh = FakeMesh()
    release = trio.Event()
    first = Script(body=[b'{"model":"llama3","response":"a","done":false}\n', Wait(release), DONE])
    second = Script(body=[DONE])
    a = mesh.add("peer-a", [LLAMA], FakeUpstream("a", first, second), load=LoadInfo(capacity=1))
    results: list[httpx.Response] = []
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:

            async def call() -> None:
                results.append(await client.post("/api/generate", content=gen()))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                await a.wait_until(lambda: len(a.requests) == 1)
                nursery.start_soon(call)
                while gw.proxy.queues.total() != 1:
                    await trio.sleep(0.01)
                assert len(a.requests) == 1  # the second waits at the gateway
                assert gw.metric("meshollama_queue_depth", model="llama3:latest") == 1
                release.set()
            assert gw.metric("meshollama_queue_total", outcome="dispatched") == 1
            assert gw.metric("meshollama_queue_depth", model="llama3:latest") == 0
    assert [r.status_code for r in results] == [200, 200] and len(a.requests) == 2


async def test_a_full_queue_answers_503_with_retry_after():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(body=[Hang()])), load=LoadInfo(capacity=1))
    with trio.fail_after(10):
        async with running_gateway(mesh, queue_size=1, queue_timeout=30.0) as gw, \
                httpx.AsyncClient(base_url=gw.url) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(client.post, "/api/generate", content=gen()))  # takes the slot
                while gw.proxy.in_flight < 1 or not gw.proxy.stats.view("peer-a", trio.current_time()).in_flight:
                    await trio.sleep(0.01)
                nursery.start_soon(partial(client.post, "/api/generate", content=gen()))  # waits
                while gw.proxy.queues.total() != 1:
                    await trio.sleep(0.01)
                r = await client.post("/v1/completions", json={"model": "llama3", "prompt": "x"})
                nursery.cancel_scope.cancel()
    assert r.status_code == 503 and r.headers["retry-after"] == "3"
    assert "gateway.queue_size" in r.json()["error"]["message"]


async def test_a_queued_request_times_out_with_503():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], load=LoadInfo(in_flight=1, capacity=1))  # full by its heartbeat
    with trio.fail_after(10):
        async with running_gateway(mesh, queue_timeout=0.3) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/generate", content=gen())
            assert gw.metric("meshollama_queue_total", outcome="timeout") == 1
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "gateway.queue_timeout" in r.json()["error"]


async def test_peers_that_answer_busy_send_the_request_back_in_line():
    mesh = FakeMesh()
    a = mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(fail=UpstreamBusy("full")), Script(body=[DONE])))
    with trio.fail_after(10):
        async with running_gateway(mesh, retries=0) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/generate", content=gen())
    assert r.status_code == 200 and len(a.requests) == 2


# --- drain and disconnects ----------------------------------------------------------


async def test_a_draining_gateway_sends_new_requests_elsewhere():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA])
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            gw.proxy.draining = True
            r = await client.post("/api/chat", json={"model": "llama3", "messages": []})
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
    assert "draining" in r.json()["error"]


async def test_only_an_admin_may_drain_a_node_and_no_peer_can(tmp_path):
    from meshollama.gateway.endpoints import peer_may_call

    from .test_roles import A, R, U, _keys, bearer

    asked: list[str] = []
    keys = _keys(tmp_path)
    with trio.fail_after(10):
        async with running_gateway(FakeMesh(), data_dir=tmp_path) as gw, \
                httpx.AsyncClient(base_url=gw.url) as client:
            gw.app.extensions["meshollama"].drain = lambda: asked.append("drain") or {"draining": True}
            assert (await client.post("/api/mesh/drain")).status_code == 401
            for role in (U, R):
                assert (await client.post("/api/mesh/drain", headers=bearer(keys[role]))).status_code == 403
            assert asked == []  # refused before the node heard of it
            r = await client.post("/api/mesh/drain", headers=bearer(keys[A]))
            assert r.status_code == 202 and r.json() == {"draining": True} and asked == ["drain"]
    # Over the mesh protocol the path is not even served to a peer.
    assert not peer_may_call("POST", "/api/mesh/drain")


async def test_a_client_that_leaves_cancels_the_upstream():
    mesh = FakeMesh()
    a = mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(body=[
        b'{"model":"llama3","response":"a","done":false}\n', Hang()])))
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as client:
                async with client.stream("POST", "/api/generate", content=gen()) as r:
                    async for _ in r.aiter_bytes():
                        break
            await a.wait_until(lambda: a.aborted == 1)
            await gw.proxy.wait_idle()
            assert gw.metric("meshollama_requests_total", endpoint="/api/generate", model="llama3:latest",
                             peer="peer-a", status="499") == 1


# --- resume -------------------------------------------------------------------------


def chat_line(content: str, **extra) -> bytes:
    obj = {"model": "llama3", "created_at": "2024-05-01T10:00:00Z",
           "message": {"role": "assistant", "content": content}, "done": False, **extra}
    return json.dumps(obj).encode() + b"\n"


def chat_final(eval_count: int, prompt_eval_count: int = 5) -> bytes:
    obj = {"model": "llama3", "created_at": "2024-05-01T10:00:01Z", "message": {"role": "assistant", "content": ""},
           "done": True, "done_reason": "stop", "total_duration": 1000, "prompt_eval_count": prompt_eval_count,
           "eval_count": eval_count}
    return json.dumps(obj).encode() + b"\n"


CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "count"}], "options": {"seed": 7}}


async def test_a_chat_killed_mid_stream_continues_on_a_holder_of_the_same_digest():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(body=[chat_line("one"), chat_line(" two"), Break("reset")])))
    other = mesh.add("peer-b", [model("llama3:latest", digest="b" * 64)])  # other weights: never continues
    c = mesh.add("peer-c", [LLAMA], FakeUpstream("c", Script(body=[
        chat_line(" three"), chat_line(" four"), chat_final(2, prompt_eval_count=7)])))
    with trio.fail_after(10):
        async with running_gateway(mesh, routing="round_robin") as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/chat", json=CHAT)
    got = lines(r.text)
    assert "".join(g["message"]["content"] for g in got) == "one two three four"
    final = got[-1]
    assert final["done"] is True and sum(g["done"] for g in got) == 1
    assert final["eval_count"] == 4 and final["prompt_eval_count"] == 5  # counts cover the whole answer
    assert final["meshollama"] == {"peers": ["peer-a", "peer-c"], "resumed": 1}
    assert other.requests == []
    sent = json.loads(c.requests[0].body)
    assert sent["messages"][-1] == {"role": "assistant", "content": "one two"}
    assert sent["options"] == {"seed": 7}


async def test_a_frozen_openai_stream_continues_elsewhere_as_one_sse_stream():
    def chunk(content: str, cid: str, role: bool = False, finish=None) -> bytes:
        delta = {"role": "assistant", "content": content} if role else {"content": content}
        obj = {"id": cid, "object": "chat.completion.chunk", "created": 100, "model": "llama3",
               "system_fingerprint": "fp_ollama", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(headers=SSE, body=[
        chunk("one", "chatcmpl-A", role=True), chunk(" two", "chatcmpl-A"), Hang()])))
    mesh.add("peer-b", [LLAMA], FakeUpstream("b", Script(headers=SSE, body=[
        chunk(" three", "chatcmpl-B", role=True), chunk("", "chatcmpl-B", finish="stop"), b"data: [DONE]\n\n"])))
    body = {"model": "llama3", "stream": True, "messages": [{"role": "user", "content": "count"}]}
    with trio.fail_after(10):
        async with running_gateway(mesh, stall_timeout=0.2) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/v1/chat/completions", json=body)
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert {o["id"] for o in objs} == {"chatcmpl-A"}  # one stream to the client
    assert "".join(o["choices"][0]["delta"].get("content", "") for o in objs) == "one two three"
    assert objs[-1]["meshollama"]["peers"] == ["peer-a", "peer-b"]


async def test_a_request_with_tools_is_never_resumed_mid_stream():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(body=[chat_line("one"), Break("reset")])))
    b = mesh.add("peer-b", [LLAMA])
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/chat", json={**CHAT, "tools": tools})
            await gw.proxy.wait_idle()
            assert gw.metric("meshollama_resumes_total", outcome="refused") == 1
    got = lines(r.text)
    assert got[0]["message"]["content"] == "one"
    assert "not resumed" in got[-1]["error"] and "tools" in got[-1]["error"]
    assert b.requests == []


async def test_no_holder_left_ends_the_stream_with_an_explicit_error():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(body=[chat_line("one"), Break("reset")])))
    mesh.add("peer-b", [LLAMA], FakeUpstream("b", Script(status=500, headers=NDJSON, body=[b'{"error":"boom"}'])))
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/chat", json=CHAT)
            await gw.proxy.wait_idle()
            assert gw.metric("meshollama_resumes_total", outcome="failed") == 1  # b was tried and failed
    got = lines(r.text)
    assert [g.get("message", {}).get("content") for g in got[:-1]] == ["one"]
    assert "could not be resumed" in got[-1]["error"]


async def test_a_break_with_no_other_holder_counts_as_no_peer():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(body=[chat_line("one"), Break("reset")])))
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/chat", json=CHAT)
            await gw.proxy.wait_idle()
            assert gw.metric("meshollama_resumes_total", outcome="no_peer") == 1
            assert gw.metric("meshollama_resumes_total", outcome="failed") == 0
    assert "error" in lines(r.text)[-1]


async def test_a_stream_cut_short_without_its_final_object_is_not_passed_off_as_whole():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(body=[chat_line("one")])))  # ends cleanly, no done
    mesh.add("peer-b", [LLAMA], FakeUpstream("b", Script(body=[chat_line(" two"), chat_final(1)])))
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/chat", json=CHAT)
    got = lines(r.text)
    assert "".join(g["message"]["content"] for g in got) == "one two" and got[-1]["done"] is True


async def test_meshollama_drain_names_what_went_wrong(tmp_path, capsys):
    from meshollama import cli

    from .test_roles import U, _keys

    keys = _keys(tmp_path)
    nobody = "http://127.0.0.1:9"  # discard port: nothing listens
    args = ["drain", "--data-dir", str(tmp_path)]
    assert await trio.to_thread.run_sync(cli.main, [*args, "--api", nobody]) == 1
    assert "cannot reach the node" in capsys.readouterr().err
    with trio.fail_after(10):
        async with running_gateway(FakeMesh(), data_dir=tmp_path) as gw:
            gw.app.extensions["meshollama"].drain = lambda: {"draining": True, "drain_timeout": 1}
            code = await trio.to_thread.run_sync(cli.main, [*args, "--api", gw.url, "--api-key", keys[U]])
    assert code == 1 and "answered 403" in capsys.readouterr().err

"""The routed-request engine over real Hypercorn, with scripted upstreams.

Every test runs a real gateway on 127.0.0.1:<port 0> and talks to it with
httpx; upstreams are :class:`FakeUpstream` s whose steps the test releases
with events, so ordering is asserted without timing.
"""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from meshollama.errors import BadRequest, UpstreamBusy, UpstreamUnavailable
from meshollama.gateway.endpoints import ENDPOINTS, match, model_of, parse_payload

from .fakes import (
    JSON,
    NDJSON,
    SSE,
    Break,
    FakeMesh,
    FakeUpstream,
    Hang,
    Script,
    Wait,
    model,
    running_gateway,
)

LLAMA = model("llama3:latest")
BUSY_BODY = b'{"error":"server busy, please try again.  maximum pending requests exceeded"}'


def gen(model_name: str = "llama3", **extra) -> bytes:
    return json.dumps({"model": model_name, "prompt": "hi", **extra}).encode()


def lines(resp_text: str) -> list[dict]:
    return [json.loads(line) for line in resp_text.splitlines()]


# --- pure parts -----------------------------------------------------------------


@pytest.mark.parametrize(("body", "message"), [
    (b"", "missing request body"),
    (b"{", "invalid JSON"),
    (b"[1]", "cannot unmarshal array"),
    (b"42", "cannot unmarshal number"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[" * 100_000, "invalid JSON"),
])
def test_parse_payload_rejects(body, message):
    with pytest.raises(BadRequest, match=message):
        parse_payload(body, match("/api/generate"))


def test_parse_payload_like_ollama():
    ep = match("/api/generate")
    assert parse_payload(b"null", ep) == {}  # null is an empty request
    assert parse_payload(b' {"model":"x"} trailing', ep) == {"model": "x"}  # first value only


def test_model_of():
    show = match("/api/show")
    assert model_of({"name": "old-style"}, show) == "old-style"
    assert model_of({"model": "", "name": "n"}, show) == "n"
    with pytest.raises(BadRequest, match="invalid model name"):
        model_of({"model": "bad name!"}, match("/api/chat"))
    with pytest.raises(BadRequest, match="ChatRequest.model of type string"):
        model_of({"model": 3}, match("/api/chat"))


def test_endpoint_table():
    assert match("/api/blobs/sha256:abc").label == "/api/blobs"
    assert match("/api/blobs/") is None and match("/api/blobs/a/b") is None
    assert match("/api/tags") is None
    assert {e.path for e in ENDPOINTS if e.openai} == {"/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                                       "/v1/responses"}
    assert match("/v1/messages").envelope == "anthropic" and match("/v1/messages").routed


async def test_responses_and_messages_are_routed_by_model_with_their_error_envelopes():
    mesh = FakeMesh()
    up = mesh.add("peer-a", [LLAMA])
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/v1/responses", content=b'{"model":"llama3","input":"hi"}')
            assert r.status_code == 200 and r.headers["x-meshollama-peer"] == "peer-a"
            assert up.requests[-1].path == "/v1/responses"
            missing = await client.post("/v1/messages", content=b'{"model":"nope","max_tokens":5,"messages":[]}')
            assert missing.status_code == 404
            assert missing.json() == {"type": "error", "error": {"type": "not_found_error",
                                                                 "message": "model 'nope' not found"}}
            bad = await client.post("/v1/responses", content=b'{"input":"hi"}')
            assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


# --- streaming ------------------------------------------------------------------


async def test_stream_is_relayed_chunk_by_chunk():
    release = trio.Event()
    mesh = FakeMesh()
    up = mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(
        headers=NDJSON + (("x-custom", "kept"), ("content-length", "999"), ("connection", "close")),
        body=[b'{"response":"Hel","done":false}\n', Wait(release), b'{"response":"lo","done":false}\n',
              b'{"done":true}\n'],
    )))
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            async with client.stream("POST", "/api/generate", content=gen()) as resp:
                assert resp.status_code == 200
                assert resp.headers["content-type"] == "application/x-ndjson"
                assert resp.headers["x-meshollama-peer"] == "peer-a"
                assert resp.headers["x-custom"] == "kept"
                assert "content-length" not in resp.headers  # streamed: chunked, never upstream's length
                it = resp.aiter_lines()
                first = await it.__anext__()
                # The client has the first line while the upstream is still
                # blocked before its second: nothing was buffered.
                assert json.loads(first)["response"] == "Hel"
                assert up.sent == [b'{"response":"Hel","done":false}\n']
                release.set()
                rest = [line async for line in it]
            assert [json.loads(x).get("response") for x in rest] == ["lo", None]
            await gw.proxy.wait_idle()
            assert up.exits == [None]
            assert gw.metric("meshollama_requests_total", endpoint="/api/generate", model="llama3:latest",
                             peer="peer-a", status="200") == 1
            assert gw.metric("meshollama_time_to_first_byte_seconds_count", endpoint="/api/generate") == 1


async def test_request_is_forwarded_intact_without_content_type():
    mesh = FakeMesh()
    up = mesh.add("peer-a", [LLAMA])
    body = gen(stream=False)
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            # httpx sends no Content-Type for raw content; curl -d sends a form type.
            r1 = await client.post("/api/generate?x=1", content=body,
                                   headers={"origin": "http://localhost:3000", "user-agent": "ollama-python/0.6.3"})
            r2 = await client.post("/api/generate", content=body,
                                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r1.status_code == r2.status_code == 200
    req = up.requests[0]
    assert (req.method, req.path, req.body) == ("POST", "/api/generate?x=1", body)
    sent = dict(req.headers)
    assert sent["user-agent"] == "ollama-python/0.6.3"
    assert "content-type" not in sent
    for hop in ("host", "origin", "connection", "content-length", "accept-encoding"):
        assert hop not in sent
    assert dict(up.requests[1].headers)["content-type"] == "application/x-www-form-urlencoded"


async def test_upstream_4xx_is_relayed_not_retried():
    mesh = FakeMesh()
    a = mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(
        status=400, headers=JSON, body=[b'{"error":"raw mode does not support template, system, or context"}'])))
    b = mesh.add("peer-b", [LLAMA])
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/generate", content=gen(raw=True, system="x"))
    assert r.status_code == 400 and "raw mode" in r.json()["error"]
    assert r.headers["x-meshollama-peer"] == "peer-a"
    assert len(a.requests) == 1 and b.requests == []


async def test_empty_upstream_body_is_relayed():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(status=200, headers=(), body=[])))
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/show", content=b'{"model":"llama3"}')
    assert r.status_code == 200 and r.content == b""


# --- retries --------------------------------------------------------------------


@pytest.mark.parametrize(("first", "reason"), [
    (Script(fail=UpstreamUnavailable("dial failed")), "unavailable"),
    (Script(fail=UpstreamBusy("at capacity")), "busy"),
    (Script(status=503, headers=JSON, body=[BUSY_BODY]), "http_503"),
    (Script(status=500, headers=JSON, body=[b'{"error":"runner crashed"}']), "http_500"),
    (Script(body=[Break("reset before first byte")]), "broken"),
])
async def test_retries_next_peer_before_first_byte(first, reason):
    mesh = FakeMesh()
    a = mesh.add("peer-a", [LLAMA], FakeUpstream("a", first))
    b = mesh.add("peer-b", [LLAMA])
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/generate", content=gen(stream=False))
            await gw.proxy.wait_idle()
            assert r.status_code == 200, r.text
            assert r.headers["x-meshollama-peer"] == "peer-b"
            assert r.json()["response"] == "Hello"
            assert len(a.requests) == len(b.requests) == 1
            assert gw.metric("meshollama_retries_total", reason=reason) == 1
            now = trio.current_time()
            # A 500 may be the request's own fault (bad options): the peer is not sidelined for it.
            assert gw.proxy.stats.view("peer-a", now).sidelined is (reason != "http_500")
            assert not gw.proxy.stats.view("peer-b", now).sidelined


async def test_all_failed_relays_last_upstream_answer_byte_for_byte():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(fail=UpstreamUnavailable("down"))))
    mesh.add("peer-b", [LLAMA], FakeUpstream("b", Script(status=503, headers=JSON, body=[BUSY_BODY])))
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/chat", content=b'{"model":"llama3","messages":[]}')
    assert r.status_code == 503
    assert r.content == BUSY_BODY
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    assert r.headers["x-meshollama-peer"] == "peer-b"


async def test_all_failed_without_answer_is_503_and_retries_are_bounded():
    mesh = FakeMesh()
    ups = [mesh.add(f"peer-{c}", [LLAMA], FakeUpstream(c, Script(fail=UpstreamUnavailable("down")))) for c in "abc"]
    with trio.fail_after(10):
        async with running_gateway(mesh, retries=1) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/generate", content=gen())
            await gw.proxy.wait_idle()
            assert gw.metric("meshollama_upstream_errors_total", kind="unavailable") == 2
    assert r.status_code == 503
    assert r.json() == {"error": "all peers serving 'llama3' are busy or failing (tried 2)"}
    assert [len(u.requests) for u in ups] == [1, 1, 0]


async def test_openai_route_failures_use_the_openai_envelope():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(fail=UpstreamBusy("full"))))
    with trio.fail_after(10):
        async with running_gateway(mesh, retries=0, queue_size=0) as gw, \
                httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/v1/chat/completions", content=b'{"model":"llama3","messages":[]}')
    assert r.status_code == 503
    assert r.json() == {"error": {"message": "all peers serving 'llama3' are busy or failing (tried 1)",
                                  "type": "api_error", "param": None, "code": None}}


async def test_upstream_hanging_after_5xx_head_does_not_wedge(monkeypatch):
    from meshollama.gateway import attempt

    monkeypatch.setattr(attempt, "ERROR_BODY_TIMEOUT", 0.05)
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(status=502, headers=JSON, body=[b'{"err', Hang()])))
    with trio.fail_after(10):
        async with running_gateway(mesh, retries=0) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/generate", content=gen())
    assert r.status_code == 502 and r.json() == {"error": "upstream answered 502"}


# --- mid-stream failures ----------------------------------------------------------


async def test_ndjson_broken_mid_stream_ends_with_an_error_line():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(body=[
        b'{"response":"a","done":false}\n', b'{"response":"b","do', Break("connection reset")])))
    b = mesh.add("peer-b", [LLAMA])
    with trio.fail_after(10):
        async with running_gateway(mesh, resume=False) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/generate", content=gen())
            await gw.proxy.wait_idle()
            assert gw.metric("meshollama_stream_errors_total") == 1
    assert r.status_code == 200
    got = r.text.split("\n")
    assert got[0] == '{"response":"a","done":false}'
    assert "connection reset" in json.loads(got[1])["error"]  # the half line never went out
    assert got[2:] == [""]
    assert b.requests == []  # bytes went out: no retry


async def test_ndjson_broken_mid_stream_is_resumed_on_another_peer():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(body=[
        b'{"model":"llama3","response":"a","done":false}\n', b'{"response":"b","do', Break("connection reset")])))
    b = mesh.add("peer-b", [LLAMA])
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/generate", content=gen())
            await gw.proxy.wait_idle()
            assert gw.metric("meshollama_resumes_total", outcome="resumed") == 1
    assert r.status_code == 200 and r.headers["x-meshollama-peer"] == "peer-a"
    got = [json.loads(line) for line in r.text.splitlines()]
    assert "".join(g["response"] for g in got) == "aHello"  # peer-b's canned "Hel", "lo" after "a"
    assert [g["done"] for g in got] == [False, False, False, True]
    assert got[-1]["meshollama"] == {"peers": ["peer-a", "peer-b"], "resumed": 1}
    sent = json.loads(b.requests[0].body)
    assert b.requests[0].path == "/api/chat"  # a generate continues as a chat with the text so far
    assert sent["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]


async def test_sse_broken_mid_stream_ends_with_an_error_event():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(headers=SSE, body=[
        b'data: {"choices":[]}\n\n', Break("gone")])))
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/v1/chat/completions", content=b'{"model":"llama3","stream":true}')
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e]
    assert events[0] == 'data: {"choices":[]}'
    error = json.loads(events[1].removeprefix("data: "))["error"]
    assert "gone" in error["message"] and error["type"] == "api_error"


async def test_other_bodies_broken_mid_stream_are_left_incomplete():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(headers=JSON, body=[b'{"embeddings":[[0.1,', Break()])))
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post("/api/embed", content=b'{"model":"llama3","input":"x"}')


# --- request validation ---------------------------------------------------------

NOT_FOUND = [
    ("/api/generate", {"model": "nope", "prompt": "x"}, {"error": "model 'nope' not found"}),
    ("/api/generate", {"model": "nope", "stream": True}, {"error": "model 'nope' not found"}),
    ("/api/chat", {"model": "nope", "messages": []}, {"error": "model 'nope' not found"}),
    ("/api/embed", {"model": "nope", "input": "x"}, {"error": 'model "nope" not found, try pulling it first'}),
    ("/api/embeddings", {"model": "nope", "prompt": "x"},
     {"error": 'model "nope" not found, try pulling it first'}),
    ("/api/show", {"model": "nope"}, {"error": "model 'nope:latest' not found"}),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
     {"error": {"message": "model 'nope' not found", "type": "not_found_error", "param": None, "code": None}}),
    ("/v1/completions", {"model": "nope", "prompt": "x"},
     {"error": {"message": "model 'nope' not found", "type": "not_found_error", "param": None, "code": None}}),
    ("/v1/embeddings", {"model": "nope", "input": "x"},
     {"error": {"message": "model 'nope' not found", "type": "not_found_error", "param": None, "code": None}}),
]

MISSING = [
    ("/api/generate", {}, 404, "model '' not found"),
    ("/api/chat", {"model": ""}, 400, "model is required"),
    ("/api/embed", {"input": "x"}, 404, "model '' not found"),
    ("/api/embeddings", {}, 400, "model is required"),
    ("/api/show", {}, 400, "model is required"),
    ("/v1/chat/completions", {"messages": []}, 400, "model is required"),
]


async def test_error_answers_per_endpoint():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA])
    mesh.add("peer-down", [model("gone:latest")], state=__import__(
        "meshollama.mesh.peertable", fromlist=["PeerState"]).PeerState.DOWN)  # DOWN peers serve nothing
    with trio.fail_after(20):
        async with running_gateway(mesh, max_body_bytes=1000) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            for path, body, expected in NOT_FOUND:
                r = await client.post(path, json=body)
                assert (path, r.status_code, r.json()) == (path, 404, expected)
                ctype = r.headers["content-type"]
                assert ctype.startswith("application/json"), ctype  # not NDJSON even when streaming

            # A model that exists only on a peer we cannot reach now is not "not
            # found" (clients would offer to pull it) but unavailable, naming the peer.
            r = await client.post("/api/generate", json={"model": "gone", "prompt": "x", "stream": False})
            assert r.status_code == 503 and "peer-down (down)" in r.json()["error"], r.text

            for path, body, status, message in MISSING:
                r = await client.post(path, json=body)
                got = r.json()["error"]
                got = got["message"] if isinstance(got, dict) else got
                assert (path, r.status_code, got) == (path, status, message)

            # body null: the "model missing" path, like Ollama
            r = await client.post("/api/chat", content=b"null")
            assert (r.status_code, r.json()) == (400, {"error": "model is required"})

            for body, fragment in [(b"", "missing request body"), (b"{", "invalid JSON"),
                                   (b"[]", "cannot unmarshal array"), (b'{"model": 7}', "of type string"),
                                   (b'{"model":"bad name!"}', "invalid model name")]:
                r = await client.post("/api/chat", content=body)
                assert r.status_code == 400 and fragment in r.json()["error"], (body, r.text)

            r = await client.post("/v1/chat/completions", content=b"{")
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"

            # 413, by Content-Length before reading, and while reading a chunked body
            r = await client.post("/api/chat", content=b"x" * 1001)
            assert r.status_code == 413 and "too large" in r.json()["error"]

            async def chunked():
                for _ in range(20):
                    yield b"x" * 100

            r = await client.post("/api/chat", content=chunked())
            assert r.status_code == 413

            # wrong method on a proxied path
            r = await client.get("/api/chat")
            assert (r.status_code, r.text) == (405, "405 method not allowed")
    assert mesh.upstreams["peer-a"].requests == []  # nothing reached an upstream


# --- disconnects, limits ----------------------------------------------------------


async def test_client_disconnect_mid_stream_cancels_the_upstream():
    mesh = FakeMesh()
    up = mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(body=[b'{"response":"a"}\n', Hang()])))
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as client:
                async with client.stream("POST", "/api/generate", content=gen()) as resp:
                    await resp.aiter_lines().__anext__()
                # leaving the stream early closes the connection
            await up.wait_until(lambda: up.aborted == 1)
            await gw.proxy.wait_idle()
            assert isinstance(up.exits[0], trio.Cancelled)
            assert up.body_closed_early == 1
            assert gw.proxy.in_flight == 0
            assert gw.metric("meshollama_requests_total", endpoint="/api/generate", model="llama3:latest",
                             peer="peer-a", status="499") == 1
            assert gw.metric("meshollama_in_flight_requests") == 0


async def test_client_disconnect_before_the_answer_cancels_the_upstream():
    mesh = FakeMesh()
    up = mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(hang_before_head=True)))
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw:
            async with trio.open_nursery() as nursery:
                async def call():
                    async with httpx.AsyncClient(base_url=gw.url) as client:
                        await client.post("/api/generate", content=gen())

                nursery.start_soon(call)
                await up.wait_until(lambda: len(up.requests) == 1)
                nursery.cancel_scope.cancel()  # the client gives up
            await up.wait_until(lambda: up.aborted == 1)
            await gw.proxy.wait_idle()


async def test_max_concurrent_answers_503():
    mesh = FakeMesh()
    release = trio.Event()
    up = mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(body=[b'{"a":1}\n', Wait(release),
                                                                     b'{"b":2,"done":true}\n'])))
    with trio.fail_after(10):
        async with running_gateway(mesh, max_concurrent=1) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            async with client.stream("POST", "/api/generate", content=gen()) as first:
                lines_in = first.aiter_lines()  # keep a reference: a collected iterator closes the response
                await lines_in.__anext__()
                r = await client.post("/api/generate", content=gen())
                assert r.status_code == 503 and "max_concurrent" in r.json()["error"]
                r = await client.post("/v1/completions", content=gen())
                assert r.status_code == 503 and r.json()["error"]["type"] == "api_error"
                release.set()
                assert [line async for line in lines_in] == ['{"b":2,"done":true}']
            r = await client.post("/api/generate", content=gen())
            assert r.status_code == 200
    assert len(up.requests) == 2


# --- model management: this node's backend ----------------------------------------


async def test_management_goes_to_the_local_backend_streamed():
    mesh = FakeMesh()
    remote = mesh.add("peer-a", [LLAMA])
    release = trio.Event()
    backend = FakeUpstream("backend",
                           Script(body=[b'{"status":"pulling manifest"}\n', Wait(release), b'{"status":"success"}\n']),
                           lambda req: Script(headers=(), body=[]))
    with trio.fail_after(10):
        async with running_gateway(mesh, backend=backend) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            async with client.stream("POST", "/api/pull", content=b'{"model":"qwen"}') as resp:
                assert resp.headers["x-meshollama-peer"] == "peer-self"
                it = resp.aiter_lines()
                assert json.loads(await it.__anext__()) == {"status": "pulling manifest"}
                release.set()
                assert [json.loads(x) async for x in it] == [{"status": "success"}]
            r = await client.request("DELETE", "/api/delete", content=b'{"model":"qwen"}')
            assert (r.status_code, r.content) == (200, b"")
            r = await client.head("/api/blobs/sha256:" + "0" * 64)
            assert r.status_code == 200
            r = await client.post("/api/blobs/sha256:" + "0" * 64, content=b"\x00\x01binary")
            assert r.status_code == 200
            r = await client.put("/api/pull", content=b"{}")
            assert r.status_code == 405
    assert [(q.method, q.path, q.body) for q in backend.requests] == [
        ("POST", "/api/pull", b'{"model":"qwen"}'),
        ("DELETE", "/api/delete", b'{"model":"qwen"}'),
        ("HEAD", "/api/blobs/sha256:" + "0" * 64, b""),
        ("POST", "/api/blobs/sha256:" + "0" * 64, b"\x00\x01binary"),
    ]
    assert remote.requests == []


async def test_management_upstream_errors_are_relayed_or_explicit():
    mesh = FakeMesh()
    backend = FakeUpstream("backend", Script(status=500, headers=JSON, body=[b'{"error":"pull model manifest: x"}']),
                           Script(fail=UpstreamBusy("queue full")))
    with trio.fail_after(10):
        async with running_gateway(mesh, backend=backend) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/pull", content=b'{"model":"x","stream":false}')
            assert (r.status_code, r.json()) == (500, {"error": "pull model manifest: x"})
            r = await client.post("/api/pull", content=b'{"model":"x"}')
            assert r.status_code == 503 and "queue full" in r.json()["error"]
        async with running_gateway(mesh, backend=None) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/copy", content=b'{"source":"a","destination":"b"}')
            assert r.status_code == 502 and "no local backend" in r.json()["error"]


async def test_a_non_streamed_answer_keeps_its_content_length():
    """Framed as the backend framed it (Ollama sends Content-Length for stream:false)."""
    body = b'{"model":"llama3","response":"hi","done":true}'
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(
        headers=JSON + (("content-length", str(len(body))),), body=[body])))
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/generate", content=b'{"model":"llama3","prompt":"x","stream":false}')
            assert r.status_code == 200 and r.content == body
            assert r.headers["content-length"] == str(len(body))
            assert "transfer-encoding" not in r.headers


async def test_a_body_shorter_than_its_content_length_is_an_error_not_a_truncation():
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(
        headers=JSON + (("content-length", "500"),), body=[b'{"model":"llama3",', Break("backend died")])))
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post("/api/generate", content=b'{"model":"llama3","prompt":"x","stream":false}')
            assert (await client.get("/api/version")).status_code == 200  # and the gateway goes on


async def test_router_learns_speed_only_from_streamed_answers_of_warm_models():
    """A non-streamed first byte is the whole generation and a cold one is a model
    load: neither may be taken for the peer's speed (it would bench the peer)."""
    from meshollama import names

    key = names.key("llama3")
    lines = [b'{"response":"a","done":false}\n', b'{"response":"b","done":false}\n', b'{"done":true}\n']
    mesh = FakeMesh()
    mesh.add("warm", [model("llama3:latest", loaded=True)], FakeUpstream("warm", Script(body=lines),
             Script(headers=JSON, body=[b'{"done":true}'])))
    mesh.add("cold", [LLAMA], FakeUpstream("cold", Script(body=lines)))
    with trio.fail_after(10):
        async with running_gateway(mesh, routing="round_robin") as gw, httpx.AsyncClient(base_url=gw.url) as client:
            stats = gw.proxy.stats
            for _ in range(2):  # round robin: one streamed answer from each peer
                assert (await client.post("/api/generate", content=gen())).status_code == 200
            now = trio.current_time()
            assert stats.view("warm", now, key).latency_ewma is not None  # streamed, warm: a speed sample
            assert stats.view("cold", now, key).latency_ewma is None  # cold: a load, not a speed
            assert stats.view("cold", now, key).gap_ewma is not None  # the pace of its tokens still counts
            before = stats.view("warm", now, key).latency_ewma
            peers = []
            for _ in range(2):  # the next turn is cold's, then warm's
                r = await client.post("/api/generate", content=gen(stream=False))
                assert r.status_code == 200
                peers.append(r.headers["x-meshollama-peer"])
            assert peers == ["cold", "warm"]
            assert stats.view("warm", trio.current_time(), key).latency_ewma == before  # non-streamed: nothing
            # cold answered a moment ago, so it is warm now even before a heartbeat says so
            assert stats.view("cold", trio.current_time(), key).latency_ewma is not None


@pytest.mark.parametrize(("body", "message"), [
    (gen(options={"stop": "\n"}), 'option "stop" must be of type array'),
    (gen(options={"temperature": "hot"}), 'option "temperature" must be of type float32'),
    (gen(format="yaml"), 'invalid format: "yaml"; expected "json" or a valid JSON Schema object'),
])
async def test_a_request_that_fails_on_every_peer_is_answered_once_not_retried(body, message):
    """Ollama answers 500 for a bad option type or format: the request's fault,
    so it is answered here with Ollama's text and no peer is asked."""
    mesh = FakeMesh()
    ups = [mesh.add(f"peer-{c}", [LLAMA]) for c in "ab"]
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/generate", content=body)
            missing = await client.post("/api/generate", content=gen("nobody-has-it", options={"stop": "x"}))
    assert (r.status_code, r.json()) == (500, {"error": message})
    assert [u.requests for u in ups] == [[], []]
    assert missing.status_code == 404  # the model is looked up first, as in Ollama


async def test_error_answers_are_logged_with_their_message(caplog):
    mesh = FakeMesh()
    mesh.add("peer-a", [LLAMA], FakeUpstream("a", Script(
        status=400, headers=JSON, body=[b'{"error":"raw mode does not support template, system, or context"}'])))
    caplog.set_level("INFO", logger="meshollama.gateway.proxy")
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            await client.post("/api/generate", content=gen(raw=True, system="x"))
            await client.post("/api/generate", content=gen(options={"stop": "x"}))
            await client.post("/api/generate", content=gen("nobody-has-it"))
            await gw.proxy.wait_idle()
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if "->" in r.getMessage()]
    assert ("INFO", "POST /api/generate llama3:latest -> 400 from peer-a: raw mode does not support template, "
                    "system, or context") in logged
    assert ("WARNING", 'POST /api/generate llama3:latest -> 500: option "stop" must be of type array') in logged
    assert ("INFO", "POST /api/generate - -> 404: model 'nobody-has-it' not found") in logged


async def test_a_client_that_closes_once_it_has_every_declared_byte_is_not_counted_as_gone():
    """A non-streamed answer: the client reads Content-Length bytes and closes
    before the empty last ASGI message goes out; that is a 200, not a 499
    (found in the panel's last-requests table)."""
    from meshollama.gateway.asgi import Responder
    from meshollama.gateway.attempt import Outcome
    from meshollama.gateway.proxy import Proxy

    async def send(message):
        pass

    async def disconnect():
        return {"type": "http.disconnect"}

    for body, gone in ((b"{}", False), (b"{", True)):
        responder = Responder(send)
        await responder.start(200, (("content-type", "application/json"), ("content-length", "2")))
        await responder.body(body)
        out = Outcome(started=0.0)
        with trio.CancelScope() as scope:
            await Proxy._watch_disconnect(disconnect, scope, responder, out)
        assert out.client_gone is gone and scope.cancel_called is gone


async def test_one_model_is_one_label_whatever_its_spelling():
    """Routing ignores case, so metrics must too: each spelling a client
    invents would otherwise be new series (a cardinality bomb)."""
    mesh = FakeMesh()
    mesh.add("peer-a", [model("llama3:latest")])
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            for spelling in ("llama3", "Llama3", "LLAMA3:LATEST", "library/llama3:latest"):
                r = await client.post("/api/generate", json={"model": spelling, "prompt": "x", "stream": False})
                assert r.status_code == 200
            await gw.proxy.wait_idle()
            assert gw.metric("meshollama_requests_total", endpoint="/api/generate", model="llama3:latest",
                             peer="peer-a", status="200") == 4
            models = {s.labels["model"] for m in gw.registry.collect() for s in m.samples if "model" in s.labels}
            assert models == {"llama3:latest"}


async def test_a_client_that_resets_while_the_whole_body_is_being_sent_is_gone():
    """The declared bytes count as delivered only once the server took them: a
    client that resets while a large send blocks is a 499, not a 200."""
    from meshollama.gateway.asgi import Responder
    from meshollama.gateway.attempt import Outcome
    from meshollama.gateway.proxy import Proxy

    sending = trio.Event()

    async def send(message):
        if message["type"] == "http.response.body":
            sending.set()
            await trio.sleep_forever()  # the socket is full: the client stopped reading

    async def disconnect():
        await sending.wait()
        return {"type": "http.disconnect"}

    responder = Responder(send)
    out = Outcome(started=0.0)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await responder.start(200, (("content-length", "4"),))
            nursery.start_soon(responder.body, b"abcd")
            with trio.CancelScope() as scope:
                await Proxy._watch_disconnect(disconnect, scope, responder, out)
            nursery.cancel_scope.cancel()
    assert out.client_gone

"""The gateway app end to end: real Hypercorn, httpx, and the ollama and openai clients."""

from __future__ import annotations

import json
import socket
from contextlib import asynccontextmanager
from functools import partial

import httpx
import ollama
import openai
import pytest
import trio
from prometheus_client import CollectorRegistry

from meshollama.catalog import LoadInfo
from meshollama.errors import PortInUseError
from meshollama.gateway import create_app, serve_gateway
from meshollama.gateway.app import OLLAMA_COMPAT_VERSION
from meshollama.gateway.auth import ANONYMOUS, Authenticator, Caller, Refusal, bearer_token
from meshollama.gateway.cors import CorsPolicy
from meshollama.gateway.keystore import KeyStore
from meshollama.gateway.roles import Role
from meshollama.gateway.server import _is_loopback
from meshollama.mesh.peertable import PeerState

from .fakes import (
    DIGEST_A,
    DIGEST_B,
    NDJSON,
    Break,
    FakeMesh,
    FakeUpstream,
    Script,
    Wait,
    make_config,
    model,
    running_gateway,
)


@asynccontextmanager
async def ollama_client(url: str, **kw):
    client = ollama.AsyncClient(host=url, **kw)
    try:
        yield client
    finally:
        await client.close()


def two_peer_mesh() -> FakeMesh:
    mesh = FakeMesh()
    mesh.add("peer-self", [model("llama3:latest", loaded=True, modified_at="2024-05-01T10:00:00Z"),
                           model("all-minilm:latest", DIGEST_B, modified_at="2024-03-01T10:00:00Z")],
             load=LoadInfo(in_flight=0, capacity=2))
    mesh.add("peer-b", [model("library/llama3", modified_at="2024-05-01T10:00:00Z"),  # same model and digest
                        model("user/tiny:q4", DIGEST_B, modified_at="2024-06-01T10:00:00Z")])
    mesh.add("peer-down", [model("ghost:latest")], state=PeerState.DOWN)
    return mesh


# --- plain routes ---------------------------------------------------------------


async def test_root_version_404_405():
    with trio.fail_after(10):
        async with running_gateway(FakeMesh()) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.get("/")
            assert (r.status_code, r.text) == (200, "Ollama is running")
            assert r.headers["content-type"].startswith("text/plain")
            r = await client.head("/")
            assert (r.status_code, r.content) == (200, b"")

            r = await client.get("/api/version")
            assert r.status_code == 200 and r.headers["content-type"] == "application/json; charset=utf-8"
            assert r.json() == {"version": OLLAMA_COMPAT_VERSION}
            assert tuple(map(int, OLLAMA_COMPAT_VERSION.split("."))) >= (0, 14, 0)  # /v1/messages
            assert (await client.head("/api/version")).status_code == 200
            assert (await client.head("/api/tags")).status_code == 200

            # Unknown routes: 404 with a JSON error the route's clients can show
            # (plain text gave openai's SDK a NotFoundError with no message).
            for path in ("/api/does-not-exist", "/nope"):
                r = await client.get(path)
                assert (r.status_code, r.json()) == (404, {"error": "404 page not found"}), path
            r = await client.get("/v1/models/user/m:tag")
            assert r.status_code == 404 and r.json()["error"]["message"] == "404 page not found"
            r = await client.post("/v1/messages/batches", json={})
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
            for method, path in [("GET", "/api/chat"), ("GET", "/api/show"), ("POST", "/api/tags"),
                                 ("DELETE", "/api/version"), ("GET", "/api/delete"), ("POST", "/v1/models")]:
                r = await client.request(method, path)
                assert (r.status_code, r.text) == (405, "405 method not allowed"), (method, path)
            # no server banner, Ollama sends none
            assert "server" not in r.headers


async def test_listings_over_http():
    mesh = two_peer_mesh()
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            tags = (await client.get("/api/tags")).json()["models"]
            assert [(t["name"], t["digest"]) for t in tags] == [
                ("user/tiny:q4", DIGEST_B), ("llama3:latest", DIGEST_A), ("all-minilm:latest", DIGEST_B)]
            assert all(t["name"] == t["model"] for t in tags)

            ps = (await client.get("/api/ps")).json()["models"]
            assert [p["name"] for p in ps] == ["llama3:latest"]

            models = (await client.get("/v1/models")).json()
            assert [m["id"] for m in models["data"]] == ["user/tiny:q4", "llama3:latest", "all-minilm:latest"]
            r = await client.get("/v1/models/LLAMA3")
            assert r.json()["id"] == "LLAMA3" and r.json()["object"] == "model"
            r = await client.get("/v1/models/ghost")  # only a DOWN peer has it
            assert r.status_code == 404
            assert r.json() == {"error": {"message": "model 'ghost:latest' not found", "type": "not_found_error",
                                          "param": None, "code": None}}

            peers = (await client.get("/api/mesh/peers")).json()
            assert [(p["peer_id"], p["state"], p["is_self"]) for p in peers] == [
                ("peer-b", "alive", False), ("peer-down", "down", False), ("peer-self", "alive", True)]
            status = (await client.get("/api/mesh/status")).json()
            assert status["self_id"] == "peer-self"
            assert status["peers"] == {"total": 3, "alive": 2, "draining": 0, "down": 1, "unreachable": 0}
            assert status["models"] == 3
            assert status["mesh"] == {"listen_addrs": ["/ip4/127.0.0.1/tcp/4001"], "queue": {}, "gateway_in_flight": 0}


async def test_tags_empty_mesh_is_an_empty_list():
    with trio.fail_after(10):
        async with running_gateway(FakeMesh()) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            assert (await client.get("/api/tags")).json() == {"models": []}
            assert (await client.get("/api/ps")).json() == {"models": []}
            assert (await client.get("/v1/models")).json() == {"object": "list", "data": []}


async def test_metrics_endpoint():
    mesh = two_peer_mesh()
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            await client.post("/api/generate", json={"model": "llama3", "stream": False})
            await gw.proxy.wait_idle()
            r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'meshollama_requests_total{endpoint="/api/generate",model="llama3:latest"' in r.text
    assert "meshollama_in_flight_requests 0.0" in r.text


class BrokenMesh(FakeMesh):
    def snapshot(self):
        raise RuntimeError("peer table exploded")


async def test_unexpected_errors_answer_500_and_the_app_keeps_serving(caplog):
    with trio.fail_after(10):
        async with running_gateway(BrokenMesh()) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.get("/api/tags")
            assert (r.status_code, r.json()) == (500, {"error": "internal error (RuntimeError)"})
            r = await client.post("/api/chat", json={"model": "llama3"})
            assert (r.status_code, r.json()) == (500, {"error": "internal error (RuntimeError)"})
            r = await client.post("/v1/chat/completions", json={"model": "llama3"})
            assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"
            assert (await client.get("/")).status_code == 200
    assert "peer table exploded" in caplog.text


def test_two_apps_share_nothing():
    # Metrics live on the registry passed in: two nodes in one process do not collide.
    create_app(make_config(), FakeMesh(), None, CollectorRegistry())
    create_app(make_config(), FakeMesh(), None, CollectorRegistry())


# --- API keys -------------------------------------------------------------------


def test_config_api_keys_are_admin_keys():
    auth = Authenticator(KeyStore(None, ["k1", "k2"]))
    assert auth.configured and not Authenticator(KeyStore(None, [])).configured
    assert auth.authenticate("Bearer k2", 0) == Caller(Role.ADMIN, "config", "config-2", "config-2")
    assert auth.authenticate("bearer  k1 ", 0).role is Role.ADMIN
    for bad in ("Bearer k3", "Basic k1", None, "Bearer "):
        assert isinstance(auth.authenticate(bad, 0), Refusal), bad
    assert bearer_token("Bearer x y") == "x y"
    assert Authenticator(KeyStore(None, [])).authenticate(None, 0) is ANONYMOUS


async def test_api_keys_over_http_and_not_forwarded():
    mesh = two_peer_mesh()
    with trio.fail_after(10):
        async with running_gateway(mesh, api_keys=("k1", "k2")) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.get("/api/tags")
            assert (r.status_code, r.json()) == (401, {"error": "unauthorized"})
            assert r.headers["www-authenticate"] == "Bearer"
            r = await client.get("/v1/models", headers={"authorization": "Bearer wrong"})
            assert r.status_code == 401
            assert r.json() == {"error": {"message": "unauthorized", "type": "api_error", "param": None, "code": None}}
            r = await client.post("/api/chat", json={"model": "llama3"})
            assert r.status_code == 401
            for method, path in [("GET", "/"), ("HEAD", "/"), ("GET", "/metrics")]:
                assert (await client.request(method, path)).status_code == 200, path
            auth = {"authorization": "Bearer k2"}
            assert (await client.get("/api/tags", headers=auth)).status_code == 200
            r = await client.post("/api/generate", headers=auth, json={"model": "llama3", "stream": False})
            assert r.status_code == 200
    (req,) = mesh.upstreams[r.headers["x-meshollama-peer"]].requests
    assert "authorization" not in dict(req.headers)


async def test_client_credentials_stay_at_an_open_gateway_too():
    """Whatever a client sends this gateway is for it, not for the peer that happens to answer."""
    mesh = two_peer_mesh()
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/generate", headers={"authorization": "Bearer theirs", "cookie": "s=1",
                                                            "proxy-authorization": "Basic eA=="},
                                  json={"model": "llama3", "stream": False})
            assert r.status_code == 200
    (req,) = mesh.upstreams[r.headers["x-meshollama-peer"]].requests
    assert not {"authorization", "cookie", "proxy-authorization"} & {k.lower() for k, _ in req.headers}


# --- CORS -----------------------------------------------------------------------


def test_cors_policy_pure():
    p = CorsPolicy(["https://app.example.com", "https://*.corp.example"])
    for ok in ["http://localhost", "http://localhost:3000", "https://127.0.0.1:8443", "http://0.0.0.0:1",
               "app://obsidian.md", "tauri://localhost", "vscode-webview://abc", "file://",
               "https://app.example.com", "https://x.corp.example"]:
        assert p.allowed(ok), ok
    for bad in ["https://evil.example", "http://localhost.evil.example", "null", "https://app.example.com.evil"]:
        assert not p.allowed(bad), bad
    assert CorsPolicy(["*"]).allowed("https://anything")
    assert CorsPolicy.same_origin("http://gw.local:11434", "gw.local:11434")


async def test_cors_over_http():
    mesh = two_peer_mesh()
    with trio.fail_after(10):
        async with running_gateway(mesh, cors_origins=("https://app.example.com",)) as gw, \
                httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.get("/api/tags", headers={"origin": "https://evil.example"})
            assert (r.status_code, r.content) == (403, b"")
            r = await client.post("/api/chat", headers={"origin": "https://evil.example"}, json={"model": "llama3"})
            assert (r.status_code, r.content) == (403, b"")

            r = await client.get("/api/tags", headers={"origin": "http://localhost:3000"})
            assert r.status_code == 200
            assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
            r = await client.post("/api/generate", headers={"origin": "https://app.example.com"},
                                  json={"model": "llama3", "stream": False})
            assert r.status_code == 200
            assert r.headers["access-control-allow-origin"] == "https://app.example.com"
            # The allowed page may read which peer answered (and the trace id).
            assert "x-meshollama-peer" in r.headers["access-control-expose-headers"].lower()
            assert r.headers["x-meshollama-peer"]

            r = await client.options("/api/chat", headers={
                "origin": "http://localhost:3000", "access-control-request-method": "POST",
                "access-control-request-headers": "content-type, x-stainless-os"})
            assert (r.status_code, r.content) == (204, b"")
            assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
            assert "POST" in r.headers["access-control-allow-methods"]
            assert "x-stainless-os" in r.headers["access-control-allow-headers"]

            host = gw.url.removeprefix("http://")
            r = await client.get("/api/tags", headers={"origin": f"http://{host}"})  # same origin
            assert r.status_code == 200


# --- the ollama python client ---------------------------------------------------


async def test_ollama_python_client():
    mesh = two_peer_mesh()
    with trio.fail_after(20):
        async with running_gateway(mesh) as gw, ollama_client(gw.url) as client:
            r = await client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
            assert r.message.content == "Hello" and r.model == "llama3"
            parts = [p async for p in await client.chat(model="llama3", messages=[], stream=True)]
            assert "".join(p.message.content for p in parts) == "Hello" and parts[-1].done
            r = await client.generate(model="llama3", prompt="hi")
            assert r.response == "Hello"
            parts = [p async for p in await client.generate(model="llama3", prompt="hi", stream=True)]
            assert "".join(p.response for p in parts) == "Hello"
            r = await client.embed(model="all-minilm", input=["a", "b"])
            assert len(r.embeddings) == 2
            r = await client.embeddings(model="all-minilm", prompt="a")
            assert list(r.embedding) == [1.5, 2.5]
            listed = await client.list()
            assert {m.model for m in listed.models} == {"llama3:latest", "all-minilm:latest", "user/tiny:q4"}
            assert all(m.digest and m.modified_at and m.details for m in listed.models)
            running = await client.ps()
            assert [m.model for m in running.models] == ["llama3:latest"]
            assert running.models[0].expires_at is not None
            shown = await client.show("llama3")
            assert shown.capabilities == ["completion"]
            with pytest.raises(ollama.ResponseError) as err:
                await client.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
            assert err.value.status_code == 404 and "not found" in err.value.error
            with pytest.raises(ollama.ResponseError) as err:
                await client.show("nope")
            assert err.value.status_code == 404


async def test_ollama_python_sync_client_in_a_thread():
    mesh = two_peer_mesh()
    with trio.fail_after(20):
        async with running_gateway(mesh) as gw:

            def calls():
                client = ollama.Client(host=gw.url)
                try:
                    out = [client.generate(model="llama3", prompt="x").response]
                    out += ["".join(p.message.content for p in client.chat(model="llama3", messages=[], stream=True))]
                finally:
                    client.close()
                return out

            assert await trio.to_thread.run_sync(calls) == ["Hello", "Hello"]


async def test_ollama_python_sees_errors_as_response_errors():
    mesh = FakeMesh()
    mesh.add("peer-a", [model("llama3:latest")], FakeUpstream("a", Script(
        headers=NDJSON, body=[b'{"model":"llama3","created_at":"2024-05-01T10:00:00Z","response":"x","done":false}\n',
                              Break("boom")])))
    mesh.add("peer-b", [model("busy:latest")], FakeUpstream("b", Script(
        status=503, headers=(("content-type", "application/json; charset=utf-8"),),
        body=[b'{"error":"server busy, please try again.  maximum pending requests exceeded"}'])))
    with trio.fail_after(20):
        async with running_gateway(mesh) as gw, ollama_client(gw.url) as client:
            with pytest.raises(ollama.ResponseError) as err:
                async for _ in await client.generate(model="llama3", prompt="x", stream=True):
                    pass
            assert "boom" in err.value.error and err.value.status_code == -1
            with pytest.raises(ollama.ResponseError) as err:
                await client.generate(model="busy", prompt="x")
            assert err.value.status_code == 503 and "server busy" in err.value.error


async def test_ollama_python_with_api_key():
    mesh = two_peer_mesh()
    with trio.fail_after(20):
        async with running_gateway(mesh, api_keys=("s3cret",)) as gw:
            async with ollama_client(gw.url, headers={"Authorization": "Bearer s3cret"}) as client:
                assert (await client.generate(model="llama3", prompt="x")).response == "Hello"
            async with ollama_client(gw.url) as client:
                with pytest.raises(ollama.ResponseError) as err:
                    await client.list()
            assert err.value.status_code == 401


# --- the openai python client ---------------------------------------------------


async def test_openai_python_client():
    mesh = two_peer_mesh()
    with trio.fail_after(20):
        async with running_gateway(mesh, api_keys=("sk-mesh",)) as gw:
            async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-mesh", max_retries=0) as client:
                r = await client.chat.completions.create(model="llama3", messages=[{"role": "user", "content": "hi"}])
                assert r.choices[0].message.content == "Hello" and r.usage.total_tokens == 5
                stream = await client.chat.completions.create(
                    model="llama3", messages=[{"role": "user", "content": "hi"}], stream=True)
                chunks = [c async for c in stream]
                assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello"
                assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
                r = await client.completions.create(model="llama3", prompt="hi")
                assert r.choices[0].text == "Hello"
                r = await client.embeddings.create(model="all-minilm", input=["a", "b"])
                assert [d.index for d in r.data] == [0, 1]
                listed = [m.id async for m in client.models.list()]
                assert listed == ["user/tiny:q4", "llama3:latest", "all-minilm:latest"]
                assert (await client.models.retrieve("llama3")).id == "llama3"
                with pytest.raises(openai.NotFoundError):
                    await client.models.retrieve("nope")
                with pytest.raises(openai.NotFoundError) as err:
                    await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
                assert "not found" in str(err.value)
            async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="wrong", max_retries=0) as client:
                with pytest.raises(openai.AuthenticationError):
                    await client.models.list()
    # the key stayed at the gateway
    for up in mesh.upstreams.values():
        assert all("authorization" not in dict(q.headers) for q in up.requests)


async def test_openai_stream_broken_mid_way_raises():
    mesh = FakeMesh()
    mesh.add("peer-a", [model("llama3:latest")], FakeUpstream("a", Script(
        headers=(("content-type", "text/event-stream"),),
        body=[b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"llama3",'
              b'"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\n', Break("peer lost")])))
    with trio.fail_after(20):
        async with running_gateway(mesh) as gw:
            async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0) as client:
                stream = await client.chat.completions.create(
                    model="llama3", messages=[{"role": "user", "content": "hi"}], stream=True)
                with pytest.raises(openai.APIError, match="peer lost"):
                    async for _ in stream:
                        pass


# --- serving --------------------------------------------------------------------


def test_is_loopback():
    assert _is_loopback("127.0.0.1") and _is_loopback("[::1]") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("10.0.0.2") and not _is_loopback("example.com")


async def test_port_in_use():
    app = create_app(make_config(), FakeMesh(), None, CollectorRegistry())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with trio.fail_after(10):
            with pytest.raises(PortInUseError, match=f"127.0.0.1:{port}: address already in use"):
                await serve_gateway(app, f"127.0.0.1:{port}")


async def test_graceful_shutdown_lets_in_flight_streams_finish():
    release = trio.Event()
    mesh = FakeMesh()
    up = mesh.add("peer-a", [model("llama3:latest")], FakeUpstream("a", Script(
        body=[b'{"a":1}\n', Wait(release), b'{"b":2,"done":true}\n'])))
    app = create_app(make_config(), mesh, None, CollectorRegistry())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = trio.CancelScope()

            async def run(task_status=trio.TASK_STATUS_IGNORED):
                with server:
                    await serve_gateway(app, "127.0.0.1:0", task_status=task_status, grace_period=5)

            bound = await nursery.start(run)
            async with httpx.AsyncClient(base_url=f"http://{bound}") as client:
                async with client.stream("POST", "/api/generate", json={"model": "llama3"}) as resp:
                    it = resp.aiter_lines()
                    assert json.loads(await it.__anext__()) == {"a": 1}
                    server.cancel()  # shut down with a stream in flight
                    async with httpx.AsyncClient() as other:
                        with pytest.raises(httpx.ConnectError):  # the listener closes at once
                            await other.get(f"http://{bound}/")
                    release.set()
                    assert [json.loads(line) async for line in it] == [{"b": 2, "done": True}]
    assert up.exits == [None]


@pytest.mark.parametrize("path", ["/", "/api/tags", "/api/nope", "/api/chat"])
async def test_idle_keep_alive_connections_do_not_hold_shutdown(path):
    # Regression: Quart-Trio's cancellation used to leave served keep-alive
    # connections without their idle timer, so shutdown waited out the grace period.
    app = create_app(make_config(), FakeMesh(), None, CollectorRegistry())
    async with httpx.AsyncClient() as client:
        with trio.fail_after(5):  # well below the grace period
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(partial(serve_gateway, app, "127.0.0.1:0", grace_period=10))
                await client.post(f"http://{bound}{path}", json={"model": "x"})
                nursery.cancel_scope.cancel()


async def test_shutdown_deadline_cancels_stuck_streams():
    mesh = FakeMesh()
    up = mesh.add("peer-a", [model("llama3:latest")], FakeUpstream("a", Script(
        body=[b'{"a":1}\n', Wait(trio.Event())])))  # never released
    app = create_app(make_config(), mesh, None, CollectorRegistry())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(partial(serve_gateway, app, "127.0.0.1:0", grace_period=0.2))
            async with httpx.AsyncClient(base_url=f"http://{bound}") as client:
                async with client.stream("POST", "/api/generate", json={"model": "llama3"}) as resp:
                    it = resp.aiter_lines()
                    await it.__anext__()
                    nursery.cancel_scope.cancel()
                    with pytest.raises(httpx.RemoteProtocolError):
                        async for _ in it:
                            pass
    assert up.aborted == 1

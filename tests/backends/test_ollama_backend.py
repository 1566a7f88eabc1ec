"""OllamaBackend against the in-process fake Ollama (and its pure parts without one)."""

from __future__ import annotations

import json
import logging
import socket
from contextlib import asynccontextmanager
from functools import partial

import httpx
import pytest
import trio

from meshollama import names
from meshollama.backends.base import Backend
from meshollama.catalog import LoadInfo
from meshollama.backends.ollama import (
    OllamaBackend,
    loaded_keys,
    loaded_state,
    parse_models,
    request_model,
    split_url,
)
from meshollama.errors import ConfigError, UpstreamBroken, UpstreamUnavailable
from meshollama.httpmsg import ProxyRequest, header

from tests.fakes.fake_ollama import FakeOllama, serve_fake

MODELS = ("llama3", "library/mistral:7b", "user/custom:v1", "nomic-embed-text")
SHORT = {"llama3:latest", "mistral:7b", "user/custom:v1", "nomic-embed-text:latest"}


def post(path: str, body: dict, *headers: tuple[str, str]) -> ProxyRequest:
    return ProxyRequest("POST", path, (("Content-Type", "application/json"), *headers), json.dumps(body).encode())


def names_of(backend: OllamaBackend) -> set[str]:
    return {m.name for m in backend.models()}


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def running(models=MODELS, *, token_delay: float = 0.01, tokens: int = 8, **backend_kw):
    """A fake Ollama plus a serving backend in front of it."""
    backend_kw.setdefault("refresh_interval", 3600)  # tests drive refreshes themselves
    async with trio.open_nursery() as nursery:
        fake: FakeOllama = await nursery.start(
            partial(serve_fake, models, name="node-a", token_delay=token_delay, tokens=tokens)
        )
        backend = OllamaBackend(fake.url, **backend_kw)
        await nursery.start(backend.serve)
        yield fake, backend
        nursery.cancel_scope.cancel()


# --- pure parts --------------------------------------------------------------


@pytest.mark.parametrize(
    "url, base, host",
    [
        ("http://127.0.0.1:11435", "http://127.0.0.1:11435", "127.0.0.1:11435"),
        ("127.0.0.1:11434/", "http://127.0.0.1:11434", "127.0.0.1:11434"),
        ("http://localhost", "http://localhost:80", "localhost:80"),
        ("https://gpu.lan/ollama/", "https://gpu.lan:443/ollama", "gpu.lan:443"),
        ("http://[::1]:11434", "http://[::1]:11434", "[::1]:11434"),
    ],
)
def test_split_url(url, base, host):
    assert split_url(url) == (base, host)


@pytest.mark.parametrize("url", ["ftp://x:1", "http://", "http://h:notaport"])
def test_split_url_rejects(url):
    with pytest.raises(ConfigError) as err:
        split_url(url)
    assert err.value.key == "ollama.url"


def test_parse_models_normalises_and_skips_junk():
    digest = "ab" * 32
    tags = {
        "models": [
            {"name": "llama3:latest", "model": "llama3:latest", "digest": digest, "size": 5,
             "details": {"family": "llama"}},
            {"model": "registry.ollama.ai/library/Mistral", "digest": f"sha256:{digest}",
             "modified_at": "2024-01-01T00:00:00Z"},
            {"model": "user/custom:v1", "size": -3, "capabilities": ["completion", 7]},
            {"model": "LLAMA3"},  # same model again: kept once
            {"model": "bad name!"},
            "not an object",
            {"size": 1},
        ]
    }
    ps = {"models": [{"model": "Mistral:latest"}, {"name": "ghost:latest"}]}
    models = parse_models(tags, loaded_keys(ps))
    assert [m.name for m in models] == ["llama3:latest", "Mistral:latest", "user/custom:v1"]
    llama, mistral, custom = models
    assert llama.digest == digest and llama.size == 5 and dict(llama.details) == {"family": "llama"}
    assert not llama.loaded and mistral.loaded
    assert mistral.digest == digest and mistral.modified_at == "2024-01-01T00:00:00Z"
    assert custom.size == 0 and custom.capabilities == ("completion",)


@pytest.mark.parametrize("doc", [None, [], {"models": None}, {"models": "x"}, {}])
def test_parse_models_tolerates_odd_documents(doc):
    assert parse_models(doc) == ()
    assert loaded_keys(doc) == frozenset()


@pytest.mark.parametrize(
    "body, model",
    [
        (b'{"model":"llama3","prompt":"hi"}', "llama3:latest"),
        (b'{"name":"library/qwen:0.5b"}', "qwen:0.5b"),
        (b'{"prompt":"no model"}', None),
        (b"[1,2]", None),
        (b"{not json", None),
        (b"", None),
    ],
)
def test_request_model(body, model):
    assert request_model(ProxyRequest("POST", "/api/generate", (), body)) == model


def test_is_a_backend():
    assert isinstance(OllamaBackend("http://127.0.0.1:1"), Backend)


# --- against the fake --------------------------------------------------------


async def test_models_listed_with_normalised_names():
    with trio.fail_after(10):
        async with running() as (fake, backend):
            assert backend.up is True
            assert names_of(backend) == SHORT
            for m in backend.models():
                assert len(m.digest) == 64 and int(m.digest, 16) >= 0
                assert m.size > 0 and m.modified_at and m.details["format"] == "gguf"
                assert not m.loaded
            # A generation loads the model; a poll right after it says so (the timer is an hour).
            async with backend.open(post("/api/generate", {"model": "llama3", "prompt": "x", "stream": False})) as r:
                await r.read_all()
            while {m.name for m in backend.models() if m.loaded} != {"llama3:latest"}:
                await backend.changed().wait()


async def test_stream_passes_through_incrementally():
    with trio.fail_after(10):
        async with running(token_delay=0.05, tokens=6) as (fake, backend):
            request = post("/api/generate", {"model": "llama3", "prompt": "hi"})
            async with backend.open(request) as response:
                assert response.status == 200
                assert header(response.headers, "content-type") == "application/x-ndjson"
                assert header(response.headers, "transfer-encoding") is None
                chunks = []
                async for chunk in response.body:
                    if not chunks:
                        # The first line is here while the fake still generates.
                        assert fake.active == 1
                    chunks.append(chunk)
            body = b"".join(chunks)
            lines = body.split(b"\n")
            assert lines[-1] == b"" and all(lines[:-1])  # NDJSON, no chunk framing left in it
            objs = [json.loads(line) for line in lines[:-1]]
            assert "".join(o["response"] for o in objs).startswith("hello from node-a")
            assert [o["done"] for o in objs] == [False] * 6 + [True]
            assert len(chunks) > 1


async def test_bytes_unchanged_and_no_gzip():
    with trio.fail_after(10):
        async with running() as (fake, backend):
            async with httpx.AsyncClient() as client:
                direct = (await client.get(fake.url + "/api/tags")).content
            request = ProxyRequest("GET", "/api/tags", (("Accept-Encoding", "gzip, br"),))
            async with backend.open(request) as response:
                assert await response.read_all() == direct
            assert fake.requests[-1].header("accept-encoding") == "identity"


async def test_host_rewritten_hop_by_hop_dropped_rest_kept():
    with trio.fail_after(10):
        async with running() as (fake, backend):
            request = post(
                "/api/chat",
                {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False},
                ("Host", "api.example.com"),
                ("Connection", "keep-alive, x-secret"),
                ("Keep-Alive", "timeout=5"),
                ("User-Agent", "ollama-python/0.6.3 (x86_64 linux) Python/3.11.7"),
                ("X-Custom", "1"),
                ("X-Secret", "named in Connection, so hop-by-hop"),
            )
            async with backend.open(request) as response:
                assert response.status == 200  # not Ollama's 403 for a foreign Host
                reply = json.loads(await response.read_all())
            assert reply["message"]["content"].startswith("hello from node-a")
            seen = fake.requests[-1]
            assert seen.header("host") == backend.host_header == f"127.0.0.1:{fake.port}"
            assert seen.header("user-agent") == "ollama-python/0.6.3 (x86_64 linux) Python/3.11.7"
            assert seen.header("x-custom") == "1"
            assert seen.header("keep-alive") is None and seen.header("x-secret") is None
            assert seen.header("connection") in (None, "keep-alive")  # never the caller's value
            assert seen.json()["model"] == "llama3"


async def test_error_status_and_body_pass_through():
    with trio.fail_after(10):
        async with running() as (fake, backend):
            async with backend.open(post("/api/generate", {"model": "nope", "prompt": "x"})) as response:
                assert response.status == 404
                assert header(response.headers, "content-type") == "application/json; charset=utf-8"
                assert json.loads(await response.read_all()) == {"error": "model 'nope' not found"}
            busy = {"error": "server busy, please try again.  maximum pending requests exceeded"}
            fake.set(fail_before_first_byte={"status": 503, "body": busy}, fault_count=1)
            async with backend.open(post("/api/generate", {"model": "llama3", "prompt": "x"})) as response:
                assert response.status == 503  # a response, not UpstreamBusy: the body is Ollama's
                assert json.loads(await response.read_all()) == busy


async def test_delete_forwards_its_body():
    with trio.fail_after(10):
        async with running() as (fake, backend):
            request = ProxyRequest("DELETE", "/api/delete", (), b'{"model":"mistral:7b"}')
            async with backend.open(request) as response:
                assert response.status == 200
                assert await response.read_all() == b""
            with trio.fail_after(5):
                while "mistral:7b" in names_of(backend):
                    await backend.changed().wait()


async def test_pull_shows_new_model_without_waiting_for_the_timer():
    with trio.fail_after(10):
        async with running() as (fake, backend):
            assert "qwen2.5:0.5b" not in names_of(backend)
            async with backend.open(post("/api/pull", {"model": "qwen2.5:0.5b"})) as response:
                lines = (await response.read_all()).splitlines()
            assert json.loads(lines[-1]) == {"status": "success"}
            # refresh_interval is an hour: only the post-pull refresh can do this.
            while "qwen2.5:0.5b" not in names_of(backend):
                await backend.changed().wait()


async def test_leaving_early_aborts_the_upstream_stream():
    with trio.fail_after(10):
        async with running(token_delay=0.05, tokens=1000) as (fake, backend):
            async with backend.open(post("/api/generate", {"model": "llama3", "prompt": "x"})) as response:
                async for _ in response.body:
                    break
                assert backend.load().in_flight == 1
            assert backend.load().in_flight == 0
            await fake.wait_for(lambda: fake.aborted == 1)
            assert fake.requests[-1].outcome == "aborted"


async def test_cancellation_aborts_the_upstream_stream():
    with trio.fail_after(10):
        async with running(token_delay=0.05, tokens=1000) as (fake, backend):
            chat = post("/api/chat", {"model": "llama3", "messages": [{"role": "user", "content": "x"}]})
            with trio.move_on_after(0.3):
                async with backend.open(chat) as r:
                    async for _ in r.body:
                        pass
            await fake.wait_for(lambda: fake.aborted == 1)
            assert backend.load().in_flight == 0


async def test_broken_stream_raises_upstream_broken():
    with trio.fail_after(10):
        async with running() as (fake, backend):
            fake.set(fail_after_n_chunks={"n": 2, "mode": "close"})
            got = []
            with pytest.raises(UpstreamBroken):
                async with backend.open(post("/api/generate", {"model": "llama3", "prompt": "x"})) as response:
                    async for chunk in response.body:
                        got.append(chunk)
            assert b"".join(got).count(b"\n") == 2
            # An error *line* is Ollama's normal mid-stream failure: passed through, not raised.
            fake.set(fail_after_n_chunks={"n": 2, "mode": "error", "error": "boom"})
            async with backend.open(post("/api/generate", {"model": "llama3", "prompt": "x"})) as response:
                lines = (await response.read_all()).splitlines()
            assert len(lines) == 3 and json.loads(lines[-1]) == {"error": "boom"}


async def test_load_and_per_model_counts():
    with trio.fail_after(10):
        async with running(token_delay=0.05, tokens=1000, num_parallel=2) as (fake, backend):
            assert backend.load() == LoadInfo(in_flight=0, capacity=2, queued=0)
            request = post("/api/generate", {"model": "llama3", "prompt": "x"})
            event = backend.changed()
            async with backend.open(request):
                assert not event.is_set()  # a free slot taken: not worth a heartbeat of its own
                async with backend.open(request):
                    assert event.is_set()  # full
                    event = backend.changed()
                    async with backend.open(request):
                        assert event.is_set()  # queueing
                        assert backend.load() == LoadInfo(in_flight=2, capacity=2, queued=1)  # 3: 2 run, 1 waits
                        assert backend.in_flight_by_model() == {"llama3:latest": 3}
                        event = backend.changed()
                    assert event.is_set()  # draining
            assert backend.load().in_flight == 0 and backend.in_flight_by_model() == {}


async def test_down_then_back(caplog):
    caplog.set_level(logging.INFO, logger="meshollama.backend.ollama")
    with trio.fail_after(15):
        async with trio.open_nursery() as outer:
            fake_scope = trio.CancelScope()

            async def run_fake(port, *, task_status):
                with fake_scope:
                    await serve_fake(MODELS, port, name="node-a", task_status=task_status)

            fake = await outer.start(run_fake, 0)
            backend = OllamaBackend(fake.url, refresh_interval=3600, probe_timeout=0.5)
            await outer.start(backend.serve)
            assert names_of(backend) == SHORT

            fake_scope.cancel()  # Ollama goes away: connections refused
            gone = backend.changed()
            assert await backend.refresh() is False
            assert gone.is_set() and backend.models() == () and backend.up is False
            assert await backend.refresh() is False  # still down: no second log line
            with pytest.raises(UpstreamUnavailable):
                async with backend.open(post("/api/generate", {"model": "llama3", "prompt": "x"})):
                    pass  # pragma: no cover
            assert backend.load().in_flight == 0

            fake_scope = trio.CancelScope()
            await outer.start(run_fake, fake.port)  # back on the same port
            assert await backend.refresh() is True
            assert names_of(backend) == SHORT and backend.up is True
            outer.cancel_scope.cancel()

    messages = [r.getMessage() for r in caplog.records if r.name == "meshollama.backend.ollama"]
    assert sum("unreachable" in m for m in messages) == 1
    assert sum("is up" in m for m in messages) == 2


async def test_timer_polls_and_recovers():
    port = free_port()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            backend = OllamaBackend(f"http://127.0.0.1:{port}", refresh_interval=0.05, probe_timeout=0.5)
            await nursery.start(backend.serve)  # starts even though nothing listens
            assert backend.up is False and backend.models() == ()
            await nursery.start(partial(serve_fake, MODELS, port, name="late"))
            while names_of(backend) != SHORT:
                await backend.changed().wait()
            nursery.cancel_scope.cancel()


async def test_unreachable_open_raises_unavailable():
    backend = OllamaBackend(f"http://127.0.0.1:{free_port()}")
    try:
        with trio.fail_after(5):
            with pytest.raises(UpstreamUnavailable) as err:
                async with backend.open(ProxyRequest("GET", "/api/tags")):
                    pass  # pragma: no cover
            assert err.value.retryable
    finally:
        await backend.aclose()


async def test_slow_ps_keeps_last_loaded_state():
    with trio.fail_after(10):
        async with running(probe_timeout=0.2) as (fake, backend):
            async with backend.open(post("/api/embed", {"model": "nomic-embed-text", "input": "a"})) as r:
                await r.read_all()
            await backend.refresh()
            assert {m.name for m in backend.models() if m.loaded} == {"nomic-embed-text:latest"}
            fake.set(hang_before_first_byte=True, fault_paths=["/api/ps"])
            assert await backend.refresh() is True  # /api/ps timed out; /api/tags answered
            assert {m.name for m in backend.models() if m.loaded} == {"nomic-embed-text:latest"}
            fake.clear_faults()


def test_running_facts_from_ps_reach_the_announced_details():
    tags = {"models": [{"name": "llama3:latest", "digest": "sha256:" + "a" * 64, "size": 10,
                        "details": {"family": "llama"}},
                       {"name": "qwen:7b", "digest": "b" * 64, "size": 20}]}
    ps = {"models": [{"model": "llama3:latest", "expires_at": "2318-08-01T00:00:00Z", "size_vram": 9,
                      "context_length": 4096, "size": "junk"}]}
    state = loaded_state(ps)
    assert state == {names.key("llama3"): {"expires_at": "2318-08-01T00:00:00Z", "size_vram": 9,
                                          "context_length": 4096}}
    llama, qwen = parse_models(tags, state)
    assert llama.loaded and dict(llama.details) == {"family": "llama", "expires_at": "2318-08-01T00:00:00Z",
                                                    "size_vram": 9, "context_length": 4096}
    assert not qwen.loaded and dict(qwen.details) == {}
    assert loaded_keys(ps) == frozenset(state)

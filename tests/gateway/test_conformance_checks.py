"""The conformance checks of ``shared/reference/ollama-api.md`` §7, through the real gateway.

Each test runs the gateway app on Hypercorn (127.0.0.1, port 0) over a
one-node mesh whose only peer is this node's :class:`OllamaBackend`, itself in
front of the stand-in Ollama (``tests/fakes/fake_ollama.py``) on another
OS-chosen port. A request therefore crosses the code a real node runs:
validation, routing, the proxy engine, the backend's httpx client, and an
Ollama-shaped server that answers with Ollama's statuses, texts and framing.

Every docstring quotes the §7 check it automates. Checks already covered by
other tests, and the ones a proxy cannot be held to, are listed with their
reasons in ``docs/conformance.md``.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import ollama
import pytest
import trio

from meshollama.backends.ollama import OllamaBackend
from meshollama.errors import UpstreamUnavailable
from meshollama.gateway.listings import parse_time
from meshollama.mesh.peertable import PeerState, PeerView, Snapshot
from tests.fakes.fake_ollama import FakeOllama, serve_fake

from .fakes import Running, running_gateway

CHAT = "llama3"  # a chat model without tools or thinking
EMB = "all-minilm"  # an embedding model
SELF = "peer-self"
NDJSON = "application/x-ndjson"
JSON_UTF8 = "application/json; charset=utf-8"
HEX64 = re.compile(r"[0-9a-f]{64}\Z")
METRICS = ("total_duration", "load_duration", "eval_count", "eval_duration")


class BackendMesh:
    """A one-node MeshView whose peer entry is read live from the backend, as a node's own heartbeat is."""

    self_id = SELF

    def __init__(self, backend: OllamaBackend) -> None:
        self.backend = backend

    def snapshot(self) -> Snapshot:
        now = trio.current_time()
        me = PeerView(peer_id=SELF, addrs=(), api_url="", version="test", models=self.backend.models(),
                      load=self.backend.load(), seq=1, last_seen=now, state=PeerState.ALIVE, is_self=True)
        return Snapshot(peers=(me,), taken_at=now)

    def upstream(self, peer_id: str) -> OllamaBackend:
        if peer_id != SELF:
            raise UpstreamUnavailable(f"unknown peer {peer_id}")
        return self.backend

    def status(self) -> dict[str, Any]:
        return {}


@dataclass
class Env:
    fake: FakeOllama
    backend: OllamaBackend
    gw: Running
    client: httpx.AsyncClient

    async def wait_listing(self, path: str, predicate: Callable[[Any], bool]) -> Any:
        """GET a gateway listing until ``predicate`` holds, re-asking whenever the backend's view changes."""
        while True:
            changed = self.backend.changed()
            doc = (await self.client.get(path)).json()
            if predicate(doc):
                return doc
            await changed.wait()

    def forwarded(self, path: str) -> list[Any]:
        """What the stand-in received on ``path`` (the backend's own polls are on other paths)."""
        return [r for r in self.fake.requests if r.path.partition("?")[0] == path]


@asynccontextmanager
async def stand_in(*, refresh_interval: float = 3600.0, **gateway: Any) -> AsyncIterator[Env]:
    """Gateway -> OllamaBackend -> stand-in Ollama, all on loopback with OS-chosen ports."""
    async with trio.open_nursery() as nursery:
        fake = await nursery.start(partial(serve_fake, [f"{CHAT}:latest", f"{EMB}:latest"], name="standin",
                                           token_delay=0.0))
        backend = OllamaBackend(fake.url, refresh_interval=refresh_interval)
        await nursery.start(backend.serve)
        async with running_gateway(BackendMesh(backend), backend, **gateway) as gw, \
                httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            yield Env(fake, backend, gw, client)
        nursery.cancel_scope.cancel()


def ndjson(body: bytes) -> list[dict[str, Any]]:
    """Strict NDJSON: every line one JSON object ending in exactly one newline, no blank lines."""
    assert body.endswith(b"\n"), body[-80:]
    lines = body[:-1].split(b"\n")
    assert all(lines), f"blank line in {body!r}"
    objs = [json.loads(line) for line in lines]
    assert all(isinstance(o, dict) for o in objs)
    return objs


def sse_events(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body; every event must be ``data: ...\\n\\n``."""
    assert text.endswith("\n\n"), text[-80:]
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e.removeprefix("data: ") for e in events]


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def gen(**fields: Any) -> dict[str, Any]:
    return {"model": CHAT, "prompt": "hi", **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], **fields}


# --- transport and routing ----------------------------------------------------------


async def test_check_09_wrong_field_type_is_400_before_model_lookup():
    """§7 check 9: `POST /api/chat {"model":"x","stream":"false"}` -> 400 (type error; the message
    mentions `stream`). Ollama's bind fails before the model is looked up, so the model need not exist."""
    with trio.fail_after(10):
        async with stand_in() as env:
            for model in ("x", CHAT, ""):
                r = await env.client.post("/api/chat", json={"model": model, "stream": "false"})
                assert r.status_code == 400, (model, r.text)
                assert "stream" in r.json()["error"]
            r = await env.client.post("/api/generate", json={"model": "x", "prompt": "a", "stream": 1})
            assert r.status_code == 400 and "stream" in r.json()["error"]
            r = await env.client.post("/v1/chat/completions", json={"model": "x", "messages": [], "stream": "yes"})
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
            assert "stream" in r.json()["error"]["message"]
            assert env.forwarded("/api/chat") == []  # answered at the gateway, as Ollama's bind would
            async with httpx.AsyncClient() as direct:  # and the stand-in agrees
                r = await direct.post(env.fake.url + "/api/chat", json={"model": CHAT, "stream": "false"})
            assert r.status_code == 400 and "stream" in r.json()["error"]


async def test_check_10_any_client_host_is_accepted_upstream():
    """§7 check 10: a request carrying `Host: evil.example.com` directly -> 403 with an empty body.
    Through the proxy with any client Host -> not 403, because the proxy must send an
    upstream-acceptable Host. (Our loopback gateway is itself Host-strict, like Ollama, so the
    client's names are allowed in its config here; test_hosts.py covers the refusal.)"""
    with trio.fail_after(10):
        async with stand_in(allowed_hosts=("*.example.com",)) as env:
            async with httpx.AsyncClient() as direct:
                r = await direct.get(env.fake.url + "/api/tags", headers={"host": "evil.example.com"})
            assert (r.status_code, r.content) == (403, b"")  # the stand-in is loopback-strict, like Ollama

            for body in (gen(stream=False), {"model": CHAT}):
                r = await env.client.post("/api/generate", json=body, headers={"host": "evil.example.com"})
                assert r.status_code == 200, r.text
            r = await env.client.post("/api/show", json={"model": CHAT}, headers={"host": "api.example.com"})
            assert r.status_code == 200
            hosts = {q.header("host") for q in env.forwarded("/api/generate") + env.forwarded("/api/show")}
            assert hosts == {env.backend.host_header}


# --- /api/generate ---------------------------------------------------------------


async def test_check_12_generate_stream_is_strict_ndjson():
    """§7 check 12: `{"model":$CHAT,"prompt":"hi","options":{"num_predict":16}}` (no `stream`) -> 200
    `application/x-ndjson`, at least 2 lines; every line is a standalone JSON object terminated by
    `\\n`; no blank lines, no `data:` prefix."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/generate", json=gen(options={"num_predict": 16}))
    assert r.status_code == 200
    assert r.headers["content-type"] == NDJSON
    assert not any(line.startswith(b"data:") for line in r.content.split(b"\n"))
    assert len(ndjson(r.content)) >= 2


async def test_check_13_generate_stream_final_line():
    """§7 check 13: every line before the last has `done:false` and a string `response`. The last line
    has `done:true`, `done_reason` in {`stop`,`length`}; integer `total_duration`, `load_duration`,
    `eval_count`, `eval_duration`; a non-empty integer array `context`. Nothing follows the `done:true` line."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/generate", json=gen(options={"num_predict": 16}))
    *parts, last = ndjson(r.content)
    assert parts and all(p["done"] is False and isinstance(p["response"], str) for p in parts)
    assert last["done"] is True and last["done_reason"] in ("stop", "length")
    for key in METRICS:
        assert type(last[key]) is int, key
    assert last["context"] and all(type(t) is int for t in last["context"])


async def test_check_15_generate_not_streamed():
    """§7 check 15: `stream:false` -> one JSON object, `application/json; charset=utf-8`, `done:true`,
    `response` equal to the concatenated stream text (deterministic output), `context` present."""
    with trio.fail_after(10):
        async with stand_in() as env:
            streamed = ndjson((await env.client.post("/api/generate", json=gen(options={"seed": 1}))).content)
            r = await env.client.post("/api/generate", json=gen(stream=False, options={"seed": 1}))
    assert r.status_code == 200 and r.headers["content-type"] == JSON_UTF8
    (whole,) = ndjson(r.content + b"\n")  # exactly one object
    assert whole["done"] is True
    assert whole["response"] == "".join(p["response"] for p in streamed)
    assert isinstance(whole["context"], list) and whole["context"]


async def test_check_16_raw_mode():
    """§7 check 16: `raw:true,stream:false` -> no `context` key. `raw:true,"system":"x"` -> 400
    `raw mode does not support template, system, or context`."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/generate", json=gen(raw=True, stream=False))
            assert r.status_code == 200 and "context" not in r.json()
            r = await env.client.post("/api/generate", json=gen(raw=True, system="x"))
            assert r.status_code == 400
            assert r.json() == {"error": "raw mode does not support template, system, or context"}


async def test_check_17_generate_without_prompt_loads():
    """§7 check 17: `{"model":$CHAT}` (no prompt, no `stream`) -> 200, a single JSON object with
    `response:""`, `done:true`, `done_reason:"load"`."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/generate", json={"model": CHAT})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    (obj,) = ndjson(r.content + b"\n")
    assert (obj["response"], obj["done"], obj["done_reason"]) == ("", True, "load")


async def test_check_18_keep_alive_zero_unloads():
    """§7 check 18: `{"model":$CHAT,"keep_alive":0}` -> 200 single object, `done_reason:"unload"`.
    A few seconds later `/api/ps` no longer lists the model (here: by the backend's next poll)."""

    def listed(doc: Any) -> bool:
        return any(m["model"] == f"{CHAT}:latest" for m in doc["models"])

    with trio.fail_after(10):
        async with stand_in(refresh_interval=0.05) as env:
            await env.client.post("/api/generate", json={"model": CHAT})
            await env.wait_listing("/api/ps", listed)
            r = await env.client.post("/api/generate", json={"model": CHAT, "keep_alive": 0})
            assert r.status_code == 200
            (obj,) = ndjson(r.content + b"\n")
            assert (obj["done"], obj["done_reason"]) == (True, "unload")
            await env.wait_listing("/api/ps", lambda doc: not listed(doc))


async def test_check_20_invalid_model_name():
    """§7 check 20: `{"model":"bad name!","prompt":"x"}` -> 400 `{"error":"invalid model name"}`."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/generate", json={"model": "bad name!", "prompt": "x"})
    assert (r.status_code, r.json()) == (400, {"error": "invalid model name"})


async def test_check_21_num_predict_ends_with_length():
    """§7 check 21: `options.num_predict:1` -> final `done_reason:"length"`."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/generate", json=gen(options={"num_predict": 1}))
    assert ndjson(r.content)[-1]["done_reason"] == "length"


async def test_check_22_model_is_echoed_byte_for_byte():
    """§7 check 22: `model` given as `$CHAT`, `$CHAT:latest`, and an upper-cased `$CHAT` -> all 200,
    and each response's `model` equals the string sent, byte for byte."""
    with trio.fail_after(10):
        async with stand_in() as env:
            for sent in (CHAT, f"{CHAT}:latest", CHAT.upper()):
                r = await env.client.post("/api/generate", json={"model": sent, "prompt": "hi", "stream": False})
                assert (r.status_code, r.json()["model"]) == (200, sent)
                r = await env.client.post("/api/generate", json={"model": sent, "prompt": "hi"})
                assert {o["model"] for o in ndjson(r.content)} == {sent}


async def test_check_23_invalid_keep_alive_is_400():
    """§7 check 23 (first half): `keep_alive:"5 minutes"` -> 400."""
    with trio.fail_after(10):
        async with stand_in() as env:
            for bad in ("5 minutes", True):
                r = await env.client.post("/api/generate", json=gen(keep_alive=bad))
                assert r.status_code == 400 and r.json()["error"], bad
            r = await env.client.post("/api/generate", json=gen(keep_alive="10m", stream=False))
            assert r.status_code == 200


async def test_check_23_negative_keep_alive_shows_in_ps():
    """§7 check 23 (second half): `keep_alive:-1` -> 200, and `/api/ps` `expires_at` is more than
    100 years ahead."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/generate", json=gen(keep_alive=-1, stream=False))
            assert r.status_code == 200
            doc = await env.wait_listing("/api/ps", lambda d: bool(d["models"]))
    expires = parse_time(doc["models"][0]["expires_at"])
    assert expires is not None and expires > time.time() + 100 * 365 * 86400


async def test_check_24_think_errors():
    """§7 check 24: `think:true` on a non-thinking `$CHAT` -> 400, error containing
    `does not support thinking`. `think:"bogus"` -> 400 containing `invalid think value`."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/generate", json=gen(think=True))
            assert r.status_code == 400 and "does not support thinking" in r.json()["error"]
            r = await env.client.post("/api/generate", json=gen(think="bogus"))
            assert r.status_code == 400 and "invalid think value" in r.json()["error"]


async def test_check_25_bad_images_and_top_logprobs():
    """§7 check 25: `images:["%%%not-base64"]` -> 400. `top_logprobs:21` -> 400
    `top_logprobs must be between 0 and 20`."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/generate", json=gen(images=["%%%not-base64"]))
            assert r.status_code == 400 and r.json()["error"]
            r = await env.client.post("/api/generate", json=gen(top_logprobs=21))
            assert (r.status_code, r.json()) == (400, {"error": "top_logprobs must be between 0 and 20"})


async def test_check_26_structured_output_passes_through():
    """§7 check 26: `format:"json",stream:false` -> `response` parses as JSON. `format` set to a
    JSON-schema object -> `response` validates against the schema. (The stand-in answers `format`
    with fitting JSON; what is checked is that the field and the answer cross the proxy intact.)"""
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/generate", json=gen(format="json", stream=False))
            assert isinstance(json.loads(r.json()["response"]), dict)
            r = await env.client.post("/api/generate", json=gen(format=schema))  # streamed, then joined
            text = "".join(o["response"] for o in ndjson(r.content))
            assert env.forwarded("/api/generate")[-1].json()["format"] == schema
    value = json.loads(text)
    assert set(value) == {"name", "age"}
    assert isinstance(value["name"], str) and type(value["age"]) is int


# --- /api/chat -------------------------------------------------------------------


async def test_check_27_chat_stream():
    """§7 check 27: default (streaming) -> NDJSON. Every line has `message.role == "assistant"` and a
    string `message.content`. The final line has `done:true`, `done_reason`, the metrics, and no `context`."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/chat", json=chat())
    assert r.status_code == 200 and r.headers["content-type"] == NDJSON
    lines = ndjson(r.content)
    assert all(o["message"]["role"] == "assistant" and isinstance(o["message"]["content"], str) for o in lines)
    last = lines[-1]
    assert last["done"] is True and last["done_reason"] and "context" not in last
    for key in METRICS:
        assert type(last[key]) is int, key


async def test_check_28_chat_not_streamed_equals_stream():
    """§7 check 28: `stream:false` -> one object, with `message.content` equal to the concatenation of
    the stream."""
    with trio.fail_after(10):
        async with stand_in() as env:
            streamed = ndjson((await env.client.post("/api/chat", json=chat())).content)
            r = await env.client.post("/api/chat", json=chat(stream=False))
    (whole,) = ndjson(r.content + b"\n")
    assert whole["message"]["content"] == "".join(o["message"]["content"] for o in streamed)


async def test_check_29_chat_without_messages_loads():
    """§7 check 29: `messages:[]` -> 200 single object
    `{"message":{"role":"assistant","content":""},"done":true,"done_reason":"load"}`."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/chat", json={"model": CHAT, "messages": []})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    (obj,) = ndjson(r.content + b"\n")
    assert obj["message"] == {"role": "assistant", "content": ""}
    assert (obj["done"], obj["done_reason"], obj["model"]) == (True, "load", CHAT)


async def test_check_31_tools():
    """§7 check 31: a request with `"tools":[]` (what ollama-python always sends) -> 200. A request with
    one real tool on a model without the tools capability -> 400 ending in `does not support tools`."""
    tool = {"type": "function", "function": {"name": "now", "description": "the time",
                                              "parameters": {"type": "object", "properties": {}}}}
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/chat", json=chat(tools=[], stream=False))
            assert r.status_code == 200
            r = await env.client.post("/api/chat", json=chat(tools=[tool]))
            assert r.status_code == 400 and r.json()["error"].endswith("does not support tools")


async def test_check_32_role_case_is_accepted():
    """§7 check 32: a message with `"role":"USER"` -> 200 (roles are lower-cased)."""
    with trio.fail_after(10):
        async with stand_in() as env:
            body = {"model": CHAT, "messages": [{"role": "USER", "content": "hi"}], "stream": False}
            r = await env.client.post("/api/chat", json=body)
            assert r.status_code == 200 and r.json()["message"]["role"] == "assistant"
            assert env.forwarded("/api/chat")[-1].json()["messages"][0]["role"] == "USER"  # passed on untouched


# --- embeddings ------------------------------------------------------------------


async def test_check_33_embed():
    """§7 check 33: `POST /api/embed {"model":$EMB,"input":["a","b"]}` -> 200. `embeddings` has length 2
    with equal dimensions; each vector's L2 norm is 1±1e-3; `model` equals the request string."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/embed", json={"model": EMB, "input": ["a", "b"]})
    assert r.status_code == 200
    doc = r.json()
    a, b = doc["embeddings"]
    assert len(a) == len(b) > 0
    assert all(abs(norm(v) - 1) <= 1e-3 for v in (a, b))
    assert doc["model"] == EMB


async def test_check_34_embed_inputs_and_dimensions():
    """§7 check 34: `input:""` -> 200 `{"embeddings":[]}`. `input:[1,2]` -> 400
    `{"error":"invalid input type"}`. `dimensions:8` -> vectors of length 8 with norm ≈1."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/embed", json={"model": EMB, "input": ""})
            assert r.status_code == 200 and r.json()["embeddings"] == []
            r = await env.client.post("/api/embed", json={"model": EMB, "input": [1, 2]})
            assert (r.status_code, r.json()) == (400, {"error": "invalid input type"})
            r = await env.client.post("/api/embed", json={"model": EMB, "input": ["a", "b"], "dimensions": 8})
            vectors = r.json()["embeddings"]
    assert [len(v) for v in vectors] == [8, 8]
    assert all(abs(norm(v) - 1) <= 1e-3 for v in vectors)


async def test_check_36_legacy_embeddings():
    """§7 check 36: `POST /api/embeddings {"model":$EMB,"prompt":"a"}` -> 200, and `embedding` is the
    object's only key. `prompt:""` -> `{"embedding":[]}`."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/embeddings", json={"model": EMB, "prompt": "a"})
            assert r.status_code == 200 and list(r.json()) == ["embedding"] and r.json()["embedding"]
            r = await env.client.post("/api/embeddings", json={"model": EMB, "prompt": ""})
            assert r.json() == {"embedding": []}


# --- model management ------------------------------------------------------------


async def test_check_38_show():
    """§7 check 38: `POST /api/show {"model":$CHAT}` -> 200 with `model_info` present (an object), a
    `capabilities` array, `details`, `template`, `parameters`, `modified_at`. `{"model":"nope"}` -> 404
    containing `not found`. `{}` -> 400 `model is required`."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/show", json={"model": CHAT})
            assert r.status_code == 200
            doc = r.json()
            assert isinstance(doc["model_info"], dict) and isinstance(doc["capabilities"], list)
            assert isinstance(doc["details"], dict)
            assert all(isinstance(doc[k], str) for k in ("template", "parameters", "modified_at"))
            r = await env.client.post("/api/show", json={"model": "nope"})
            assert r.status_code == 404 and "not found" in r.json()["error"]
            r = await env.client.post("/api/show", json={})
            assert (r.status_code, r.json()) == (400, {"error": "model is required"})


async def test_check_39_copy():
    """§7 check 39: `POST /api/copy {"source":$CHAT,"destination":"conf-copy"}` -> exactly 200 with an
    empty body, and `/api/tags` then lists `conf-copy:latest`. Copying a missing source -> 404
    `model "…" not found`."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/copy", json={"source": CHAT, "destination": "conf-copy"})
            assert (r.status_code, r.content) == (200, b"")
            tags = await env.wait_listing("/api/tags", lambda d: "conf-copy:latest" in {m["name"] for m in d["models"]})
            r = await env.client.post("/api/copy", json={"source": "nope", "destination": "conf-copy2"})
            assert (r.status_code, r.json()) == (404, {"error": 'model "nope" not found'})
    for entry in tags["models"]:  # the §2.7 entry shape survives the backend -> announcement -> listing path
        assert entry["name"] == entry["model"] and ":" in entry["name"]
        assert HEX64.match(entry["digest"]) and type(entry["size"]) is int and isinstance(entry["details"], dict)
        assert parse_time(entry["modified_at"]) is not None


async def test_check_40_delete():
    """§7 check 40: `DELETE /api/delete {"model":"conf-copy"}` -> exactly 200 (not 204), empty body.
    Repeating it -> 404 `model 'conf-copy' not found`. `DELETE` with an empty body -> 400
    `missing request body`; the proxy must forward DELETE bodies."""
    with trio.fail_after(10):
        async with stand_in() as env:
            env.fake.add_model("conf-copy")
            r = await env.client.request("DELETE", "/api/delete", json={"model": "conf-copy"})
            assert (r.status_code, r.content) == (200, b"")
            r = await env.client.request("DELETE", "/api/delete", json={"model": "conf-copy"})
            assert (r.status_code, r.json()) == (404, {"error": "model 'conf-copy' not found"})
            r = await env.client.request("DELETE", "/api/delete", content=b"")
            assert (r.status_code, r.json()) == (400, {"error": "missing request body"})
            assert [q.body for q in env.forwarded("/api/delete")][:2] == [b'{"model":"conf-copy"}'] * 2


async def test_check_41_blob_head():
    """§7 check 41: `HEAD /api/blobs/sha256:<64 hex of unknown data>` -> 404. `HEAD /api/blobs/sha256:zz` -> 400."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.head("/api/blobs/sha256:" + "0123456789abcdef" * 4)
            assert (r.status_code, r.content) == (404, b"")
            r = await env.client.head("/api/blobs/sha256:zz")
            assert r.status_code == 400


async def test_check_42_blob_upload():
    """§7 check 42: `POST /api/blobs/sha256:<sha256(body)>` with raw bytes and `Content-Type:
    application/json` (as python sends) -> 201. The same again -> 200. Body hash != path digest -> 400
    containing `digest mismatch`."""
    import hashlib

    data = bytes(range(256)) * 64
    path = "/api/blobs/sha256:" + hashlib.sha256(data).hexdigest()
    headers = {"content-type": "application/json"}
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post(path, content=data, headers=headers)
            assert r.status_code == 201
            r = await env.client.post(path, content=data, headers=headers)
            assert r.status_code == 200
            r = await env.client.post("/api/blobs/sha256:" + "0" * 64, content=data, headers=headers)
            assert r.status_code == 400 and "digest mismatch" in r.json()["error"]
            assert env.forwarded(path)[0].body == data  # raw bytes, unchanged
            assert (await env.client.head(path)).status_code == 200


async def test_check_43_create():
    """§7 check 43: `POST /api/create {"model":"conf-mario","from":$CHAT,"system":"hi"}` (streaming) ->
    NDJSON of `{"status":…}` lines, the last being `{"status":"success"}`. With `stream:false` -> one
    `{"status":"success"}` object. `{"model":"x"}` -> 400 `neither 'from' or 'files' was specified`."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/create", json={"model": "conf-mario", "from": CHAT, "system": "hi"})
            assert r.status_code == 200 and r.headers["content-type"] == NDJSON
            lines = ndjson(r.content)
            assert all(isinstance(o["status"], str) for o in lines) and lines[-1] == {"status": "success"}
            r = await env.client.post("/api/create", json={"model": "conf-mario2", "from": CHAT, "stream": False})
            assert (r.status_code, r.json()) == (200, {"status": "success"})
            r = await env.client.post("/api/create", json={"model": "x"})
            assert (r.status_code, r.json()) == (400, {"error": "neither 'from' or 'files' was specified"})


async def test_check_44_pull_and_push_errors():
    """§7 check 44: `POST /api/pull {"model":"no-such-ns/no-such-model-xyz"}` (streaming) -> 200 NDJSON:
    the first line is `{"status":"pulling manifest"}`, and a later line has a string `error`. With
    `stream:false` -> non-2xx `{"error":…}`. `POST /api/push {}` -> 400 `model is required`."""
    missing = "no-such-ns/no-such-model-xyz"
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/pull", json={"model": missing})
            assert r.status_code == 200 and r.headers["content-type"] == NDJSON
            first, *rest = ndjson(r.content)
            assert first == {"status": "pulling manifest"}
            assert any(isinstance(o.get("error"), str) for o in rest)
            r = await env.client.post("/api/pull", json={"model": missing, "stream": False})
            assert r.status_code >= 300 and isinstance(r.json()["error"], str)
            r = await env.client.post("/api/push", json={})
            assert (r.status_code, r.json()) == (400, {"error": "model is required"})


# --- concurrency and failures ------------------------------------------------------


async def test_check_45_ps():
    """§7 check 45: after a generate that sends `keep_alive:"5m"`, `GET /api/ps` returns an entry with
    `name` = `model` = `$CHAT:latest`; integer `size` >= `size_vram` >= 0; RFC 3339 `expires_at` ≈
    now+5m (±15 s); integer `context_length`, `digest`, `details`. With nothing loaded -> `{"models":[]}`."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.get("/api/ps")
            assert (r.status_code, r.json()) == (200, {"models": []})
            r = await env.client.post("/api/generate", json=gen(keep_alive="5m", stream=False))
            assert r.status_code == 200
            doc = await env.wait_listing("/api/ps", lambda d: bool(d["models"]))
    (entry,) = doc["models"]
    assert entry["name"] == entry["model"] == f"{CHAT}:latest"
    assert type(entry["size"]) is int and type(entry["size_vram"]) is int
    assert entry["size"] >= entry["size_vram"] >= 0
    expires = parse_time(entry["expires_at"])
    assert expires is not None and abs(expires - (time.time() + 300)) <= 15
    assert type(entry["context_length"]) is int
    assert HEX64.match(entry["digest"]) and isinstance(entry["details"], dict)


async def test_check_46_concurrent_requests_on_one_model_both_succeed():
    """§7 check 46: two concurrent long generates on the same model -> both 200, no 503. Ollama queues
    the second in its scheduler; the gateway queues it first (gateway.queue_size): the node's one
    slot is taken, so the second waits in the gateway's line and goes once the first is done."""
    results: dict[int, httpx.Response] = {}
    with trio.fail_after(10):
        async with stand_in() as env:
            env.fake.set(hang_before_first_byte=True, fault_paths=("/api/generate",), fault_count=1)

            async def call(i: int) -> None:
                results[i] = await env.client.post("/api/generate", json=gen(stream=False))

            def gens() -> list[Any]:
                return env.forwarded("/api/generate")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, 1)
                await env.fake.wait_for(lambda: len(gens()) == 1)
                assert env.backend.load().in_flight == 1  # the node's one slot is taken
                nursery.start_soon(call, 2)
                while env.gw.proxy.queues.total() != 1:
                    await trio.sleep(0.01)
                assert len(gens()) == 1  # waiting at the gateway, not sent
                env.fake.set(hang_before_first_byte=False)  # let the first one go
    assert [results[i].status_code for i in (1, 2)] == [200, 200]
    assert env.gw.metric("meshollama_queue_total", outcome="dispatched") == 1


async def test_check_48_error_line_mid_stream_is_relayed_verbatim():
    """§7 check 48: upstream streams 2 NDJSON chunks, then `{"error":"boom"}\\n`, then closes -> the client
    gets HTTP 200, the 2 chunks, and the error line verbatim, with no synthesised `done:true`. Python
    raises `ResponseError('boom')` with `status_code == -1`."""
    with trio.fail_after(10):
        async with stand_in() as env:
            env.fake.set(fail_after_n_chunks={"n": 2, "mode": "error", "error": "boom"}, fault_count=1)
            r = await env.client.post("/api/generate", json=gen())
            assert r.status_code == 200
            lines = r.content.split(b"\n")
            assert len(lines) == 4 and lines[2:] == [b'{"error":"boom"}', b""]
            assert all(json.loads(line)["done"] is False for line in lines[:2])

            env.fake.set(fail_after_n_chunks={"n": 2, "mode": "error", "error": "boom"}, fault_count=1)
            client = ollama.AsyncClient(host=env.gw.url)
            try:
                with pytest.raises(ollama.ResponseError) as err:
                    async for _ in await client.generate(model=CHAT, prompt="hi", stream=True):
                        pass
            finally:
                await client.close()
    assert (err.value.error, err.value.status_code) == ("boom", -1)


async def test_check_49_error_before_first_byte_keeps_its_status():
    """§7 check 49: upstream fails before the first byte with 500 `{"error":"x"}` on a streaming request
    -> the client gets 500 `application/json` `{"error":"x"}`, not a 200 NDJSON stream."""
    with trio.fail_after(10):
        async with stand_in() as env:
            env.fake.set(fail_before_first_byte={"status": 500, "body": {"error": "x"}}, fault_count=1)
            r = await env.client.post("/api/generate", json=gen(stream=True))
    assert r.status_code == 500
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"error": "x"}


# --- OpenAI-compatible ---------------------------------------------------------------


async def test_check_51_v1_chat_completion():
    """§7 check 51: `POST /v1/chat/completions` (no `stream`) -> 200 `application/json`, with
    `object:"chat.completion"`, an `id` starting `chatcmpl-`, `system_fingerprint:"fp_ollama"`;
    `choices[0].message.role:"assistant"` and `finish_reason` in {`stop`,`length`};
    `usage.total_tokens == prompt_tokens + completion_tokens`."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert doc["object"] == "chat.completion" and doc["id"].startswith("chatcmpl-")
    assert doc["system_fingerprint"] == "fp_ollama"
    choice = doc["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    usage = doc["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_check_52_v1_chat_stream():
    """§7 check 52: `stream:true,"stream_options":{"include_usage":true}` -> `text/event-stream`, where
    every event is `data: …\\n\\n`; all chunks share one `id` and `object:"chat.completion.chunk"`;
    exactly one chunk has a non-null `finish_reason`; it is followed by exactly one chunk with
    `"choices":[]` and a `usage` object; the last event is `data: [DONE]`. Without `include_usage`, no
    chunk contains `usage`."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/v1/chat/completions",
                                      json=chat(stream=True, stream_options={"include_usage": True}))
            plain = await env.client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    *payloads, done = sse_events(r.text)
    assert done == "[DONE]"
    chunks = [json.loads(p) for p in payloads]
    assert len({c["id"] for c in chunks}) == 1
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    finished = [i for i, c in enumerate(chunks) if any(ch.get("finish_reason") for ch in c["choices"])]
    assert len(finished) == 1
    after = chunks[finished[0] + 1:]
    assert len(after) == 1 and after[0]["choices"] == [] and isinstance(after[0]["usage"], dict)

    *payloads, done = sse_events(plain.text)
    assert done == "[DONE]" and not any("usage" in json.loads(p) for p in payloads)


async def test_check_53_v1_chat_empty_messages():
    """§7 check 53 (second half): `messages:[]` -> 400 with `type:"invalid_request_error"` and the
    message `[] is too short - 'messages'`."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/v1/chat/completions", json={"model": CHAT, "messages": []})
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "[] is too short - 'messages'", "type": "invalid_request_error",
                                  "param": None, "code": None}}


async def test_check_54_v1_completions():
    """§7 check 54: `POST /v1/completions {"model":$CHAT,"prompt":"hi","max_tokens":5}` ->
    `object:"text_completion"`, an `id` starting `cmpl-`, and a string `choices[0].text`.
    `prompt:["a"]` -> 400 `invalid_request_error`."""
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/v1/completions", json={"model": CHAT, "prompt": "hi", "max_tokens": 5})
            bad = await env.client.post("/v1/completions", json={"model": CHAT, "prompt": ["a"]})
    doc = r.json()
    assert r.status_code == 200 and doc["object"] == "text_completion" and doc["id"].startswith("cmpl-")
    assert isinstance(doc["choices"][0]["text"], str)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


async def test_check_55_v1_embeddings():
    """§7 check 55: `POST /v1/embeddings {"model":$EMB,"input":["a","b"]}` ->
    `{"object":"list","data":[{index 0},{index 1}],"model":$EMB,"usage":{prompt_tokens==total_tokens}}`.
    With `encoding_format:"base64"`, each embedding is a string whose decoded length is 4×dim.
    `encoding_format:"bogus"` -> 400. `input:[]` -> 400 `invalid input`."""
    body = {"model": EMB, "input": ["a", "b"]}
    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/v1/embeddings", json=body)
            b64 = await env.client.post("/v1/embeddings", json={**body, "encoding_format": "base64"})
            bogus = await env.client.post("/v1/embeddings", json={**body, "encoding_format": "bogus"})
            empty = await env.client.post("/v1/embeddings", json={"model": EMB, "input": []})
    doc = r.json()
    assert r.status_code == 200 and doc["object"] == "list" and doc["model"] == EMB
    assert [(d["object"], d["index"]) for d in doc["data"]] == [("embedding", 0), ("embedding", 1)]
    assert doc["usage"]["prompt_tokens"] == doc["usage"]["total_tokens"]
    dim = len(doc["data"][0]["embedding"])
    assert all(len(base64.b64decode(d["embedding"])) == 4 * dim for d in b64.json()["data"])
    assert bogus.status_code == 400 and bogus.json()["error"]["type"] == "invalid_request_error"
    assert empty.status_code == 400 and empty.json()["error"]["message"] == "invalid input"


# --- the python client, as a user runs it ---------------------------------------------

# Runs in a fresh interpreter so OLLAMA_HOST is read at `import ollama`, as in real use.
PY_CLIENT = """
import json, ollama
msgs = [{"role": "user", "content": "hi"}]
out = {
    "chat": ollama.chat(model="llama3", messages=msgs).message.content,
    "chat_stream": "".join(p.message.content for p in ollama.chat(model="llama3", messages=msgs, stream=True)),
    "generate": ollama.generate(model="llama3", prompt="hi").response,
    "generate_stream": "".join(p.response for p in ollama.generate(model="llama3", prompt="hi", stream=True)),
    "embed": len(ollama.embed(model="all-minilm", input=["a", "b"]).embeddings),
    "embeddings": len(ollama.embeddings(model="all-minilm", prompt="a").embedding),
    "list": sorted(m.model for m in ollama.list().models),
    "ps": [m.model for m in ollama.ps().models],
    "show": ollama.show("llama3").capabilities,
    "pull": ollama.pull("llama3").status,
    "pull_stream": [p.status for p in ollama.pull("llama3", stream=True)][-1],
    "copy": ollama.copy("llama3", "conf-copy").status,
    "delete": ollama.delete("conf-copy").status,
}
print(json.dumps(out))
"""

PY_KEYED = """
import json, ollama
print(json.dumps([ollama.generate(model="llama3", prompt="hi").response, len(ollama.list().models)]))
"""


async def run_python(script: str, **env: str) -> Any:
    """Run ``script`` in a child interpreter with ``env`` added; its stdout is JSON."""
    full = {k: v for k, v in os.environ.items()
            if k.upper() not in ("OLLAMA_HOST", "OLLAMA_API_KEY", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}
    full.update(env)
    done = await trio.run_process([sys.executable, "-c", script], env=full, capture_stdout=True,
                                  capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return json.loads(done.stdout)


async def test_check_57_python_client_end_to_end():
    """§7 check 57: with `OLLAMA_HOST` set to the proxy before `import ollama`, `ollama.chat` (stream
    False and True), `ollama.generate` (stream False and True), `ollama.embed`, `ollama.embeddings`,
    `ollama.list`, `ollama.ps`, `ollama.show`, `ollama.pull($CHAT)` (streams progress ending in
    `success`), `ollama.copy` and `ollama.delete` all complete without `ValidationError`,
    `JSONDecodeError` or `ResponseError`, and the upstream sees `User-Agent:
    ollama-python/0.6.x (...) Python/...` unchanged."""
    with trio.fail_after(60):
        async with stand_in() as env:
            out = await run_python(PY_CLIENT, OLLAMA_HOST=env.gw.url)
            seen = [q for q in env.fake.requests if q.path not in ("/api/tags", "/api/ps")]
    assert out["chat"] == out["chat_stream"] and out["chat"].startswith("hello from standin")
    assert out["generate"] == out["generate_stream"] == out["chat"]
    assert (out["embed"], out["show"]) == (2, ["completion"]) and out["embeddings"] > 0
    assert out["list"] == [f"{EMB}:latest", f"{CHAT}:latest"]
    assert isinstance(out["ps"], list)
    assert (out["pull"], out["pull_stream"], out["copy"], out["delete"]) == ("success",) * 4
    paths = {q.path for q in seen}
    assert {"/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show", "/api/pull",
            "/api/copy", "/api/delete"} <= paths
    agent = re.compile(r"ollama-python/0\.6\.\d+ \(\S+ \S+\) Python/\d+\.\d+\.\d+\S*\Z")
    assert all(agent.match(q.header("user-agent") or "") for q in seen), {q.header("user-agent") for q in seen}


async def test_check_58_python_client_api_key():
    """§7 check 58 (the key half): with `OLLAMA_API_KEY=k`, an `Authorization: Bearer k` header is present
    on arrival, and the proxy strips or forwards it as documented: with `gateway.api_keys` it is the
    gateway's key (checked, then stripped); without, it is stripped too: a credential given to this
    gateway is never passed on to whichever peer or backend answers."""
    with trio.fail_after(60):
        async with stand_in(api_keys=("k",)) as env:
            text, count = await run_python(PY_KEYED, OLLAMA_HOST=env.gw.url, OLLAMA_API_KEY="k")
            assert text.startswith("hello from standin") and count == 2
            assert all(q.header("authorization") is None for q in env.forwarded("/api/generate"))
            r = await env.client.get("/api/tags")
            assert r.status_code == 401  # so the key above did arrive and was checked
        async with stand_in() as env:
            await run_python(PY_KEYED, OLLAMA_HOST=env.gw.url, OLLAMA_API_KEY="k")
            assert [q.header("authorization") for q in env.forwarded("/api/generate")] == [None]

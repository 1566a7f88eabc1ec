"""Pure tests of the embedded backend's wire shapes (ollama_api, _options, _requests, _responses) and GGUF helpers."""

from __future__ import annotations

import base64
import io
import json
import math
import struct

import pytest

from meshollama.backends import gguf
from meshollama.backends import ollama_api as api
from meshollama.backends import ollama_options as opts
from meshollama.backends import ollama_requests as req
from meshollama.backends import ollama_responses as resp
from meshollama.backends.ollama_api import Endpoint, Reply, Route
from meshollama.backends import openai_requests as oreq
from meshollama.backends import shapers
from meshollama.backends.shapers import GenStats
from meshollama.catalog import ModelInfo
from meshollama.errors import BadRequest, ModelNotFound, RequestError

NOW = 1_714_564_800_123_456_789  # 2024-05-01T12:00:00.123456789Z
STATS = GenStats(done_reason="stop", total_ns=900, load_ns=100, prompt_n=7, prompt_ns=200,
                 eval_n=3, eval_ns=300, context=(1, 2, 3))


def lines(data: bytes) -> list[dict]:
    assert data.endswith(b"\n")
    parts = data.split(b"\n")[:-1]
    assert all(parts), "no blank lines"
    return [json.loads(p) for p in parts]


def events(data: bytes) -> list[str]:
    assert data.endswith(b"\n\n")
    out = []
    for block in data.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: ")
        out.append(block[len(b"data: "):].decode())
    return out


# --- encoding, time ----------------------------------------------------------------


def test_rfc3339_is_go_rfc3339nano_utc():
    assert api.rfc3339(NOW) == "2024-05-01T12:00:00.123456789Z"
    assert api.rfc3339(1_714_564_800_100_000_000) == "2024-05-01T12:00:00.1Z"
    assert api.rfc3339(1_714_564_800_000_000_000) == "2024-05-01T12:00:00Z"


def test_dumps_is_compact_utf8():
    assert api.dumps({"a": "é", "b": [1, 2]}) == '{"a":"é","b":[1,2]}'.encode()
    assert api.ndjson({}) == b"{}\n"
    assert api.sse({"x": 1}) == b'data: {"x":1}\n\n'


# --- routing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,path,expected",
    [
        ("POST", "/api/chat", Route(Endpoint.CHAT)),
        ("POST", "/api/generate?x=1", Route(Endpoint.GENERATE)),
        ("HEAD", "/api/tags", Route(Endpoint.TAGS)),
        ("GET", "/v1/models/smollm2:135m", Route(Endpoint.V1_MODEL, "smollm2:135m")),
        ("DELETE", "/api/delete", Route(Endpoint.DELETE)),
        ("POST", "/api/copy", Route(Endpoint.COPY)),
        ("HEAD", "/api/blobs/sha256:ab", Route(Endpoint.BLOBS, "sha256:ab")),
        ("POST", "/v1/responses", Route(Endpoint.V1_RESPONSES)),
        ("POST", "/v1/messages", Route(Endpoint.V1_MESSAGES)),
        ("GET", "/api/chat", Reply(405, api.TEXT, b"405 method not allowed")),
        ("POST", "/api/tags", Reply(405, api.TEXT, b"405 method not allowed")),
        ("GET", "/api/nope", Reply(404, api.TEXT, b"404 page not found")),
        ("GET", "/v1/models/user/m:tag", Reply(404, api.TEXT, b"404 page not found")),
    ],
)
def test_route(method, path, expected):
    assert api.route(method, path) == expected


# --- errors --------------------------------------------------------------------------


def test_error_envelopes():
    native = api.error_reply(ModelNotFound("model 'x' not found"), Endpoint.CHAT)
    assert native == Reply(404, api.JSON_UTF8, b'{"error":"model \'x\' not found"}')
    oai = api.error_reply(BadRequest("bad"), Endpoint.V1_CHAT)
    assert oai.status == 400 and oai.content_type == api.JSON
    assert json.loads(oai.body) == {"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}}
    assert json.loads(api.error_reply(ModelNotFound("m"), Endpoint.V1_CHAT).body)["error"]["type"] == "not_found_error"
    assert json.loads(api.error_reply(RequestError("x", 500), Endpoint.V1_CHAT).body)["error"]["type"] == "api_error"


@pytest.mark.parametrize(
    "endpoint,status,text",
    [
        (Endpoint.GENERATE, 404, "model '' not found"),
        (Endpoint.CHAT, 400, "model is required"),
        (Endpoint.EMBED, 404, "model '' not found"),
        (Endpoint.EMBEDDINGS, 400, "model is required"),
        (Endpoint.SHOW, 400, "model is required"),
    ],
)
def test_missing_model_texts(endpoint, status, text):
    err = api.missing_model_error(endpoint)
    assert (err.status, err.message) == (status, text)


@pytest.mark.parametrize(
    "endpoint,text",
    [
        (Endpoint.GENERATE, "model 'Nope' not found"),
        (Endpoint.CHAT, "model 'Nope' not found"),
        (Endpoint.EMBED, 'model "Nope" not found, try pulling it first'),
        (Endpoint.EMBEDDINGS, 'model "Nope" not found, try pulling it first'),
        (Endpoint.SHOW, "model 'Nope:latest' not found"),
        (Endpoint.V1_CHAT, "model 'Nope' not found"),
    ],
)
def test_not_found_texts(endpoint, text):
    err = api.not_found_error(endpoint, "Nope")
    assert err.status == 404 and err.message == text


# --- request bodies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body,message",
    [
        (b"", "missing request body"),
        (b"  \n", "missing request body"),
        (b"{", "unexpected EOF"),
        (b"{]", "invalid character ']' looking for beginning of value"),
        (b"[1]", "json: cannot unmarshal array into Go value of type api.ChatRequest"),
    ],
)
def test_decode_body_errors(body, message):
    with pytest.raises(BadRequest) as info:
        req.parse_chat(body)
    assert info.value.message == message


def test_decode_body_null_and_trailing_bytes():
    assert req.decode_body(b"null", "x") == {}
    assert req.decode_body(b'{"a":1} trailing', "x") == {"a": 1}
    with pytest.raises(BadRequest, match="EOF"):
        req.decode_body(b"", "x", openai=True)


def test_wrong_field_type_names_the_field():
    with pytest.raises(BadRequest) as info:
        req.parse_chat(b'{"model":"x","stream":"false"}')
    assert "stream" in info.value.message and info.value.status == 400
    with pytest.raises(BadRequest, match="content"):
        req.parse_chat(b'{"model":"x","messages":[{"role":"user","content":5}]}')


def test_parse_generate():
    job = req.parse_generate(b'{"model":"m","prompt":"hi","system":"be brief"}')
    assert job.stream and job.want_context and not job.load_only
    assert job.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"})
    assert req.parse_generate(b'{"model":"m"}').load_only
    raw = req.parse_generate(b'{"model":"m","prompt":"x","raw":true,"stream":false}')
    assert raw.raw_prompt == "x" and not raw.want_context and not raw.stream
    assert req.parse_generate(b'{"model":"m","prompt":"x","raw":true,"system":"s"}').raw_conflict
    assert req.parse_generate(b'{"model":"m","prompt":"x","context":[1,2]}').context == (1, 2)
    assert req.parse_generate(b'{"name":"legacy","prompt":"x"}').model == "legacy"


def test_parse_chat_lowercases_roles_and_load_only():
    job = req.parse_chat(b'{"model":"m","messages":[{"role":"USER","content":"hi"}],"tools":[]}')
    assert job.messages == ({"role": "user", "content": "hi"},) and not job.tools
    assert req.parse_chat(b'{"model":"m","messages":[]}').load_only


def test_think_values():
    assert req.parse_chat(b'{"model":"m","think":"high"}').think
    assert not req.parse_chat(b'{"model":"m","think":false}').think
    with pytest.raises(BadRequest, match="invalid think value"):
        req.parse_chat(b'{"model":"m","think":"bogus"}')


def test_keep_alive():
    assert opts.parse_keep_alive(None) is None
    assert opts.parse_keep_alive(0) == 0
    assert opts.parse_keep_alive("10m") == 600
    assert opts.parse_keep_alive("1h30m") == 5400
    assert opts.parse_keep_alive("-1m") < 0 and opts.parse_keep_alive(-1) < 0
    assert opts.parse_keep_alive("0") == 0
    with pytest.raises(BadRequest, match='time: invalid duration "5 minutes"'):
        opts.parse_keep_alive("5 minutes")
    with pytest.raises(BadRequest, match="bool"):
        opts.parse_keep_alive(True)


def test_validate_for_model_order_and_texts():
    full = "registry.ollama.ai/library/m:latest"
    cases = [
        (b'{"model":"m","prompt":"x","raw":true,"system":"s"}', req.parse_generate, 400, "raw mode does not support"),
        (b'{"model":"m","prompt":"x","think":true}', req.parse_generate, 400, '"m" does not support thinking'),
        (b'{"model":"m","prompt":"x","suffix":"y"}', req.parse_generate, 400, f"{full} does not support insert"),
        (b'{"model":"m","prompt":"x","top_logprobs":21}', req.parse_generate, 400, "top_logprobs must be between 0 and 20"),
        (b'{"model":"m","messages":[],"tools":[{"type":"function"}]}', req.parse_chat, 400, f"{full} does not support tools"),
        (b'{"model":"m","prompt":"x","format":"xml"}', req.parse_generate, 500, 'invalid format: "xml"'),
    ]
    for body, parse, status, text in cases:
        with pytest.raises(RequestError) as info:
            req.validate_for_model(parse(body), full)
        assert info.value.status == status and text in info.value.message
    req.validate_for_model(req.parse_generate(b'{"model":"m","prompt":"x","format":"json"}'), full)
    req.validate_for_model(req.parse_generate(b'{"model":"m","prompt":"x","format":{"type":"object"}}'), full)


def test_full_name():
    assert api.full_name("smollm2:135m") == "registry.ollama.ai/library/smollm2:135m"


# --- options -------------------------------------------------------------------------------


def test_sampling_defaults_are_ollamas():
    d = opts.sampling(None)
    assert (d.temperature, d.top_k, d.top_p, d.min_p, d.repeat_penalty) == (0.8, 40, 0.9, 0.0, 1.0)
    assert d.seed is None and d.max_tokens is None and d.stop == ()


def test_sampling_mapping():
    got = opts.sampling({"temperature": 0, "top_p": 0.5, "top_k": 5, "seed": 42, "num_predict": 16,
                      "stop": ["\n", ""], "num_ctx": 4096, "numa": True})
    assert (got.temperature, got.top_p, got.top_k, got.seed, got.max_tokens) == (0.0, 0.5, 5, 42, 16)
    assert got.stop == ("\n",) and got.num_ctx == 4096
    assert opts.sampling({"num_predict": -1, "seed": -1}).max_tokens is None


@pytest.mark.parametrize(
    "options,text",
    [
        ({"temperature": "hot"}, 'option "temperature" must be of type float32'),
        ({"top_k": "x"}, 'option "top_k" must be of type integer'),
        ({"stop": "\n"}, 'option "stop" must be of type array'),
        ({"stop": [1]}, 'option "stop" must be of an array of strings'),
    ],
)
def test_sampling_type_errors_are_500(options, text):
    with pytest.raises(RequestError) as info:
        opts.sampling(options)
    assert info.value.status == 500 and info.value.message == text


# --- OpenAI requests --------------------------------------------------------------------------


def test_openai_chat_request():
    job = oreq.parse_openai_chat(json.dumps({
        "model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 5, "stop": "x", "seed": 1, "stream": True, "stream_options": {"include_usage": True},
        "response_format": {"type": "json_object"},
    }).encode())
    assert job.stream and job.include_usage and job.format == "json"
    assert job.messages == ({"role": "user", "content": "hi"},)
    samp = opts.sampling(job.options)
    assert (samp.temperature, samp.top_p, samp.max_tokens, samp.stop, samp.seed) == (1.0, 1.0, 5, ("x",), 1)
    plain = oreq.parse_openai_chat(b'{"model":"m","messages":[{"role":"user","content":"hi"}]}')
    assert not plain.stream and not plain.include_usage


def test_openai_chat_request_errors():
    with pytest.raises(BadRequest, match=r"\[\] is too short - 'messages'"):
        oreq.parse_openai_chat(b'{"model":"m","messages":[]}')
    with pytest.raises(BadRequest, match="invalid message content type: float64"):
        oreq.parse_openai_chat(b'{"model":"m","messages":[{"role":"user","content":1.5}]}')
    with pytest.raises(BadRequest, match="image URLs are not currently supported"):
        oreq.parse_openai_chat(json.dumps({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}).encode())


def test_openai_completion_request():
    job = oreq.parse_openai_completion(b'{"model":"m","prompt":"hi","max_tokens":5}')
    assert job.messages == ({"role": "user", "content": "hi"},) and not job.stream
    with pytest.raises(BadRequest, match="prompt"):
        oreq.parse_openai_completion(b'{"model":"m","prompt":["a"]}')


def test_embed_requests():
    assert req.parse_embed(b'{"model":"m","input":["a","b"]}').inputs == ("a", "b")
    assert req.parse_embed(b'{"model":"m","input":""}').inputs == ()
    assert req.parse_embed(b'{"model":"m"}').inputs == ()
    with pytest.raises(BadRequest, match="invalid input type"):
        req.parse_embed(b'{"model":"m","input":[1,2]}')
    assert req.parse_embeddings(b'{"model":"m","prompt":""}').inputs == ()
    oai = oreq.parse_openai_embeddings(b'{"model":"m","input":"","encoding_format":"base64"}')
    assert oai.inputs == ("",) and oai.encoding_format == "base64"
    for body, text in [(b'{"model":"m","input":[]}', "invalid input"),
                       (b'{"model":"m"}', "invalid input"),
                       (b'{"model":"m","input":[[1,2]]}', "invalid input type"),
                       (b'{"model":"m","input":"a","encoding_format":"bogus"}', "Invalid value for 'encoding_format' = bogus")]:
        with pytest.raises(BadRequest) as info:
            oreq.parse_openai_embeddings(body)
        assert info.value.message.startswith(text)


# --- native output ---------------------------------------------------------------------------


def test_native_generate_stream():
    sh = shapers.make_shaper(req.parse_generate(b'{"model":"SmolLM2:135m","prompt":"x"}'), seq=0, created=0)
    assert sh.content_type == api.NDJSON
    out = sh.delta("Hel", NOW) + sh.delta("", NOW) + sh.delta("lo", NOW) + sh.finish(STATS, NOW)
    got = lines(out)
    assert got[0] == {"model": "SmolLM2:135m", "created_at": "2024-05-01T12:00:00.123456789Z",
                      "response": "Hel", "done": False}
    final = got[-1]
    assert len(got) == 3 and final["done"] is True and final["response"] == ""
    assert final["done_reason"] == "stop" and final["context"] == [1, 2, 3]
    for key, value in {"total_duration": 900, "load_duration": 100, "prompt_eval_count": 7,
                       "prompt_eval_duration": 200, "eval_count": 3, "eval_duration": 300}.items():
        assert final[key] == value
    assert list(final)[:6] == ["model", "created_at", "response", "done", "done_reason", "context"]


def test_native_generate_not_streamed_and_raw_has_no_context():
    sh = shapers.make_shaper(req.parse_generate(b'{"model":"m","prompt":"x","stream":false,"raw":true}'), seq=0, created=0)
    assert sh.content_type == api.JSON_UTF8
    assert sh.delta("a", NOW) == b"" and sh.delta("b", NOW) == b""
    obj = json.loads(sh.finish(STATS, NOW))
    assert obj["response"] == "ab" and obj["done"] and "context" not in obj


def test_native_chat_every_line_has_assistant_role():
    sh = shapers.make_shaper(req.parse_chat(b'{"model":"m","messages":[{"role":"user","content":"x"}]}'), seq=0, created=0)
    got = lines(sh.delta("a", NOW) + sh.finish(STATS, NOW))
    assert all(line["message"]["role"] == "assistant" for line in got)
    assert got[-1]["message"]["content"] == "" and "context" not in got[-1]
    whole = shapers.make_shaper(req.parse_chat(b'{"model":"m","stream":false,"messages":[{"role":"user","content":"x"}]}'),
                          seq=0, created=0)
    whole.delta("a", NOW), whole.delta("b", NOW)
    assert json.loads(whole.finish(STATS, NOW))["message"] == {"role": "assistant", "content": "ab"}


def test_mid_stream_error_line():
    sh = shapers.NativeChat("m", True)
    assert sh.fail("boom", NOW) == b'{"error":"boom"}\n'


def test_load_replies():
    chat = shapers.load_reply(req.parse_chat(b'{"model":"m"}'), NOW)
    assert json.loads(chat.body) == {"model": "m", "created_at": "2024-05-01T12:00:00.123456789Z",
                                     "message": {"role": "assistant", "content": ""}, "done": True,
                                     "done_reason": "load"}
    gen = json.loads(shapers.load_reply(req.parse_generate(b'{"model":"m","keep_alive":0}'), NOW, "unload").body)
    assert gen["response"] == "" and gen["done_reason"] == "unload"


def test_ollama_python_accepts_native_shapes():
    types = pytest.importorskip("ollama._types")
    sh = shapers.make_shaper(req.parse_chat(b'{"model":"m","messages":[{"role":"user","content":"x"}]}'), seq=0, created=0)
    for line in lines(sh.delta("a", NOW) + sh.finish(STATS, NOW)):
        types.ChatResponse(**line)
    gsh = shapers.make_shaper(req.parse_generate(b'{"model":"m","prompt":"x"}'), seq=0, created=0)
    for line in lines(gsh.delta("a", NOW) + gsh.finish(STATS, NOW)):
        types.GenerateResponse(**line)
    info = ModelInfo(name="m:latest", digest="a" * 64, size=3, modified_at="2024-05-01T12:00:00Z",
                     details={"family": "llama"}, capabilities=("completion",))
    types.ListResponse(**json.loads(resp.tags_reply([info]).body))
    types.ProcessResponse(**json.loads(resp.ps_reply([resp.Running(info, NOW, 2048)]).body))
    types.ShowResponse(**json.loads(resp.show_reply(info, template="t", model_info={"a": 1}).body))
    job = req.parse_embed(b'{"model":"m","input":"a"}')
    types.EmbedResponse(**json.loads(resp.embed_reply(job, [[1.0, 0.0]], prompt_n=1, total_ns=1, load_ns=1).body))


# --- OpenAI output ---------------------------------------------------------------------------


def _openai_chat_stream(include_usage: bool) -> list[str]:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    sh = shapers.make_shaper(oreq.parse_openai_chat(json.dumps(body).encode()), seq=7, created=1700000000)
    assert sh.content_type == api.SSE
    return events(sh.delta("He", NOW) + sh.delta("y", NOW) + sh.finish(STATS, NOW))


def test_openai_chat_stream_shape():
    evs = _openai_chat_stream(include_usage=True)
    assert evs[-1] == "[DONE]"
    chunks = [json.loads(e) for e in evs[:-1]]
    assert {c["id"] for c in chunks} == {"chatcmpl-7"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishing) == 1 and finishing[0]["choices"][0]["delta"] == {}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "He"}
    assert chunks[1]["choices"][0]["delta"] == {"content": "y"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert not any("usage" in json.loads(e) for e in _openai_chat_stream(False)[:-1])


def test_openai_chat_not_streamed():
    sh = shapers.make_shaper(oreq.parse_openai_chat(b'{"model":"m","messages":[{"role":"user","content":"x"}]}'),
                       seq=3, created=1700000000)
    assert sh.content_type == api.JSON and sh.delta("ok", NOW) == b""
    obj = json.loads(sh.finish(STATS, NOW))
    assert obj["id"] == "chatcmpl-3" and obj["object"] == "chat.completion" and obj["system_fingerprint"] == "fp_ollama"
    assert obj["choices"][0]["message"] == {"role": "assistant", "content": "ok"}
    assert obj["usage"]["total_tokens"] == obj["usage"]["prompt_tokens"] + obj["usage"]["completion_tokens"]


def test_openai_python_accepts_openai_shapes():
    pytest.importorskip("openai")
    from openai.types import Completion, CreateEmbeddingResponse
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    for e in _openai_chat_stream(True)[:-1]:
        ChatCompletionChunk.model_validate(json.loads(e))
    sh = shapers.make_shaper(oreq.parse_openai_chat(b'{"model":"m","messages":[{"role":"user","content":"x"}]}'), seq=1, created=1)
    sh.delta("ok", NOW)
    ChatCompletion.model_validate(json.loads(sh.finish(STATS, NOW)))
    csh = shapers.make_shaper(oreq.parse_openai_completion(b'{"model":"m","prompt":"x"}'), seq=1, created=1)
    csh.delta("ok", NOW)
    obj = json.loads(csh.finish(STATS, NOW))
    assert obj["id"] == "cmpl-1" and obj["choices"][0]["text"] == "ok"
    Completion.model_validate(obj)
    job = oreq.parse_openai_embeddings(b'{"model":"m","input":["a"]}')
    CreateEmbeddingResponse.model_validate(json.loads(resp.embed_reply(job, [[3.0, 4.0]], prompt_n=2, total_ns=1, load_ns=1).body))


def test_openai_completion_stream_with_usage():
    body = b'{"model":"m","prompt":"x","stream":true,"stream_options":{"include_usage":true}}'
    sh = shapers.make_shaper(oreq.parse_openai_completion(body), seq=2, created=1)
    evs = events(sh.delta("a", NOW) + sh.finish(STATS, NOW))
    assert evs[-1] == "[DONE]"
    chunks = [json.loads(e) for e in evs[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[0]["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[2]["choices"] == [] and chunks[2]["usage"]["total_tokens"] == 10


def test_openai_mid_stream_error_is_an_sse_error_object():
    sh = shapers.OpenAIChat("m", True, False, 1, 1)
    assert json.loads(events(sh.fail("boom", NOW))[0]) == {
        "error": {"message": "boom", "type": "api_error", "param": None, "code": None}}


# --- stop strings --------------------------------------------------------------------------


def test_stop_scanner_across_deltas():
    sc = shapers.StopScanner(["<|end|>"])
    assert sc.feed("Hello <|") == ("Hello ", False)
    assert sc.feed("en") == ("", False)
    assert sc.feed("d|> more") == ("", True)
    assert sc.feed("x") == ("", True) and sc.flush() == ""


def test_stop_scanner_releases_false_prefix():
    sc = shapers.StopScanner(["\n\n", "STOP"])
    assert sc.feed("a\n") == ("a", False)
    assert sc.feed("b") == ("\nb", False)
    assert sc.feed("ST") == ("", False)
    assert sc.flush() == "ST"
    assert shapers.StopScanner([]).feed("anything") == ("anything", False)


# --- embeddings -----------------------------------------------------------------------------------


def test_embed_reply_normalises_and_truncates():
    job = req.parse_embed(b'{"model":"M","input":["a","b"],"dimensions":2}')
    obj = json.loads(resp.embed_reply(job, [[3.0, 4.0, 12.0], [0.0, 0.0, 1.0]], prompt_n=4, total_ns=9, load_ns=1).body)
    assert obj["model"] == "M" and obj["embeddings"][0] == [0.6, 0.8] and obj["embeddings"][1] == [0.0, 0.0]
    assert obj["prompt_eval_count"] == 4 and obj["total_duration"] == 9
    empty = json.loads(resp.embed_reply(req.parse_embed(b'{"model":"M","input":""}'), [], prompt_n=0, total_ns=1, load_ns=1).body)
    assert empty == {"model": "M", "embeddings": []}


def test_embeddings_reply_is_raw_and_alone():
    job = req.parse_embeddings(b'{"model":"m","prompt":"a"}')
    assert json.loads(resp.embed_reply(job, [[3.0, 4.0]], prompt_n=1, total_ns=1, load_ns=1).body) == {"embedding": [3.0, 4.0]}
    empty = req.parse_embeddings(b'{"model":"m","prompt":""}')
    assert json.loads(resp.embed_reply(empty, [], prompt_n=0, total_ns=1, load_ns=1).body) == {"embedding": []}


def test_openai_embeddings_float_and_base64():
    job = oreq.parse_openai_embeddings(b'{"model":"m","input":["a","b"]}')
    obj = json.loads(resp.embed_reply(job, [[3.0, 4.0], [1.0, 0.0]], prompt_n=5, total_ns=1, load_ns=1).body)
    assert obj["object"] == "list" and [d["index"] for d in obj["data"]] == [0, 1]
    assert obj["data"][0] == {"object": "embedding", "embedding": [0.6, 0.8], "index": 0}
    assert obj["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    b64 = oreq.parse_openai_embeddings(b'{"model":"m","input":"a","encoding_format":"base64"}')
    data = json.loads(resp.embed_reply(b64, [[3.0, 4.0]], prompt_n=1, total_ns=1, load_ns=1).body)["data"][0]["embedding"]
    raw = base64.b64decode(data)
    assert len(raw) == 4 * 2 and struct.unpack("<2f", raw) == pytest.approx((0.6, 0.8))


def test_normalise():
    assert math.isclose(math.hypot(*resp.normalise([1.0, 2.0, 3.0])), 1.0)
    assert resp.normalise([0.0, 0.0]) == [0.0, 0.0]


# --- listings ----------------------------------------------------------------------------------------


def _info(name: str, modified: str) -> ModelInfo:
    return ModelInfo(name=name, digest="d" * 64, size=10, modified_at=modified,
                     details={"format": "gguf", "family": "llama"}, capabilities=("completion", "embedding"))


def test_tags_newest_first_never_null():
    assert json.loads(resp.tags_reply([]).body) == {"models": []}
    got = json.loads(resp.tags_reply([_info("old:latest", "2024-01-01T00:00:00Z"),
                                   _info("new:latest", "2025-01-01T00:00:00Z")]).body)["models"]
    assert [m["name"] for m in got] == ["new:latest", "old:latest"]
    assert got[0]["model"] == "new:latest" and got[0]["details"]["parent_model"] == ""


def test_ps_and_show_and_v1_models():
    info = _info("m:latest", "2024-05-01T12:00:00Z")
    ps = json.loads(resp.ps_reply([resp.Running(info, NOW, 2048)]).body)["models"][0]
    assert ps["expires_at"] == "2024-05-01T12:00:00.123456789Z" and ps["size_vram"] == 0 and ps["context_length"] == 2048
    show = json.loads(resp.show_reply(info, template="{{x}}", model_info={"general.architecture": "llama"},
                                   stop=["<|im_end|>"]).body)
    assert {"model_info", "capabilities", "details", "template", "parameters", "modified_at"} <= set(show)
    assert show["capabilities"] == ["completion", "embedding"] and '"<|im_end|>"' in show["parameters"]
    models = json.loads(resp.v1_models_reply([info]).body)
    assert models == {"object": "list", "data": [{"id": "m:latest", "object": "model", "created": 1714564800,
                                                  "owned_by": "library"}]}
    assert json.loads(resp.v1_model_reply("M", info).body)["id"] == "M"


def test_pull_replies():
    assert lines(resp.pull_reply(True).body)[-1] == {"status": "success"}
    assert json.loads(resp.pull_reply(False).body) == {"status": "success"}
    missing = lines(resp.pull_missing_reply("x", True).body)
    assert missing[0] == {"status": "pulling manifest"} and "error" in missing[1]
    assert resp.pull_missing_reply("x", False).status == 500


# --- GGUF helpers -------------------------------------------------------------------------------------


def test_name_from_filename():
    assert gguf.name_from_filename("/m/mymodel.gguf") == "mymodel:latest"
    assert gguf.name_from_filename("/m/Llama 3.2 1B-Instruct.Q4_K_M.gguf") == "llama-3.2-1b-instruct.q4_k_m:latest"
    assert gguf.name_from_filename("/m/---.gguf") == "model:latest"
    assert len(gguf.name_from_filename("/m/" + "a" * 200 + ".gguf")) == 80 + len(":latest")


def test_human_number():
    assert gguf.human_number(134_515_008) == "134.52M"
    assert gguf.human_number(8_000_000_000) == "8B"
    assert gguf.human_number(7_241_732_096) == "7.2B"
    assert gguf.human_number(999) == "999"


def _gguf_bytes() -> bytes:
    def string(x: str) -> bytes:
        return struct.pack("<Q", len(x)) + x.encode()

    kvs = [
        string("general.architecture") + struct.pack("<I", 8) + string("llama"),
        string("general.file_type") + struct.pack("<I", 4) + struct.pack("<I", 15),
        string("llama.context_length") + struct.pack("<I", 4) + struct.pack("<I", 4096),
        string("tokenizer.ggml.tokens") + struct.pack("<I", 9) + struct.pack("<IQ", 8, 20)
        + b"".join(string(f"t{i}") for i in range(20)),
        string("tokenizer.ggml.scores") + struct.pack("<I", 9) + struct.pack("<IQ", 6, 20) + b"\0" * 80,
        string("general.tags") + struct.pack("<I", 9) + struct.pack("<IQ", 8, 1) + string("x"),
        string("tokenizer.chat_template") + struct.pack("<I", 8) + string("{{ messages }}"),
    ]
    tensors = [string("a") + struct.pack("<I", 2) + struct.pack("<QQ", 10, 20) + struct.pack("<IQ", 0, 0),
               string("b") + struct.pack("<I", 1) + struct.pack("<Q", 5) + struct.pack("<IQ", 0, 0)]
    return b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(tensors)


def test_parse_header_and_details():
    header = gguf.parse_header(io.BytesIO(_gguf_bytes()))
    assert header.parameter_count == 205
    assert header.metadata["tokenizer.ggml.tokens"] == gguf.ArrayLen(20)
    assert header.metadata["general.tags"] == ["x"]
    d = gguf.details(header, "whatever.gguf")
    assert d == {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                 "parameter_size": "205", "quantization_level": "Q4_K_M"}
    info = gguf.model_info(header)
    assert info["tokenizer.ggml.tokens"] == [] and "tokenizer.chat_template" not in info
    assert info["general.parameter_count"] == 205
    assert gguf.chat_template(header) == "{{ messages }}" and gguf.context_length(header) == 4096
    json.dumps(info)  # serialisable


def test_header_errors_and_filename_fallback():
    with pytest.raises(gguf.GgufError):
        gguf.parse_header(io.BytesIO(b"NOPE"))
    with pytest.raises(gguf.GgufError):
        gguf.parse_header(io.BytesIO(_gguf_bytes()[:40]))
    d = gguf.details(None, "/x/Mistral-7B-Instruct-v0.3.Q5_K_M.gguf")
    assert d["quantization_level"] == "Q5_K_M" and d["parameter_size"] == "7B" and d["family"] == ""


def test_digest_cache(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"abc")
    cache = gguf.DigestCache()
    assert cache.cached(path) is None
    assert cache.digest(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert cache.cached(path) == cache.digest(path)
    path.write_bytes(b"abcd")
    assert cache.cached(path) is None
    assert cache.cached(tmp_path / "missing.gguf") is None

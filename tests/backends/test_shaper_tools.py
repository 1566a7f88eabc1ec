"""Tool calls and logprobs as each API writes them (shapers fed scripted pieces)."""

from __future__ import annotations

import json
import random

from meshollama.backends import openai_requests as oreq
from meshollama.backends import ollama_requests as req
from meshollama.backends.shapers import GenStats, Piece, TokenLogprob, make_shaper

STATS = GenStats(done_reason="stop", total_ns=9, load_ns=1, prompt_n=5, prompt_ns=2, eval_n=3, eval_ns=4)
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
CALL_TEXT = ['Checking. <tool', '_call>\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}\n</tool_call>']


def shaped(body: dict, parse=req.parse_chat, pieces=CALL_TEXT, stats=STATS) -> bytes:
    sh = make_shaper(parse(json.dumps(body).encode()), seq=1, created=2, rng=random.Random(0))
    out = b"".join(sh.delta(p, 10**18) for p in pieces)
    return out + sh.finish(stats, 10**18)


def lines(raw: bytes) -> list[dict]:
    return [json.loads(x) for x in raw.splitlines() if x.strip()]


def sse(raw: bytes) -> list:
    events = [e[len(b"data: "):] for e in raw.split(b"\n\n") if e]
    return [e.decode() if e == b"[DONE]" else json.loads(e) for e in events]


CHAT = {"model": "m", "messages": [{"role": "user", "content": "weather?"}], "tools": [TOOL]}


def test_native_chat_streams_text_then_a_tool_call_chunk():
    out = lines(shaped(CHAT))
    # Text before the tag streams at once; the half-written call sends nothing.
    assert [o["message"]["content"] for o in out] == ["Checking. ", "", ""]
    [call] = out[1]["message"]["tool_calls"]
    assert call["function"] == {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}
    assert call["id"].startswith("call_")
    assert out[-1]["done"] is True and out[-1]["done_reason"] == "stop"
    assert "tool_calls" not in out[-1]["message"]


def test_native_chat_whole_answer_gathers_calls():
    [obj] = lines(shaped({**CHAT, "stream": False}))
    assert obj["message"]["content"] == "Checking. "
    assert [c["function"]["name"] for c in obj["message"]["tool_calls"]] == ["get_weather"]


def test_without_tools_the_text_is_plain_content():
    [obj] = lines(shaped({"model": "m", "messages": CHAT["messages"], "stream": False}))
    assert obj["message"]["content"] == "".join(CALL_TEXT) and "tool_calls" not in obj["message"]


def test_openai_tool_calls_streamed_and_whole():
    body = {"model": "m", "messages": CHAT["messages"], "tools": [TOOL], "stream": True}
    events = sse(shaped(body, oreq.parse_openai_chat))
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    [call] = [c for d in deltas for c in d.get("tool_calls", [])]
    assert call["type"] == "function" and call["index"] == 0
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls" and events[-1] == "[DONE]"
    whole = json.loads(shaped({**body, "stream": False}, oreq.parse_openai_chat))
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    # cut off by the length limit: the reason stays "length"
    cut = json.loads(shaped({**body, "stream": False}, oreq.parse_openai_chat,
                            stats=GenStats("length", 1, 1, 1, 1, 1, 1)))
    assert cut["choices"][0]["finish_reason"] == "length"


LP = (TokenLogprob("Hi", -0.25, (("Hi", -0.25), ("Hey", -1.5))),)


def test_logprobs_native_streamed_and_whole():
    pieces = [Piece("Hi", LP), Piece("!", (TokenLogprob("!", -0.5),))]
    body = {"model": "m", "prompt": "x", "logprobs": True, "top_logprobs": 2}
    out = lines(shaped(body, req.parse_generate, pieces))
    assert out[0]["logprobs"] == [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105], "top_logprobs": [
        {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]}, {"token": "Hey", "logprob": -1.5, "bytes": [72, 101, 121]}]}]
    assert "logprobs" not in out[-1]
    [whole] = lines(shaped({**body, "stream": False}, req.parse_generate, pieces))
    assert [lp["token"] for lp in whole["logprobs"]] == ["Hi", "!"]
    [chat] = lines(shaped({"model": "m", "messages": CHAT["messages"], "stream": False, "logprobs": True},
                          req.parse_chat, pieces))
    assert len(chat["logprobs"]) == 2


def test_logprobs_openai_chat():
    pieces = [Piece("Hi", LP)]
    body = {"model": "m", "messages": CHAT["messages"], "logprobs": True, "top_logprobs": 2}
    whole = json.loads(shaped(body, oreq.parse_openai_chat, pieces))
    content = whole["choices"][0]["logprobs"]["content"]
    assert content[0]["token"] == "Hi" and len(content[0]["top_logprobs"]) == 2
    events = sse(shaped({**body, "stream": True}, oreq.parse_openai_chat, pieces))
    assert events[0]["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.25


def test_openai_history_with_tool_calls_and_results():
    job = oreq.parse_openai_chat(json.dumps({"model": "m", "tools": [TOOL], "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]}).encode())
    assistant, tool = job.messages[1], job.messages[2]
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert tool == {"role": "tool", "content": "sunny", "tool_call_id": "call_1", "tool_name": "get_weather"}
    assert len(job.tools) == 1


def test_native_history_keeps_tool_fields_and_empty_tools_is_none():
    job = req.parse_chat(json.dumps({"model": "m", "tools": [], "messages": [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "Tool", "content": "42", "tool_name": "f"}]}).encode())
    assert job.tools == ()
    assert job.messages[0]["tool_calls"] == [{"function": {"name": "f", "arguments": {"a": 1}}}]
    assert job.messages[1] == {"role": "tool", "content": "42", "tool_name": "f"}


def test_openai_tool_call_arguments_that_are_not_json_are_a_400():
    import pytest

    from meshollama.errors import BadRequest

    body = {"model": "m", "messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}
    with pytest.raises(BadRequest, match="invalid tool call arguments"):
        oreq.parse_openai_chat(json.dumps(body).encode())

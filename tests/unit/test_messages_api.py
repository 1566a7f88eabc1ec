"""The Anthropic Messages API over chat completions: requests (Ollama's test vectors
from anthropic/anthropic_test.go and middleware/anthropic_test.go), streamed events
and complete messages. The ``anthropic`` SDK checks run where it is installed."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from meshollama.backends import messages_api as ma
from meshollama.backends import messages_request as mr
from meshollama.errors import BadRequest, ModelNotFound, NoCapacity

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNk+A8AAQUBAScY42YAAAAASUVORK5CYII="


def counter_ids() -> ma.Ids:
    n = itertools.count()
    return lambda prefix: f"{prefix}_{next(n)}"


def body(**kw: Any) -> dict[str, Any]:
    return {"model": "test-model", "max_tokens": 1024, "messages": [{"role": "user", "content": "Hello"}], **kw}


def chat(b: dict[str, Any]) -> dict[str, Any]:
    return ma.to_chat(json.dumps(b).encode())


def bad(b: Any) -> str:
    with pytest.raises(BadRequest) as e:
        ma.to_chat(b if isinstance(b, bytes) else json.dumps(b).encode())
    return e.value.message


# --- requests ----------------------------------------------------------------------------


def test_basic_request():
    assert chat(body()) == {"model": "test-model", "messages": [{"role": "user", "content": "Hello"}],
                            "max_tokens": 1024, "stream": False}


def test_system_prompt_string_and_blocks():
    assert chat(body(system="You are helpful."))["messages"][0] == {"role": "system", "content": "You are helpful."}
    c = chat(body(system=[{"type": "text", "text": "You are "}, {"type": "text", "text": "helpful."}]))
    assert c["messages"][0] == {"role": "system", "content": "You are helpful."}
    assert chat(body(system=""))["messages"][0]["role"] == "user"


def test_options_and_stream():
    c = chat(body(temperature=0.7, top_p=0.9, top_k=40, stop_sequences=["\n", "END"], stream=True))
    assert (c["temperature"], c["top_p"], c["top_k"], c["stop"]) == (0.7, 0.9, 40, ["\n", "END"])
    assert c["stream"] is True and c["stream_options"] == {"include_usage": True}


def test_image_block():
    c = chat(body(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What's in this image?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]}]))
    assert c["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "What's in this image?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}}]}]
    gif = chat(body(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/gif", "data": "R0lGODlh"}}]}]))
    assert gif["messages"][0]["content"] == [{"type": "image_url", "image_url": {"url": "data:;base64,R0lGODlh"}}]


def test_tool_use_and_results():
    c = chat(body(messages=[
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Use the tool.", "signature": "sig"},
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "call_123", "name": "get_weather", "input": {"location": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_123", "content": "The weather in Paris is sunny, 22°C"},
            {"type": "text", "text": "Please describe it."}]}]))
    assert c["messages"] == [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "reasoning": "Use the tool.", "tool_calls": [
            {"id": "call_123", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_123", "content": "The weather in Paris is sunny, 22°C"},
        {"role": "user", "content": "Please describe it."}]


def test_tool_result_blocks_with_image():
    c = chat(body(messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_img", "content": [
        {"type": "text", "text": "Attached image"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]}]}]))
    assert c["messages"] == [{"role": "tool", "tool_call_id": "call_img", "content": [
        {"type": "text", "text": "Attached image"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}}]}]


def test_thinking_only_block_and_ignored_blocks():
    c = chat(body(messages=[{"role": "user", "content": "Hello"}, {"role": "assistant", "content": [
        {"type": "redacted_thinking", "data": "x"}, {"type": "thinking", "thinking": "Let me think about this..."}]}]))
    assert c["messages"][1] == {"role": "assistant", "content": "", "reasoning": "Let me think about this..."}
    assert len(chat(body(messages=[{"role": "user", "content": [{"type": "document"}]}]))["messages"]) == 0


def test_server_tool_history():
    c = chat(body(messages=[{"role": "assistant", "content": [
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "ollama"}},
        {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [
            {"type": "web_search_result", "title": "Ollama", "url": "https://ollama.com"}]}]},
        {"role": "assistant", "content": [{"type": "web_search_tool_result", "tool_use_id": "s2",
                                           "content": {"type": "web_search_tool_result_error", "error_code": "max_uses_exceeded"}}]}]))
    assert c["messages"][0]["tool_calls"][0]["function"] == {"name": "web_search", "arguments": "{\"query\":\"ollama\"}"}
    assert c["messages"][1] == {"role": "tool", "tool_call_id": "srvtoolu_1", "content": "- Ollama: https://ollama.com\n"}
    assert c["messages"][2]["content"] == "web_search_tool_result_error: max_uses_exceeded"


def test_tools():
    c = chat(body(tools=[
        {"name": "get_weather", "description": "Get the weather", "input_schema": {
            "type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
        {"type": "custom", "name": "web_search", "description": "my own"},
        {"type": "bash_20250124", "name": "bash"}]))
    assert c["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "Get the weather", "parameters": {
            "type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}},
        {"type": "function", "function": {"name": "web_search", "description": "my own",
                                          "parameters": {"type": "object", "properties": {}}}},
        {"type": "function", "function": {"name": "bash", "description": "",
                                          "parameters": {"type": "object", "properties": {}}}}]


@pytest.mark.parametrize(("extra", "want"), [
    ({"thinking": {"type": "enabled", "budget_tokens": 1000}}, "medium"),
    ({"thinking": {"type": "disabled"}, "output_config": {"effort": "high"}}, "none"),
    ({"output_config": {"effort": "high"}}, "high"),
    ({"output_config": {"effort": " XHigh "}}, "high"),
    ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "low"}}, "low"),
    ({"output_config": {"effort": "bogus"}}, None),
    ({}, None)])
def test_thinking(extra, want):
    assert chat(body(**extra)).get("reasoning_effort") == want


@pytest.mark.parametrize(("b", "message"), [
    (b"", "EOF"),
    (b"[]", "json: cannot unmarshal array into Go value of type anthropic.MessagesRequest"),
    ({"max_tokens": 1024, "messages": [{"role": "user", "content": "Hi"}]}, "model is required"),
    ({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}, "max_tokens is required and must be positive"),
    ({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "Hi"}]}, "max_tokens is required and must be positive"),
    ({"model": "m", "max_tokens": 1024}, "messages is required"),
    (body(max_tokens="many"), "json: cannot unmarshal string into Go struct field MessagesRequest.max_tokens of type int"),
    (body(stop_sequences=["a", 1]), "json: cannot unmarshal number into Go struct field MessagesRequest.stop_sequences of type string"),
    (body(messages=[{"role": "user", "content": 5}]), "json: cannot unmarshal number into Go value of type []anthropic.ContentBlock"),
    (body(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
     "json: cannot unmarshal number into Go struct field ContentBlock.text of type string"),
    # a bind error wins over the missing model
    ({"max_tokens": 1, "messages": [{"role": "user", "content": 5}]}, "json: cannot unmarshal number into Go value of type []anthropic.ContentBlock"),
    (body(messages=[{"role": "assistant", "content": [{"type": "tool_use", "name": "get_weather"}]}]),
     "tool_use block missing required 'id' field"),
    (body(messages=[{"role": "assistant", "content": [{"type": "tool_use", "id": "call_123"}]}]),
     "tool_use block missing required 'name' field"),
    (body(tools=[{"name": "bad_tool", "input_schema": "{invalid json"}]),
     'invalid input_schema for tool "bad_tool": json: cannot unmarshal string into Go value of type api.ToolFunctionParameters'),
    (body(messages=[{"role": "user", "content": [{"type": "image"}]}]), "invalid image source"),
    (body(messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "https://x"}}]}]),
     "invalid image source type: url. Only base64 images are supported."),
    (body(messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "abc!"}}]}]),
     "invalid base64 image data: illegal base64 data at input byte 3"),
    (body(messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": "x"}]}]}]), "invalid tool_result image source"),
])
def test_invalid_requests(b, message):
    assert bad(b) == message


@pytest.mark.parametrize(("data", "at"), [
    ("YWJj", None), ("", None), ("YQ==", None), ("YWI=", None), ("YW\nJj", None), ("YWJ", 0), ("Y", 0),
    ("YWJjZA", 4), ("Y===", 1), ("YWJjZA=", 7), ("YWJj!", 4), ("YQ==x", 4), ("YW=j", 2)])
def test_base64_errors_at_gos_offsets(data, at):
    assert mr._base64_error(data) == at


def test_estimate_input_tokens():
    assert ma.estimate_input_tokens({"messages": [{"role": "user", "content": "Hello, world!"}]}) == 4  # (4+13)//4
    assert ma.estimate_input_tokens({"messages": [{"role": "user", "content": ""}]}) == 1
    assert ma.estimate_input_tokens({"messages": []}) == 0
    with_tools = {"system": "You are a helpful assistant.", "messages": [{"role": "user", "content": "Hi"}],
                  "tools": [{"name": "get_weather", "description": "Get the weather", "input_schema": {"type": "object"}}]}
    assert ma.estimate_input_tokens(with_tools) == (28 + 4 + 2 + 11 + 15 + 17) // 4


# --- non-streamed answers ------------------------------------------------------------------


def completion(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "test-model",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def test_from_chat_text():
    assert ma.from_chat(completion({"content": "Hello there!"}), ids=counter_ids()) == {
        "id": "msg_0", "type": "message", "role": "assistant", "model": "test-model",
        "content": [{"type": "text", "text": "Hello there!"}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5}}


def test_from_chat_thinking_and_tool_calls():
    m = ma.from_chat(completion({"content": "The answer", "reasoning_content": "Let me think...", "tool_calls": [
        {"id": "call_123", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}},
        {"id": "", "type": "function", "function": {"name": "broken", "arguments": "{not json"}}]}, "tool_calls"),
        ids=counter_ids(), model="claude-alias")
    assert m["content"] == [
        {"type": "thinking", "thinking": "Let me think...", "signature": ""},
        {"type": "text", "text": "The answer"},
        {"type": "tool_use", "id": "call_123", "name": "get_weather", "input": {"location": "Paris"}},
        {"type": "tool_use", "id": "toolu_1", "name": "broken", "input": {}}]
    assert (m["stop_reason"], m["model"], m["id"]) == ("tool_use", "claude-alias", "msg_0")


@pytest.mark.parametrize(("finish", "reason"), [("stop", "end_turn"), ("length", "max_tokens"),
                                                ("tool_calls", "tool_use"), ("content_filter", "refusal"),
                                                (None, "end_turn")])
def test_stop_reasons(finish, reason):
    assert ma.from_chat(completion({"content": "x"}, finish))["stop_reason"] == reason


def test_from_chat_empty():
    m = ma.from_chat(completion({"content": None}))
    assert m["content"] == [] and m["id"].startswith("msg_") and len(m["id"]) == 28


# --- streamed answers ---------------------------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}


USAGE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
         "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def run(chunks: list[dict[str, Any]], input_tokens: int = 3) -> bytes:
    s = ma.MessagesStream("test-model", input_tokens=input_tokens, ids=counter_ids())
    return b"".join(s.feed(c) for c in chunks) + s.finish()


def events(sse: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in sse.decode().split("\n\n")[:-1]:
        head, data = block.split("\n")
        obj = json.loads(data.removeprefix("data: "))
        assert head == "event: " + obj["type"]
        out.append((obj["type"], obj))
    return out


def test_stream_text():
    evs = events(run([chunk({"role": "assistant", "content": "Hello"}), chunk({"content": " world!"}),
                      chunk(finish="stop"), USAGE]))
    assert [e for e, _ in evs] == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                                   "content_block_stop", "message_delta", "message_stop"]
    assert evs[0][1] == {"type": "message_start", "message": {
        "id": "msg_0", "type": "message", "role": "assistant", "model": "test-model", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 0}}}
    assert evs[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert evs[2][1] == {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}
    assert evs[4][1] == {"type": "content_block_stop", "index": 0}
    assert evs[5][1] == {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                         "usage": {"input_tokens": 10, "output_tokens": 5}}
    assert evs[6][1] == {"type": "message_stop"}


def test_stream_thinking_text_and_tool_call_pieces():
    evs = events(run([chunk({"role": "assistant", "reasoning_content": "Let me "}), chunk({"reasoning": "think"}),
                      chunk({"content": "Checking."}),
                      chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                             "function": {"name": "get_weather", "arguments": ""}}]}),
                      chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"location\":"}}]}),
                      chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
                      chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                                             "function": {"name": "get_time", "arguments": "{}"}}]}),
                      chunk(finish="tool_calls")]))
    starts = [d["content_block"] for e, d in evs if e == "content_block_start"]
    assert starts == [{"type": "thinking", "thinking": "", "signature": ""}, {"type": "text", "text": ""},
                      {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}},
                      {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}}]
    deltas = [(d["index"], d["delta"]) for e, d in evs if e == "content_block_delta"]
    assert deltas == [(0, {"type": "thinking_delta", "thinking": "Let me "}), (0, {"type": "thinking_delta", "thinking": "think"}),
                      (1, {"type": "text_delta", "text": "Checking."}),
                      (2, {"type": "input_json_delta", "partial_json": "{\"location\":"}),
                      (2, {"type": "input_json_delta", "partial_json": "\"Paris\"}"}),
                      (3, {"type": "input_json_delta", "partial_json": "{}"})]
    assert [d["index"] for e, d in evs if e == "content_block_stop"] == [0, 1, 2, 3]
    assert evs[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert evs[-2][1]["usage"] == {"input_tokens": 3, "output_tokens": 0}  # no usage chunk: the estimate


def test_stream_text_after_thinking_after_text():
    """Ollama's TextBeforeThinking: each switch stops the open block and starts the next."""
    evs = events(run([chunk({"content": "a"}), chunk({"reasoning": "b"}), chunk({"content": "c"}), chunk(finish="length")]))
    assert [d["content_block"]["type"] for e, d in evs if e == "content_block_start"] == ["text", "thinking", "text"]
    assert evs[-2][1]["delta"]["stop_reason"] == "max_tokens"


def test_stream_empty_and_failure():
    assert [e for e, _ in events(run([]))] == ["message_start", "message_delta", "message_stop"]
    s = ma.MessagesStream("m", ids=counter_ids())
    evs = events(s.feed(chunk({"content": "Hel"})) + s.fail("model crashed"))
    assert evs[-1][1] == {"type": "error", "error": {"type": "api_error", "message": "model crashed"}}
    assert s.feed(chunk({"content": "x"})) == b"" and s.finish() == b""
    s = ma.MessagesStream("m", ids=counter_ids())
    assert events(s.fail("busy", 529)) == [("error", {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})]
    s = ma.MessagesStream("m", ids=counter_ids())
    assert events(s.feed({"error": {"message": "boom"}}))[-1][1]["error"]["message"] == "boom"


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "kind"), [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (413, "request_too_large"), (429, "rate_limit_error"), (500, "api_error"),
    (503, "overloaded_error"), (529, "overloaded_error")])
def test_error_body(status, kind):
    assert json.loads(ma.error_body(status, "test message", "req_1")) == {
        "type": "error", "error": {"type": kind, "message": "test message"}, "request_id": "req_1"}


def test_error_reply():
    reply = ma.error_reply(ModelNotFound("model 'x' not found"), "req_9")
    assert (reply.status, reply.content_type) == (404, "application/json")
    assert json.loads(reply.body)["error"] == {"type": "not_found_error", "message": "model 'x' not found"}
    assert json.loads(ma.error_reply(NoCapacity("busy")).body)["request_id"].startswith("req_")


# --- the anthropic SDK reading our bytes (skipped where it is not installed) --------------------------


def sdk(status: int, body: bytes, content_type: str) -> Any:
    anthropic = pytest.importorskip("anthropic")
    httpx2 = pytest.importorskip("httpx2")

    def handler(request: Any) -> Any:
        return httpx2.Response(status, headers={"content-type": content_type}, content=body)
    return anthropic.Anthropic(api_key="test", base_url="http://gateway.test", max_retries=0,
                               http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
                               _strict_response_validation=True)


HELLO = [{"role": "user", "content": "Hello"}]


def test_anthropic_sdk_accumulates_our_stream():
    sse = run([chunk({"role": "assistant", "reasoning_content": "hmm"}), chunk({"content": "It is "}),
               chunk({"content": "sunny."}),
               chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": "{\"city\""}}]}),
               chunk({"tool_calls": [{"index": 0, "function": {"arguments": ":\"Paris\"}"}}]}),
               chunk(finish="tool_calls"), USAGE])
    with sdk(200, sse, ma.MessagesStream.content_type).messages.stream(
            model="test-model", max_tokens=100, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "It is sunny."
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[2].input == {"city": "Paris"} and final.content[2].id == "call_1"
    assert (final.stop_reason, final.usage.input_tokens, final.usage.output_tokens) == ("tool_use", 10, 5)


def test_anthropic_sdk_reads_our_complete_message():
    anthropic = pytest.importorskip("anthropic")
    m = ma.from_chat(completion({"content": "Hi", "reasoning_content": "hm", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}, "tool_calls"))
    anthropic.types.Message.model_validate(m)
    got = sdk(200, json.dumps(m).encode(), "application/json").messages.create(
        model="test-model", max_tokens=100, messages=HELLO)
    assert got.content[1].text == "Hi" and got.content[2].input == {"a": 1} and got.stop_reason == "tool_use"


def test_anthropic_sdk_raises_our_errors():
    anthropic = pytest.importorskip("anthropic")
    client = sdk(404, ma.error_body(404, "model 'x' not found", "req_1"), "application/json")
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="x", max_tokens=1, messages=HELLO)
    assert e.value.body["error"]["type"] == "not_found_error"
    s = ma.MessagesStream("m", ids=counter_ids())
    client = sdk(200, s.feed(chunk({"content": "Hel"})) + s.fail("model crashed"), ma.MessagesStream.content_type)
    with pytest.raises(anthropic.APIStatusError) as e2, client.messages.stream(
            model="m", max_tokens=1, messages=HELLO) as stream:
        stream.get_final_message()
    assert "model crashed" in str(e2.value)

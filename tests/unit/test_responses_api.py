"""The Responses API over chat completions: requests (Ollama's test vectors from
openai/responses_test.go), streamed events and complete responses, each also
checked by the ``openai`` SDK's own strict parsers."""

from __future__ import annotations

import itertools
import json
from typing import Any

import httpx2
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from meshollama.backends import responses_api as ra
from meshollama.errors import BadRequest

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
CREATED, DONE_AT = 1_700_000_000, 1_700_000_009


def counter_ids() -> ra.Ids:
    n = itertools.count()
    return lambda prefix: f"{prefix}_{next(n)}"


def chat(body: dict[str, Any]) -> dict[str, Any]:
    return ra.to_chat(json.dumps(body).encode())


def bad(body: Any) -> str:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(BadRequest) as e:
        ra.to_chat(raw)
    assert e.value.status == 400
    return e.value.message


def roles(c: dict[str, Any]) -> list[str]:
    return [m["role"] for m in c["messages"]]


# --- requests ----------------------------------------------------------------------------


def test_string_input_instructions_and_defaults():
    c = chat({"model": "gpt-oss:20b", "input": "Hello", "instructions": "You are helpful."})
    assert c == {"model": "gpt-oss:20b",
                 "messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello"}],
                 "temperature": 1.0, "stream": False}


def test_options_stream_and_format():
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    c = chat({"model": "m", "input": "x", "temperature": 0.5, "top_p": 0.9, "max_output_tokens": 100,
              "stream": True, "text": {"format": {"type": "json_schema", "name": "person", "schema": schema,
                                                  "strict": True}}})
    assert c["temperature"] == 0.5 and c["top_p"] == 0.9 and c["max_tokens"] == 100
    assert c["stream"] is True and c["stream_options"] == {"include_usage": True}
    assert c["response_format"] == {"type": "json_schema",
                                    "json_schema": {"name": "person", "schema": schema, "strict": True}}
    assert "response_format" not in chat({"model": "m", "input": "x", "text": {"format": {"type": "text"}}})
    assert chat({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}})["response_format"] == {
        "type": "json_object"}


def test_shorthand_messages_keep_their_roles():
    c = chat({"model": "m", "input": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"},
                                      {"role": "developer", "content": "Be brief"}, {"role": "user", "content": "How are you?"}]})
    assert [(m["role"], m["content"]) for m in c["messages"]] == [
        ("user", "Hello"), ("assistant", "Hi there!"), ("developer", "Be brief"), ("user", "How are you?")]


@pytest.mark.parametrize(("effort", "want"), [
    ("low", "low"), ("medium", "medium"), ("high", "high"), ("max", "max"), ("minimal", "low"),
    ("xhigh", "max"), ("ultra", "max"), ("none", "none")])
def test_reasoning_effort_as_ollama_maps_it(effort, want):
    assert chat({"model": "m", "input": "hi", "reasoning": {"effort": effort}})["reasoning_effort"] == want


def test_reasoning_effort_unset_and_invalid():
    assert "reasoning_effort" not in chat({"model": "m", "input": "hi", "reasoning": {"summary": "auto"}})
    assert bad({"model": "m", "input": "hi", "reasoning": {"effort": "extreme"}}) == (
        'invalid reasoning value: "extreme" (must be "minimal", "low", "medium", "high", "xhigh", "ultra", "max", or "none")')


def test_function_call_round_trip():
    c = chat({"model": "m", "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "what is the weather?"}]},
        {"type": "function_call", "call_id": "call_abc123", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
        {"type": "function_call_output", "call_id": "call_abc123", "output": "sunny, 72F"}]})
    assert c["messages"] == [
        {"role": "user", "content": "what is the weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_abc123", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_abc123", "content": "sunny, 72F"}]


def test_function_call_output_content_array_and_image():
    out = chat({"model": "m", "input": [
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": [
            {"type": "input_text", "text": "sunny"}, {"type": "input_text", "text": ", 72F"}]}]})["messages"][1]
    assert out == {"role": "tool", "tool_call_id": "c", "content": "sunny, 72F"}
    url = "data:image/png;base64," + PNG
    out = chat({"model": "m", "input": [
        {"type": "function_call", "call_id": "c", "name": "inspect_image", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": [
            {"type": "input_text", "text": "attached image"}, {"type": "input_image", "detail": "auto", "image_url": url}]}]})
    assert out["messages"][1]["content"] == [{"type": "text", "text": "attached image"},
                                             {"type": "image_url", "image_url": {"url": url}}]


def test_images_in_a_message():
    url = "data:image/png;base64," + PNG
    c = chat({"model": "llava", "input": [{"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "What is in this image?"}, {"type": "input_image", "detail": "auto", "image_url": url},
        {"type": "input_image", "detail": "auto", "file_id": "file-1"}]}]})  # a file_id alone is skipped
    assert c["messages"] == [{"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                                          {"type": "image_url", "image_url": {"url": url}}]}]


def fc(call_id: str, name: str) -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": name, "arguments": "{}"}


def asst(text: Any) -> dict[str, Any]:
    return {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}] if text else ""}


USER = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "go"}]}


def calls(m: dict[str, Any]) -> list[str]:
    return [c["function"]["name"] for c in m.get("tool_calls", [])]


def test_function_calls_merge_into_the_assistant_turn():
    c = chat({"model": "m", "input": [USER, asst("First batch."), fc("1", "func_a"), fc("2", "func_b"),
                                      asst("Second batch."), fc("3", "func_c")]})
    assert roles(c) == ["user", "assistant", "assistant"]
    assert (c["messages"][1]["content"], calls(c["messages"][1])) == ("First batch.", ["func_a", "func_b"])
    assert (c["messages"][2]["content"], calls(c["messages"][2])) == ("Second batch.", ["func_c"])


def test_reasoning_goes_to_the_next_assistant_turn():
    reasoning = {"type": "reasoning", "id": "rs_1", "encrypted_content": "Thinking first...", "summary": []}
    c = chat({"model": "m", "input": [USER, reasoning, asst(""), fc("1", "think_action"),
                                      asst("Now doing more."), fc("2", "action_a"), fc("3", "action_b")]})
    assert roles(c) == ["user", "assistant", "assistant"]
    assert c["messages"][1]["reasoning"] == "Thinking first..." and c["messages"][1]["content"] == ""
    assert calls(c["messages"][1]) == ["think_action"]
    assert "reasoning" not in c["messages"][2] and calls(c["messages"][2]) == ["action_a", "action_b"]
    c = chat({"model": "m", "input": [USER, {**reasoning, "encrypted_content": "I need a tool"}, fc("a", "get_weather")]})
    assert c["messages"][1]["reasoning"] == "I need a tool" and calls(c["messages"][1]) == ["get_weather"]
    c = chat({"model": "m", "input": [USER, {**reasoning, "encrypted_content": "Still thinking..."}]})
    assert c["messages"][1] == {"role": "assistant", "content": "", "reasoning": "Still thinking..."}


def test_multi_turn_with_tools_and_reasoning():
    c = chat({"model": "qwen3", "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is the weather in Paris?"}]},
        {"type": "reasoning", "id": "rs_001", "encrypted_content": "I need to call the weather API for Paris.", "summary": []},
        {"type": "function_call", "call_id": "call_abc", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
        {"type": "function_call_output", "call_id": "call_abc", "output": "Sunny, 72°F"},
        {"type": "reasoning", "id": "rs_002", "encrypted_content": "Format it nicely.", "summary": []},
        {"type": "message", "role": "assistant", "content": [{"type": "input_text", "text": "It's sunny!"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What about London?"}]}]})
    assert roles(c) == ["user", "assistant", "tool", "assistant", "user"]
    assert c["messages"][1]["reasoning"] == "I need to call the weather API for Paris."
    assert c["messages"][3] == {"role": "assistant", "content": "It's sunny!", "reasoning": "Format it nicely."}


def test_assistant_message_between_call_and_output_joins_the_call():
    c = chat({"model": "kimi-k3:cloud", "input": [
        {"role": "user", "content": "Find Ollama and inspect the current directory."},
        {"type": "web_search_call", "id": "ws_test", "status": "completed", "action": {"type": "search", "query": "Ollama"}},
        {"type": "function_call", "call_id": "call_test", "name": "exec_command", "arguments": "{\"cmd\":\"pwd\"}"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "I found Ollama."}]},
        {"type": "function_call_output", "call_id": "call_test", "output": "/tmp"}]})
    assert roles(c) == ["user", "assistant", "tool"]
    assert c["messages"][1]["content"] == "I found Ollama." and calls(c["messages"][1]) == ["exec_command"]
    assert c["messages"][2] == {"role": "tool", "tool_call_id": "call_test", "content": "/tmp"}


def test_tools_namespaces_and_web_search():
    shell = {"type": "function", "name": "shell", "description": "Runs a shell command", "strict": True,
             "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}
    c = chat({"model": "m", "input": "hello", "tools": [
        {"type": "namespace", "name": "muse", "description": "Muse Code tool set.", "tools": [
            {**shell, "name": "bash"}, {**shell, "name": "muse.read_file", "description": "Reads a file"}]},
        {"type": "web_search"}, shell, {"type": "function", "name": "bare"}]})
    assert [t["function"]["name"] for t in c["tools"]] == ["muse.bash", "muse.read_file", "shell", "bare"]
    assert c["tools"][2] == {"type": "function", "function": {
        "name": "shell", "description": "Runs a shell command", "parameters": shell["parameters"]}}
    assert c["tools"][3]["function"]["parameters"] == {"type": "object", "properties": {}}


@pytest.mark.parametrize(("body", "message"), [
    (b"", "EOF"),
    (b"[1]", "json: cannot unmarshal array into Go value of type openai.ResponsesRequest"),
    ({"model": "m", "input": 5}, "input must be a string or array: json: cannot unmarshal number into Go value of type []json.RawMessage"),
    ({"model": "m", "input": [{"type": "unknown_type"}]}, 'input[0]: unknown input item type: "unknown_type"'),
    ({"model": "m", "input": [{"content": "hello"}]}, "input[0]: input item missing required 'type' field"),
    ({"model": "m", "input": ["x", {"type": ""}]}, ("input[0]: json: cannot unmarshal string into Go value of type "
                                                   'struct { Type string "json:\\"type\\""; Role string "json:\\"role\\"" }')),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input[0]: content[0]: unknown content type: input_audio"),
    ({"model": "m", "input": [{"role": "user", "content": 3}]}, "input[0]: content must be a string or array: json: cannot unmarshal number into Go value of type []json.RawMessage"),
    ({"model": "m", "input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "x"}]}]}, "input[0]: output[0]: unknown content type: x"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "file inputs are not currently supported"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "image URLs are not currently supported, please use base64 encoded data instead"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/gif;base64,R0lG"}]}]}, "invalid image input"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,not-valid!"}]}]}, "invalid image input"),
    ({"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{\"a\":"}]}, "failed to parse function call arguments: unexpected end of JSON input"),
    ({"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "x"}]}, "failed to parse function call arguments: invalid character 'x' looking for beginning of value"),
    ({"model": "m", "input": "x", "temperature": "hot"}, "json: cannot unmarshal string into Go struct field ResponsesRequest.temperature of type float64"),
    ({"model": "m", "input": "x", "stream": "yes"}, "json: cannot unmarshal string into Go struct field ResponsesRequest.stream of type bool"),
])
def test_invalid_requests(body, message):
    assert bad(body) == message


# --- non-streamed answers ------------------------------------------------------------------


def completion(message: dict[str, Any], finish: str = "stop", usage: tuple[int, int] = (10, 5)) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": CREATED, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}}


def test_from_chat_text():
    r = ra.from_chat(completion({"content": "Hello!"}), ids=counter_ids(), completed_at=DONE_AT)
    assert r["id"] == "resp_0" and r["object"] == "response" and r["status"] == "completed"
    assert (r["created_at"], r["completed_at"], r["model"]) == (CREATED, DONE_AT, "m")
    assert r["output"] == [{"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
                            "content": [{"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}]}]
    assert r["usage"] == {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15,
                          "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                          "output_tokens_details": {"reasoning_tokens": 0}}
    assert r["incomplete_details"] is None and r["error"] is None and r["tools"] == []
    assert Response.model_validate(r).output_text == "Hello!"


def test_from_chat_reasoning_tool_calls_and_echo():
    req = {"model": "m", "instructions": "be brief", "temperature": 0.2, "max_output_tokens": 50,
           "reasoning": {"effort": "high"},
           "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": False}]}
    r = ra.from_chat(completion({"content": "Checking.", "reasoning": "Let me think", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        "tool_calls"), request=req, ids=counter_ids())
    assert [o["type"] for o in r["output"]] == ["reasoning", "message", "function_call"]
    assert r["output"][0] == {"id": "rs_1", "type": "reasoning", "encrypted_content": "Let me think",
                              "summary": [{"type": "summary_text", "text": "Let me think"}]}
    assert r["output"][2] == {"id": "fc_3", "type": "function_call", "status": "completed", "call_id": "call_1",
                              "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}
    assert (r["instructions"], r["temperature"], r["top_p"], r["max_output_tokens"]) == ("be brief", 0.2, 1.0, 50)
    assert r["reasoning"] == {"effort": "high", "summary": None} and r["tools"] == req["tools"]
    parsed = Response.model_validate(r)
    assert parsed.output[2].type == "function_call" and parsed.output[2].arguments == "{\"city\":\"Paris\"}"


def test_from_chat_tool_calls_only_and_length():
    r = ra.from_chat(completion({"content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]}), ids=counter_ids())
    assert [o["type"] for o in r["output"]] == ["function_call"] and r["output"][0]["arguments"] == "{}"
    r = ra.from_chat(completion({"content": "cut sh"}, "length"), ids=counter_ids())
    assert r["status"] == "incomplete" and r["incomplete_details"] == {"reason": "max_output_tokens"}
    assert r["output"][0]["status"] == "incomplete"
    Response.model_validate(r)


# --- streamed answers ---------------------------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": CREATED, "model": "m",
            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}


def usage_chunk(prompt: int, completion_: int) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": CREATED, "model": "m", "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion_, "total_tokens": prompt + completion_}}


def run(chunks: list[dict[str, Any]], request: dict[str, Any] | None = None) -> bytes:
    s = ra.ResponsesStream("m", CREATED, request=request, ids=counter_ids(), clock=lambda: DONE_AT)
    return b"".join(s.feed(c) for c in chunks) + s.finish()


def events(sse: bytes) -> list[dict[str, Any]]:
    out = []
    for block in sse.decode().split("\n\n")[:-1]:
        head, data = block.split("\n")
        obj = json.loads(data.removeprefix("data: "))
        assert head == "event: " + obj["type"]
        out.append(obj)
    assert sse.endswith(b"\n\n") and [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


TEXT = [chunk({"role": "assistant", "content": "Hello"}), chunk({"content": " World"}), chunk(finish="stop"),
        usage_chunk(10, 2)]


def test_stream_text_events():
    evs = events(run(TEXT))
    assert [e["type"] for e in evs] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert evs[0]["response"]["status"] == "in_progress" and evs[0]["response"]["output"] == []
    assert evs[2]["item"] == {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    assert evs[4] == {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0,
                      "delta": "Hello", "logprobs": [], "sequence_number": 4}
    assert evs[6]["text"] == "Hello World"
    done = evs[-1]["response"]
    assert (done["id"], done["status"], done["created_at"], done["completed_at"]) == ("resp_0", "completed", CREATED, DONE_AT)
    assert done["output"] == [evs[8]["item"]] and done["output"][0]["content"][0]["text"] == "Hello World"
    assert (done["usage"]["input_tokens"], done["usage"]["output_tokens"], done["usage"]["total_tokens"]) == (10, 2, 12)
    for e in evs:
        TypeAdapter(ResponseStreamEvent).validate_python(e)


def test_stream_reasoning_then_text_then_tool_call_pieces():
    evs = events(run([chunk({"role": "assistant", "reasoning_content": "Let me "}), chunk({"reasoning": "think..."}),
                      chunk({"content": "Calling."}),
                      chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                             "function": {"name": "get_weather", "arguments": ""}}]}),
                      chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
                      chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
                      chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                                             "function": {"name": "get_time", "arguments": "{}"}}]}),
                      chunk(finish="tool_calls"), usage_chunk(7, 9)]))
    kinds = [e["type"] for e in evs]
    assert kinds[2:] == [
        "response.output_item.added", "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta", "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done", "response.reasoning_summary_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert [e["output_index"] for e in evs if e["type"] == "response.output_item.added"] == [0, 1, 2, 3]
    assert evs[8]["item"] == {"id": "rs_1", "type": "reasoning", "encrypted_content": "Let me think...",
                              "summary": [{"type": "summary_text", "text": "Let me think..."}]}
    added = evs[15]["item"]
    assert added == {"id": "fc_3", "type": "function_call", "status": "in_progress", "call_id": "call_1",
                     "name": "get_weather", "arguments": ""}
    assert evs[18] == {"type": "response.function_call_arguments.done", "item_id": "fc_3", "output_index": 2,
                       "name": "get_weather", "arguments": "{\"city\":\"Paris\"}", "sequence_number": 18}
    output = evs[-1]["response"]["output"]
    assert [o["type"] for o in output] == ["reasoning", "message", "function_call", "function_call"]
    assert [o.get("call_id") for o in output[2:]] == ["call_1", "call_2"]
    for e in evs:
        TypeAdapter(ResponseStreamEvent).validate_python(e)


def test_stream_whole_tool_calls_as_ollama_sends_them():
    """Ollama-style chunks: each tool call complete in one delta (index 0 twice, new ids)."""
    evs = events(run([chunk({"role": "assistant", "tool_calls": [
        {"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}}]}),
        chunk({"tool_calls": [{"index": 0, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}),
        chunk(finish="tool_calls")]))
    output = evs[-1]["response"]["output"]
    assert [(o["call_id"], o["name"], o["arguments"]) for o in output] == [("call_a", "f", "{\"x\":1}"), ("call_b", "g", "{}")]
    assert evs[-1]["response"]["usage"]["total_tokens"] == 0  # no usage chunk: zeros


def test_stream_length_is_incomplete_and_empty_stream_completes():
    evs = events(run([chunk({"content": "cut sh"}), chunk(finish="length")]))
    done = evs[-1]
    assert done["type"] == "response.completed" and done["response"]["status"] == "incomplete"
    assert done["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert done["response"]["output"][0]["status"] == "incomplete"
    evs = events(run([]))
    assert [e["type"] for e in evs] == ["response.created", "response.in_progress", "response.completed"]


def test_stream_echoes_the_request():
    req = {"model": "m", "instructions": "sys", "top_p": 0.5, "truncation": "auto", "background": False,
           "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": True}},
           "reasoning": {"summary": "auto"}, "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}
    created = events(run(TEXT, request=req))[0]["response"]
    assert (created["instructions"], created["top_p"], created["truncation"], created["temperature"]) == ("sys", 0.5, "auto", 1.0)
    assert created["text"] == {"format": req["text"]["format"]} and created["tools"] == req["tools"]
    assert created["reasoning"] == {"effort": None, "summary": "auto"}


def test_stream_failure():
    s = ra.ResponsesStream("m", CREATED, ids=counter_ids(), clock=lambda: DONE_AT)
    evs = events(s.feed(chunk({"content": "Hel"})) + s.fail("model crashed"))
    failed = evs[-1]
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": "server_error", "message": "model crashed"}
    assert s.feed(chunk({"content": "more"})) == b"" and s.finish() == b"" and s.fail("again") == b""
    TypeAdapter(ResponseStreamEvent).validate_python(failed)
    s = ra.ResponsesStream("m", CREATED, ids=counter_ids())  # an error chunk, before anything was sent
    assert [e["type"] for e in events(s.feed({"error": {"message": "boom", "type": "api_error"}}))] == [
        "response.created", "response.in_progress", "response.failed"]


# --- the openai SDK reading our bytes ---------------------------------------------------------------


def sdk(body: bytes, content_type: str) -> openai.OpenAI:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": content_type}, content=body)
    return openai.OpenAI(api_key="test", base_url="http://gateway.test/v1", max_retries=0,
                         http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
                         _strict_response_validation=True)


def test_openai_sdk_accumulates_our_stream():
    sse = run([chunk({"role": "assistant", "reasoning_content": "hmm"}), chunk({"content": "It is "}),
               chunk({"content": "sunny."}),
               chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": "{\"city\""}}]}),
               chunk({"tool_calls": [{"index": 0, "function": {"arguments": ":\"Paris\"}"}}]}),
               chunk(finish="tool_calls"), usage_chunk(12, 8)])
    with sdk(sse, ra.ResponsesStream.content_type).responses.stream(model="m", input="weather?") as stream:
        seen = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.output_text.delta" in seen and seen[-1] == "response.completed"
    assert final.output_text == "It is sunny." and final.usage is not None and final.usage.total_tokens == 20
    call = final.output[2]
    assert call.type == "function_call" and (call.call_id, call.name, call.arguments) == (
        "call_1", "get_weather", "{\"city\":\"Paris\"}")


def test_openai_sdk_reads_our_complete_response():
    body = json.dumps(ra.from_chat(completion({"content": "Hi!"}), ids=counter_ids())).encode()
    r = sdk(body, "application/json").responses.create(model="m", input="hi")
    assert r.output_text == "Hi!" and r.status == "completed" and r.usage is not None and r.usage.input_tokens == 10


def test_openai_sdk_raises_our_errors():
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(404, headers={"content-type": "application/json"},
                               content=ra.error_body(404, "model 'x' not found"))
    client = openai.OpenAI(api_key="t", base_url="http://gateway.test/v1", max_retries=0,
                           http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="x", input="hi")
    assert e.value.message.endswith("model 'x' not found") and e.value.type == "not_found_error"


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "kind"), [(400, "invalid_request_error"), (404, "not_found_error"),
                                              (500, "api_error"), (503, "api_error")])
def test_error_body(status, kind):
    assert json.loads(ra.error_body(status, "boom")) == {
        "error": {"message": "boom", "type": kind, "param": None, "code": None}}


def test_error_reply():
    reply = ra.error_reply(BadRequest("bad"))
    assert (reply.status, reply.content_type) == (400, "application/json")
    assert json.loads(reply.body)["error"]["type"] == "invalid_request_error"

"""Is an answer a well-formed answer for its API? (pure; raises AssertionError saying why not)

One checker per API the recorded clients speak: Ollama's native API, OpenAI's
chat/completions/embeddings, OpenAI's Responses API and Anthropic's Messages
API. They hold the answer to what real Ollama sends for the same request:
the status, the framing (one JSON object, NDJSON, or SSE), the fields each
client library parses, and, where the request asks for it, tool calls that
name a declared tool, logprobs with the asked number of alternatives, and
JSON that fits when a format was asked for and the model stopped by itself.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

DIM = 576  # SmolLM2-135M's hidden size: the length of its embeddings


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes

    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self):
        return json.loads(self.body)


def check(method: str, path: str, request_body: str | None, answer: Answer) -> None:
    """Raise AssertionError unless ``answer`` is what Ollama would answer to this request."""
    req = json.loads(request_body) if request_body else {}
    assert answer.status == 200, f"status {answer.status}: {answer.body[:800]!r}"
    route = urlsplit(path).path.rstrip("/") or "/"
    if method in ("GET", "HEAD"):
        return _check_get(route, answer)
    checker = _POSTS.get(route)
    assert checker is not None, f"no checker for {method} {route}"
    checker(req, answer)


# --- helpers -----------------------------------------------------------------


def _one_json(answer: Answer) -> dict:
    assert answer.content_type.startswith("application/json"), f"Content-Type {answer.content_type!r}"
    obj = answer.json()
    assert isinstance(obj, dict), obj
    assert obj.get("error") is None, obj
    return obj


def _ndjson(answer: Answer) -> list[dict]:
    assert answer.content_type.startswith("application/x-ndjson"), f"Content-Type {answer.content_type!r}"
    text = answer.text()
    assert text.endswith("\n"), "NDJSON stream does not end with a newline"
    lines = [json.loads(line) for line in text.split("\n") if line]
    assert lines, "empty stream"
    for line in lines:
        assert line.get("error") is None, line
    assert all(not line.get("done") for line in lines[:-1]), "done before the last line"
    assert lines[-1].get("done") is True, lines[-1]
    return lines


def _sse(answer: Answer) -> list[tuple[str | None, str]]:
    """(event name or None, data) per SSE event."""
    assert answer.content_type.startswith("text/event-stream"), f"Content-Type {answer.content_type!r}"
    events = []
    for block in answer.text().replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        event, data = None, []
        for line in block.split("\n"):
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
        if data:
            events.append((event, "\n".join(data)))
    assert events, "no SSE events"
    return events


def _tool_names(req: dict) -> set[str]:
    names = set()
    for tool in req.get("tools") or []:
        fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        if fn.get("name"):
            names.add(fn["name"])
    return names


def _fits_format(text: str, fmt) -> None:
    if not fmt:
        return
    value = json.loads(text)  # raises: not JSON
    if isinstance(fmt, dict):
        for key in fmt.get("required", []):
            assert key in value, f"{key!r} missing from {value!r}"


def _stopped_at_once(reason, tokens) -> bool:
    """An empty answer is still a well-formed one when the model ended its turn at its first token.

    SmolLM2 does that now and then (about 1 answer in 100 at temperature 1):
    the answer then says it stopped ("stop", "end_turn", "completed") after at
    most one token. ``tokens`` is None where the answer does not count them.
    """
    return reason in ("stop", "end_turn", "completed") and (tokens is None or tokens <= 1)


def _duration_fields(final: dict) -> None:
    for key in ("total_duration", "eval_count"):
        assert isinstance(final.get(key), int), f"{key} missing from the final object: {final}"


# --- Ollama native -------------------------------------------------------------


def _ollama_tool_calls(calls, req: dict) -> None:
    assert isinstance(calls, list) and calls, calls
    for call in calls:
        fn = call["function"]
        assert fn["name"] in _tool_names(req), f"tool {fn['name']!r} was not offered"
        assert isinstance(fn["arguments"], dict), f"arguments must be an object: {fn}"


def _check_chat(req: dict, answer: Answer) -> None:
    model = req.get("model")
    if req.get("stream", True):
        lines = _ndjson(answer)
        for line in lines:
            assert line.get("model") == model and line.get("created_at"), line
            assert line["message"]["role"] == "assistant", line
        content = "".join(line["message"].get("content") or "" for line in lines)
        calls = [c for line in lines for c in line["message"].get("tool_calls") or []]
        final = lines[-1]
    else:
        final = _one_json(answer)
        assert final.get("model") == model and final.get("done") is True, final
        assert final["message"]["role"] == "assistant", final
        content = final["message"].get("content") or ""
        calls = final["message"].get("tool_calls") or []
    assert final.get("done_reason") in ("stop", "length"), final
    _duration_fields(final)
    if req.get("messages"):
        assert content or calls or _stopped_at_once(final["done_reason"], final.get("eval_count")), \
            f"neither content nor tool calls: {final}"
    if calls:
        _ollama_tool_calls(calls, req)
    if final["done_reason"] == "stop" and not calls:
        _fits_format(content, req.get("format"))


def _check_generate(req: dict, answer: Answer) -> None:
    model = req.get("model")
    if req.get("stream", True):
        lines = _ndjson(answer)
        for line in lines:
            assert line.get("model") == model and isinstance(line.get("response"), str), line
        text = "".join(line["response"] for line in lines)
        final = lines[-1]
    else:
        final = _one_json(answer)
        assert final.get("model") == model and final.get("done") is True, final
        text = final["response"]
    if req.get("prompt"):
        assert final.get("done_reason") in ("stop", "length"), final
        _duration_fields(final)
        assert text or _stopped_at_once(final["done_reason"], final.get("eval_count")), f"no text: {final}"


def _check_embed(req: dict, answer: Answer) -> None:
    obj = _one_json(answer)
    inputs = req.get("input")
    n = len(inputs) if isinstance(inputs, list) else 1
    assert obj.get("model") == req.get("model"), obj.get("model")
    assert len(obj["embeddings"]) == n, len(obj["embeddings"])
    assert all(len(e) == DIM for e in obj["embeddings"])


def _check_embeddings(req: dict, answer: Answer) -> None:
    obj = _one_json(answer)
    assert len(obj["embedding"]) == DIM, len(obj["embedding"])


def _check_show(req: dict, answer: Answer) -> None:
    obj = _one_json(answer)
    for key in ("details", "model_info", "capabilities", "modified_at"):
        assert key in obj, f"{key} missing: {sorted(obj)}"
    assert "completion" in obj["capabilities"], obj["capabilities"]


# --- OpenAI -------------------------------------------------------------------


def _openai_tool_calls(calls, req: dict) -> None:
    for call in calls:
        assert call.get("id") and call.get("type") == "function", call
        assert call["function"]["name"] in _tool_names(req), call
        json.loads(call["function"]["arguments"])


def _check_logprobs(entries, top: int) -> None:
    assert isinstance(entries, list) and entries, f"no logprobs: {entries!r}"
    for e in entries:
        assert isinstance(e["token"], str) and isinstance(e["logprob"], (int, float)) and e["logprob"] <= 0, e
        assert isinstance(e.get("bytes"), list), e
        assert len(e["top_logprobs"]) == top, f"asked for {top} top_logprobs, got {e['top_logprobs']}"


def _check_v1_chat(req: dict, answer: Answer) -> None:
    model = req.get("model")
    want_lp = bool(req.get("logprobs"))
    top = int(req.get("top_logprobs") or 0)
    if not req.get("stream"):
        obj = _one_json(answer)
        assert obj["object"] == "chat.completion" and obj["model"] == model and obj["id"], obj
        choice = obj["choices"][0]
        msg = choice["message"]
        assert msg["role"] == "assistant", msg
        assert choice["finish_reason"] in ("stop", "length", "tool_calls"), choice
        usage = obj["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
        calls = msg.get("tool_calls") or []
        assert msg.get("content") or calls or _stopped_at_once(choice["finish_reason"], usage["completion_tokens"]), obj
        if calls:
            _openai_tool_calls(calls, req)
        if want_lp:
            _check_logprobs((choice.get("logprobs") or {}).get("content"), top)
        fmt = req.get("response_format") or {}
        if fmt.get("type") in ("json_object", "json_schema") and choice["finish_reason"] == "stop":
            _fits_format(msg["content"], (fmt.get("json_schema") or {}).get("schema") or True)
        return
    events = _sse(answer)
    assert events[-1][1] == "[DONE]", events[-1]
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert chunks, "no chunks before [DONE]"
    finishes = []
    text, calls = "", []
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == model, chunk
        for choice in chunk["choices"]:
            delta = choice["delta"]
            text += delta.get("content") or ""
            calls += delta.get("tool_calls") or []
            if choice.get("finish_reason"):
                finishes.append(choice["finish_reason"])
            if want_lp and delta.get("content"):
                _check_logprobs((choice.get("logprobs") or {}).get("content"), top)
    assert finishes and finishes[-1] in ("stop", "length", "tool_calls"), finishes
    usage = (chunks[-1].get("usage") or {}).get("completion_tokens")
    assert text or calls or _stopped_at_once(finishes[-1], usage), "neither content nor tool calls"
    if calls:
        _openai_tool_calls([c for c in calls if c.get("id")], req)
    if (req.get("stream_options") or {}).get("include_usage"):
        last = chunks[-1]
        assert last["choices"] == [] and isinstance(last["usage"]["completion_tokens"], int), last


def _check_v1_completion(req: dict, answer: Answer) -> None:
    if not req.get("stream"):
        obj = _one_json(answer)
        assert obj["object"] == "text_completion" and obj["model"] == req.get("model"), obj
        choice = obj["choices"][0]
        assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["text"], str), choice
        assert choice["text"] or _stopped_at_once(choice["finish_reason"], obj["usage"]["completion_tokens"]), obj
        return
    events = _sse(answer)
    assert events[-1][1] == "[DONE]", events[-1]
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks), chunks
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")]
    assert finishes and finishes[-1] in ("stop", "length"), chunks[-1]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) or _stopped_at_once(finishes[-1], None), \
        "no text"


def _check_v1_embeddings(req: dict, answer: Answer) -> None:
    obj = _one_json(answer)
    inputs = req.get("input")
    n = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
    assert obj["object"] == "list" and len(obj["data"]) == n, obj
    for item in obj["data"]:
        assert item["object"] == "embedding", item
        emb = item["embedding"]
        if req.get("encoding_format") == "base64":
            assert isinstance(emb, str) and len(base64.b64decode(emb)) == 4 * DIM, emb[:60]
        else:
            assert isinstance(emb, list) and len(emb) == DIM, len(emb)
    assert obj["usage"]["prompt_tokens"] > 0, obj["usage"]


# --- OpenAI Responses -----------------------------------------------------------


def _check_response_object(resp: dict, req: dict, *, final: bool) -> None:
    assert resp["object"] == "response" and resp["id"] and resp["model"] == req.get("model"), resp
    if not final:
        return
    assert resp["status"] in ("completed", "incomplete"), resp["status"]
    usage = resp["usage"]
    assert usage["input_tokens"] > 0 and isinstance(usage["output_tokens"], int), usage
    texts = []
    for item in resp["output"]:
        if item["type"] == "message":
            assert item["role"] == "assistant", item
            for part in item["content"]:
                assert part["type"] == "output_text" and isinstance(part["text"], str), part
                texts.append(part["text"])
        elif item["type"] == "function_call":
            assert item["name"] in _tool_names(req) and item["call_id"], item
            json.loads(item["arguments"])
            texts.append(item["arguments"])
        else:
            assert item["type"] == "reasoning", item
    assert "".join(texts) or _stopped_at_once(resp["status"], usage["output_tokens"]), \
        f"no text and no function call: {resp}"


def _typed_events(answer: Answer) -> list[dict]:
    """The SSE events' payloads; each names its own event (``type`` = the ``event:`` line)."""
    payloads = []
    for name, data in _sse(answer):
        obj = json.loads(data)
        assert obj["type"] == name, f"event {name!r} carries type {obj.get('type')!r}"
        payloads.append(obj)
    return payloads


def _check_responses(req: dict, answer: Answer) -> None:
    if not req.get("stream"):
        _check_response_object(_one_json(answer), req, final=True)
        return
    payloads = _typed_events(answer)
    types = [p["type"] for p in payloads]
    assert types[0] == "response.created", types
    assert types[-1] in ("response.completed", "response.incomplete"), types
    deltas = "".join(p["delta"] for p in payloads if p["type"] == "response.output_text.delta")
    args = "".join(p["delta"] for p in payloads if p["type"] == "response.function_call_arguments.delta")
    _check_response_object(payloads[0]["response"], req, final=False)
    _check_response_object(payloads[-1]["response"], req, final=True)
    if deltas or args or payloads[-1]["response"]["output"]:
        assert "response.output_item.added" in types and "response.output_item.done" in types, types
    else:
        assert _stopped_at_once(payloads[-1]["response"]["status"],
                                payloads[-1]["response"]["usage"]["output_tokens"]), f"no text deltas: {types}"


# --- Anthropic Messages ------------------------------------------------------------


def _check_message_object(msg: dict, req: dict) -> None:
    assert msg["type"] == "message" and msg["role"] == "assistant" and msg["id"], msg
    assert msg["model"] == req.get("model"), msg["model"]
    assert msg["stop_reason"] in ("end_turn", "max_tokens", "stop_sequence", "tool_use"), msg["stop_reason"]
    usage = msg["usage"]
    assert usage["input_tokens"] > 0 and isinstance(usage["output_tokens"], int), usage
    assert msg["content"] or _stopped_at_once(msg["stop_reason"], usage["output_tokens"]), f"no content blocks: {msg}"
    for block in msg["content"]:
        if block["type"] == "text":
            assert isinstance(block["text"], str), block
        elif block["type"] == "tool_use":
            assert block["id"] and block["name"] in _tool_names(req) and isinstance(block["input"], dict), block
        else:
            assert block["type"] == "thinking", block


def _check_messages(req: dict, answer: Answer) -> None:
    if not req.get("stream"):
        _check_message_object(_one_json(answer), req)
        return
    payloads = _typed_events(answer)
    types = [p["type"] for p in payloads if p["type"] != "ping"]
    assert types[0] == "message_start" and types[-1] == "message_stop", types
    assert "message_delta" in types, types
    start = payloads[0]["message"]
    assert start["role"] == "assistant" and start["model"] == req.get("model"), start
    blocks: dict[int, dict] = {}
    for p in payloads:
        if p["type"] == "content_block_start":
            blocks[p["index"]] = dict(p["content_block"], _json="")
        elif p["type"] == "content_block_delta":
            block, delta = blocks[p["index"]], p["delta"]
            if delta["type"] == "text_delta":
                block["text"] = block.get("text", "") + delta["text"]
            elif delta["type"] == "input_json_delta":
                block["_json"] += delta["partial_json"]
    delta = next(p for p in payloads if p["type"] == "message_delta")
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens", "stop_sequence", "tool_use"), delta
    assert isinstance(delta["usage"]["output_tokens"], int), delta
    content = "".join(b.get("text", "") + b["_json"] for b in blocks.values())
    if content:
        assert "content_block_start" in types and "content_block_stop" in types, types
    else:
        assert _stopped_at_once(delta["delta"]["stop_reason"], delta["usage"]["output_tokens"]), f"no text: {types}"
    for b in blocks.values():
        if b["type"] == "tool_use":
            assert b["name"] in _tool_names(req), b
            json.loads(b["_json"] or "{}")


# --- GET listings -----------------------------------------------------------------


def _check_get(route: str, answer: Answer) -> None:
    if route == "/":
        assert answer.text() == "Ollama is running", answer.body
        return
    obj = _one_json(answer)
    if route == "/api/version":
        assert isinstance(obj["version"], str), obj
    elif route in ("/api/tags", "/api/ps"):
        assert isinstance(obj["models"], list), obj
        for m in obj["models"]:
            assert m["name"] and m["model"] and m["digest"] and "details" in m, m
        if route == "/api/tags":
            assert "smollm2:135m" in {m["name"] for m in obj["models"]}, obj
    elif route == "/v1/models":
        assert obj["object"] == "list" and "smollm2:135m" in {m["id"] for m in obj["data"]}, obj
    elif route.startswith("/v1/models/"):
        assert obj["object"] == "model" and obj["id"] == route[len("/v1/models/"):], obj
    else:
        raise AssertionError(f"no checker for GET {route}")


_POSTS = {
    "/api/chat": _check_chat,
    "/api/generate": _check_generate,
    "/api/embed": _check_embed,
    "/api/embeddings": _check_embeddings,
    "/api/show": _check_show,
    "/v1/chat/completions": _check_v1_chat,
    "/v1/completions": _check_v1_completion,
    "/v1/embeddings": _check_v1_embeddings,
    "/v1/responses": _check_responses,
    "/v1/messages": _check_messages,
}

#!/usr/bin/env python3
"""Record the exact HTTP requests that real client libraries send to an Ollama server.

Two modes, both stdlib-only on the server side (the client libraries are
imported only by the ``drive`` mode, from a throwaway venv, see setup.sh):

``drive`` (default)
    Starts a recording server on 127.0.0.1 (OS-chosen port) that answers
    like Ollama would (canned NDJSON/SSE/JSON for the Ollama, OpenAI,
    OpenAI Responses and Anthropic Messages APIs, so every client proceeds),
    drives each client library through its common calls against it, and
    writes one fixture per client: ``<out>/<client>.json`` =
    ``{"client", "package", "version", "python", "requests": [{"name",
    "method", "path", "headers", "body"}, ...]}``. ``body`` is the exact
    request body as text (null when there was none), so a test can replay it
    byte for byte.

        python scripts/clients/record.py --out tests/clients/recordings
        python scripts/clients/record.py --clients ollama,openai --out /tmp/rec
        python scripts/clients/record.py --out /tmp/rec --compare tests/clients/recordings

``serve``
    Only the server: records whatever talks to it (Open WebUI, a shell with
    curl) into a JSON file, rewritten after every request. With
    ``--upstream URL`` it forwards every request to that server (a
    meshollama node) and relays the answer chunk by chunk; without, it
    answers with the canned answers. Prints ``listening on http://...`` once
    it is up and runs until SIGINT/SIGTERM.

        python scripts/clients/record.py serve --log /tmp/owui.json --upstream http://127.0.0.1:11434

Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import signal
import struct
import sys
import threading
import time
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MODEL = "smollm2:135m"
CONTROL_NAME = "/__recorder__/name"  # POST a name here: requests from then on are recorded under it
HEADERS_OF_INTEREST = ("content-type", "accept", "user-agent", "anthropic-version", "openai-beta")
ANSWER = "Hello! The sky looks blue because air scatters blue sunlight more than red."
DIM = 576  # SmolLM2-135M's hidden size, as the real model's embeddings
CREATED_AT = "2025-01-01T00:00:00.000000Z"


# --- what was recorded ---------------------------------------------------------


class Log:
    """Requests seen, each tagged with the name of the call being driven."""

    def __init__(self, path: Path | None = None) -> None:
        self.lock = threading.Lock()
        self.entries: list[dict] = []
        self.current = "unnamed"
        self.path = path

    def add(self, entry: dict) -> dict:
        with self.lock:
            entry = {"name": self.current, **entry}
            self.entries.append(entry)
            self._flush()
            return entry

    def update(self, entry: dict, **fields) -> None:
        with self.lock:
            entry.update(fields)
            self._flush()

    def _flush(self) -> None:
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.entries, indent=1, ensure_ascii=False) + "\n")
            tmp.replace(self.path)

    def take(self) -> list[dict]:
        with self.lock:
            out, self.entries = self.entries, []
            return out


# --- canned answers ------------------------------------------------------------


def _pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _fake_embedding(seed: int = 0) -> list[float]:
    vec = [((i * 37 + seed * 11) % 101 - 50) / 50.0 for i in range(DIM)]
    norm = sum(v * v for v in vec) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in vec]


def _example(schema: dict) -> object:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if "enum" in schema and schema["enum"]:
        return schema["enum"][0]
    if kind in ("number", "integer"):
        return 2
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object":
        return {k: _example(v) for k, v in (schema.get("properties") or {}).items()
                if k in (schema.get("required") or [])}
    return "Paris"


def _tool_call(tools: list) -> tuple[str, dict] | None:
    """(name, arguments) for the first function tool of an Ollama/OpenAI/Responses/Anthropic tool list."""
    for tool in tools or []:
        if not isinstance(tool, dict):
            continue
        fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        name = fn.get("name")
        params = fn.get("parameters") or fn.get("input_schema") or {}
        if name:
            return name, _example({"type": "object", **params})
    return None


def _last_role(messages) -> str:
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return str(messages[-1].get("role", ""))
    return ""


def _wants_tool_call(body: dict, tool_calls: bool) -> tuple[str, dict] | None:
    if not tool_calls:
        return None
    messages = body.get("messages") if "messages" in body else body.get("input")
    if _last_role(messages) in ("tool", "function"):
        return None
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        last = messages[-1]
        if last.get("type") == "function_call_output":
            return None
        content = last.get("content")
        if isinstance(content, list) and any(isinstance(c, dict) and c.get("type") == "tool_result" for c in content):
            return None
    return _tool_call(body.get("tools") or [])


def _answer(body: dict) -> str:
    """The canned text; JSON that fits when a format is asked for (Ollama's format, OpenAI's response_format)."""
    fmt = body.get("format")
    rf = body.get("response_format") or {}
    if rf.get("type") == "json_schema":
        fmt = (rf.get("json_schema") or {}).get("schema") or "json"
    elif rf.get("type") == "json_object":
        fmt = "json"
    if isinstance(fmt, dict):
        return json.dumps(_example({"type": "object", **fmt}))
    if fmt == "json":
        return json.dumps({"answer": ANSWER})
    return ANSWER


def _durations() -> dict:
    return {"total_duration": 120000000, "load_duration": 1000000, "prompt_eval_count": 12,
            "prompt_eval_duration": 20000000, "eval_count": 16, "eval_duration": 90000000}


def _details() -> dict:
    return {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
            "parameter_size": "134.52M", "quantization_level": "Q8_0"}


def _tag() -> dict:
    return {"name": MODEL, "model": MODEL, "modified_at": "2025-01-01T00:00:00Z", "size": 144811104,
            "digest": "9077fe9d2ae1a4a6e9a8d2e4e7c0b8f3c5e1d2c3b4a5f6e7d8c9b0a1f2e3d4c5", "details": _details()}


class Canned:
    """Plausible Ollama answers: (status, content type, list of body chunks)."""

    def __init__(self, tool_calls: bool = True) -> None:
        self.tool_calls = tool_calls

    def answer(self, method: str, path: str, body: dict | None) -> tuple[int, str, list[bytes]]:
        route = urllib.parse.urlsplit(path).path.rstrip("/") or "/"
        body = body if isinstance(body, dict) else {}
        getters = {
            "/": lambda: (200, "text/plain; charset=utf-8", [b"Ollama is running"]),
            "/api/version": lambda: self._json({"version": "0.12.6"}),
            "/api/tags": lambda: self._json({"models": [_tag()]}),
            "/api/ps": lambda: self._json({"models": [{**_tag(), "expires_at": "2099-01-01T00:00:00Z",
                                                       "size_vram": 0, "context_length": 8192}]}),
            "/v1/models": lambda: self._json({"object": "list", "data": [
                {"id": MODEL, "object": "model", "created": 1735689600, "owned_by": "library"}]}),
        }
        if method in ("GET", "HEAD") and route in getters:
            return getters[route]()
        if route.startswith("/v1/models/") and method == "GET":
            return self._json({"id": route[len("/v1/models/"):], "object": "model", "created": 1735689600,
                               "owned_by": "library"})
        posts = {
            "/api/chat": self.chat,
            "/api/generate": self.generate,
            "/api/embed": self.embed,
            "/api/embeddings": lambda b: self._json({"embedding": _fake_embedding()}),
            "/api/show": self.show,
            "/v1/chat/completions": self.v1_chat,
            "/v1/completions": self.v1_completion,
            "/v1/embeddings": self.v1_embeddings,
            "/v1/responses": self.responses,
            "/v1/messages": self.messages,
        }
        if method == "POST" and route in posts:
            return posts[route](body)
        return 404, "text/plain", [b"404 page not found"]

    @staticmethod
    def _json(obj: dict, status: int = 200) -> tuple[int, str, list[bytes]]:
        return status, "application/json; charset=utf-8", [json.dumps(obj).encode()]

    @staticmethod
    def _ndjson(objs: list[dict]) -> tuple[int, str, list[bytes]]:
        return 200, "application/x-ndjson", [json.dumps(o).encode() + b"\n" for o in objs]

    @staticmethod
    def _sse(events: list[tuple[str | None, object]]) -> tuple[int, str, list[bytes]]:
        chunks = []
        for event, data in events:
            text = data if isinstance(data, str) else json.dumps(data)
            head = f"event: {event}\n" if event else ""
            chunks.append(f"{head}data: {text}\n\n".encode())
        return 200, "text/event-stream", chunks

    # Ollama native

    def chat(self, body: dict):
        text = _answer(body)
        model = body.get("model", MODEL)
        call = _wants_tool_call(body, self.tool_calls)
        final = {"model": model, "created_at": CREATED_AT, "message": {"role": "assistant", "content": ""},
                 "done": True, "done_reason": "stop", **_durations()}
        if not body.get("stream", True):
            message = {"role": "assistant", "content": "" if call else text}
            if call:
                message["tool_calls"] = [{"function": {"name": call[0], "arguments": call[1]}}]
            return self._json({**final, "message": message})
        lines = []
        if call:
            lines.append({"model": model, "created_at": CREATED_AT, "done": False, "message": {
                "role": "assistant", "content": "",
                "tool_calls": [{"function": {"name": call[0], "arguments": call[1]}}]}})
        else:
            lines += [{"model": model, "created_at": CREATED_AT, "message": {"role": "assistant", "content": p},
                       "done": False} for p in _pieces(text)]
        return self._ndjson([*lines, final])

    def generate(self, body: dict):
        text = _answer(body)
        model = body.get("model", MODEL)
        final = {"model": model, "created_at": CREATED_AT, "response": "", "done": True, "done_reason": "stop",
                 "context": [1, 2, 3], **_durations()}
        if not body.get("prompt"):
            return self._json({"model": model, "created_at": CREATED_AT, "response": "", "done": True,
                               "done_reason": "load"})
        if not body.get("stream", True):
            return self._json({**final, "response": text})
        return self._ndjson([*({"model": model, "created_at": CREATED_AT, "response": p, "done": False}
                               for p in _pieces(text)), final])

    def embed(self, body: dict):
        inputs = body.get("input")
        n = len(inputs) if isinstance(inputs, list) else 1
        return self._json({"model": body.get("model", MODEL),
                           "embeddings": [_fake_embedding(i) for i in range(n)],
                           "total_duration": 1000000, "load_duration": 1000, "prompt_eval_count": 4 * n})

    def show(self, body: dict):
        return self._json({
            "license": "", "modelfile": f"FROM {MODEL}\n", "parameters": "stop \"<|im_end|>\"",
            "template": "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}",
            "details": _details(),
            "model_info": {"general.architecture": "llama", "general.parameter_count": 134515008,
                           "llama.context_length": 8192, "llama.embedding_length": DIM},
            "capabilities": ["completion", "tools"],
            "modified_at": "2025-01-01T00:00:00Z",
        })

    # OpenAI

    def v1_chat(self, body: dict):
        text = _answer(body)
        model = body.get("model", MODEL)
        call = _wants_tool_call(body, self.tool_calls)
        logprobs = bool(body.get("logprobs"))
        top = int(body.get("top_logprobs") or 0)
        base = {"id": "chatcmpl-42", "created": 1735689600, "model": model, "system_fingerprint": "fp_ollama"}
        tool_calls = None
        if call:
            tool_calls = [{"id": "call_1", "index": 0, "type": "function",
                           "function": {"name": call[0], "arguments": json.dumps(call[1])}}]

        def lp(text: str) -> dict:
            entry = {"token": text, "logprob": -0.25, "bytes": list(text.encode())}
            return {**entry, "top_logprobs": [entry, {"token": "x", "logprob": -2.5, "bytes": [120]}][:top]}

        usage = {"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28}
        if not body.get("stream"):
            message = {"role": "assistant", "content": "" if call else text}
            if tool_calls:
                message["tool_calls"] = tool_calls
            choice = {"index": 0, "message": message, "finish_reason": "tool_calls" if call else "stop",
                      "logprobs": {"content": [lp(p) for p in _pieces(text)]} if logprobs else None}
            return self._json({**base, "object": "chat.completion", "choices": [choice], "usage": usage})
        chunk = {**base, "object": "chat.completion.chunk"}
        events: list[tuple[str | None, object]] = []
        if call:
            events.append((None, {**chunk, "choices": [{"index": 0, "delta": {
                "role": "assistant", "content": "", "tool_calls": tool_calls}, "finish_reason": None}]}))
        else:
            for p in _pieces(text):
                events.append((None, {**chunk, "choices": [{
                    "index": 0, "delta": {"role": "assistant", "content": p}, "finish_reason": None,
                    **({"logprobs": {"content": [lp(p)]}} if logprobs else {})}]}))
        events.append((None, {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                    "finish_reason": "tool_calls" if call else "stop"}]}))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append((None, {**chunk, "choices": [], "usage": usage}))
        events.append((None, "[DONE]"))
        return self._sse(events)

    def v1_completion(self, body: dict):
        base = {"id": "cmpl-42", "object": "text_completion", "created": 1735689600,
                "model": body.get("model", MODEL), "system_fingerprint": "fp_ollama"}
        usage = {"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28}
        if not body.get("stream"):
            return self._json({**base, "choices": [{"text": ANSWER, "index": 0, "finish_reason": "stop",
                                                    "logprobs": None}], "usage": usage})
        events = [(None, {**base, "choices": [{"text": p, "index": 0, "finish_reason": None}]})
                  for p in _pieces(ANSWER)]
        events.append((None, {**base, "choices": [{"text": "", "index": 0, "finish_reason": "stop"}]}))
        events.append((None, "[DONE]"))
        return self._sse(events)

    def v1_embeddings(self, body: dict):
        inputs = body.get("input")
        n = len(inputs) if isinstance(inputs, list) and not all(isinstance(x, int) for x in inputs) else 1
        data = []
        for i in range(n):
            vec = _fake_embedding(i)
            if body.get("encoding_format") == "base64":
                data.append({"object": "embedding", "index": i,
                             "embedding": base64.b64encode(struct.pack(f"<{DIM}f", *vec)).decode()})
            else:
                data.append({"object": "embedding", "index": i, "embedding": vec})
        return self._json({"object": "list", "data": data, "model": body.get("model", MODEL),
                           "usage": {"prompt_tokens": 4 * n, "total_tokens": 4 * n}})

    # OpenAI Responses

    def responses(self, body: dict):
        model = body.get("model", MODEL)
        call = _wants_tool_call(body, self.tool_calls)
        usage = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 16,
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 28}
        if call:
            item = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": call[0],
                    "arguments": json.dumps(call[1]), "status": "completed"}
        else:
            item = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": ANSWER, "annotations": [], "logprobs": []}]}

        def response(status: str, output: list) -> dict:
            return {"id": "resp_42", "object": "response", "created_at": 1735689600, "status": status,
                    "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
                    "max_output_tokens": body.get("max_output_tokens"), "model": model, "output": output,
                    "parallel_tool_calls": True, "previous_response_id": None,
                    "reasoning": {"effort": None, "summary": None}, "store": False,
                    "temperature": body.get("temperature", 1.0), "text": {"format": {"type": "text"}},
                    "tool_choice": "auto", "tools": body.get("tools") or [], "top_p": 1.0,
                    "truncation": "disabled", "usage": usage if status == "completed" else None,
                    "metadata": {}}

        if not body.get("stream"):
            return self._json(response("completed", [item]))
        seq = iter(range(1000))
        ev = [("response.created", {"type": "response.created", "sequence_number": next(seq),
                                    "response": response("in_progress", [])}),
              ("response.in_progress", {"type": "response.in_progress", "sequence_number": next(seq),
                                        "response": response("in_progress", [])})]
        if call:
            ev.append(("response.output_item.added", {"type": "response.output_item.added",
                                                      "sequence_number": next(seq), "output_index": 0,
                                                      "item": {**item, "arguments": "", "status": "in_progress"}}))
            ev.append(("response.function_call_arguments.delta", {
                "type": "response.function_call_arguments.delta", "sequence_number": next(seq),
                "item_id": "fc_1", "output_index": 0, "delta": item["arguments"]}))
            ev.append(("response.function_call_arguments.done", {
                "type": "response.function_call_arguments.done", "sequence_number": next(seq),
                "item_id": "fc_1", "output_index": 0, "arguments": item["arguments"]}))
        else:
            ev.append(("response.output_item.added", {"type": "response.output_item.added",
                                                      "sequence_number": next(seq), "output_index": 0,
                                                      "item": {**item, "status": "in_progress", "content": []}}))
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            ev.append(("response.content_part.added", {"type": "response.content_part.added",
                                                       "sequence_number": next(seq), "item_id": "msg_1",
                                                       "output_index": 0, "content_index": 0, "part": part}))
            for p in _pieces(ANSWER):
                ev.append(("response.output_text.delta", {"type": "response.output_text.delta",
                                                          "sequence_number": next(seq), "item_id": "msg_1",
                                                          "output_index": 0, "content_index": 0, "delta": p,
                                                          "logprobs": []}))
            ev.append(("response.output_text.done", {"type": "response.output_text.done",
                                                     "sequence_number": next(seq), "item_id": "msg_1",
                                                     "output_index": 0, "content_index": 0, "text": ANSWER,
                                                     "logprobs": []}))
            ev.append(("response.content_part.done", {"type": "response.content_part.done",
                                                      "sequence_number": next(seq), "item_id": "msg_1",
                                                      "output_index": 0, "content_index": 0,
                                                      "part": {**part, "text": ANSWER}}))
        ev.append(("response.output_item.done", {"type": "response.output_item.done", "sequence_number": next(seq),
                                                 "output_index": 0, "item": item}))
        ev.append(("response.completed", {"type": "response.completed", "sequence_number": next(seq),
                                          "response": response("completed", [item])}))
        return self._sse(ev)

    # Anthropic Messages

    def messages(self, body: dict):
        model = body.get("model", MODEL)
        call = _wants_tool_call(body, self.tool_calls)
        if call:
            block = {"type": "tool_use", "id": "toolu_1", "name": call[0], "input": call[1]}
        else:
            block = {"type": "text", "text": ANSWER}
        stop = "tool_use" if call else "end_turn"
        msg = {"id": "msg_42", "type": "message", "role": "assistant", "model": model, "content": [block],
               "stop_reason": stop, "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 16}}
        if not body.get("stream"):
            return self._json(msg)
        ev: list[tuple[str | None, object]] = [
            ("message_start", {"type": "message_start", "message": {
                **msg, "content": [], "stop_reason": None, "usage": {"input_tokens": 12, "output_tokens": 0}}})]
        if call:
            ev.append(("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {**block, "input": {}}}))
            ev.append(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(call[1])}}))
        else:
            ev.append(("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "text", "text": ""}}))
            ev.append(("ping", {"type": "ping"}))
            for p in _pieces(ANSWER):
                ev.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": p}}))
        ev.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
        ev.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": 16}}))
        ev.append(("message_stop", {"type": "message_stop"}))
        return self._sse(ev)


# --- the server ------------------------------------------------------------------

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
        "content-length", "host"}


class Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, log: Log, canned: Canned, upstream: str | None = None, port: int = 0,
                 host: str = "127.0.0.1") -> None:
        self.log = log
        self.canned = canned
        self.upstream = urllib.parse.urlsplit(upstream) if upstream else None
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Recorder

    def log_message(self, fmt, *args):  # quiet
        pass

    def _body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _handle(self) -> None:
        raw = self._body()
        if self.path == CONTROL_NAME:  # the driver of a `serve` recorder names what comes next
            self.server.log.current = (raw or b"unnamed").decode("utf-8")
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        text = raw.decode("utf-8") if raw is not None else None
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = None
        headers = {k: self.headers[k] for k in HEADERS_OF_INTEREST if self.headers.get(k) is not None}
        started = time.time()
        entry = self.server.log.add({"method": self.command, "path": self.path, "headers": headers, "body": text,
                                     "at": round(started, 3)})
        if self.server.upstream is not None:
            self._forward(raw, entry)
            return
        status, ctype, chunks = self.server.canned.answer(self.command, self.path, parsed)
        self.server.log.update(entry, status=status)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        streamed = len(chunks) > 1 or ctype in ("text/event-stream", "application/x-ndjson")
        if streamed:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if self.command != "HEAD":
                for chunk in chunks:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
        else:
            data = b"".join(chunks)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        self.wfile.flush()

    def _forward(self, raw: bytes | None, entry: dict) -> None:
        started = time.time()
        up = self.server.upstream
        conn = http.client.HTTPConnection(up.hostname, up.port or 80, timeout=600)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        headers["Host"] = up.netloc
        try:
            conn.request(self.command, self.path, body=raw, headers=headers)
            resp = conn.getresponse()
        except OSError as exc:
            self.server.log.update(entry, status=502, error=str(exc))
            msg = json.dumps({"error": f"recorder: upstream unreachable: {exc}"}).encode()
            self.send_response(502)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP:
                self.send_header(k, v)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        head = b""
        try:
            while True:
                chunk = resp.read1(65536) if self.command != "HEAD" else b""
                if not chunk:
                    break
                if len(head) < 600:
                    head += chunk[: 600 - len(head)]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        finally:
            conn.close()
            self.server.log.update(entry, status=resp.status, answer_head=head.decode("utf-8", "replace"),
                                   seconds=round(time.time() - started, 3))

    do_GET = do_POST = do_HEAD = do_DELETE = do_PUT = _handle


def start_server(log: Log, canned: Canned, upstream: str | None = None, port: int = 0,
                 host: str = "127.0.0.1") -> Recorder:
    server = Recorder(log, canned, upstream, port, host)
    threading.Thread(target=server.serve_forever, name="recorder", daemon=True).start()
    return server


# --- the client drivers -------------------------------------------------------------

QUESTION = "Why is the sky blue? Answer in one sentence."
N = 24  # tokens to generate, so replays against the real model stay short


def get_current_weather(city: str) -> str:
    """Get the current weather for a city.

    Args:
        city: The name of the city, e.g. Paris

    Returns:
        A short description of the weather
    """
    return f"It is 22 degrees and sunny in {city}."


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The name of the city, e.g. Paris"}},
            "required": ["city"],
        },
    },
}
TOOL_QUESTION = "What is the weather in Paris? Use the tool."


def drive_ollama(url: str, step) -> None:
    import ollama

    client = ollama.Client(host=url)
    user = [{"role": "user", "content": QUESTION}]
    opts = {"num_predict": N}
    with step("chat"):
        client.chat(model=MODEL, messages=user, options=opts)
    with step("chat.stream"):
        list(client.chat(model=MODEL, messages=user, options=opts, stream=True))
    tool_user = [{"role": "user", "content": TOOL_QUESTION}]
    with step("chat.tools"):
        first = client.chat(model=MODEL, messages=tool_user, tools=[get_current_weather], options=opts)
    with step("chat.tools.stream"):
        list(client.chat(model=MODEL, messages=tool_user, tools=[WEATHER_TOOL], options=opts, stream=True))
    with step("chat.tools.result"):
        calls = first.message.tool_calls or []
        history = [*tool_user, first.message]
        for call in calls:
            history.append({"role": "tool", "content": get_current_weather(**call.function.arguments),
                            "tool_name": call.function.name})
        client.chat(model=MODEL, messages=history, tools=[get_current_weather], options=opts)
    with step("chat.format_schema"):
        client.chat(model=MODEL, messages=[{"role": "user", "content": "Name a colour and its hex code."}],
                    format={"type": "object", "properties": {"colour": {"type": "string"}, "hex": {"type": "string"}},
                            "required": ["colour", "hex"]}, options=opts)
    with step("chat.system_multi_turn"):
        client.chat(model=MODEL, options=opts, messages=[
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": QUESTION}])
    with step("generate"):
        client.generate(model=MODEL, prompt=QUESTION, options=opts)
    with step("generate.stream"):
        list(client.generate(model=MODEL, prompt=QUESTION, options=opts, stream=True))
    with step("embed"):
        client.embed(model=MODEL, input=["The sky is blue.", "Grass is green."])
    with step("embeddings"):
        client.embeddings(model=MODEL, prompt="The sky is blue.")
    with step("list"):
        client.list()
    with step("show"):
        client.show(MODEL)
    with step("ps"):
        client.ps()


def drive_openai(url: str, step) -> None:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="ollama", max_retries=0, timeout=60)
    user = [{"role": "user", "content": QUESTION}]
    with step("chat.completions"):
        client.chat.completions.create(model=MODEL, messages=user, max_tokens=N)
    with step("chat.completions.stream"):
        list(client.chat.completions.create(model=MODEL, messages=user, max_tokens=N, stream=True,
                                            stream_options={"include_usage": True}))
    tool_user = [{"role": "user", "content": TOOL_QUESTION}]
    with step("chat.completions.tools"):
        first = client.chat.completions.create(model=MODEL, messages=tool_user, tools=[WEATHER_TOOL], max_tokens=N)
    with step("chat.completions.tools.stream"):
        list(client.chat.completions.create(model=MODEL, messages=tool_user, tools=[WEATHER_TOOL], max_tokens=N,
                                            stream=True))
    with step("chat.completions.tools.result"):
        msg = first.choices[0].message
        history = [*tool_user, msg.model_dump(exclude_none=True)]
        for call in msg.tool_calls or []:
            history.append({"role": "tool", "tool_call_id": call.id,
                            "content": get_current_weather(**json.loads(call.function.arguments))})
        client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER_TOOL], max_tokens=N)
    with step("chat.completions.logprobs"):
        client.chat.completions.create(model=MODEL, messages=user, max_tokens=N, logprobs=True, top_logprobs=2)
    with step("chat.completions.logprobs.stream"):
        list(client.chat.completions.create(model=MODEL, messages=user, max_tokens=N, logprobs=True,
                                            top_logprobs=2, stream=True))
    with step("chat.completions.json_schema"):
        client.chat.completions.create(model=MODEL, max_tokens=N, messages=[
            {"role": "user", "content": "Name a colour and its hex code."}], response_format={
            "type": "json_schema", "json_schema": {"name": "colour", "schema": {
                "type": "object", "properties": {"colour": {"type": "string"}, "hex": {"type": "string"}},
                "required": ["colour", "hex"]}}})
    with step("completions"):
        client.completions.create(model=MODEL, prompt="The sky is", max_tokens=N)
    with step("completions.stream"):
        list(client.completions.create(model=MODEL, prompt="The sky is", max_tokens=N, stream=True))
    with step("embeddings"):
        client.embeddings.create(model=MODEL, input=["The sky is blue.", "Grass is green."])
    with step("embeddings.float"):
        client.embeddings.create(model=MODEL, input="The sky is blue.", encoding_format="float")
    with step("models.list"):
        client.models.list()
    with step("models.retrieve"):
        client.models.retrieve(MODEL)
    with step("responses"):
        client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=N)
    with step("responses.stream"):
        list(client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=N, stream=True))
    with step("responses.instructions_messages"):
        client.responses.create(model=MODEL, instructions="You are a terse assistant.", max_output_tokens=N,
                                input=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                       {"role": "user", "content": QUESTION}])
    with step("responses.tools"):
        client.responses.create(model=MODEL, input=TOOL_QUESTION, max_output_tokens=N, tools=[{
            "type": "function", "name": "get_current_weather", "description": "Get the current weather for a city",
            "parameters": WEATHER_TOOL["function"]["parameters"]}])


def drive_anthropic(url: str, step) -> None:
    import anthropic

    client = anthropic.Anthropic(base_url=url, api_key="ollama", max_retries=0, timeout=60)
    user = [{"role": "user", "content": QUESTION}]
    with step("messages"):
        client.messages.create(model=MODEL, max_tokens=N, messages=user)
    with step("messages.stream"):
        list(client.messages.create(model=MODEL, max_tokens=N, messages=user, stream=True))
    with step("messages.system"):
        client.messages.create(model=MODEL, max_tokens=N, system="You are a terse assistant.", messages=user)
    with step("messages.stream_helper"):
        with client.messages.stream(model=MODEL, max_tokens=N, messages=user) as stream:
            stream.get_final_message()
    with step("messages.tools"):
        client.messages.create(model=MODEL, max_tokens=N, messages=[{"role": "user", "content": TOOL_QUESTION}],
                               tools=[{"name": "get_current_weather", "description": "Get the current weather",
                                       "input_schema": WEATHER_TOOL["function"]["parameters"]}])


def drive_langchain_ollama(url: str, step) -> None:
    from langchain_core.tools import tool
    from langchain_ollama import ChatOllama, OllamaEmbeddings, OllamaLLM

    with step("OllamaLLM.invoke"):
        OllamaLLM(model=MODEL, base_url=url, num_predict=N).invoke(QUESTION)
    chat = ChatOllama(model=MODEL, base_url=url, num_predict=N)
    with step("ChatOllama.invoke"):
        chat.invoke(QUESTION)
    with step("ChatOllama.stream"):
        list(chat.stream(QUESTION))

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather for a city."""
        return get_current_weather(city)

    with step("ChatOllama.bind_tools.invoke"):
        chat.bind_tools([get_weather]).invoke(TOOL_QUESTION)
    with step("OllamaEmbeddings.embed_documents"):
        OllamaEmbeddings(model=MODEL, base_url=url).embed_documents(["The sky is blue.", "Grass is green."])
    with step("OllamaEmbeddings.embed_query"):
        OllamaEmbeddings(model=MODEL, base_url=url).embed_query("The sky is blue.")


def drive_litellm(url: str, step) -> None:
    import litellm

    litellm.telemetry = False
    user = [{"role": "user", "content": QUESTION}]
    for prefix in ("ollama", "ollama_chat"):
        with step(f"completion.{prefix}"):
            litellm.completion(model=f"{prefix}/{MODEL}", api_base=url, messages=user, max_tokens=N)
        with step(f"completion.{prefix}.stream"):
            list(litellm.completion(model=f"{prefix}/{MODEL}", api_base=url, messages=user, max_tokens=N,
                                    stream=True))
    with step("completion.ollama_chat.tools"):
        litellm.completion(model=f"ollama_chat/{MODEL}", api_base=url, max_tokens=N, tools=[WEATHER_TOOL],
                           messages=[{"role": "user", "content": TOOL_QUESTION}])
    with step("embedding.ollama"):
        litellm.embedding(model=f"ollama/{MODEL}", api_base=url, input=["The sky is blue."])


def drive_llama_index(url: str, step) -> None:
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.ollama import Ollama

    llm = Ollama(model=MODEL, base_url=url, request_timeout=60.0, additional_kwargs={"num_predict": N})
    messages = [ChatMessage(role="system", content="You are a terse assistant."),
                ChatMessage(role="user", content=QUESTION)]
    with step("complete"):
        llm.complete(QUESTION)
    with step("stream_complete"):
        list(llm.stream_complete(QUESTION))
    with step("chat"):
        llm.chat(messages)
    with step("stream_chat"):
        list(llm.stream_chat(messages))


CLIENTS = {
    # fixture name: (PyPI package, driver)
    "ollama": ("ollama", drive_ollama),
    "openai": ("openai", drive_openai),
    "anthropic": ("anthropic", drive_anthropic),
    "langchain-ollama": ("langchain-ollama", drive_langchain_ollama),
    "litellm": ("litellm", drive_litellm),
    "llama-index": ("llama-index-llms-ollama", drive_llama_index),
}


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def fixture(client: str, package: str, requests: list[dict], extra: dict | None = None) -> dict:
    return {
        "client": client,
        "package": package,
        "version": _version(package),
        "python": platform.python_version(),
        "recorded_by": "scripts/clients/record.py",
        **(extra or {}),
        "requests": [{k: r.get(k) for k in ("name", "method", "path", "headers", "body")} for r in requests],
    }


def drive(args) -> int:
    # No client may phone home: litellm fetches its model cost map from the
    # internet unless told to use the bundled one.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_TELEMETRY", "False")
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    for var in ("OLLAMA_HOST", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "HTTP_PROXY", "HTTPS_PROXY",
                "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        os.environ.pop(var, None)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    log = Log()
    server = start_server(log, Canned(tool_calls=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = args.clients.split(",") if args.clients else list(CLIENTS)
    failures = 0
    for name in wanted:
        package, driver = CLIENTS[name]
        errors: list[str] = []

        class step:  # noqa: N801 - a tiny context manager per driven call
            def __init__(self, call: str) -> None:
                self.call = call

            def __enter__(self):
                log.current = f"{name}.{self.call}"
                return self

            def __exit__(self, typ, exc, tb):
                if exc is not None:
                    errors.append(f"{self.call}: {typ.__name__}: {exc}")
                    traceback.print_exception(typ, exc, tb, file=sys.stderr)
                return True  # record the rest of the calls anyway

        t0 = time.monotonic()
        try:
            driver(server.url, step)
        except ImportError as exc:
            errors.append(f"import: {exc}")
        requests = log.take()
        doc = fixture(name, package, requests, {"errors": errors} if errors else None)
        (out / f"{name}.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        print(f"{name} {doc['version']}: {len(requests)} requests in {time.monotonic() - t0:.1f}s"
              f"{'; ERRORS: ' + '; '.join(errors) if errors else ''}")
        failures += bool(errors)
    server.shutdown()
    if args.compare:
        compare(out, Path(args.compare), wanted)
    return 1 if failures else 0


def compare(new_dir: Path, old_dir: Path, clients: list[str]) -> None:
    """Say, per client, whether what it sends now differs from the fixtures (informational)."""
    for name in clients:
        old_path = old_dir / f"{name}.json"
        if not old_path.exists():
            print(f"compare {name}: no fixture in {old_dir}")
            continue
        old, new = json.loads(old_path.read_text()), json.loads((new_dir / f"{name}.json").read_text())

        def key(doc):  # order-insensitive: some clients send a side request from a thread (litellm's /api/show)
            return sorted((r["name"], r["method"], r["path"], r["body"] or "") for r in doc["requests"])

        if key(old) == key(new):
            print(f"compare {name}: same requests as the fixture ({old['version']} -> {new['version']})")
        else:
            changed = sorted({r[0] for r in set(key(old)) ^ set(key(new))})
            print(f"compare {name}: DIFFERENT from the fixture ({old['version']} -> {new['version']}): "
                  f"{', '.join(changed)}")


def serve(args) -> int:
    log = Log(Path(args.log))
    server = start_server(log, Canned(tool_calls=not args.no_tool_calls), args.upstream, args.port, args.host)
    print(f"listening on {server.url}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests/clients/recordings"))
    parser.add_argument("--compare", default=None, metavar="DIR",
                        help="after recording, say which clients' requests differ from the fixtures in DIR")
    parser.add_argument("--clients", default="", help=f"comma-separated subset of {','.join(CLIENTS)}")
    s = sub.add_parser("serve", help="only the recording server")
    s.add_argument("--log", required=True, help="JSON file of the requests seen, rewritten after each")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--upstream", default=None, help="forward to this server instead of canned answers")
    s.add_argument("--no-tool-calls", action="store_true", help="canned answers never call a tool")
    args = parser.parse_args(argv)
    return serve(args) if args.mode == "serve" else drive(args)


if __name__ == "__main__":
    sys.exit(main())

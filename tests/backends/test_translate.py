"""The Responses/Messages translation over a chat stream that fails or is cut."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager

from meshollama.backends.ollama_api import Endpoint
from meshollama.backends.translate import translated
from meshollama.httpmsg import ProxyRequest, ProxyResponse

CHUNK = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}\n\n'


def chat_answer(*pieces: bytes, status: int = 200):
    @asynccontextmanager
    async def open_chat(request):
        async def body():
            for p in pieces:
                yield p
        yield ProxyResponse(status, (("content-type", "text/event-stream"),), body())
    return open_chat


async def answer(ep: Endpoint, body: dict, open_chat) -> tuple[int, bytes]:
    async with translated(ep, ProxyRequest("POST", ep.value, (), json.dumps(body).encode()), open_chat) as r:
        return r.status, b"".join([c async for c in r.body])


MESSAGES = {"model": "m", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
RESPONSES = {"model": "m", "input": "hi", "stream": True}


async def test_a_cut_chat_stream_ends_with_the_apis_error_event():
    status, body = await answer(Endpoint.V1_MESSAGES, MESSAGES, chat_answer(CHUNK))
    assert status == 200 and body.rstrip().endswith(b'"message":"generation ended before it finished"}}')
    assert b"event: error" in body and b"message_stop" not in body
    status, body = await answer(Endpoint.V1_RESPONSES, RESPONSES, chat_answer(CHUNK))
    assert b"event: response.failed" in body and b"response.completed" not in body


async def test_an_error_event_mid_stream_becomes_the_apis_error():
    err = b'data: {"error":{"message":"llama runner failed: boom","type":"api_error"}}\n\n'
    status, body = await answer(Endpoint.V1_MESSAGES, MESSAGES, chat_answer(CHUNK, err))
    assert b"event: error" in body and b"llama runner failed: boom" in body
    status, body = await answer(Endpoint.V1_RESPONSES, RESPONSES, chat_answer(CHUNK, err))
    assert b"response.failed" in body and b"llama runner failed: boom" in body


async def test_an_error_before_the_first_byte_keeps_its_status_in_the_apis_envelope():
    err = b'{"error":{"message":"model \'m\' not found","type":"not_found_error"}}'
    status, body = await answer(Endpoint.V1_MESSAGES, {**MESSAGES, "stream": False}, chat_answer(err, status=404))
    assert status == 404 and json.loads(body)["error"] == {"type": "not_found_error", "message": "model 'm' not found"}
    status, body = await answer(Endpoint.V1_RESPONSES, {**RESPONSES, "stream": False}, chat_answer(err, status=404))
    assert status == 404 and json.loads(body)["error"]["message"] == "model 'm' not found"

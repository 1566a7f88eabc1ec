"""``fates.classify`` against literal bodies of every format and fate; ``continuous``; ``Tally``;
``send`` against the stand-in Ollama."""

from __future__ import annotations

from contextlib import asynccontextmanager
from functools import partial

import httpx
import pytest
import trio

from tests.fakes.fake_ollama import serve_fake

from .fates import (
    Fate,
    Outcome,
    Tally,
    classify,
    continuous,
    discontinuity,
    numbered_text,
    send,
)

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
JSON = "application/json; charset=utf-8"

CHAT_OK = (
    b'{"model":"m","message":{"role":"assistant","content":"w01"},"done":false}\n'
    b'{"model":"m","message":{"role":"assistant","content":" w02"},"done":false}\n'
    b'{"model":"m","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop",'
    b'"meshollama":{"peers":["12D3KooA","12D3KooB"]}}\n'
)
GEN_OK = b'{"response":"a","done":false}\n{"response":" b","done":false}\n{"response":"","done":true}\n'
V1_CHAT_OK = (
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"w01"},"finish_reason":null}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"content":" w02"},"finish_reason":null}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"meshollama":{"peers":["P"]}}\n\n'
    b"data: [DONE]\n\n"
)
V1_COMPLETION_OK = (
    b'data: {"choices":[{"text":"a","index":0,"finish_reason":null}]}\n\n'
    b'data: {"choices":[{"text":" b","index":0,"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)


@pytest.mark.parametrize(
    ("path", "ctype", "body", "text"),
    [
        ("/api/chat", NDJSON, CHAT_OK, "w01 w02"),
        ("/api/generate", NDJSON, GEN_OK, "a b"),
        ("/v1/chat/completions", SSE, V1_CHAT_OK, "w01 w02"),
        ("/v1/completions", SSE, V1_COMPLETION_OK, "a b"),
        ("/v1/chat/completions", SSE, V1_CHAT_OK.replace(b"\n", b"\r\n"), "w01 w02"),
        ("/api/chat", JSON, b'{"message":{"role":"assistant","content":"hi there"},"done":true}', "hi there"),
        ("/api/generate", JSON, b'{"response":"hi","done":true}', "hi"),
        ("/v1/chat/completions", "application/json",
         b'{"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}', "hi"),
        ("/v1/completions", "application/json", b'{"choices":[{"text":"hi","index":0}]}', "hi"),
        ("/api/tags", JSON, b'{"models":[]}', ""),
        # no content type: told apart by the body
        ("/api/chat", None, CHAT_OK, "w01 w02"),
        ("/v1/chat/completions", None, V1_CHAT_OK, "w01 w02"),
        # Anthropic and Responses API streams end with their own final events
        ("/v1/messages", SSE,
         (b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"type":"text_delta","text":"hi"}}'
         b'\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'), "hi"),
        ("/v1/responses", SSE,
         (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"hi"}\n\n'
         b'event: response.completed\ndata: {"type":"response.completed","response":{"error":null}}\n\n'), "hi"),
    ],
)
def test_complete(path, ctype, body, text):
    out = classify(path, 200, ctype, body)
    assert out.fate is Fate.COMPLETE, out
    assert out.text == text and out.error is None and out.final is not None


def test_final_object_and_peers():
    out = classify("/api/chat", 200, NDJSON, CHAT_OK)
    assert out.final["done_reason"] == "stop"
    assert out.peers == ("12D3KooA", "12D3KooB")
    out = classify("/v1/chat/completions", 200, SSE, V1_CHAT_OK)
    assert out.final["choices"][0]["finish_reason"] == "stop" and out.peers == ("P",)
    assert classify("/api/generate", 200, NDJSON, GEN_OK).peers == ()


@pytest.mark.parametrize(
    ("path", "status", "ctype", "body", "message"),
    [
        # an HTTP error status, with the error bodies Ollama and OpenAI use, or none
        ("/api/chat", 404, JSON, b'{"error":"model \'x\' not found"}', "model 'x' not found"),
        ("/v1/chat/completions", 503, "application/json",
         b'{"error":{"message":"no peer","type":"api_error","param":null,"code":null}}', "no peer"),
        ("/api/chat", 502, "text/plain", b"upstream down", "upstream down"),
        ("/api/chat", 500, None, b"", "HTTP 500"),
        # an error line after some chunks, with or without a proper end after it
        ("/api/chat", 200, NDJSON,
         b'{"message":{"role":"assistant","content":"w01"},"done":false}\n{"error":"peer lost"}\n', "peer lost"),
        ("/api/generate", 200, NDJSON, b'{"response":"a","done":false}\n{"error":"x"}\n{"response":"","done":true}\n',
         "x"),
        # SSE error events
        ("/v1/chat/completions", 200, SSE,
         (b'data: {"choices":[{"index":0,"delta":{"content":"w01"}}]}\n\n'
         b'data: {"error":{"message":"peer lost","type":"api_error"}}\n\n'), "peer lost"),
        ("/v1/chat/completions", 200, SSE, b'data: {"error":"plain"}\n\ndata: [DONE]\n\n', "plain"),
        ("/v1/messages", 200, SSE,
         b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"busy"}}\n\n', "busy"),
        ("/v1/responses", 200, SSE,
         b'event: response.failed\ndata: {"type":"response.failed","response":{"error":{"message":"gone"}}}\n\n',
         "gone"),
        # a non-streamed 200 whose body is an error object
        ("/api/pull", 200, JSON, b'{"error":"pull failed"}', "pull failed"),
    ],
)
def test_explicit_error(path, status, ctype, body, message):
    out = classify(path, status, ctype, body)
    assert out.fate is Fate.ERROR, out
    assert out.error == message


def test_error_keeps_partial_text():
    body = b'{"message":{"role":"assistant","content":"w01"},"done":false}\n{"error":"peer lost"}\n'
    assert classify("/api/chat", 200, NDJSON, body).text == "w01"


@pytest.mark.parametrize(
    ("ctype", "body"),
    [
        (NDJSON, b'{"response":"a","done":true}'),  # the whole body arrived, then the connection broke
        (NDJSON, b'{"response":"a","done":false}\n'),
        (SSE, b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'),
        (JSON, b'{"message":{"role":"ass'),
        (JSON, b""),
    ],
)
def test_transport_error_is_an_explicit_error_with_its_reason(ctype, body):
    reason = "RemoteProtocolError: peer closed connection without sending complete message body"
    out = classify("/api/chat", 200, ctype, body, transport_error=reason)
    assert out.fate is Fate.ERROR
    assert out.error == reason and reason in out.reason


def test_transport_error_before_any_response():
    out = classify("/api/chat", None, None, b"", transport_error="ConnectError: refused")
    assert out.fate is Fate.ERROR and out.status is None and "refused" in out.error


def test_an_error_line_wins_over_the_transport_error_that_follows():
    out = classify("/api/chat", 200, NDJSON, b'{"error":"peer lost"}\n', transport_error="ReadError: reset")
    assert out.fate is Fate.ERROR and out.error == "peer lost" and "ReadError" in out.reason


@pytest.mark.parametrize(
    ("path", "ctype", "body"),
    [
        # NDJSON that ends without its done line: the silent failure
        ("/api/chat", NDJSON, b'{"message":{"role":"assistant","content":"w01"},"done":false}\n'),
        ("/api/generate", NDJSON, b""),
        ("/api/generate", NDJSON, b'{"response":"a","done":false}\n{"response":" b","do'),
        ("/api/generate", NDJSON, b'{"response":"a","done":false}\nnot json\n{"response":"","done":true}\n'),
        # SSE without [DONE]; Ollama's own mid-stream failure: an empty chunk, then nothing
        ("/v1/chat/completions", SSE, b'data: {"choices":[{"index":0,"delta":{"content":"w01"}}]}\n\n'),
        ("/v1/chat/completions", SSE,
         (b'data: {"choices":[{"index":0,"delta":{"content":"w01"}}]}\n\n'
         b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n')),
        ("/v1/completions", SSE, b'data: {"choices":[{"text":"a","index":0}]}\n\ndata: {"choi'),
        ("/v1/chat/completions", SSE, b""),
        # a non-streamed 200 that does not parse
        ("/api/chat", JSON, b'{"message":{"role":"assistant","content":"w0'),
        ("/api/chat", JSON, b""),
    ],
)
def test_truncated(path, ctype, body):
    out = classify(path, 200, ctype, body)
    assert out.fate is Fate.TRUNCATED, out
    assert out.error is None and out.reason


def test_truncated_keeps_the_text_received():
    out = classify("/api/chat", 200, NDJSON, b'{"message":{"role":"assistant","content":"w01"},"done":false}\n')
    assert out.text == "w01" and out.reason == "no line with done true"


@pytest.mark.parametrize(
    ("status", "ctype", "body"),
    [
        (None, None, b""),  # nothing at all arrived
        (200, NDJSON, b'{"message":{"role":"assistant","content":"w01"},"done":false}\n'),
        (200, NDJSON, CHAT_OK),  # the final object came but the stream never closed
        (200, NDJSON, b'{"error":"told, but never closed"}\n'),
        (503, JSON, b'{"error":"busy"}'),
    ],
)
def test_hung_wins(status, ctype, body):
    out = classify("/api/chat", status, ctype, body, hung=True)
    assert out.fate is Fate.HUNG, out
    assert "deadline" in out.reason


def test_hung_says_what_it_saw():
    assert "never closed" in classify("/api/chat", 200, NDJSON, CHAT_OK, hung=True).reason
    out = classify("/api/chat", 200, NDJSON, b'{"error":"x"}\n', hung=True)
    assert out.error == "x" and "after an error" in out.reason
    assert "ReadTimeout" in classify("/api/chat", None, None, b"", hung=True, transport_error="ReadTimeout: ").reason


def test_continuous():
    text = numbered_text(5)
    assert text == "w001 w002 w003 w004 w005"
    assert continuous(text, text)
    assert continuous("w001 w002 w003 w004 w005", ["w001", " w002", " w003", " w004", " w005"])
    assert not continuous("w001 w002 w002 w003 w004 w005", text)
    assert not continuous("w001 w002 w004 w005", text)
    assert not continuous("w001 w002w003 w004 w005", text)
    assert not continuous("w001 w002", text)
    assert "duplicate at word 2" in discontinuity("w001 w002 w002 w003 w004 w005", text)
    assert "missing words at word 2" in discontinuity("w001 w002 w004 w005", text)
    assert "ends after word 2" in discontinuity("w001 w002", text)
    assert "extra" in discontinuity(text + " w006", text)
    assert discontinuity(text, text) is None


def test_tally():
    tally = Tally()
    tally.add(Outcome(Fate.COMPLETE, text="ok", path="/api/chat"))
    tally.add(Outcome(Fate.COMPLETE, path="/api/chat"))
    tally.add(Outcome(Fate.ERROR, error="peer lost", reason="error in body", path="/api/chat"))
    tally.assert_none_lost()
    assert tally.count(Fate.COMPLETE) == 2 and tally.counts[Fate.ERROR] == 1
    tally.add(Outcome(Fate.TRUNCATED, text="w01 w02", reason="no line with done true", path="/api/generate"))
    tally.add(Outcome(Fate.HUNG, reason="client deadline expired", path="/v1/chat/completions"))
    assert [o.fate for o in tally.lost] == [Fate.TRUNCATED, Fate.HUNG]
    assert set(tally.examples()) == {Fate.ERROR, Fate.TRUNCATED, Fate.HUNG}
    summary = tally.summary()
    assert summary.startswith("5 requests: complete=2, error=1, hung=1, truncated=1")
    assert "no line with done true" in summary and "/api/generate" in summary
    with pytest.raises(AssertionError, match="truncated=1"):
        tally.assert_none_lost()


# --- send, against the stand-in Ollama ---------------------------------------


@asynccontextmanager
async def _fake(**kw):
    async with trio.open_nursery() as nursery:
        fake = await nursery.start(partial(serve_fake, ["llama3:latest"], name="A", token_delay=0.0, **kw))
        try:
            async with httpx.AsyncClient(base_url=fake.url, timeout=10) as client:
                yield fake, client
        finally:
            nursery.cancel_scope.cancel()


def _chat(stream=True):
    return {"model": "llama3", "messages": [{"role": "user", "content": "x"}], "stream": stream}


async def test_send_sorts_what_the_fake_does():
    with trio.fail_after(10):
        async with _fake(text=numbered_text(6), tokens=6) as (fake, client):
            for path in ("/api/chat", "/v1/chat/completions"):
                for stream in (True, False):
                    out = await send(client, path, _chat(stream), deadline=5)
                    assert out.fate is Fate.COMPLETE, out
                    assert continuous(out.text, numbered_text(6)) and out.elapsed < 5
            # an error line mid-stream
            fake.set(fail_after_n_chunks={"n": 2, "mode": "error", "error": "boom"}, fault_count=1)
            out = await send(client, "/api/chat", _chat(), deadline=5)
            assert (out.fate, out.error, out.text) == (Fate.ERROR, "boom", "w001 w002")
            # a connection dropped mid-body: the client's library raises
            fake.set(fail_after_n_chunks={"n": 2, "mode": "close"}, fault_count=1)
            out = await send(client, "/api/chat", _chat(), deadline=5)
            assert out.fate is Fate.ERROR and "RemoteProtocolError" in out.error and out.text == "w001 w002"
            # Ollama's own /v1 mid-stream failure: an empty chunk, then a clean end. Silent.
            fake.set(fail_after_n_chunks={"n": 2, "mode": "error"}, fault_count=1)
            out = await send(client, "/v1/chat/completions", _chat(), deadline=5)
            assert out.fate is Fate.TRUNCATED and out.text == "w001 w002"
            # an HTTP error status
            out = await send(client, "/api/chat", {**_chat(), "model": "nope"}, deadline=5)
            assert out.fate is Fate.ERROR and out.status == 404 and "not found" in out.error


async def test_send_marks_a_stalled_or_hanging_answer_hung():
    with trio.fail_after(10):
        async with _fake(text=numbered_text(6), tokens=6) as (fake, client):
            fake.set(stall_after_n_chunks=2)
            out = await send(client, "/api/chat", _chat(), deadline=0.5)
            assert out.fate is Fate.HUNG and out.text == "w001 w002" and out.elapsed >= 0.5
            fake.set(stall_after_n_chunks=None, hang_before_first_byte=True)
            out = await send(client, "/api/chat", _chat(stream=False), deadline=0.5)
            assert out.fate is Fate.HUNG and out.status is None
            fake.clear_faults()
            # the client leaving on its deadline reached the fake
            await fake.wait_for(lambda: fake.aborted == 2)

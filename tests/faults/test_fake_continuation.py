"""The stand-in Ollama's knobs the fault suite relies on: ``text`` and continuation,
``stall_after_n_chunks``, and the record of clients that left mid-stream."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from functools import partial

import httpx
import trio

from tests.fakes.fake_ollama import (
    prefix_length,
    run_fake_process,
    serve_fake,
    split_text,
)

from .fates import Fate, classify, continuous, numbered_text

MODEL = "llama3:latest"
TEXT = numbered_text(12)  # "w001 w002 ... w012"
WORDS = split_text(TEXT)


def prefix(k: int) -> str:
    return "".join(WORDS[:k])


@asynccontextmanager
async def fake_and_client(**kw):
    kw.setdefault("token_delay", 0.0)
    async with trio.open_nursery() as nursery:
        fake = await nursery.start(partial(serve_fake, [MODEL], name="A", **kw))
        try:
            async with httpx.AsyncClient(base_url=fake.url, timeout=10) as client:
                yield fake, client
        finally:
            nursery.cancel_scope.cancel()


async def post(client, path, payload):
    r = await client.post(path, json=payload)
    return classify(path, r.status_code, r.headers.get("content-type"), r.content)


def chat(*messages, stream=True, **extra):
    msgs = [{"role": "user", "content": "count"}, *messages]
    return {"model": MODEL, "messages": msgs, "stream": stream, **extra}


def assistant(content):
    return {"role": "assistant", "content": content}


def test_split_text_and_prefix_length():
    assert split_text("w01 w02 w03") == ["w01", " w02", " w03"]
    assert split_text("  a\n b  ") == ["  a", "\n b"]
    words = split_text("a b c")
    assert [prefix_length(words, c) for c in ("", "a", "a b", "a b c")] == [0, 1, 2, 3]
    assert [prefix_length(words, c) for c in ("b", "a ", "a b c d", "a bc", "ab")] == [None] * 5


async def test_default_text_is_unchanged():
    with trio.fail_after(10):
        async with fake_and_client() as (fake, client):
            out = await post(client, "/api/chat", chat(assistant("w001")))
            assert out.fate is Fate.COMPLETE
            assert out.text == "hello from A token3 token4 token5 token6 token7"
            assert out.final["eval_count"] == 8 and out.final["prompt_eval_count"] == 5
            assert fake.requests[-1].continued is None


async def test_text_replaces_the_canned_words_and_tokens_caps_it():
    with trio.fail_after(10):
        async with fake_and_client(text=TEXT, tokens=100) as (fake, client):
            out = await post(client, "/api/chat", chat())
            assert out.fate is Fate.COMPLETE and out.text == TEXT
            assert out.final["eval_count"] == 12 and out.final["prompt_eval_count"] == 5
            fake.set(tokens=5)
            out = await post(client, "/api/generate", {"model": MODEL, "prompt": "x"})
            assert out.text == prefix(5) and out.final["done_reason"] == "stop"
            fake.set(tokens=100)
            out = await post(client, "/api/chat", chat(options={"num_predict": 3}))
            assert out.text == prefix(3) and out.final["done_reason"] == "length"
            out = await post(client, "/v1/completions", {"model": MODEL, "prompt": "x", "stream": True})
            assert out.fate is Fate.COMPLETE and out.text == TEXT


async def test_two_fakes_with_the_same_text_say_the_same():
    with trio.fail_after(10):
        async with fake_and_client(text=TEXT, tokens=100) as (_, a), trio.open_nursery() as nursery:
            other = await nursery.start(partial(serve_fake, [MODEL], name="B", text=TEXT, tokens=100, token_delay=0))
            async with httpx.AsyncClient(base_url=other.url, timeout=10) as b:
                texts = {(await post(c, "/api/chat", chat())).text for c in (a, b)}
            nursery.cancel_scope.cancel()
        assert texts == {TEXT}


async def test_native_chat_continues_a_final_assistant_message():
    with trio.fail_after(10):
        async with fake_and_client(text=TEXT, tokens=100) as (fake, client):
            for stream in (True, False):
                out = await post(client, "/api/chat", chat(assistant(prefix(5)), stream=stream))
                assert out.fate is Fate.COMPLETE
                assert out.text == "".join(WORDS[5:])
                assert continuous(prefix(5) + out.text, TEXT)
                assert out.final["eval_count"] == 7 and out.final["prompt_eval_count"] == 10
                assert fake.requests[-1].continued == 5
            # the whole text already there: nothing left to say
            out = await post(client, "/api/chat", chat(assistant(TEXT)))
            assert out.fate is Fate.COMPLETE and out.text == "" and out.final["eval_count"] == 0
            # num_predict limits this request's words
            out = await post(client, "/api/chat", chat(assistant(prefix(2)), options={"num_predict": 3}))
            assert out.text == "".join(WORDS[2:5]) and out.final["done_reason"] == "length"
            assert fake.state()["mismatched_prefixes"] == 0


async def test_v1_chat_continues_a_final_assistant_message():
    with trio.fail_after(10):
        async with fake_and_client(text=TEXT, tokens=100) as (fake, client):
            payload = chat(assistant(prefix(4)), stream=True, stream_options={"include_usage": True})
            out = await post(client, "/v1/chat/completions", payload)
            assert out.fate is Fate.COMPLETE and out.text == "".join(WORDS[4:])
            assert out.final["usage"] == {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17}
            # content as a list of parts, not streamed
            parts = {"role": "assistant", "content": [{"type": "text", "text": prefix(7)}]}
            out = await post(client, "/v1/chat/completions", chat(parts, stream=False))
            assert out.fate is Fate.COMPLETE and out.text == "".join(WORDS[7:])
            assert out.final["usage"]["prompt_tokens"] == 12
            assert [r.continued for r in fake.requests] == [4, 7]


async def test_raw_generate_continues_a_prompt_ending_with_the_text():
    with trio.fail_after(10):
        async with fake_and_client(text=TEXT, tokens=100) as (fake, client):
            for stream in (True, False):
                payload = {"model": MODEL, "prompt": "count for me:" + prefix(6), "raw": True, "stream": stream}
                out = await post(client, "/api/generate", payload)
                assert out.fate is Fate.COMPLETE and out.text == "".join(WORDS[6:])
                assert out.final["prompt_eval_count"] == 11 and out.final["eval_count"] == 6
                assert fake.requests[-1].continued == 6
            # the longest matching prefix wins; a prompt that ends otherwise starts over
            out = await post(client, "/api/generate", {"model": MODEL, "prompt": "w001 w002 w003", "raw": True})
            assert out.text == "".join(WORDS[3:])
            out = await post(client, "/api/generate", {"model": MODEL, "prompt": "w002", "raw": True})
            assert out.text == TEXT
            # not raw: the prompt is the user's, no continuation
            out = await post(client, "/api/generate", {"model": MODEL, "prompt": prefix(6)})
            assert out.text == TEXT and fake.requests[-1].continued is None


async def test_a_prefix_that_does_not_match_starts_over_and_is_recorded():
    with trio.fail_after(10):
        async with fake_and_client(text=TEXT, tokens=100) as (fake, client):
            bad = "w001 w002 w002"
            out = await post(client, "/api/chat", chat(assistant(bad)))
            assert out.fate is Fate.COMPLETE and out.text == TEXT
            assert fake.state()["mismatched_prefixes"] == 1
            record = fake.requests[-1]
            assert record.mismatched_prefix == bad and record.continued == 0
            logged = (await client.get("/_fake/requests")).json()[-1]
            assert logged["mismatched_prefix"] == bad


async def test_text_flag_of_the_subprocess():
    with trio.fail_after(20):
        async with run_fake_process([MODEL], text="x1 x2 x3", tokens=10, token_delay=0) as proc:
            async with httpx.AsyncClient(base_url=proc.url, timeout=10) as client:
                out = await post(client, "/api/chat", chat(assistant("x1")))
            assert out.text == " x2 x3"
            assert (await proc.state())["knobs"]["text"] == "x1 x2 x3"


async def pump(resp, send):
    """Hand the response's NDJSON objects to ``send`` (a reader that outlives a timed-out receive)."""
    async with send:
        async for line in resp.aiter_lines():
            if line:
                await send.send(json.loads(line))


async def test_stall_after_n_chunks_then_release():
    with trio.fail_after(10):
        async with fake_and_client(text=TEXT, tokens=100) as (fake, client):
            r = await client.post("/_fake/control", json={"stall_after_n_chunks": 3})
            assert r.json()["knobs"]["stall_after_n_chunks"] == 3
            send, received = trio.open_memory_channel(100)
            async with client.stream("POST", "/api/chat", json=chat()) as resp, trio.open_nursery() as nursery:
                nursery.start_soon(pump, resp, send)
                got = [await received.receive() for _ in range(3)]
                assert "".join(x["message"]["content"] for x in got) == prefix(3)
                # Wedged: nothing more comes (unstalled, all 12 words take no
                # time at all), and the request is still running.
                with trio.move_on_after(0.3) as quiet:
                    await received.receive()
                assert quiet.cancelled_caught and fake.active == 1
                fake.set(stall_after_n_chunks=None)
                rest = [x async for x in received]
            assert rest[-1]["done"] is True
            assert prefix(3) + "".join(x["message"]["content"] for x in rest) == TEXT
            assert fake.requests[-1].outcome == "ok" and fake.completed == 1


async def test_a_client_leaving_a_stalled_stream_is_recorded():
    with trio.fail_after(10):
        async with fake_and_client(text=TEXT, tokens=100) as (fake, client):
            fake.set(stall_after_n_chunks=2)
            for path, payload in (("/api/chat", chat()), ("/v1/chat/completions", chat())):
                before = fake.aborted
                async with client.stream("POST", path, json=payload) as resp:
                    async for line in resp.aiter_lines():
                        if line:
                            break
                    # leave mid-stream: closing the response drops the connection
                await fake.wait_for(lambda before=before: fake.aborted == before + 1)
                assert fake.requests[-1].outcome == "aborted"
            assert fake.state()["aborted"] == 2 and fake.active == 0


async def test_stall_respects_fault_paths_and_fault_count():
    with trio.fail_after(10):
        async with fake_and_client(text=TEXT, tokens=100) as (fake, client):
            fake.set(stall_after_n_chunks=1, fault_paths=("/v1/chat/completions",))
            out = await post(client, "/api/chat", chat())  # not a fault path: runs through
            assert out.fate is Fate.COMPLETE and out.text == TEXT
            fake.set(fault_paths=("/api/chat",), fault_count=1)
            async with trio.open_nursery() as nursery:
                outs = []

                async def first():
                    outs.append(await post(client, "/api/chat", chat()))

                nursery.start_soon(first)
                await fake.wait_for(lambda: fake.knobs.fault_count is None)  # the first took the fault
                assert fake.knobs.stall_after_n_chunks is None
                # used up: the next request runs while the first is stalled
                out = await post(client, "/api/chat", chat())
                assert out.fate is Fate.COMPLETE and out.text == TEXT
                assert fake.requests[-2].outcome == "pending" and not outs
                fake.set(stall_after_n_chunks=None)  # releases the stalled one
            assert outs[0].fate is Fate.COMPLETE and outs[0].text == TEXT


async def test_stall_does_not_touch_non_streamed_answers():
    with trio.fail_after(10):
        async with fake_and_client(text=TEXT, tokens=100) as (fake, client):
            fake.set(stall_after_n_chunks=0)
            out = await post(client, "/api/chat", chat(stream=False))
            assert out.fate is Fate.COMPLETE and out.text == TEXT
            fake.clear_faults()
            assert fake.knobs.stall_after_n_chunks is None

"""Mid-stream resume (gateway/resume.py), driven by scripted upstream byte sequences.

Chunk shapes copy what tests/fakes/fake_ollama.py and a real Ollama write
(shared/reference/ollama-api.md §2.3, §2.4, §3.2, §3.3). Each scenario plays
the proxy's part: commit, feed, break, resume, end; then reads the client's
bytes back as a client would and checks the answer is whole.
"""

from __future__ import annotations

import json
import random

import pytest

from meshollama.gateway.errors import dumps
from meshollama.gateway.resume import Continuation, Finished, GiveUp, StreamRelay
from meshollama.gateway.resume_shapes import Cutter, parse, refusal

NDJSON = "application/x-ndjson"
SSE = "text/event-stream; charset=utf-8"
MODEL = "llama3.2"
TS = "2025-01-02T03:04:05.123456789Z"
WORDS = ["The", " sky", " is", " blue", " because", " of", " Rayleigh", " scattering", "."]
UNICODE = ["Grüß", " dich", ", ", "日本", "語", " 🎉", " ok"]
SECOND = 1_000_000_000


# --- what upstreams write -----------------------------------------------------


def line(obj) -> bytes:
    return dumps(obj) + b"\n"


def sse(obj) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def metrics(count: int, prompt: int = 5) -> dict:
    return {"total_duration": 2_000_000 + count, "load_duration": 1_000_000, "prompt_eval_count": prompt,
            "prompt_eval_duration": 500_000, "eval_count": count, "eval_duration": 1000 + count}


def chat_chunk(text: str = "", thinking: str = "", **extra) -> bytes:
    msg = {"role": "assistant", "content": text}
    if thinking:
        msg["thinking"] = thinking
    msg.update(extra)
    return line({"model": MODEL, "created_at": TS, "message": msg, "done": False})


def chat_final(count: int, prompt: int = 5, reason: str = "stop") -> bytes:
    return line({"model": MODEL, "created_at": TS, "message": {"role": "assistant", "content": ""},
                 "done": True, "done_reason": reason, **metrics(count, prompt)})


def chat_stream(words, prompt: int = 5) -> bytes:
    return b"".join(chat_chunk(w) for w in words) + chat_final(len(words), prompt)


def gen_chunk(text: str) -> bytes:
    return line({"model": MODEL, "created_at": TS, "response": text, "done": False})


def gen_final(count: int, prompt: int = 5, raw: bool = False, reason: str = "stop") -> bytes:
    final = {"model": MODEL, "created_at": TS, "response": "", "done": True, "done_reason": reason,
             **metrics(count, prompt)}
    if not raw:
        final["context"] = list(range(1, count + 6))
    return line(final)


def gen_stream(words, raw: bool = False) -> bytes:
    return b"".join(gen_chunk(w) for w in words) + gen_final(len(words), raw=raw)


def v1_head(id_: str = "chatcmpl-123", created: int = 1_700_000_000) -> dict:
    return {"id": id_, "object": "chat.completion.chunk", "created": created, "model": MODEL,
            "system_fingerprint": "fp_ollama"}


def v1_chunk(head: dict, delta: dict, finish=None) -> bytes:
    return sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def v1_stream(words, head: dict, usage: bool, prompt: int = 5, reason: str = "stop") -> bytes:
    out = [v1_chunk(head, {"role": "assistant", "content": w} if i == 0 else {"content": w})
           for i, w in enumerate(words)]
    out.append(v1_chunk(head, {}, reason))
    if usage:
        n = len(words)
        out.append(sse({**head, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                                                         "total_tokens": prompt + n}}))
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def cmpl_head(id_: str = "cmpl-42", created: int = 1_700_000_000) -> dict:
    return {"id": id_, "object": "text_completion", "created": created, "model": MODEL,
            "system_fingerprint": "fp_ollama"}


ZERO = {"usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


def cmpl_stream(words, head: dict, usage: bool, prompt: int = 5) -> bytes:
    zero = ZERO if usage else {}
    out = [sse({**head, "choices": [{"text": w, "index": 0, "finish_reason": "stop" if i == len(words) - 1 else None}],
                **zero}) for i, w in enumerate(words)]
    if usage:
        n = len(words)
        out.append(sse({**head, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                                                         "total_tokens": prompt + n}}))
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


# --- what clients read ----------------------------------------------------------


def native_objects(data: bytes) -> list[dict]:
    assert data.endswith(b"\n")
    return [json.loads(raw) for raw in data.split(b"\n")[:-1]]  # every line whole JSON, no blank lines


def sse_events(data: bytes) -> list:
    assert data.endswith(b"\n\n")
    out = []
    for event in data.split(b"\n\n")[:-1]:
        assert event.startswith(b"data: "), event
        payload = event[6:]
        out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


def native_text(objs: list[dict], key: str = "content") -> str:
    if key == "response":
        return "".join(o.get("response", "") for o in objs)
    return "".join(o["message"].get(key, "") for o in objs)


def v1_text(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events if isinstance(e, dict) and e["choices"])


def cmpl_text(events: list) -> str:
    return "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e["choices"])


def play(relay: StreamRelay, chunks) -> tuple[bytes, bool]:
    """Feed ``chunks`` then end: the bytes sent and whether the stream was complete."""
    out = b"".join(relay.feed(c) for c in chunks)
    complete, rest = relay.end()
    return out + rest, complete


def splits(data: bytes, rng: random.Random, n: int) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(n, len(data) - 1)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Why is the sky blue?"}]}
GEN = {"model": MODEL, "prompt": "Why is the sky blue?"}
V1 = {"model": MODEL, "messages": [{"role": "user", "content": "Why is the sky blue?"}], "stream": True}
CMPL = {"model": MODEL, "prompt": "Once upon a time", "stream": True}

# (path, payload, content type, unbroken stream, text of the answer)
STREAMS = [
    ("/api/chat", CHAT, NDJSON, chat_stream(WORDS), "".join(WORDS)),
    ("/api/chat", CHAT, NDJSON, chat_stream(UNICODE), "".join(UNICODE)),
    ("/api/generate", GEN, NDJSON, gen_stream(UNICODE), "".join(UNICODE)),
    ("/v1/chat/completions", V1, SSE, v1_stream(UNICODE, v1_head(), usage=True), "".join(UNICODE)),
    ("/v1/chat/completions", V1, SSE, v1_stream(WORDS, v1_head(), usage=False), "".join(WORDS)),
    ("/v1/completions", CMPL, SSE, cmpl_stream(UNICODE, cmpl_head(), usage=True), "".join(UNICODE)),
]
IDS = ["chat", "chat-unicode", "generate", "v1-chat-usage", "v1-chat", "v1-completions"]


# --- pass-through -----------------------------------------------------------------


@pytest.mark.parametrize(("path", "payload", "ctype", "stream", "text"), STREAMS, ids=IDS)
def test_unbroken_stream_is_byte_identical(path, payload, ctype, stream, text):
    relay = StreamRelay(path, payload)
    relay.commit("peer-a", ctype)
    out, complete = play(relay, [stream])
    assert out == stream
    assert complete and relay.state == "done"
    assert relay.text == text and relay.peers == ["peer-a"] and relay.resumes == 0


@pytest.mark.parametrize(("path", "payload", "ctype", "stream", "text"), STREAMS, ids=IDS)
def test_any_split_gives_the_same_bytes(path, payload, ctype, stream, text):
    rng = random.Random(7)
    plans = [[stream[:i], stream[i:]] for i in range(1, len(stream))]  # every single cut, mid-UTF-8 ones too
    plans += [splits(stream, rng, n) for n in (3, 10, 40) for _ in range(20)]
    plans.append([stream[i:i + 1] for i in range(len(stream))])  # byte by byte
    for plan in plans:
        relay = StreamRelay(path, payload)
        relay.commit("peer-a", ctype)
        sent = []
        for piece in plan:
            out = relay.feed(piece)
            if out:  # only whole lines / events ever go out
                assert out.endswith(b"\n\n" if ctype == SSE else b"\n")
            sent.append(out)
        complete, rest = relay.end()
        assert b"".join(sent) + rest == stream
        assert complete and relay.text == text


def test_unterminated_final_line_still_passes_through():
    stream = chat_stream(WORDS[:3])[:-1]  # no newline after the final object
    relay = StreamRelay("/api/chat", CHAT)
    relay.commit("peer-a", NDJSON)
    out, complete = play(relay, [stream])
    assert (out, complete) == (stream, True)
    stream = v1_stream(WORDS[:2], v1_head(), usage=False)[:-1]  # "data: [DONE]\n"
    relay = StreamRelay("/v1/chat/completions", V1)
    relay.commit("peer-a", SSE)
    assert play(relay, [stream]) == (stream, True)


def test_bytes_after_the_final_object():
    stream = chat_stream(WORDS[:2])
    relay = StreamRelay("/api/chat", CHAT)
    relay.commit("peer-a", NDJSON)
    out = relay.feed(stream + b"\n{tra") + relay.feed(b"iling")
    assert (out, relay.end()) == (stream + b"\n{trailing", (True, b""))  # the first upstream's: as they came
    relay = StreamRelay("/api/chat", CHAT)
    relay.commit("peer-a", NDJSON)
    relay.feed(chat_chunk("a"))
    relay.broke("reset")
    relay.resumed("peer-b", NDJSON)
    out = relay.feed(chat_stream(["b"]) + b"\n{tra") + relay.feed(b"iling\n")
    assert out.endswith(b"}\n") and native_objects(out)[-1]["done"]  # a continuation's: dropped


def test_crlf_sse_events_are_cut_at_blank_lines():
    stream = v1_stream(WORDS[:3], v1_head(), usage=False).replace(b"\n", b"\r\n")
    relay = StreamRelay("/v1/chat/completions", V1)
    relay.commit("peer-a", SSE)
    first = relay.feed(stream[:-3])
    assert stream.startswith(first) and first.endswith(b"\r\n\r\n") and len(first) < len(stream)
    assert first + relay.feed(stream[-3:]) == stream
    assert relay.end() == (True, b"") and relay.text == "".join(WORDS[:3])


@pytest.mark.parametrize(("path", "ctype"), [("/api/chat", "application/json; charset=utf-8"),
                                              ("/api/pull", NDJSON), ("/api/embed", "application/json")])
def test_non_streamed_and_other_paths_are_raw(path, ctype):
    body = b'{"model":"llama3.2","created_at":"x","message":{"role":"assistant","content":"hi"},"done":true}'
    relay = StreamRelay(path, {"model": MODEL})
    relay.commit("peer-a", ctype)
    assert relay.feed(body[:7]) == body[:7]  # no buffering, even mid-line
    assert relay.feed(body[7:]) == body[7:]
    assert relay.end() == (True, b"")
    assert relay.text == ""  # not parsed
    relay = StreamRelay(path, {"model": MODEL})
    relay.commit("peer-a", ctype)
    relay.feed(body[:7])
    verdict = relay.broke("reset")
    assert isinstance(verdict, GiveUp) and verdict.tail == b"" and relay.state == "failed"


# --- resuming, one format at a time --------------------------------------------------


def test_chat_resumes_on_another_peer():
    payload = {**CHAT, "options": {"seed": 42, "temperature": 0, "num_predict": 50}, "keep_alive": "5m"}
    relay = StreamRelay("/api/chat", payload)
    relay.commit("peer-a", NDJSON)
    a = chat_stream(WORDS).split(b"\n")
    sent = relay.feed(b"\n".join(a[:3]) + b"\n" + a[3][:17])  # 3 lines and part of the 4th
    assert sent == b"\n".join(a[:3]) + b"\n"
    verdict = relay.broke("connection reset", spent=0.25)
    assert relay.state == "resuming"
    assert verdict == Continuation("/api/chat", dumps({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Why is the sky blue?"},
                     {"role": "assistant", "content": "The sky is"}],
        "options": {"seed": 42, "temperature": 0, "num_predict": 47},
        "keep_alive": "5m",
        "stream": True,
    }))
    relay.resumed("peer-b", NDJSON)
    b_stream = chat_stream(WORDS[3:], prompt=5 + 3)
    out, complete = play(relay, [b_stream])
    assert complete and relay.state == "done"
    # B's content chunks pass through untouched; only its final object changes.
    assert out.startswith(b"".join(chat_chunk(w) for w in WORDS[3:]))
    objs = native_objects(sent + out)
    assert native_text(objs) == "".join(WORDS) == relay.text
    finals = [o for o in objs if o["done"]]
    assert len(finals) == 1 and finals[0] is objs[-1]
    final = finals[0]
    assert final["eval_count"] == 3 + 6
    assert final["prompt_eval_count"] == 5
    assert final["total_duration"] == 2_000_000 + 6 + SECOND // 4
    assert final["meshollama"] == {"peers": ["peer-a", "peer-b"], "resumed": 1}
    assert final["done_reason"] == "stop" and final["model"] == MODEL


def test_chat_continuation_carries_thinking_and_extends_a_prefill():
    payload = {"model": MODEL, "think": True, "messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "Sure,"}]}
    relay = StreamRelay("/api/chat", payload)
    relay.commit("peer-a", NDJSON)
    relay.feed(chat_chunk(thinking="Let me") + chat_chunk(thinking=" think.") + chat_chunk(" here"))
    verdict = relay.broke("stalled")
    assert json.loads(verdict.body)["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Sure, here", "thinking": "Let me think."},
    ]
    assert relay.pieces == 3


def test_thinking_only_then_break_continues_rather_than_retries():
    relay = StreamRelay("/api/chat", {**CHAT, "think": True})
    relay.commit("peer-a", NDJSON)
    relay.feed(chat_chunk(thinking="Hmm"))
    verdict = relay.broke("reset")
    assert json.loads(verdict.body)["messages"][-1] == {"role": "assistant", "content": "", "thinking": "Hmm"}


def test_generate_is_continued_as_chat_and_translated_back():
    payload = {"model": MODEL, "prompt": "Why is the sky blue?", "system": "Be brief.", "images": ["aGk="],
               "options": {"num_predict": 50, "seed": 1}, "keep_alive": "5m", "think": False, "stream": True}
    relay = StreamRelay("/api/generate", payload)
    relay.commit("peer-a", NDJSON)
    sent = relay.feed(b"".join(gen_chunk(w) for w in WORDS[:3]) + b'{"model":"llama')
    verdict = relay.broke("peer killed", spent=1.0)
    assert verdict == Continuation("/api/chat", dumps({
        "model": MODEL,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Why is the sky blue?", "images": ["aGk="]},
                     {"role": "assistant", "content": "The sky is"}],
        "options": {"num_predict": 47, "seed": 1},
        "keep_alive": "5m",
        "think": False,
        "stream": True,
    }))
    relay.resumed("peer-b", NDJSON)
    out, complete = play(relay, [chat_stream(WORDS[3:], prompt=20)])
    assert complete
    objs = native_objects(sent + out)
    assert all("message" not in o for o in objs)  # generate-shaped throughout
    assert native_text(objs, "response") == "".join(WORDS)
    assert objs[3] == {"model": MODEL, "created_at": TS, "response": " blue", "done": False}
    final = objs[-1]
    assert [o["done"] for o in objs].count(True) == 1 and final["done"] is True
    assert "context" not in final
    assert final == {"model": MODEL, "created_at": TS, "response": "", "done": True, "done_reason": "stop",
                     "total_duration": 2_000_006 + SECOND, "load_duration": 1_000_000, "prompt_eval_count": 17,
                     "prompt_eval_duration": 500_000, "eval_count": 9, "eval_duration": 1006,
                     "meshollama": {"peers": ["peer-a", "peer-b"], "resumed": 1}}


def test_raw_generate_is_continued_with_a_longer_prompt():
    payload = {"model": MODEL, "prompt": "[INST] sky? [/INST]", "raw": True, "options": {"num_predict": 10}}
    relay = StreamRelay("/api/generate", payload)
    relay.commit("peer-a", NDJSON)
    sent = relay.feed(b"".join(gen_chunk(w) for w in WORDS[:4]))
    verdict = relay.broke("reset")
    assert verdict == Continuation("/api/generate", dumps({
        "model": MODEL, "prompt": "[INST] sky? [/INST]The sky is blue", "raw": True,
        "options": {"num_predict": 6}, "stream": True}))
    relay.resumed("peer-b", NDJSON)
    out, _ = play(relay, [gen_stream(WORDS[4:], raw=True)])
    objs = native_objects(sent + out)
    assert native_text(objs, "response") == "".join(WORDS)
    assert objs[-1]["eval_count"] == 4 + 5 and objs[-1]["meshollama"]["resumed"] == 1


@pytest.mark.parametrize("usage", [True, False])
def test_v1_chat_resumes_with_the_original_ids(usage):
    payload = {**V1, "max_tokens": 100, "seed": 7, "temperature": 0.2}
    if usage:
        payload["stream_options"] = {"include_usage": True}
    relay = StreamRelay("/v1/chat/completions", payload)
    relay.commit("peer-a", SSE)
    a = v1_stream(WORDS, v1_head(), usage)
    events = a.split(b"\n\n")
    sent = relay.feed(b"\n\n".join(events[:3]) + b"\n\n" + events[3][:9])
    verdict = relay.broke("stalled", spent=0.5)
    expected = {**payload, "messages": [*V1["messages"], {"role": "assistant", "content": "The sky is"}],
                "max_tokens": 97}
    assert verdict == Continuation("/v1/chat/completions", dumps(expected))
    relay.resumed("peer-b", SSE)
    b_stream = v1_stream(WORDS[3:], v1_head("chatcmpl-999", 1_700_000_123), usage, prompt=8)
    out, complete = play(relay, [b_stream])
    assert complete and relay.state == "done"
    got = sse_events(sent + out)
    assert got[-1] == "[DONE]" and got.count("[DONE]") == 1
    chunks = got[:-1]
    assert v1_text(chunks) == "".join(WORDS)
    assert {(c["id"], c["created"], c["model"], c["object"]) for c in chunks} == {
        ("chatcmpl-123", 1_700_000_000, MODEL, "chat.completion.chunk")}
    assert [i for i, c in enumerate(chunks) if c["choices"] and "role" in c["choices"][0]["delta"]] == [0]
    finishes = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishes) == 1
    mesh = {"peers": ["peer-a", "peer-b"], "resumed": 1}
    if usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["meshollama"] == mesh
        assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
        assert "meshollama" not in finishes[0]
    else:
        assert finishes[0] is chunks[-1] and finishes[0]["meshollama"] == mesh
        assert not any("usage" in c for c in chunks)


def test_v1_chat_continuation_carries_reasoning():
    relay = StreamRelay("/v1/chat/completions", V1)
    relay.commit("peer-a", SSE)
    head = v1_head()
    relay.feed(v1_chunk(head, {"role": "assistant", "content": "", "reasoning": "Think"}) + v1_chunk(head, {"content": "A"}))
    verdict = relay.broke("reset")
    assert json.loads(verdict.body)["messages"][-1] == {"role": "assistant", "content": "A", "reasoning": "Think"}


@pytest.mark.parametrize("usage", [True, False])
def test_v1_completions_continue_as_chat_and_are_translated_back(usage):
    payload = {**CMPL, "max_tokens": 20, "temperature": 0.5, "stop": "\n", "seed": 3}
    if usage:
        payload["stream_options"] = {"include_usage": True}
    relay = StreamRelay("/v1/completions", payload)
    relay.commit("peer-a", SSE)
    a = cmpl_stream(WORDS, cmpl_head(), usage).split(b"\n\n")
    sent = relay.feed(b"\n\n".join(a[:3]) + b"\n\n")
    verdict = relay.broke("reset", spent=2)
    assert verdict == Continuation("/api/chat", dumps({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Once upon a time"}, {"role": "assistant", "content": "The sky is"}],
        "options": {"stop": ["\n"], "num_predict": 17, "temperature": 0.5, "seed": 3, "frequency_penalty": 0,
                    "presence_penalty": 0, "top_p": 1.0},
        "stream": True,
    }))
    relay.resumed("peer-b", NDJSON)
    out, complete = play(relay, [chat_stream(WORDS[3:], prompt=9)])
    assert complete
    got = sse_events(sent + out)
    assert got[-1] == "[DONE]" and got.count("[DONE]") == 1
    chunks = got[:-1]
    assert cmpl_text(chunks) == "".join(WORDS)
    assert {(c["id"], c["object"], c["created"], c["model"]) for c in chunks} == {
        ("cmpl-42", "text_completion", 1_700_000_000, MODEL)}
    finishes = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishes) == 1 and finishes[0]["choices"][0]["finish_reason"] == "stop"
    mesh = {"peers": ["peer-a", "peer-b"], "resumed": 1}
    if usage:
        assert all(c["usage"] == ZERO["usage"] for c in chunks[:-1])  # Ollama's zero usage on each chunk
        assert chunks[-1] == {**cmpl_head(), "choices": [], "meshollama": mesh,
                              "usage": {"prompt_tokens": 6, "completion_tokens": 9, "total_tokens": 15}}
    else:
        assert finishes[0] is chunks[-1] and finishes[0]["meshollama"] == mesh
        assert not any("usage" in c for c in chunks)


def test_continuation_split_anywhere_gives_the_same_bytes():
    def client_bytes(plan) -> bytes:
        relay = StreamRelay("/v1/completions", {**CMPL, "stream_options": {"include_usage": True}})
        relay.commit("peer-a", SSE)
        sent = relay.feed(cmpl_stream(WORDS, cmpl_head(), True).split(b"[DONE]")[0][:300])
        relay.broke("reset")
        relay.resumed("peer-b", NDJSON)
        out, complete = play(relay, plan)
        assert complete
        return sent + out

    b_stream = chat_stream(UNICODE)
    whole = client_bytes([b_stream])
    rng = random.Random(3)
    for n in (2, 5, 30):
        assert client_bytes(splits(b_stream, rng, n)) == whole
    assert client_bytes([b_stream[i:i + 1] for i in range(len(b_stream))]) == whole


# --- breaks before any text, and several breaks ----------------------------------------


@pytest.mark.parametrize("body", [None, b'{"model": "llama3.2", "messages": [], "tools": [{"x": 1}]}'])
def test_break_before_any_text_retries_the_request_as_is(body):
    payload = {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}], "format": "json"}
    relay = StreamRelay("/api/chat", payload, body=body)
    relay.commit("peer-a", NDJSON)
    assert relay.feed(chat_chunk("")[:20]) == b""  # a partial line: nothing sent
    verdict = relay.broke("reset", spent=0.1)
    assert verdict == Continuation("/api/chat", body if body is not None else dumps(payload))
    relay.resumed("peer-b", NDJSON)
    b_stream = chat_stream(WORDS)
    out, complete = play(relay, [b_stream])
    objs = native_objects(out)
    assert complete and native_text(objs) == "".join(WORDS)
    assert objs[-1]["eval_count"] == 9 and objs[-1]["prompt_eval_count"] == 5
    assert objs[-1]["meshollama"] == {"peers": ["peer-a", "peer-b"], "resumed": 1}
    assert out.startswith(b_stream[:-len(chat_final(9))])  # the content chunks, untouched


def test_v1_break_after_the_role_chunk_retries_with_the_original_id():
    relay = StreamRelay("/v1/chat/completions", V1)
    relay.commit("peer-a", SSE)
    sent = relay.feed(v1_chunk(v1_head(), {"role": "assistant", "content": ""}))
    verdict = relay.broke("reset")
    assert verdict == Continuation("/v1/chat/completions", dumps(V1))
    relay.resumed("peer-b", SSE)
    out, _ = play(relay, [v1_stream(WORDS, v1_head("chatcmpl-5", 1_800_000_000), usage=False)])
    got = sse_events(sent + out)
    assert v1_text(got) == "".join(WORDS)
    assert {c["id"] for c in got if isinstance(c, dict)} == {"chatcmpl-123"}
    assert {c["created"] for c in got if isinstance(c, dict)} == {1_700_000_000}


def test_two_breaks_accumulate():
    relay = StreamRelay("/api/chat", {**CHAT, "options": {"num_predict": 100}})
    relay.commit("peer-a", NDJSON)
    sent = [relay.feed(b"".join(chat_chunk(w) for w in WORDS[:2]))]
    first = relay.broke("reset", spent=1)
    assert json.loads(first.body)["messages"][-1] == {"role": "assistant", "content": "The sky"}
    relay.resumed("peer-b", NDJSON)
    sent.append(relay.feed(b"".join(chat_chunk(w) for w in WORDS[2:5]) + chat_chunk("x")[:5]))
    second = relay.broke("stalled", spent=2)
    body = json.loads(second.body)
    assert body["messages"][-1] == {"role": "assistant", "content": "The sky is blue because"}
    assert body["options"] == {"num_predict": 95}
    assert len(body["messages"]) == 2  # the first continuation's assistant message is not repeated
    relay.resumed("peer-c", NDJSON)
    out, complete = play(relay, [chat_stream(WORDS[5:], prompt=10)])
    assert complete
    objs = native_objects(b"".join(sent) + out)
    assert native_text(objs) == "".join(WORDS)
    final = objs[-1]
    assert final["eval_count"] == 5 + 4 and final["prompt_eval_count"] == 5
    assert final["total_duration"] == 2_000_004 + 3 * SECOND
    assert final["meshollama"] == {"peers": ["peer-a", "peer-b", "peer-c"], "resumed": 2}
    assert relay.resumes == 2 and relay.peers == ["peer-a", "peer-b", "peer-c"]


def test_v1_completions_two_breaks_stay_in_one_envelope():
    payload = {**CMPL, "max_tokens": 30, "stream_options": {"include_usage": True}}
    relay = StreamRelay("/v1/completions", payload)
    relay.commit("peer-a", SSE)
    a = cmpl_stream(WORDS, cmpl_head(), True).split(b"\n\n")
    sent = [relay.feed(b"\n\n".join(a[:2]) + b"\n\n")]
    relay.broke("reset")
    relay.resumed("peer-b", NDJSON)
    sent.append(relay.feed(b"".join(chat_chunk(w) for w in WORDS[2:6]) + b'{"model'))
    second = json.loads(relay.broke("stalled").body)
    assert second["messages"][-1] == {"role": "assistant", "content": "The sky is blue because of"}
    assert second["options"]["num_predict"] == 24
    relay.resumed("peer-c", NDJSON)
    out, complete = play(relay, [chat_stream(WORDS[6:], prompt=12)])
    got = sse_events(b"".join(sent) + out)
    assert complete and cmpl_text(got) == "".join(WORDS) and got[-1] == "[DONE]"
    assert got[-2]["usage"] == {"prompt_tokens": 6, "completion_tokens": 9, "total_tokens": 15}
    assert got[-2]["meshollama"] == {"peers": ["peer-a", "peer-b", "peer-c"], "resumed": 2}


def test_give_up_mid_continuation_needs_no_separator():
    relay = StreamRelay("/api/generate", GEN)
    relay.commit("peer-a", NDJSON)
    sent = [relay.feed(gen_chunk("The"))]
    relay.broke("reset")
    relay.resumed("peer-b", NDJSON)
    sent.append(relay.feed(chat_chunk(" sky") + chat_chunk(" is")[:30]))
    assert isinstance(relay.broke("stalled"), Continuation)
    tail = relay.give_up("no other peer holds the model")
    objs = native_objects(b"".join(sent) + tail)
    assert native_text(objs[:-1], "response") == "The sky" and "error" in objs[-1]


def test_resumes_are_bounded():
    relay = StreamRelay("/api/chat", CHAT, max_resumes=1)
    relay.commit("peer-a", NDJSON)
    relay.feed(chat_chunk("a"))
    assert isinstance(relay.broke("reset"), Continuation)
    relay.resumed("peer-b", NDJSON)
    relay.feed(chat_chunk("b"))
    verdict = relay.broke("reset")
    assert isinstance(verdict, GiveUp) and "resumed 1 times" in verdict.message


def test_a_failed_continuation_peer_gets_the_same_continuation_again():
    relay = StreamRelay("/api/chat", CHAT)
    relay.commit("peer-a", NDJSON)
    relay.feed(chat_chunk("a"))
    first = relay.broke("reset")
    with pytest.raises(ValueError):
        relay.resumed("peer-b", "application/json")  # not a stream: that peer failed
    assert relay.state == "resuming" and relay.broke("no answer") == first
    relay.resumed("peer-c", NDJSON)
    assert relay.peers == ["peer-a", "peer-c"]


# --- refusals --------------------------------------------------------------------------

REFUSED = [
    ("/api/chat", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/api/chat", {**CHAT, "format": "json"}, "format"),
    ("/api/generate", {**GEN, "format": {"type": "object"}}, "format"),
    ("/api/generate", {**GEN, "context": [1, 2, 3]}, "context"),
    ("/api/generate", {**GEN, "template": "{{ .Prompt }}"}, "template"),
    ("/api/generate", {**GEN, "suffix": "end"}, "suffix"),
    ("/api/chat", {**CHAT, "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {**V1, "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {**V1, "tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {**V1, "functions": [{"name": "f"}]}, "tools"),
    ("/v1/chat/completions", {**V1, "n": 2}, "(n)"),
    ("/v1/chat/completions", {**V1, "logprobs": True}, "logprobs"),
    ("/v1/completions", {**CMPL, "echo": True}, "echo"),
    ("/v1/completions", {**CMPL, "suffix": "x"}, "suffix"),
]
ALLOWED = [
    ("/api/chat", {**CHAT, "tools": [], "format": ""}),
    ("/api/generate", {**GEN, "format": None, "context": []}),
    ("/v1/chat/completions", {**V1, "response_format": {"type": "text"}, "n": 1, "logprobs": False}),
]


@pytest.mark.parametrize(("path", "payload", "why"), REFUSED)
def test_requests_that_cannot_be_continued(path, payload, why):
    assert why in refusal(path, payload)


@pytest.mark.parametrize(("path", "payload"), ALLOWED)
def test_requests_that_can_be_continued(path, payload):
    assert refusal(path, payload) is None


def first_chunks(path: str) -> tuple[str, bytes]:
    if path == "/api/chat":
        return NDJSON, chat_chunk("The") + chat_chunk(" sky")
    if path == "/api/generate":
        return NDJSON, gen_chunk("The") + gen_chunk(" sky")
    if path == "/v1/chat/completions":
        return SSE, v1_chunk(v1_head(), {"role": "assistant", "content": "The"}) + v1_chunk(v1_head(), {"content": " x"})
    return SSE, sse({**cmpl_head(), "choices": [{"text": "The", "index": 0, "finish_reason": None}]})


def assert_error_tail(tail: bytes, ctype: str) -> str:
    assert not tail.startswith(b"\n")  # the client's bytes already end at a boundary
    if ctype == NDJSON:
        (obj,) = native_objects(tail)
        assert set(obj) == {"error"}
        return obj["error"]
    (event,) = sse_events(tail)
    assert event["error"]["type"] == "api_error" and event["error"]["param"] is None
    return event["error"]["message"]


@pytest.mark.parametrize(("path", "payload", "why"), REFUSED)
def test_refused_break_ends_with_an_explicit_error(path, payload, why):
    ctype, chunks = first_chunks(path)
    relay = StreamRelay(path, payload)
    relay.commit("peer-a", ctype)
    sent = relay.feed(chunks + chunks[:9])
    verdict = relay.broke("connection reset")
    assert isinstance(verdict, GiveUp) and relay.state == "failed"
    message = assert_error_tail(verdict.tail, ctype)
    assert message == verdict.message and "peer-a" in message and "connection reset" in message and why in message
    # What the client got parses as a stream that ends in an error.
    (native_objects if ctype == NDJSON else sse_events)(sent + verdict.tail)


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_resume_disabled_never_continues(path):
    ctype, chunks = first_chunks(path)
    relay = StreamRelay(path, V1 if path.startswith("/v1") else CHAT, resume=False)
    relay.commit("peer-a", ctype)
    relay.feed(chunks[:5])  # not even a retry before any text
    verdict = relay.broke("reset")
    assert isinstance(verdict, GiveUp) and "disabled" in assert_error_tail(verdict.tail, ctype)


@pytest.mark.parametrize(("path", "chunk"), [
    ("/api/chat", chat_chunk("", tool_calls=[{"function": {"name": "f", "arguments": {}}}])),
    ("/v1/chat/completions", v1_chunk(v1_head(), {"role": "assistant", "tool_calls": [{"id": "call_1"}]})),
])
def test_streamed_tool_calls_are_not_resumed(path, chunk):
    ctype = SSE if path.startswith("/v1") else NDJSON
    relay = StreamRelay(path, {**(V1 if ctype == SSE else CHAT), "tools": []})
    relay.commit("peer-a", ctype)
    relay.feed(chunk)
    assert relay.tool_calls and relay.text == ""
    verdict = relay.broke("reset")
    assert isinstance(verdict, GiveUp) and "tool calls" in assert_error_tail(verdict.tail, ctype)


@pytest.mark.parametrize(("path", "ctype"), [("/api/chat", NDJSON), ("/v1/completions", SSE)])
def test_give_up_ends_the_stream_in_its_envelope(path, ctype):
    relay = StreamRelay(path, CHAT if ctype == NDJSON else CMPL)
    relay.commit("peer-a", ctype)
    relay.feed(first_chunks(path)[1])
    assert isinstance(relay.broke("reset"), Continuation)
    tail = relay.give_up("no peer serves llama3.2")
    assert "no peer serves llama3.2" in assert_error_tail(tail, ctype)
    assert relay.state == "failed"
    assert relay.give_up("again") == b""


# --- the upstream's own errors, truncation, limits -------------------------------------------


def test_upstream_error_line_passes_through_and_is_final():
    stream = chat_chunk("a") + chat_chunk("b") + line({"error": "boom"})
    relay = StreamRelay("/api/chat", CHAT)
    relay.commit("peer-a", NDJSON)
    assert play(relay, [stream]) == (stream, True)
    assert relay.state == "failed"
    assert relay.broke("closed") == GiveUp("upstream peer-a failed mid-stream: closed", b"")


def test_upstream_sse_error_event_passes_through_and_is_final():
    error = sse({"error": {"message": "boom", "type": "api_error", "param": None, "code": None}})
    stream = v1_chunk(v1_head(), {"role": "assistant", "content": "a"}) + error
    relay = StreamRelay("/v1/chat/completions", V1)
    relay.commit("peer-a", SSE)
    assert play(relay, [stream[:-1]]) == (stream[:-1], True)  # even unterminated
    assert relay.state == "failed"


def test_continuation_error_line_reaches_an_openai_client_as_an_error_event():
    relay = StreamRelay("/v1/completions", CMPL)
    relay.commit("peer-a", SSE)
    relay.feed(first_chunks("/v1/completions")[1])
    relay.broke("reset")
    relay.resumed("peer-b", NDJSON)
    out, complete = play(relay, [chat_chunk(" more") + line({"error": "out of memory"})])
    assert complete and relay.state == "failed"
    events = sse_events(out)
    assert events[0]["choices"][0]["text"] == " more"
    assert events[1]["error"]["message"] == "out of memory"


@pytest.mark.parametrize(("path", "payload", "ctype", "stream", "text"), STREAMS, ids=IDS)
def test_truncated_stream_is_incomplete_and_its_partial_line_unsent(path, payload, ctype, stream, text):
    sep = b"\n\n" if ctype == SSE else b"\n"
    units = stream.split(sep)[:-1]
    cut = sep.join(units[:3]) + sep + units[3][:11]
    relay = StreamRelay(path, payload)
    relay.commit("peer-a", ctype)
    out, complete = play(relay, [cut])
    assert not complete and out == sep.join(units[:3]) + sep
    assert relay.state == "committed"
    assert isinstance(relay.broke("truncated"), Continuation)


def test_length_limit_already_reached_finishes_the_stream_here():
    relay = StreamRelay("/api/chat", {**CHAT, "options": {"num_predict": 3}})
    relay.commit("peer-a", NDJSON)
    sent = relay.feed(b"".join(chat_chunk(w) for w in WORDS[:3]))
    verdict = relay.broke("reset", spent=0.5)
    assert isinstance(verdict, Finished) and relay.state == "done"
    objs = native_objects(sent + verdict.tail)
    assert native_text(objs) == "The sky is"
    assert objs[-1] == {"model": MODEL, "created_at": TS, "message": {"role": "assistant", "content": ""},
                        "done": True, "done_reason": "length", "total_duration": SECOND // 2, "eval_count": 3}


@pytest.mark.parametrize("usage", [True, False])
def test_length_limit_reached_after_a_resume_on_v1(usage):
    payload = {**V1, "max_tokens": 4, **({"stream_options": {"include_usage": True}} if usage else {})}
    relay = StreamRelay("/v1/chat/completions", payload)
    relay.commit("peer-a", SSE)
    sent = [relay.feed(b"".join(v1_chunk(v1_head(), {"content": w}) for w in WORDS[:2]))]
    assert json.loads(relay.broke("reset").body)["max_tokens"] == 2
    relay.resumed("peer-b", SSE)
    sent.append(relay.feed(b"".join(v1_chunk(v1_head("chatcmpl-9"), {"content": w}) for w in WORDS[2:4])))
    verdict = relay.broke("reset")
    assert isinstance(verdict, Finished)
    got = sse_events(b"".join(sent) + verdict.tail)
    assert got[-1] == "[DONE]" and v1_text(got) == "The sky is blue"
    chunks = got[:-1]
    assert {c["id"] for c in chunks} == {"chatcmpl-123"}
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "length"
    mesh = {"peers": ["peer-a", "peer-b"], "resumed": 1}
    assert chunks[-1]["meshollama"] == mesh
    if usage:
        assert chunks[-1]["usage"] == {"prompt_tokens": 0, "completion_tokens": 4, "total_tokens": 4}


def test_break_after_the_finish_chunk_only_adds_what_is_missing():
    payload = {**V1, "stream_options": {"include_usage": True}}
    relay = StreamRelay("/v1/chat/completions", payload)
    relay.commit("peer-a", SSE)
    stream = v1_stream(WORDS[:3], v1_head(), usage=True)
    before_usage = stream[:stream.index(b'data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":'
                                        b'1700000000,"model":"llama3.2","system_fingerprint":"fp_ollama","choices":[]')]
    sent = relay.feed(before_usage)
    verdict = relay.broke("reset")
    assert isinstance(verdict, Finished)
    got = sse_events(sent + verdict.tail)
    assert got[-1] == "[DONE]" and got[-2]["usage"]["completion_tokens"] == 3
    assert "meshollama" not in got[-2]  # never resumed


def test_break_after_the_final_object_is_nothing_to_do():
    relay = StreamRelay("/api/chat", CHAT)
    relay.commit("peer-a", NDJSON)
    relay.feed(chat_stream(WORDS[:2]))
    assert relay.broke("reset on close") == Finished(b"", "the answer was already complete")


def test_misuse_is_loud():
    relay = StreamRelay("/api/chat", CHAT)
    with pytest.raises(RuntimeError):
        relay.feed(b"x")
    with pytest.raises(RuntimeError):
        relay.broke("reset")
    relay.commit("peer-a", NDJSON)
    with pytest.raises(RuntimeError):
        relay.resumed("peer-b", NDJSON)


# --- framing ---------------------------------------------------------------------------


def test_cutter_holds_back_partial_lines_and_events():
    cut = Cutter(sse=False)
    assert cut.push(b'{"a":1}\n{"b"') == b'{"a":1}\n'
    assert cut.push(b":2}") == b""
    assert cut.push(b"\n") == b'{"b":2}\n'
    cut = Cutter(sse=True)
    assert cut.push(b"data: 1\n") == b""
    assert cut.push(b"\ndata: 2\r\n") == b"data: 1\n\n"
    assert cut.push(b"\r\n") == b"data: 2\r\n\r\n"
    assert cut.units(b"data: 1\n\ndata: 2\r\n\r\n") == [b"data: 1", b"data: 2\r"]


def test_parse_reads_every_format():
    assert parse(b'data: [DONE]', True, "/v1/completions")[0].final
    piece, _ = parse(b'data: {"choices":[{"delta":{"content":"x","reasoning":"r"},"finish_reason":null}]}',
                     True, "/v1/chat/completions")
    assert (piece.text, piece.thinking, piece.finish) == ("x", "r", None)
    assert parse(b'{"error":"boom"}', False, "/api/chat")[0].error == "boom"
    assert parse(b"not json", False, "/api/chat")[1] is None

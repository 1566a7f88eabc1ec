#!/usr/bin/env python3
"""What the resume relay costs per streamed line, against passing the bytes on.

Every committed streamed answer on the four generation endpoints now passes
through ``gateway.resume.StreamRelay`` (whole lines only, answer text kept,
truncation noticed). This measures, in one process and without a network,
the CPU time per line of:

  raw        the bytes handed on unchanged (what the gateway did before)
  relay      ``StreamRelay.feed`` on the first peer's stream (parse and track)
  continued  ``feed`` on a continuation, where every line is rewritten

for an Ollama chat line (NDJSON) and an OpenAI chat chunk (SSE), one line
per chunk as Ollama writes them, and the same lines split into 7-byte pieces
(the worst case: most pieces end mid-line).

    .venv/bin/python benchmarks/bench_relay.py [--lines 20000] [--out results/relay.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from meshollama.gateway.resume import Continuation, StreamRelay

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}


def ndjson_line(i: int) -> bytes:
    return json.dumps({"model": "llama3", "created_at": "2024-05-01T10:00:00.123Z",
                       "message": {"role": "assistant", "content": f" word{i}"}, "done": False}).encode() + b"\n"


def sse_event(i: int) -> bytes:
    obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "llama3",
           "system_fingerprint": "fp_ollama",
           "choices": [{"index": 0, "delta": {"content": f" word{i}"}, "finish_reason": None}]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def per_line_us(pieces: list[bytes], lines: int, feed) -> float:
    t0 = time.perf_counter_ns()
    for p in pieces:
        feed(p)
    return (time.perf_counter_ns() - t0) / lines / 1000


def measure(path: str, make, lines: int, split: int | None) -> dict[str, float]:
    data = [make(i) for i in range(lines)]
    if split:
        joined = b"".join(data)
        pieces = [joined[i:i + split] for i in range(0, len(joined), split)]
    else:
        pieces = data
    out: dict[str, float] = {"raw": per_line_us(pieces, lines, lambda p: p)}
    relay = StreamRelay(path, CHAT)
    relay.commit("peer-a", "text/event-stream" if path.startswith("/v1/") else "application/x-ndjson")
    out["relay"] = per_line_us(pieces, lines, relay.feed)
    relay = StreamRelay(path, CHAT)
    relay.commit("peer-a", "text/event-stream" if path.startswith("/v1/") else "application/x-ndjson")
    relay.feed(data[0])
    verdict = relay.broke("benchmark")
    assert isinstance(verdict, Continuation)
    relay.resumed("peer-b", "text/event-stream" if path.startswith("/v1/") else "application/x-ndjson")
    out["continued"] = per_line_us(pieces, lines, relay.feed)
    return {k: round(v, 2) for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=20000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results = {}
    for name, path, make in (("ollama_chat_ndjson", "/api/chat", ndjson_line),
                             ("openai_chat_sse", "/v1/chat/completions", sse_event)):
        results[name] = measure(path, make, args.lines, None)
        results[name + "_7_byte_pieces"] = measure(path, make, args.lines, 7)
    print(f"{'stream':34} {'raw':>8} {'relay':>8} {'continued':>10}   (microseconds of CPU per line)")
    for name, r in results.items():
        print(f"{name:34} {r['raw']:8.2f} {r['relay']:8.2f} {r['continued']:10.2f}")
    if args.out:
        args.out.write_text(json.dumps({"lines": args.lines, "us_per_line": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

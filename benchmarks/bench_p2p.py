#!/usr/bin/env python3
"""The libp2p leg alone: two real hosts in one process, HTTP-over-stream client and server.

No HTTP server, no backend process: a scripted backend answers in memory, so
the figures are what ``p2p/httpstream.py`` plus py-libp2p (Noise, Yamux)
cost per request. Both hosts share one process and one CPU, so "CPU per
request" is the sum of the two sides.

  request   N sequential small requests (one-chunk answer): latency p50/p99,
            CPU per request, Yamux frames written per request by type
  stream    M sequential answers of 200 NDJSON lines each: lines per second
            and CPU per line, and how many pieces the caller saw (the
            server joins lines that pile up while it writes)

Variants: ``keepalive`` (the default, pooled streams) and ``fresh`` (a new
stream per request, as before keep-alive; a pool that never keeps anything).

    .venv/bin/python benchmarks/bench_p2p.py --out bench_p2p.json
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from libp2p.stream_muxer.yamux import yamux  # noqa: E402

from meshollama.httpmsg import ProxyRequest, ProxyResponse  # noqa: E402
from meshollama.limits import InboundLimiter  # noqa: E402
from meshollama.p2p.httpstream import PROTOCOL, HttpStreamServer, PeerScopes, PeerUpstream, StreamPool  # noqa: E402
from tests.p2p.helpers import running_hosts, settings  # noqa: E402

from common import report  # noqa: E402

ANSWER = b'{"model":"m","created_at":"2026-11-22T12:00:00Z","response":"hello","done":true}\n'
LINE = b'{"model":"m","created_at":"2026-11-22T12:00:00Z","response":"tok","done":false}\n'
FRAME_NAMES = {(0, 0): "data", (1, 0): "window_update", (1, 1): "syn", (1, 2): "ack", (1, 4): "fin",
               (1, 8): "rst", (2, 0): "ping", (2, 2): "ping_ack", (3, 0): "go_away"}


class Backend:
    """Answers ``/one`` with one chunk and ``/stream`` with 200 lines."""

    @asynccontextmanager
    async def open(self, request: ProxyRequest):
        async def one():
            yield ANSWER

        async def lines():
            for _ in range(200):
                yield LINE
                await trio.sleep(0)

        body = lines() if request.path == "/stream" else one()
        yield ProxyResponse(200, (("content-type", "application/x-ndjson"),), body)


class Frames:
    """Counts Yamux frames written, by type and flags."""

    def __init__(self) -> None:
        self.seen: Counter = Counter()
        self._original = yamux.Yamux._write_frame

    def __enter__(self) -> Frames:
        original, seen = self._original, self.seen

        async def counting(conn, data: bytes) -> None:
            _v, typ, flags, _sid, _n = struct.unpack(yamux.YAMUX_HEADER_FORMAT, data[: yamux.HEADER_SIZE])
            seen[FRAME_NAMES.get((typ, flags), f"{typ}/{flags}")] += 1
            await original(conn, data)

        yamux.Yamux._write_frame = counting
        return self

    def __exit__(self, *exc) -> None:
        yamux.Yamux._write_frame = self._original


async def run_variant(variant: str, n: int, m: int) -> dict:
    server = HttpStreamServer(Backend(), InboundLimiter(256, 64), max_body_bytes=1 << 20)
    async with running_hosts(settings(), settings(), handlers={PROTOCOL: server.handle}) as (a, b):
        await a.connect(b.addrs())
        pool = StreamPool(a.open_stream, max_idle_per_peer=0 if variant == "fresh" else 16)
        up = PeerUpstream(pool, b.peer_id, PeerScopes())
        small = ProxyRequest("POST", "/one", (("content-type", "application/json"),), b'{"model":"m","prompt":"hi"}')

        async def one(req: ProxyRequest) -> int:
            pieces = 0
            async with up.open(req) as resp:
                async for _ in resp.body:
                    pieces += 1
            return pieces

        for _ in range(20):
            await one(small)
        lat = []
        with Frames() as frames:
            c0 = time.process_time()
            for _ in range(n):
                t = time.perf_counter()
                await one(small)
                lat.append((time.perf_counter() - t) * 1000)
            cpu = time.process_time() - c0
        lat.sort()
        streamed = ProxyRequest("POST", "/stream", (), b"{}")
        await one(streamed)
        pieces = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(m):
            pieces += await one(streamed)
        wall, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        return {
            "request": {
                "n": n,
                "p50_ms": round(statistics.median(lat), 3),
                "p99_ms": round(lat[int(0.99 * (n - 1))], 3),
                "cpu_ms_per_request": round(cpu / n * 1000, 3),
                "frames_per_request": {k: round(v / n, 2) for k, v in sorted(frames.seen.items())},
            },
            "stream": {
                "answers": m,
                "lines_per_s": round(200 * m / wall),
                "cpu_us_per_line": round(cpu_s / (200 * m) * 1e6, 1),
                "pieces_seen_per_answer": round(pieces / m, 1),
            },
            "streams_opened": pool.opened,
            "streams_reused": pool.reused,
        }


async def main_async(args: argparse.Namespace) -> dict:
    results = {v: await run_variant(v, args.n, args.m) for v in args.variants.split(",")}
    return {"benchmark": "p2p", "params": {"n": args.n, "m": args.m}, "results": results}


def print_table(result: dict) -> None:
    for variant, r in result["results"].items():
        q, s = r["request"], r["stream"]
        print(f"{variant:<10} p50 {q['p50_ms']:.2f} ms  p99 {q['p99_ms']:.2f} ms  "
              f"cpu {q['cpu_ms_per_request']:.2f} ms/request  frames/request {q['frames_per_request']}")
        print(f"{'':<10} streaming {s['lines_per_s']} lines/s  {s['cpu_us_per_line']} us CPU/line  "
              f"{s['pieces_seen_per_answer']} pieces per 200-line answer")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="small requests per variant")
    parser.add_argument("--m", type=int, default=20, help="streamed answers per variant")
    parser.add_argument("--variants", default="fresh,keepalive")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report(trio.run(main_async, args), args.out, print_table)

if __name__ == "__main__":
    main()

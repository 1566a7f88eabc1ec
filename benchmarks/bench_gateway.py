#!/usr/bin/env python3
"""What a meshollama hop costs, measured side by side against one stand-in Ollama.

One run, one backend: a stand-in Ollama (``tests/fakes/fake_ollama.py``) in its
own process, and two real ``python -m meshollama start`` processes on loopback:

  direct  the client talks to the stand-in itself
  local   through node L's gateway; L's own backend (``--backend ollama``) is the
          stand-in (HTTP -> HTTP)
  remote  through node G's gateway; G has ``--backend none`` and bootstraps to L,
          so every request crosses the libp2p stream G -> L and L's backend
          (HTTP -> libp2p/Noise/Yamux -> HTTP)

The three variants are interleaved request by request (or run back to back, for
the timed throughput phases) so that drift in machine load hits them alike.

Phases (all with httpx, keep-alive connections, everything on 127.0.0.1):

  latency   N sequential ``/api/generate`` ``stream:false``, token_delay 0:
            p50/p90/p99 and the p50 added over direct
  cpu       K sequential stream:false per variant, run alone: CPU ms per request
            of each process (stand-in, L, G) from /proc/<pid>/stat, which is
            far less sensitive to other load on the machine than wall time
  ttfb      M sequential ``stream:true`` requests with token_delay 0.02: time to
            the first body byte, p50 added over direct
  rps       C concurrent clients for S seconds, ``stream:false``, token_delay 0
  tokens    ``stream:true`` with 200 tokens and token_delay 0: streamed NDJSON
            lines per second

    .venv/bin/python benchmarks/bench_gateway.py --out bench_gateway.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration.cluster import Cluster  # noqa: E402

from common import report, start_child  # noqa: E402

MODEL = "m:latest"
VARIANTS = ("direct", "local", "remote")
TARGET_REMOTE_P50_OVERHEAD_MS = 5.0
TARGET_TTFB_ADDED_MS = 10.0


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def summary_ms(values_s: list[float]) -> dict:
    ms = [v * 1000.0 for v in values_s]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 3),
        "p90_ms": round(pct(ms, 90), 3),
        "p99_ms": round(pct(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3) if ms else None,
        "min_ms": round(min(ms), 3) if ms else None,
    }


# --------------------------------------------------------------------------- processes

class FakeProc:
    """``python -m tests.fakes.fake_ollama`` as a child process."""

    def __init__(self, tmp: Path) -> None:
        self.port_file = tmp / "fake.port"
        self.log_path = tmp / "fake.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""

    async def start(self, token_delay: float = 0.0, tokens: int = 8) -> None:
        args = [sys.executable, "-m", "tests.fakes.fake_ollama", "--port", "0", "--models", MODEL,
                "--port-file", str(self.port_file), "--token-delay", str(token_delay),
                "--tokens", str(tokens), "--no-host-check", "--name", "bench"]
        self.proc, self.url = await start_child(args, self.port_file, self.log_path, "fake_ollama")

    async def control(self, client: httpx.AsyncClient, **knobs) -> None:
        r = await client.post(self.url + "/_fake/control", json=knobs)
        r.raise_for_status()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


# --------------------------------------------------------------------------- phases

def gen_body(stream: bool) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "hi", "stream": stream}).encode()


async def one_nonstream(client: httpx.AsyncClient, url: str) -> float:
    t0 = time.perf_counter()
    r = await client.post(url + "/api/generate", content=gen_body(False))
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"{url}: {r.status_code} {r.text[:200]}")
    return dt


async def phase_latency(clients: dict, urls: dict, n: int, warmup: int) -> dict:
    lat: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(warmup + n):
        for v in VARIANTS:
            dt = await one_nonstream(clients[v], urls[v])
            if i >= warmup:
                lat[v].append(dt)
    out = {v: summary_ms(lat[v]) for v in VARIANTS}
    for v in ("local", "remote"):
        out[v]["p50_added_ms"] = round(out[v]["p50_ms"] - out["direct"]["p50_ms"], 3)
        out[v]["p99_added_ms"] = round(out[v]["p99_ms"] - out["direct"]["p99_ms"], 3)
        out[v]["p50_ratio"] = round(out[v]["p50_ms"] / out["direct"]["p50_ms"], 2)
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def phase_cpu(clients: dict, urls: dict, procs: dict[str, int], n: int) -> dict:
    """CPU milliseconds per stream:false request, per process, each variant run alone.

    Less sensitive to other load on the machine than wall-clock latency: it is
    the work each process does, not how long it waited for a core.
    """
    out = {}
    for v in VARIANTS:
        for _ in range(10):
            await one_nonstream(clients[v], urls[v])
        before = {k: cpu_seconds(pid) for k, pid in procs.items()}
        t0 = time.perf_counter()
        for _ in range(n):
            await one_nonstream(clients[v], urls[v])
        wall = time.perf_counter() - t0
        after = {k: cpu_seconds(pid) for k, pid in procs.items()}
        per = {k: round((after[k] - before[k]) * 1000.0 / n, 3) for k in procs}
        per["nodes_total"] = round(per["L"] + per["G"], 3)
        out[v] = {"cpu_ms_per_request": per, "wall_ms_per_request": round(wall * 1000.0 / n, 3), "n": n}
    return out


async def one_stream(client: httpx.AsyncClient, url: str) -> tuple[float, float, float, int]:
    """(headers_s, first_body_byte_s, total_s, ndjson_lines)."""
    t0 = time.perf_counter()
    first = None
    buf = b""
    async with client.stream("POST", url + "/api/generate", content=gen_body(True)) as r:
        th = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code}")
        async for chunk in r.aiter_raw():
            if chunk and first is None:
                first = time.perf_counter() - t0
            buf += chunk
    total = time.perf_counter() - t0
    lines = [ln for ln in buf.split(b"\n") if ln.strip()]
    if not lines or not json.loads(lines[-1]).get("done"):
        raise RuntimeError(f"{url}: stream did not end with done")
    return th, first if first is not None else total, total, len(lines)


async def phase_ttfb(clients: dict, urls: dict, n: int, warmup: int) -> dict:
    hdr: dict[str, list[float]] = {v: [] for v in VARIANTS}
    fb: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(warmup + n):
        for v in VARIANTS:
            th, tf, _, _ = await one_stream(clients[v], urls[v])
            if i >= warmup:
                hdr[v].append(th)
                fb[v].append(tf)
    out = {}
    for v in VARIANTS:
        out[v] = {"ttfb": summary_ms(fb[v]), "headers": summary_ms(hdr[v])}
    for v in ("local", "remote"):
        out[v]["ttfb_p50_added_ms"] = round(out[v]["ttfb"]["p50_ms"] - out["direct"]["ttfb"]["p50_ms"], 3)
    return out


async def phase_rps(urls: dict, concurrency: int, seconds: float) -> dict:
    out = {}
    for v in VARIANTS:
        done = 0
        errors = 0
        lat: list[float] = []
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
            # warm the connection pool
            async with trio.open_nursery() as n:
                for _ in range(concurrency):
                    n.start_soon(one_nonstream, client, urls[v])
            deadline = time.perf_counter() + seconds

            async def worker():
                nonlocal done, errors
                while time.perf_counter() < deadline:
                    try:
                        lat.append(await one_nonstream(client, urls[v]))
                        done += 1
                    except Exception:  # noqa: BLE001 - counted, not fatal
                        errors += 1

            t0 = time.perf_counter()
            async with trio.open_nursery() as n:
                for _ in range(concurrency):
                    n.start_soon(worker)
            wall = time.perf_counter() - t0
        out[v] = {"requests": done, "errors": errors, "wall_s": round(wall, 3), "rps": round(done / wall, 1),
                  "latency": summary_ms(lat)}
    for v in ("local", "remote"):
        out[v]["ratio_vs_direct"] = round(out[v]["rps"] / out["direct"]["rps"], 3)
    return out


async def phase_tokens(clients: dict, urls: dict, runs: int) -> dict:
    res: dict[str, list[float]] = {v: [] for v in VARIANTS}
    lines_seen: dict[str, int] = {}
    for i in range(runs + 1):
        for v in VARIANTS:
            _, tf, total, lines = await one_stream(clients[v], urls[v])
            lines_seen[v] = lines
            if i >= 1:  # first round is warm-up
                res[v].append(lines / total)
    out = {v: {"tokens_per_s_median": round(statistics.median(res[v]), 1),
               "tokens_per_s_max": round(max(res[v]), 1),
               "lines_per_stream": lines_seen[v], "runs": runs} for v in VARIANTS}
    for v in ("local", "remote"):
        out[v]["ratio_vs_direct"] = round(out[v]["tokens_per_s_median"] / out["direct"]["tokens_per_s_median"], 3)
    return out


# --------------------------------------------------------------------------- main

async def _close_mesh(tmp: Path) -> tuple[str, ...]:
    """A closed mesh (docs/security.md): L holds the authority and admits G; G's flags."""
    async def cli(*a: str) -> str:
        r = await trio.run_process([sys.executable, "-m", "meshollama", *a], capture_stdout=True)
        return r.stdout.decode()

    out = await cli("mesh", "init", "--data-dir", str(tmp / "L"))
    authority = out.split("mesh authority: ")[1].split()[0]
    g = json.loads(await cli("id", "--json", "--data-dir", str(tmp / "G")))["peer_id"]
    await cli("admit", g, "--data-dir", str(tmp / "L"), "--api", "http://127.0.0.1:9")
    return ("--authority", authority)


async def main_async(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench_gateway_"))
    fake = FakeProc(tmp)
    result: dict = {
        "benchmark": "gateway",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()},
        "params": vars(args).copy(),
    }
    result["params"]["out"] = str(args.out) if args.out else None
    try:
        async with trio.open_nursery() as nursery:
            c = Cluster(tmp, nursery)
            try:
                await fake.start(token_delay=0.0, tokens=8)
                closed = await _close_mesh(tmp) if args.closed else ()
                local = await c.start("L", "--backend", "ollama", "--ollama-url", fake.url,
                                      heartbeat=args.heartbeat)
                gw = await c.start("G", "--backend", "none", *closed, bootstrap=local, heartbeat=args.heartbeat)

                async def remote_ready():
                    r = await c.client.get(gw.api + "/api/tags")
                    return r.status_code == 200 and any(m["name"] == MODEL for m in r.json()["models"])

                with trio.fail_after(60):
                    await c.wait_until(remote_ready)
                urls = {"direct": fake.url, "local": local.api, "remote": gw.api}
                result["setup_s"] = round(time.perf_counter() - t_start, 2)

                clients = {v: httpx.AsyncClient(timeout=30.0) for v in VARIANTS}
                ctl = httpx.AsyncClient(timeout=10.0)
                try:
                    # sanity: the routed answers come from the intended peer. The first
                    # answer after /api/tags lists the model is recorded (not asserted): an
                    # early run once saw it come back without X-Meshollama-Peer.
                    first = []
                    for v, url in (("remote", gw.api), ("local", local.api)):
                        for attempt in range(5):
                            r = await clients[v].post(url + "/api/generate", content=gen_body(False))
                            ok = r.status_code == 200 and r.headers.get("x-meshollama-peer") == local.peer_id
                            if not ok:
                                first.append({"variant": v, "attempt": attempt, "status": r.status_code,
                                              "headers": dict(r.headers), "body": r.text[:300]})
                                print(f"[gateway] WARNING unexpected answer on {v}: {first[-1]}", file=sys.stderr)
                                await trio.sleep(0.5)
                                continue
                            break
                        else:
                            raise RuntimeError(f"{v} path never answered from {local.peer_id}: {first}")
                    result["setup_anomalies"] = first

                    print(f"[gateway] latency: {args.n} x 3 sequential stream:false ...", file=sys.stderr)
                    await fake.control(ctl, token_delay=0.0, tokens=8)
                    result["latency"] = await phase_latency(clients, urls, args.n, warmup=20)

                    print("[gateway] cpu cost per request ...", file=sys.stderr)
                    procs = {"fake": fake.proc.pid, "L": local.proc.pid, "G": gw.proc.pid}
                    result["cpu_per_request"] = await phase_cpu(clients, urls, procs, args.cpu_n)

                    print(f"[gateway] ttfb: {args.ttfb_n} x 3 stream:true, token_delay "
                          f"{args.ttfb_delay} ...", file=sys.stderr)
                    await fake.control(ctl, token_delay=args.ttfb_delay, tokens=8)
                    result["ttfb"] = await phase_ttfb(clients, urls, args.ttfb_n, warmup=5)
                    result["ttfb"]["token_delay_s"] = args.ttfb_delay

                    print(f"[gateway] rps: {args.concurrency} clients x {args.seconds}s x 3 ...", file=sys.stderr)
                    await fake.control(ctl, token_delay=0.0, tokens=8)
                    result["rps"] = await phase_rps(urls, args.concurrency, args.seconds)
                    result["rps"]["concurrency"] = args.concurrency

                    print(f"[gateway] tokens: {args.stream_tokens} tokens x {args.token_runs} x 3 ...",
                          file=sys.stderr)
                    await fake.control(ctl, token_delay=0.0, tokens=args.stream_tokens)
                    result["tokens"] = await phase_tokens(clients, urls, args.token_runs)
                    result["tokens"]["tokens"] = args.stream_tokens
                finally:
                    for cl in clients.values():
                        await cl.aclose()
                    await ctl.aclose()
            finally:
                await c.close()
                nursery.cancel_scope.cancel()
    finally:
        fake.stop()
    result["machine"]["loadavg_after"] = os.getloadavg()
    result["total_s"] = round(time.perf_counter() - t_start, 2)
    lat, tt = result["latency"], result["ttfb"]
    result["targets"] = {
        "remote_p50_overhead_ms": {"target": TARGET_REMOTE_P50_OVERHEAD_MS, "measured": lat["remote"]["p50_added_ms"],
                                   "met": lat["remote"]["p50_added_ms"] < TARGET_REMOTE_P50_OVERHEAD_MS},
        "remote_ttfb_added_ms": {"target": TARGET_TTFB_ADDED_MS, "measured": tt["remote"]["ttfb_p50_added_ms"],
                                 "met": tt["remote"]["ttfb_p50_added_ms"] < TARGET_TTFB_ADDED_MS},
        "local_ttfb_added_ms": {"target": TARGET_TTFB_ADDED_MS, "measured": tt["local"]["ttfb_p50_added_ms"],
                                "met": tt["local"]["ttfb_p50_added_ms"] < TARGET_TTFB_ADDED_MS},
    }
    return result


def print_table(r: dict) -> None:
    lat, tt, rps, tok = r["latency"], r["ttfb"], r["rps"], r["tokens"]

    def added(d: dict, key: str) -> str:
        return f"{d[key]:+.2f}" if key in d else "-"

    print(f"\nmeshollama gateway benchmark ({r['machine']['cpus']} CPUs, "
          f"loadavg {r['machine']['loadavg_before'][0]:.2f}; total {r['total_s']} s)")
    print(f"{'metric':<38}{'direct':>12}{'local':>12}{'remote':>12}")
    print("-" * 74)
    for key, label in (("p50_ms", "latency p50 ms (stream:false)"), ("p90_ms", "latency p90 ms"),
                       ("p99_ms", "latency p99 ms")):
        print(f"{label:<38}" + "".join(f"{lat[v][key]:>12.2f}" for v in VARIANTS))
    print(f"{'  p50 added vs direct ms':<38}{'':>12}" + "".join(f"{added(lat[v], 'p50_added_ms'):>12}"
                                                              for v in ("local", "remote")))
    print(f"{'TTFB p50 ms (token_delay %.0f ms)' % (tt['token_delay_s'] * 1000):<38}"
          + "".join(f"{tt[v]['ttfb']['p50_ms']:>12.2f}" for v in VARIANTS))
    print(f"{'  TTFB added vs direct ms':<38}{'':>12}" + "".join(f"{added(tt[v], 'ttfb_p50_added_ms'):>12}"
                                                               for v in ("local", "remote")))
    print(f"{'req/s, %d concurrent' % rps['concurrency']:<38}" + "".join(f"{rps[v]['rps']:>12.1f}" for v in VARIANTS))
    print(f"{'  ratio vs direct':<38}{'':>12}" + "".join(f"{rps[v]['ratio_vs_direct']:>12.2f}"
                                                         for v in ("local", "remote")))
    print(f"{'streamed tokens/s (%d tokens)' % tok['tokens']:<38}"
          + "".join(f"{tok[v]['tokens_per_s_median']:>12.0f}" for v in VARIANTS))
    print(f"{'  ratio vs direct':<38}{'':>12}" + "".join(f"{tok[v]['ratio_vs_direct']:>12.2f}"
                                                         for v in ("local", "remote")))
    cpu = r["cpu_per_request"]
    print(f"{'CPU ms/request: stand-in':<38}" + "".join(f"{cpu[v]['cpu_ms_per_request']['fake']:>12.2f}" for v in VARIANTS))
    print(f"{'CPU ms/request: node L':<38}" + "".join(f"{cpu[v]['cpu_ms_per_request']['L']:>12.2f}" for v in VARIANTS))
    print(f"{'CPU ms/request: node G':<38}" + "".join(f"{cpu[v]['cpu_ms_per_request']['G']:>12.2f}" for v in VARIANTS))
    print()
    for name, t in r["targets"].items():
        print(f"target {name}: {t['measured']:.2f} ms vs < {t['target']} ms -> {'MET' if t['met'] else 'NOT MET'}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--n", type=int, default=200, help="sequential stream:false requests per variant")
    p.add_argument("--cpu-n", type=int, default=200, help="requests per variant in the CPU-cost phase")
    p.add_argument("--ttfb-n", type=int, default=60, help="sequential streaming requests per variant")
    p.add_argument("--ttfb-delay", type=float, default=0.02, help="stand-in token_delay for the TTFB phase")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--closed", action="store_true", help="a closed mesh: L admits G (docs/security.md)")
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput run")
    p.add_argument("--stream-tokens", type=int, default=200)
    p.add_argument("--token-runs", type=int, default=5)
    p.add_argument("--heartbeat", type=float, default=2.0, help="nodes' --heartbeat-interval")
    args = p.parse_args(argv)
    result = trio.run(main_async, args)
    report(result, args.out, print_table)
    return result


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What tracing (W3C traceparent, spans, OTLP export) costs per request, side by side.

All variants take the remote path (client -> gateway node G, ``--backend none``
-> libp2p -> node L -> one stand-in Ollama, ``tests/fakes/fake_ollama.py``),
with real ``python -m meshollama start`` processes on loopback. Tracing is a
node setting, so there are two pairs of nodes against the same stand-in:

  off      G1 -> L1, tracing off (the default), no client traceparent
  off+tp   G1 -> L1, tracing off, the client sends a (fresh, valid, sampled)
           traceparent: propagation only, X-Meshollama-Trace-Id comes back
  on       G2 -> L2, ``MESHOLLAMA_TRACING_OTLP_ENDPOINT`` set on both nodes to a
           null OTLP receiver (its own process: answers 200 to POST /v1/traces,
           counts the spans), sample ratio 1: 5 spans per request exported

Phases, repeated for ``--rounds`` rounds:

  latency  ``--n`` sequential ``/api/generate`` stream:false per variant,
           interleaved request by request (the order rotates every request),
           token_delay 0; p50/p99 pooled over all rounds, and each round's p50
           added over ``off`` (median over rounds)
  cpu      ``--cpu-n`` stream:false per variant, each variant alone (the order
           rotates every round), then a
           fixed settle (longer than the exporter's 2 s batch interval, the
           same for every variant) so that the export of the ``on`` spans
           falls inside the window: CPU ms per request of G and L from
           /proc/<pid>/stat; median over rounds

Then a microbenchmark of the per-request tracing hooks alone, in this
process (no I/O): the gateway side (what a routed request does: ``gateway``,
``route`` and ``peer stream`` spans, the context on the request, the trace id
header) and the serving side (``ServedBackend`` around a trivial backend),
off / off with a client traceparent / on with a null exporter; and the OTLP
JSON encoding of one request's 5 spans (done by the exporter's background
task, in batches).

    .venv/bin/python benchmarks/bench_tracing.py        # ~1 to 2 min; writes benchmarks/results/tracing-<UTC>.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench_gateway import MODEL, FakeProc, cpu_seconds, gen_body, pct, summary_ms
from common import report, start_child

from tests.integration.cluster import Cluster

VARIANTS = ("off", "off+tp", "on")
SPANS_PER_REQUEST = 5  # gateway, route, peer stream (G); serve, backend (L)
TRACE_ENV = ("MESHOLLAMA_TRACING_OTLP_ENDPOINT", "MESHOLLAMA_TRACING_SAMPLE_RATIO",
             "MESHOLLAMA_TRACING_SERVICE_NAME", "MESHOLLAMA_TRACING_HEADERS")


# --------------------------------------------------------------------------- null OTLP receiver (child process)

def receiver_main(port_file: str) -> None:
    """A null OTLP/HTTP receiver: 200 to POST /v1/traces, spans counted; GET /count reports them.

    Every document is also checked against OTLP's JSON shape
    (``tests/tracing/otlp_receiver.problems``), so the count is of valid spans.
    """
    from tests.tracing.otlp_receiver import problems

    counts = {"posts": 0, "spans": 0, "bytes": 0, "by_name": {}, "by_instance": {}, "problems": []}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # quiet
            pass

        def _answer(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            if self.path != "/v1/traces":
                self._answer(404, b"{}")
                return
            doc = json.loads(body)
            found = problems(doc)
            counts["posts"] += 1
            counts["bytes"] += len(body)
            counts["problems"].extend(found[:5])
            for rs in doc.get("resourceSpans", []):
                res = {a["key"]: next(iter(a["value"].values())) for a in rs["resource"]["attributes"]}
                inst = res.get("service.instance.id", "?")
                for ss in rs["scopeSpans"]:
                    for span in ss["spans"]:
                        counts["spans"] += 1
                        counts["by_name"][span["name"]] = counts["by_name"].get(span["name"], 0) + 1
                        counts["by_instance"][inst] = counts["by_instance"].get(inst, 0) + 1
            self._answer(200, b"{}")

        def do_GET(self):
            self._answer(200, json.dumps(counts).encode())

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    tmp = port_file + ".tmp"
    Path(tmp).write_text(str(server.server_address[1]))
    os.replace(tmp, port_file)
    server.serve_forever()


class ReceiverProc:
    def __init__(self, tmp: Path) -> None:
        self.port_file = tmp / "otlp.port"
        self.log_path = tmp / "otlp.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""

    async def start(self) -> None:
        self.proc, self.url = await start_child([sys.executable, __file__, "--receiver-child", str(self.port_file)],
                                                self.port_file, self.log_path, "receiver")

    async def counts(self, client: httpx.AsyncClient) -> dict:
        r = await client.get(self.url + "/count")
        r.raise_for_status()
        return r.json()

    async def wait_spans(self, client: httpx.AsyncClient, expected: int, limit: float = 10.0) -> dict:
        """Until the receiver has ``expected`` spans (the exporter POSTs every 2 s or per 512)."""
        with trio.move_on_after(limit):
            while True:
                c = await self.counts(client)
                if c["spans"] >= expected:
                    return c
                await trio.sleep(0.1)
        return await self.counts(client)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


# --------------------------------------------------------------------------- requests

def new_traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


class Paths:
    """One keep-alive client per variant, and how many requests each node pair has answered."""

    def __init__(self, urls: dict[str, str], peers: dict[str, str]) -> None:
        self.urls, self.peers = urls, peers
        self.clients = {v: httpx.AsyncClient(timeout=30.0) for v in VARIANTS}
        self.sent = {v: 0 for v in VARIANTS}
        self.anomalies: list[dict] = []

    async def one(self, v: str) -> float:
        tp = new_traceparent() if v == "off+tp" else None
        headers = {"traceparent": tp} if tp else {}
        t0 = time.perf_counter()
        r = await self.clients[v].post(self.urls[v] + "/api/generate", content=gen_body(False), headers=headers)
        dt = time.perf_counter() - t0
        self.sent[v] += 1
        if r.status_code != 200:
            raise RuntimeError(f"{v}: {r.status_code} {r.text[:200]}")
        tid = r.headers.get("x-meshollama-trace-id")
        want = {"off": tid is None, "off+tp": tp is not None and tid == tp.split("-")[1],
                "on": tid is not None and len(tid) == 32}[v]
        if (not want or r.headers.get("x-meshollama-peer") != self.peers[v]) and len(self.anomalies) < 20:
            self.anomalies.append({"variant": v, "trace_id": tid, "peer": r.headers.get("x-meshollama-peer")})
        return dt

    async def aclose(self) -> None:
        for c in self.clients.values():
            await c.aclose()


async def phase_latency(paths: Paths, n: int, warmup: int) -> dict[str, list[float]]:
    lat: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(warmup + n):
        k = i % len(VARIANTS)
        for v in VARIANTS[k:] + VARIANTS[:k]:  # rotate the order: no variant always goes first
            dt = await paths.one(v)
            if i >= warmup:
                lat[v].append(dt)
    return lat


async def phase_cpu(paths: Paths, procs: dict[str, dict[str, int]], n: int, settle: float,
                    receiver: ReceiverProc, ctl: httpx.AsyncClient, rotate: int = 0) -> dict:
    """CPU ms per request of G and L (and the stand-in), each variant alone.

    The window is n requests plus ``settle`` seconds of quiet, the same for
    every variant; for ``on`` the exporter has sent everything queued before
    the window opens, and everything of the window before it closes. The
    order of the variants rotates with ``rotate`` (one step per round).
    """
    out = {}
    k = rotate % len(VARIANTS)
    for v in VARIANTS[k:] + VARIANTS[:k]:
        for _ in range(5):
            await paths.one(v)
        if v == "on":  # nothing from earlier phases may be exported inside the window
            await receiver.wait_spans(ctl, SPANS_PER_REQUEST * paths.sent["on"])
        pids = procs[v]
        before = {k: cpu_seconds(pid) for k, pid in pids.items()}
        t0 = time.perf_counter()
        for _ in range(n):
            await paths.one(v)
        wall = time.perf_counter() - t0
        await trio.sleep(settle)
        after = {k: cpu_seconds(pid) for k, pid in pids.items()}
        per = {k: round((after[k] - before[k]) * 1000.0 / n, 3) for k in pids}
        per["nodes_total"] = round(per["G"] + per["L"], 3)
        entry = {"cpu_ms_per_request": per, "wall_ms_per_request": round(wall * 1000.0 / n, 3), "n": n}
        if v == "on":
            c = await receiver.counts(ctl)
            entry["spans_received_by_window_end"] = c["spans"]
            entry["spans_expected"] = SPANS_PER_REQUEST * paths.sent["on"]
        out[v] = entry
    return out


async def metrics_spans(client: httpx.AsyncClient, api: str) -> dict[str, float]:
    r = await client.get(api + "/metrics")
    out = {}
    for line in r.text.splitlines():
        if line.startswith("meshollama_tracing_spans_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = float(line.rsplit(" ", 1)[1])
    return out


# --------------------------------------------------------------------------- micro: the hooks alone

def micro(n: int) -> dict:
    """µs per request of the tracing hooks, without any I/O (one process, one core)."""
    from meshollama.gateway.attempt import _end_span
    from meshollama.httpmsg import ProxyRequest, ProxyResponse
    from meshollama.tracing import (
        CLIENT,
        OFF,
        SERVER,
        InMemoryExporter,
        ServedBackend,
        Tracer,
        encode,
        end_request,
        ending,
        from_scope,
        send_trace_id,
        with_context,
    )

    hdrs = [(b"host", b"x:1"), (b"user-agent", b"ollama-python/0.6"), (b"content-type", b"application/json"),
            (b"accept", b"*/*"), (b"content-length", b"40")]
    tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    scopes = {"none": {"headers": hdrs, "method": "POST", "path": "/api/generate"},
              "tp": {"headers": hdrs + [(b"traceparent", tp)], "method": "POST", "path": "/api/generate"}}
    req = ProxyRequest("POST", "/api/generate", tuple((k.decode(), v.decode()) for k, v in hdrs), b"{}")

    async def send(m):
        pass

    def gateway_side(scope, tracer):
        """What the gateway's routed path does per request (gateway/route/peer stream spans)."""
        span = tracer.start("gateway", from_scope(scope), SERVER, {"http.request.method": scope.get("method", ""),
                            "url.path": scope.get("path", ""), "meshollama.endpoint": "/api/generate"})
        send_trace_id(send, span.context)
        route = span.child("route")
        with ending(route):
            route.set("meshollama.model", MODEL)
            if route.recording:
                route.event("order", candidates=1, tries=1)
            a = route.child("peer stream", CLIENT, {"meshollama.peer": "p", "meshollama.local": False})
            with_context(req, a.context)
            a.event("first byte")
            _end_span(a, None, "ok")
        end_request(span, 200, model=MODEL, peer="p", error="")

    class Null:
        def export(self, s):
            pass

    tracers = {"off": OFF, "off+tp": OFF, "on": Tracer(Null())}
    scope_of = {"off": "none", "off+tp": "tp", "on": "none"}
    out: dict = {"n": n, "gateway_us": {}, "serving_us": {}}
    for v in VARIANTS:
        sc, tr = scopes[scope_of[v]], tracers[v]
        best = min(timeit.repeat(lambda sc=sc, tr=tr: gateway_side(sc, tr), number=n, repeat=3))
        out["gateway_us"][v] = round(best / n * 1e6, 2)

    # Serving side: ServedBackend.open around a backend that answers one chunk at once,
    # minus the same loop calling the backend directly.
    class Trivial:
        kind = "ollama"

        def open(self, request):
            from contextlib import asynccontextmanager

            @asynccontextmanager
            async def cm():
                async def body():
                    yield b'{"done":true}'
                yield ProxyResponse(200, (("content-type", "application/json"),), body())
            return cm()

    backend = Trivial()
    peer_tp = (("traceparent", tp.decode()),)
    reqs = {"off": req, "off+tp": ProxyRequest("POST", "/api/generate", req.headers + peer_tp, b"{}"),
            "on": ProxyRequest("POST", "/api/generate", req.headers + peer_tp, b"{}")}
    serving_n = max(1000, n // 4)

    async def loop(upstream, request, count):
        t0 = time.perf_counter()
        for _ in range(count):
            async with upstream.open(request) as resp:
                async for _chunk in resp.body:
                    pass
        return time.perf_counter() - t0

    async def serving():
        base = min([await loop(backend, req, serving_n) for _ in range(3)])
        res = {}
        for v in VARIANTS:
            served = ServedBackend(backend, tracers[v])
            t = min([await loop(served, reqs[v], serving_n) for _ in range(3)])
            res[v] = round((t - base) / serving_n * 1e6, 2)
        return res, round(base / serving_n * 1e6, 2)

    out["serving_us"], out["serving_baseline_loop_us"] = trio.run(serving)
    out["total_us"] = {v: round(out["gateway_us"][v] + out["serving_us"][v], 2) for v in VARIANTS}

    # OTLP JSON encoding of one request's spans (background task, batches of up to 512).
    mem = InMemoryExporter()
    tr = Tracer(mem)
    for _ in range(100):
        gateway_side(scopes["none"], tr)
    served = ServedBackend(backend, tr)

    async def fill():
        for _ in range(100):
            async with served.open(reqs["on"]) as resp:
                async for _chunk in resp.body:
                    pass
    trio.run(fill)
    spans = mem.spans[:500]
    resource = {"service.name": "meshollama", "service.version": "x", "service.instance.id": "12D3KooW" + "x" * 44}
    enc = min(timeit.repeat(lambda: json.dumps(encode(spans, resource), separators=(",", ":")).encode(),
                            number=20, repeat=3)) / 20
    out["otlp_encode_us_per_span"] = round(enc / len(spans) * 1e6, 2)
    out["otlp_encode_us_per_request"] = round(enc / len(spans) * SPANS_PER_REQUEST * 1e6, 2)
    out["otlp_bytes_per_span"] = round(len(json.dumps(encode(spans, resource), separators=(",", ":"))) / len(spans))
    return out


# --------------------------------------------------------------------------- main

async def main_async(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench_tracing_"))
    fake = FakeProc(tmp)
    receiver = ReceiverProc(tmp)
    result: dict = {
        "benchmark": "tracing",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()},
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "receiver_child"},
    }
    for k in TRACE_ENV:  # the "off" nodes must really be off
        os.environ.pop(k, None)
    try:
        async with trio.open_nursery() as nursery:
            c = Cluster(tmp, nursery)
            try:
                await fake.start(token_delay=0.0, tokens=8)
                await receiver.start()
                on_env = {"MESHOLLAMA_TRACING_OTLP_ENDPOINT": receiver.url, "MESHOLLAMA_TRACING_SAMPLE_RATIO": "1"}
                l1 = await c.start("L1", "--backend", "ollama", "--ollama-url", fake.url, heartbeat=args.heartbeat)
                g1 = await c.start("G1", "--backend", "none", bootstrap=l1, heartbeat=args.heartbeat)
                l2 = await c.start("L2", "--backend", "ollama", "--ollama-url", fake.url, heartbeat=args.heartbeat,
                                   env=on_env)
                g2 = await c.start("G2", "--backend", "none", bootstrap=l2, heartbeat=args.heartbeat, env=on_env)

                async def ready(gw):
                    async def check():
                        r = await c.client.get(gw.api + "/api/tags")
                        return r.status_code == 200 and any(m["name"] == MODEL for m in r.json()["models"])
                    return check

                with trio.fail_after(60):
                    await c.wait_until(await ready(g1))
                    await c.wait_until(await ready(g2))
                result["setup_s"] = round(time.perf_counter() - t_start, 2)

                urls = {"off": g1.api, "off+tp": g1.api, "on": g2.api}
                peers = {"off": l1.peer_id, "off+tp": l1.peer_id, "on": l2.peer_id}
                paths = Paths(urls, peers)
                ctl = httpx.AsyncClient(timeout=10.0)
                procs = {"off": {"G": g1.proc.pid, "L": l1.proc.pid, "fake": fake.proc.pid},
                         "on": {"G": g2.proc.pid, "L": l2.proc.pid, "fake": fake.proc.pid}}
                procs["off+tp"] = procs["off"]
                try:
                    # first answers may come before the peer is routable everywhere: a few tries
                    for v in VARIANTS:
                        for _ in range(10):
                            try:
                                await paths.one(v)
                                break
                            except RuntimeError:
                                await trio.sleep(0.5)
                    paths.anomalies.clear()
                    await fake.control(ctl, token_delay=0.0, tokens=8)

                    # idle cost of a node over one settle window (no requests), for scale
                    await receiver.wait_spans(ctl, SPANS_PER_REQUEST * paths.sent["on"])
                    b = {k: cpu_seconds(p) for k, p in {"G1": g1.proc.pid, "L1": l1.proc.pid,
                                                         "G2": g2.proc.pid, "L2": l2.proc.pid}.items()}
                    await trio.sleep(args.settle)
                    result["idle_cpu_ms_per_settle"] = {
                        k: round((cpu_seconds(p) - b[k]) * 1000.0, 1)
                        for k, p in {"G1": g1.proc.pid, "L1": l1.proc.pid, "G2": g2.proc.pid,
                                     "L2": l2.proc.pid}.items()}

                    lat_all: dict[str, list[float]] = {v: [] for v in VARIANTS}
                    rounds = []
                    for rnd in range(args.rounds):
                        print(f"[tracing] round {rnd + 1}/{args.rounds}: latency {args.n} x 3, "
                              f"cpu {args.cpu_n} x 3 ...", file=sys.stderr)
                        lat = await phase_latency(paths, args.n, warmup=10)
                        for v in VARIANTS:
                            lat_all[v] += lat[v]
                        p50 = {v: pct([x * 1000 for x in lat[v]], 50) for v in VARIANTS}
                        cpu = await phase_cpu(paths, procs, args.cpu_n, args.settle, receiver, ctl, rotate=rnd)
                        rounds.append({"p50_ms": {v: round(p50[v], 3) for v in VARIANTS},
                                       "p50_added_ms": {v: round(p50[v] - p50["off"], 3) for v in VARIANTS[1:]},
                                       "cpu": cpu})
                    result["rounds"] = rounds

                    latency = {v: summary_ms(lat_all[v]) for v in VARIANTS}
                    for v in VARIANTS[1:]:
                        latency[v]["p50_added_ms"] = round(latency[v]["p50_ms"] - latency["off"]["p50_ms"], 3)
                        latency[v]["p99_added_ms"] = round(latency[v]["p99_ms"] - latency["off"]["p99_ms"], 3)
                        latency[v]["p50_added_ms_median_of_rounds"] = round(
                            statistics.median(r["p50_added_ms"][v] for r in rounds), 3)
                    result["latency"] = latency
                    result["cpu_per_request_median"] = {
                        v: {k: round(statistics.median(r["cpu"][v]["cpu_ms_per_request"][k] for r in rounds), 3)
                            for k in ("G", "L", "nodes_total", "fake")} for v in VARIANTS}
                    for v in VARIANTS[1:]:
                        m, o = result["cpu_per_request_median"][v], result["cpu_per_request_median"]["off"]
                        m["nodes_total_added"] = round(m["nodes_total"] - o["nodes_total"], 3)

                    # export: everything the "on" pair answered must reach the receiver
                    expected = SPANS_PER_REQUEST * paths.sent["on"]
                    got = await receiver.wait_spans(ctl, expected)
                    result["export"] = {
                        "requests_on": paths.sent["on"], "spans_expected": expected, "spans_received": got["spans"],
                        "posts": got["posts"], "bytes": got["bytes"], "by_name": got["by_name"],
                        "by_node": {("G2" if k == g2.peer_id else "L2" if k == l2.peer_id else k): n
                                    for k, n in got["by_instance"].items()},
                        "shape_problems": got["problems"][:5],
                        "metrics_G2": await metrics_spans(ctl, g2.api),
                        "metrics_L2": await metrics_spans(ctl, l2.api),
                        "metrics_G1": await metrics_spans(ctl, g1.api),
                    }
                    result["requests_sent"] = dict(paths.sent)
                    result["anomalies"] = paths.anomalies
                finally:
                    await paths.aclose()
                    await ctl.aclose()
            finally:
                await c.close()
                nursery.cancel_scope.cancel()
    finally:
        fake.stop()
        receiver.stop()
    result["machine"]["loadavg_after"] = os.getloadavg()
    result["e2e_s"] = round(time.perf_counter() - t_start, 2)
    return result


def print_table(r: dict) -> None:
    lat, cpu, ex = r["latency"], r["cpu_per_request_median"], r["export"]

    def added(d: dict, key: str) -> str:
        return f"{d[key]:+.2f}" if key in d else "-"

    print(f"\nmeshollama tracing benchmark, remote path ({r['machine']['cpus']} CPUs, loadavg "
          f"{r['machine']['loadavg_before'][0]:.2f}; {r['params']['rounds']} rounds; total {r['total_s']} s)")
    print(f"{'metric':<40}" + "".join(f"{v:>12}" for v in VARIANTS))
    print("-" * 76)
    for key, label in (("p50_ms", "latency p50 ms (stream:false)"), ("p99_ms", "latency p99 ms")):
        print(f"{label:<40}" + "".join(f"{lat[v][key]:>12.2f}" for v in VARIANTS))
    print(f"{'  p50 added vs off ms (pooled)':<40}{'':>12}"
          + "".join(f"{added(lat[v], 'p50_added_ms'):>12}" for v in VARIANTS[1:]))
    print(f"{'  p50 added vs off ms (median of rounds)':<40}{'':>12}"
          + "".join(f"{added(lat[v], 'p50_added_ms_median_of_rounds'):>12}" for v in VARIANTS[1:]))
    for k, label in (("G", "CPU ms/request: node G"), ("L", "CPU ms/request: node L"),
                     ("nodes_total", "CPU ms/request: G + L")):
        print(f"{label:<40}" + "".join(f"{cpu[v][k]:>12.3f}" for v in VARIANTS))
    print(f"{'  G + L added vs off':<40}{'':>12}" + "".join(f"{cpu[v]['nodes_total_added']:>+12.3f}"
                                                           for v in VARIANTS[1:]))
    print(f"spans exported ('on'): {ex['spans_received']} received of {ex['spans_expected']} expected "
          f"({ex['requests_on']} requests x {SPANS_PER_REQUEST}) in {ex['posts']} POSTs; "
          f"G2 {ex['metrics_G2']}, L2 {ex['metrics_L2']}; shape problems: {len(ex['shape_problems'])}")
    if r.get("anomalies"):
        print(f"ANOMALIES: {r['anomalies'][:3]}")
    if "micro" in r:
        m = r["micro"]
        print(f"\nhooks alone, µs/request{'':<17}" + "".join(f"{v:>12}" for v in VARIANTS))
        for k, label in (("gateway_us", "gateway side (G)"), ("serving_us", "serving side (L)"),
                         ("total_us", "both")):
            print(f"{label:<40}" + "".join(f"{m[k][v]:>12.2f}" for v in VARIANTS))
        print(f"OTLP JSON encoding: {m['otlp_encode_us_per_span']} µs/span, "
              f"{m['otlp_encode_us_per_request']} µs per request's {SPANS_PER_REQUEST} spans, "
              f"{m['otlp_bytes_per_span']} bytes/span")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the results as JSON here "
                   "(default benchmarks/results/tracing-<UTC timestamp>.json; '-' for none)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--n", type=int, default=100, help="interleaved stream:false requests per variant per round")
    p.add_argument("--cpu-n", type=int, default=300, help="requests per variant per round in the CPU phase")
    p.add_argument("--settle", type=float, default=2.5,
                   help="quiet seconds closing each CPU window (> the exporter's 2 s interval)")
    p.add_argument("--micro-n", type=int, default=20000, help="iterations of the hooks microbenchmark (0: skip)")
    p.add_argument("--heartbeat", type=float, default=2.0, help="nodes' --heartbeat-interval")
    p.add_argument("--receiver-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.receiver_child:
        receiver_main(args.receiver_child)
        return {}
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / f"tracing-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    elif str(args.out) == "-":
        args.out = None
    t0 = time.perf_counter()
    result = trio.run(main_async, args)
    if args.micro_n:
        print(f"[tracing] microbenchmark of the hooks ({args.micro_n} x 3) ...", file=sys.stderr)
        result["micro"] = micro(args.micro_n)
    result["total_s"] = round(time.perf_counter() - t0, 2)
    report(result, args.out, print_table)
    return result


if __name__ == "__main__":
    main()

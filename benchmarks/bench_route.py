#!/usr/bin/env python3
"""What a route decision costs at 10, 100, 1,000 and 10,000 known peers (pure, in process).

A :class:`PeerTable` is filled through ``apply`` with N heartbeats: 5 peers
hold the requested model (``llama3``), the others one or two of 200 other
models, each with addresses, a digest and details like a real heartbeat.
Per N:

  decision   ``candidates`` + ``choose`` (LEAST_LOADED) on a snapshot whose
             index is built: mean and p99 µs per decision
  request    what the gateway does per request with the table unchanged:
             ``table.snapshot`` + ``RouteStats.observe`` + ``candidates`` +
             ``has_free_slot`` + ``choose``
  full scan  for comparison, one pass of the old candidate scan (every peer's
             state and models read), which the old code did twice per decision
  index      building the index for a new snapshot (the second lookup: the
             first is a plain scan), with the views' model keys cached as for
             peers that did not change; and cold: the first two lookups over
             new views (every model name parsed)
  change     the first request after a heartbeat changed the table: the sorted
             peers tuple, the index and the observe walk are rebuilt
  all hold   every one of the N peers holds the model: ``has_free_slot`` +
             ``choose`` (a random sample of ``routing.ROUTE_SAMPLE`` holders)

and the memory of the table at the largest N (tracemalloc: the table, a
snapshot and its built index). Targets (issue 13): a decision at 10,000 peers
<= 1 ms, the table <= 100 MB.

    .venv/bin/python benchmarks/bench_route.py     # ~20 s; writes benchmarks/results/route-<UTC>.json
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import statistics
import sys
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from benchmarks.common import report  # noqa: E402
from meshollama import names  # noqa: E402
from meshollama.catalog import LoadInfo, ModelInfo  # noqa: E402
from meshollama.mesh.announce import Announcement  # noqa: E402
from meshollama.mesh import peertable  # noqa: E402
from meshollama.mesh.peertable import PeerState, PeerTable, Snapshot  # noqa: E402
from meshollama.routing import RouteStats, candidates, choose, has_free_slot  # noqa: E402

MODEL = names.key("llama3")
HOLDERS = 5
OTHER_MODELS = 200
SIZES = (10, 100, 1_000, 10_000)
DETAILS = {"format": "gguf", "family": "llama", "parameter_size": "8.0B", "quantization_level": "Q4_0"}


def model(name: str, i: int) -> ModelInfo:
    return ModelInfo(name=name, digest=f"{i:064x}", size=4_661_224_676, loaded=i % 3 == 0,
                     modified_at="2026-11-30T12:00:00Z", details=DETAILS, capabilities=("completion",))


def heartbeat(i: int, seq: int = 1) -> Announcement:
    pid = f"12D3KooW{i:044d}"
    if i < HOLDERS:
        models = (model("llama3:latest", i),)
    else:
        models = tuple(model(f"other{(i * k) % OTHER_MODELS}:7b", i * k) for k in (1, 7)[: 1 + i % 2])
    return Announcement(peer_id=pid, seq=seq, version="0.9.0", models=models,
                        load=LoadInfo(in_flight=i % 3, capacity=4, queued=0),
                        addrs=(f"/ip4/10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}/tcp/4001/p2p/{pid}",
                               f"/ip4/10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}/udp/4001/quic-v1/p2p/{pid}"),
                        api_url=f"http://10.0.{i // 256 % 256}.{i % 256}:11434")


def table_of(n: int) -> PeerTable:
    table = PeerTable("me", interval=2.0, max_peers=max(n, 1))
    for i in range(n):
        table.apply(heartbeat(i), 0.0)
    return table


def timed(fn, runs: int) -> dict[str, float]:
    """Mean and p99 of ``fn()`` in µs over ``runs`` calls, each timed alone."""
    fn()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(runs):
        t0 = clock()
        fn()
        samples.append((clock() - t0) / 1000)
    samples.sort()
    return {"mean_us": round(statistics.fmean(samples), 2), "p99_us": round(samples[int(len(samples) * 0.99)], 2)}


def stats_for(snapshot: Snapshot) -> RouteStats:
    stats = RouteStats()
    stats.observe(snapshot)
    for k, p in enumerate(snapshot.serving(MODEL)):  # some history with the holders
        stats.started(p.peer_id, 0.0)
        stats.finished(p.peer_id, 0.5, ok=True, latency=0.2 + k / 10, ttfb=0.05 + k / 100, model=MODEL, chunks=20)
    return stats


def one_size(n: int, runs: int) -> dict:
    table = table_of(n)
    snap = table.snapshot(1.0)
    stats = stats_for(snap)
    rng = random.Random(1)
    assert len(candidates(snap, MODEL)) == HOLDERS

    def decision() -> None:
        candidates(snap, MODEL)
        choose(snap, MODEL, stats, 1.0, rng)

    def request() -> None:
        s = table.snapshot(1.0)
        stats.observe(s)
        if candidates(s, MODEL) and has_free_slot(s, MODEL, stats, 1.0):
            choose(s, MODEL, stats, 1.0, rng)

    def full_scan() -> None:
        tuple(p for p in snap.peers if p.state is PeerState.ALIVE and p.serves(MODEL) and p.load.capacity > 0)

    few = max(20, min(runs, 200_000 // max(n, 1)))
    beats = iter([heartbeat(n - 1, seq) for seq in range(2, few + 3)])

    def after_change() -> None:  # one heartbeat from one peer, then a request
        table.apply(next(beats), 1.0)
        request()

    build, cold = [], []
    for k in range(few):
        index = peertable.ServingIndex(snap.peers)
        index.serving(MODEL)  # the first lookup is a scan; the second builds
        t0 = time.perf_counter_ns()
        index.serving(MODEL)
        build.append((time.perf_counter_ns() - t0) / 1000)
        if k < 50:
            views = tuple(replace(p) for p in snap.peers)  # new views: their model keys not parsed yet
            fresh = Snapshot(peers=views, taken_at=1.0)
            t0 = time.perf_counter_ns()
            fresh.serving(MODEL)
            fresh.serving(MODEL)
            cold.append((time.perf_counter_ns() - t0) / 1000)
    build.sort()
    return {
        "peers": n,
        "holders": HOLDERS,
        "decision": timed(decision, runs),
        "request": timed(request, runs),
        "full_scan_once": timed(full_scan, few),
        "index_build": {"mean_us": round(statistics.fmean(build), 2), "p99_us": round(build[int(len(build) * 0.99)], 2)},
        "index_build_cold_us": round(statistics.fmean(cold), 2),
        "first_request_after_change": timed(after_change, few),
    }


def all_hold(n: int, runs: int) -> dict:
    """A decision when all ``n`` peers hold the model (the sample bounds it)."""
    table = PeerTable("me", interval=2.0, max_peers=max(n, 1))
    for i in range(n):
        hb = heartbeat(i)
        table.apply(replace(hb, models=(model("llama3:latest", i),)), 0.0)
    snap = table.snapshot(1.0)
    stats = stats_for(snap)
    rng = random.Random(1)
    assert len(candidates(snap, MODEL)) == n

    def decision() -> None:
        if has_free_slot(snap, MODEL, stats, 1.0, rng):
            choose(snap, MODEL, stats, 1.0, rng)

    return {"peers": n, "holders": n, "decision": timed(decision, max(200, runs // 10))}


def memory(n: int) -> dict:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    table = table_of(n)
    after_table = tracemalloc.get_traced_memory()[0]
    snap = table.snapshot(1.0)
    snap.serving(MODEL)
    snap.serving(MODEL)  # the second lookup builds the index
    after_index = tracemalloc.get_traced_memory()[0]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    mb = 1024 * 1024
    return {"peers": n, "table_mb": round((after_table - base) / mb, 2),
            "table_snapshot_index_mb": round((after_index - base) / mb, 2),
            "peak_mb": round((peak - base) / mb, 2), "bytes_per_peer": int((after_index - base) / n)}


def show(result: dict) -> None:
    print(f"{'peers':>7} {'decision mean/p99 µs':>22} {'request mean/p99 µs':>21} {'full scan µs':>13} "
          f"{'index µs':>10} {'cold µs':>9} {'after change µs':>16}")
    for r in result["sizes"]:
        print(f"{r['peers']:>7} {r['decision']['mean_us']:>11.1f}/{r['decision']['p99_us']:<10.1f}"
              f"{r['request']['mean_us']:>10.1f}/{r['request']['p99_us']:<10.1f}"
              f"{r['full_scan_once']['mean_us']:>13.1f} {r['index_build']['mean_us']:>10.1f} "
              f"{r['index_build_cold_us']:>9.1f} {r['first_request_after_change']['mean_us']:>16.1f}")
    for r in result.get("all_hold", []):
        print(f"all {r['peers']:>5} hold the model: decision mean/p99 {r['decision']['mean_us']:.1f}/"
              f"{r['decision']['p99_us']:.1f} µs")
    m = result["memory"]
    print(f"memory at {m['peers']} peers: table {m['table_mb']} MB, with snapshot and index "
          f"{m['table_snapshot_index_mb']} MB ({m['bytes_per_peer']} B/peer), peak {m['peak_mb']} MB")
    print("targets: decision at 10,000 peers <= 1000 µs, table <= 100 MB: "
          + ("met" if result["targets_met"] else "NOT met"))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the results as JSON here "
                   "(default benchmarks/results/route-<UTC timestamp>.json; '-' for none)")
    p.add_argument("--runs", type=int, default=20_000, help="timed decisions per table size")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    args = p.parse_args(argv)
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / f"route-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    elif str(args.out) == "-":
        args.out = None
    t0 = time.perf_counter()
    sizes = [one_size(n, args.runs) for n in args.sizes]
    mem = memory(max(args.sizes))
    hold = [all_hold(n, args.runs) for n in args.sizes]
    largest = sizes[-1]
    result = {
        "bench": "route",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "runs": args.runs,
        "sizes": sizes,
        "memory": mem,
        "all_hold": hold,
        "targets_met": (largest["decision"]["p99_us"] <= 1000 and hold[-1]["decision"]["p99_us"] <= 1000
                        and mem["table_snapshot_index_mb"] <= 100),
        "total_s": round(time.perf_counter() - t0, 2),
    }
    report(result, args.out, show)
    return result


if __name__ == "__main__":
    main()

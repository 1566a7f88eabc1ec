#!/usr/bin/env python3
"""How a mesh of N meshollama nodes forms, what it costs idle, how fast news travels.

For each N (default 5, 10, 20) this starts N real ``python -m meshollama start``
processes on loopback (``--backend none``, no mDNS, OS-chosen ports, every node
bootstrapping to node 0, starts staggered so a small machine is not swamped)
and measures:

  converge   seconds until every node's ``/api/mesh/peers`` lists all N peers
             ``alive`` (counted from the first spawn, and from the moment the
             last node wrote node.json, i.e. was up)
  idle       CPU % (utime+stime from /proc/<pid>/stat) and RSS (VmRSS from
             /proc/<pid>/status) of every node over ``--idle-seconds`` with no
             requests at all (nobody polls the nodes during the window)
  staleness  ``seconds_since_heartbeat`` of every (observer, peer) pair, sampled
             at the end of the idle window; with heartbeat interval h and prompt
             delivery it is roughly uniform on [0, h]
  join       a new node is started (bootstrapping to node 0); seconds from its
             node.json to the moment every other node lists it alive

Then, if ``--hb-sweep`` is given (default "1,2,5" at N=10), the idle CPU at N=10
for several heartbeat intervals (the default interval is 2 s).

    .venv/bin/python benchmarks/bench_mesh.py --sizes 5,10,20 --out bench_mesh.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration.cluster import Cluster, NodeProc  # noqa: E402

from common import report  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def dist(values: list[float], nd: int = 3) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "min": round(min(values), nd), "p50": round(pct(values, 50), nd),
            "mean": round(statistics.fmean(values), nd), "p90": round(pct(values, 90), nd),
            "p99": round(pct(values, 99), nd), "max": round(max(values), nd)}


async def alive_ids(c: Cluster, node: NodeProc) -> set[str]:
    try:
        peers = await c.peers(node)
    except (httpx.HTTPError, ValueError):
        return set()
    return {p["peer_id"] for p in peers if p.get("state") == "alive"}


async def wait_converged(c: Cluster, nodes: list[NodeProc], timeout: float, step: float = 0.25) -> float | None:
    """Poll every node until each lists all of ``nodes`` alive; monotonic time of success, or None."""
    want = {n.peer_id for n in nodes}
    done: set[str] = set()
    with trio.move_on_after(timeout):
        while True:
            for n in nodes:
                if n.name in done:
                    continue
                if want <= await alive_ids(c, n):
                    done.add(n.name)
            if len(done) == len(nodes):
                return time.monotonic()
            await trio.sleep(step)
    return None


async def start_mesh(c: Cluster, n: int, heartbeat: float, stagger: float, tag: str) -> tuple[list[NodeProc], float]:
    """Spawn n nodes (node 0 first and ready, the rest staggered, not waited on one by one)."""
    t0 = time.monotonic()
    first = await c.start(f"{tag}-0", "--backend", "none", heartbeat=heartbeat)
    nodes = [first]
    for i in range(1, n):
        await trio.sleep(stagger)
        nodes.append(await c.start(f"{tag}-{i}", "--backend", "none", bootstrap=first,
                                   heartbeat=heartbeat, wait=False))
    for node in nodes[1:]:
        with trio.fail_after(240):
            await c.wait_ready(node)
    return nodes, t0


async def idle_usage(nodes: list[NodeProc], seconds: float) -> dict:
    pids = [n.proc.pid for n in nodes]
    c0 = [cpu_seconds(p) for p in pids]
    t0 = time.monotonic()
    await trio.sleep(seconds)
    wall = time.monotonic() - t0
    c1 = [cpu_seconds(p) for p in pids]
    cpu = [100.0 * (b - a) / wall for a, b in zip(c0, c1)]
    rss = [rss_mib(p) for p in pids]
    return {"seconds": round(wall, 2), "cpu_pct_per_node": dist(cpu, 2), "cpu_pct_total": round(sum(cpu), 2),
            "rss_mib_per_node": dist(rss, 1), "rss_mib_total": round(sum(rss), 1),
            "loadavg": os.getloadavg()}


async def staleness(c: Cluster, nodes: list[NodeProc]) -> dict:
    vals: list[float] = []
    not_alive = 0
    for n in nodes:
        try:
            peers = await c.peers(n)
        except (httpx.HTTPError, ValueError):
            continue
        for p in peers:
            if p.get("is_self"):
                continue
            if p.get("state") != "alive":
                not_alive += 1
            vals.append(float(p["seconds_since_heartbeat"]))
    return {**dist(vals), "pairs_not_alive": not_alive}


async def join_latency(c: Cluster, nodes: list[NodeProc], heartbeat: float, tag: str, timeout: float) -> dict:
    t_spawn = time.monotonic()
    new = await c.start(f"{tag}-join", "--backend", "none", bootstrap=nodes[0], heartbeat=heartbeat, wait=False)
    with trio.fail_after(120):
        await c.wait_ready(new)
    t_ready = time.monotonic()
    seen_at: dict[str, float] = {}
    with trio.move_on_after(timeout):
        while len(seen_at) < len(nodes):
            for n in nodes:
                if n.name not in seen_at and new.peer_id in await alive_ids(c, n):
                    seen_at[n.name] = time.monotonic()
            await trio.sleep(0.1)
    after_ready = [t - t_ready for t in seen_at.values()]
    return {"startup_s": round(t_ready - t_spawn, 2), "seen_by": len(seen_at), "of": len(nodes),
            "visible_after_ready_s": dist(after_ready, 2),
            "all_visible_after_ready_s": round(max(after_ready), 2) if len(seen_at) == len(nodes) else None,
            "poll_step_s": 0.1}


async def run_size(n: int, heartbeat: float, args: argparse.Namespace, join: bool) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench_mesh_{n}_"))
    tag = f"n{n}hb{heartbeat:g}"
    res: dict = {"nodes": n, "heartbeat_s": heartbeat, "loadavg_before": os.getloadavg()}
    print(f"[mesh] N={n} heartbeat={heartbeat}s: starting ...", file=sys.stderr)
    async with trio.open_nursery() as nursery:
        c = Cluster(tmp, nursery)
        c.client = httpx.AsyncClient(timeout=20.0, limits=httpx.Limits(max_keepalive_connections=0))
        try:
            nodes, t0 = await start_mesh(c, n, heartbeat, args.stagger, tag)
            t_all_ready = time.monotonic()
            res["all_started_s"] = round(t_all_ready - t0, 2)
            print(f"[mesh]   all {n} up after {res['all_started_s']} s; waiting for convergence", file=sys.stderr)
            t_conv = await wait_converged(c, nodes, timeout=args.converge_timeout)
            if t_conv is None:
                counts = [len(await alive_ids(c, node)) for node in nodes]
                res["converged"] = False
                res["alive_counts_at_timeout"] = counts
                print(f"[mesh]   NOT converged after {args.converge_timeout} s: {counts}", file=sys.stderr)
            else:
                res["converged"] = True
                res["converge_from_first_spawn_s"] = round(t_conv - t0, 2)
                res["converge_after_all_up_s"] = round(t_conv - t_all_ready, 2)
                print(f"[mesh]   converged {res['converge_after_all_up_s']} s after all up", file=sys.stderr)
            # let start-up churn settle before measuring idle cost
            await trio.sleep(args.settle)
            res["idle"] = await idle_usage(nodes, args.idle_seconds)
            res["staleness_s"] = await staleness(c, nodes)
            print(f"[mesh]   idle cpu/node p50 {res['idle']['cpu_pct_per_node']['p50']}%  "
                  f"rss/node p50 {res['idle']['rss_mib_per_node']['p50']} MiB", file=sys.stderr)
            if join:
                res["join"] = await join_latency(c, nodes, heartbeat, tag, timeout=max(30.0, 10 * heartbeat))
                print(f"[mesh]   join visible to all after {res['join']['all_visible_after_ready_s']} s",
                      file=sys.stderr)
        finally:
            await c.close()
            nursery.cancel_scope.cancel()
    res["loadavg_after"] = os.getloadavg()
    return res


def save_partial(args: argparse.Namespace, out: dict) -> None:
    """Write what we have so far, so a run cut short still leaves numbers."""
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**out, "partial": True}, indent=2))


async def main_async(args: argparse.Namespace) -> dict:
    t_start = time.monotonic()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    out: dict = {"benchmark": "mesh",
                 "machine": {"platform": platform.platform(), "python": platform.python_version(),
                             "cpus": os.cpu_count()},
                 "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "sizes": []}
    for n in sizes:
        out["sizes"].append(await run_size(n, args.heartbeat, args, join=True))
        save_partial(args, out)
    sweep = [float(h) for h in args.hb_sweep.split(",") if h.strip()] if args.hb_sweep else []
    out["heartbeat_sweep"] = []
    for hb in sweep:
        reuse = next((r for r in out["sizes"] if r["nodes"] == args.sweep_nodes and r["heartbeat_s"] == hb), None)
        if reuse is not None:
            out["heartbeat_sweep"].append({**reuse, "reused_from_sizes": True})
        else:
            out["heartbeat_sweep"].append(await run_size(args.sweep_nodes, hb, args, join=False))
        save_partial(args, out)
    out["total_s"] = round(time.monotonic() - t_start, 1)
    return out


def print_tables(r: dict) -> None:
    print(f"\nmeshollama mesh benchmark ({r['machine']['cpus']} CPUs; total {r['total_s']} s)")
    print(f"{'N':>4}{'hb s':>6}{'all up s':>10}{'converge s':>12}{'idle CPU%/node':>16}{'CPU% total':>12}"
          f"{'RSS MiB/node':>14}{'stale p50/max s':>17}{'join s':>8}")
    rows = list(r["sizes"]) + [x for x in r.get("heartbeat_sweep", []) if not x.get("reused_from_sizes")]
    for s in rows:
        conv = f"{s['converge_after_all_up_s']:.1f}" if s.get("converged") else "no"
        idle = s["idle"]
        st = s["staleness_s"]
        join = s.get("join", {}).get("all_visible_after_ready_s")
        print(f"{s['nodes']:>4}{s['heartbeat_s']:>6g}{s['all_started_s']:>10.1f}{conv:>12}"
              f"{idle['cpu_pct_per_node']['p50']:>16.2f}{idle['cpu_pct_total']:>12.1f}"
              f"{idle['rss_mib_per_node']['p50']:>14.1f}{st.get('p50', float('nan')):>8.2f}/{st.get('max', float('nan')):<8.2f}"
              f"{(f'{join:.2f}' if join is not None else '-'):>8}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--sizes", default="5,10,20", help="comma-separated mesh sizes")
    p.add_argument("--heartbeat", type=float, default=2.0, help="--heartbeat-interval of every node")
    p.add_argument("--stagger", type=float, default=0.4, help="seconds between node spawns")
    p.add_argument("--settle", type=float, default=3.0, help="seconds after convergence before the idle window")
    p.add_argument("--idle-seconds", type=float, default=20.0)
    p.add_argument("--converge-timeout", type=float, default=180.0)
    p.add_argument("--hb-sweep", default="1,2,5", help="heartbeat intervals for the sweep ('' to skip)")
    p.add_argument("--sweep-nodes", type=int, default=10)
    args = p.parse_args(argv)
    result = trio.run(main_async, args)
    report(result, args.out, print_tables)
    return result


if __name__ == "__main__":
    main()

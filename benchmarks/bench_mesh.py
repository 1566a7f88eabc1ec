#!/usr/bin/env python3
"""How a mesh of N meshollama nodes forms, what it costs idle, how fast news travels.

For each N (default 5, 10, 25) this starts N real ``python -m meshollama start``
processes on loopback (``--backend none``, no mDNS, OS-chosen ports, every node
bootstrapping to node 0, starts staggered by ``--stagger`` s so a small machine
is not swamped) and measures:

  converge   seconds until every node's ``/api/mesh/peers`` lists all N peers
             ``alive``, counted from the first spawn and from the moment the
             last node wrote node.json (i.e. was up; the file's mtime); each
             node counts from its first complete answer (nodes asked at once,
             each round), and the end of the polling round that found the last
             one is kept too (``converge_round_end_after_last_up_s``)
  idle       CPU % (utime+stime from /proc/<pid>/stat) and RSS (VmRSS from
             /proc/<pid>/status) of every node over ``--idle-seconds`` with no
             requests at all (nobody polls the nodes during the window)
  messages   per node per second over the idle window, from the counters of
             ``GET /api/mesh/status`` read just before and just after it:
             heartbeats sent / received and, where the node reports them
             (``mesh.announced``, not in the older full-state-every-beat code),
             announcements by reason
  staleness  ``seconds_since_heartbeat`` of every (observer, peer) pair at the
             end of the idle window. With announce-only-news it is the time since
             the peer's last announcement (up to the refresh interval), not a
             measure of how fresh its load is.
  join       a new node is started (bootstrapping to node 0); seconds from its
             node.json (mtime) until EVERY other node lists it alive, and until
             the new node lists every other node alive

Every wait is bounded: a mesh that does not converge reports "did not converge
within X s" and the run goes on.

``--src DIR`` puts DIR first on the PYTHONPATH of the spawned nodes, so the same
benchmark measures another checkout (e.g. a ``git worktree`` of an older commit:
``--src /tmp/mesh-before/src``); the node's module path and status keys are
recorded so the run shows which code answered.

``--degree-sweep "2/1/3,3/2/4,4/3/6"`` repeats N=``--sweep-nodes`` for several
gossipsub D/D_low/D_high, with ``--sweep-refresh`` s refreshes (and no per-peer
growth) to amplify message costs.

    .venv/bin/python benchmarks/bench_mesh.py --sizes 5,10,25 --label after
    .venv/bin/python benchmarks/bench_mesh.py --sizes 5,10,25 --label before --src /tmp/mesh-before/src
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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

from tests.integration.cluster import Cluster, NodeProc  # noqa: E402

from common import report  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


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


def json_mtime(node: NodeProc) -> float:
    """Wall time the node wrote node.json (it was up)."""
    return (node.data_dir / "node.json").stat().st_mtime


async def alive_ids(c: Cluster, node: NodeProc) -> set[str]:
    try:
        peers = await c.peers(node)
    except (httpx.HTTPError, ValueError):
        return set()
    return {p["peer_id"] for p in peers if p.get("state") == "alive"}


async def mesh_status(c: Cluster, node: NodeProc) -> dict | None:
    try:
        r = await c.client.get(node.api + "/api/mesh/status")
        r.raise_for_status()
        data = r.json()
    except (httpx.HTTPError, ValueError):
        return None
    return data.get("mesh", data) if isinstance(data, dict) else None


async def wait_converged(c: Cluster, nodes: list[NodeProc], timeout: float,
                         step: float = 0.25) -> tuple[float | None, float, float | None]:
    """Poll every node until each lists all of ``nodes`` alive: (wall time of success or
    None, mean poll round s, wall time the round that found it ended). Nodes not yet
    complete are asked all at once each round, and a node counts from the moment its
    answer said so (a round of 25 sequential asks took ~3 s on a loaded 2-core box: the
    end of the round, the old figure, overshoots by up to that)."""
    want = {n.peer_id for n in nodes}
    done: dict[str, float] = {}
    rounds: list[float] = []
    with trio.move_on_after(timeout):
        while True:
            r0 = time.monotonic()

            async def ask(n: NodeProc) -> None:
                if want <= await alive_ids(c, n):
                    done.setdefault(n.name, time.time())

            async with trio.open_nursery() as nursery:
                for n in nodes:
                    if n.name not in done:
                        nursery.start_soon(ask, n)
            rounds.append(time.monotonic() - r0)
            if len(done) == len(nodes):
                return max(done.values()), statistics.fmean(rounds), time.time()
            await trio.sleep(step)
    return None, (statistics.fmean(rounds) if rounds else float("nan")), None


def spawn_env(args: argparse.Namespace, extra: dict | None = None) -> dict:
    env: dict[str, str] = {}
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join([str(args.src)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    for kv in args.env or []:
        k, _, v = kv.partition("=")
        env[k] = v
    env.update(extra or {})
    return env


def code_under_test(env: dict) -> dict:
    """Which meshollama package the spawned nodes import (same interpreter, same env)."""
    full = {**os.environ, **env}
    try:
        code = ("import meshollama; print(meshollama.__file__); "
                "print(getattr(meshollama, '__version__', '?'))")
        out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                             timeout=30, cwd=str(ROOT), check=False)
        lines = out.stdout.split()
        return {"module": lines[0] if lines else None, "version": lines[1] if len(lines) > 1 else None}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": repr(exc)}


async def start_mesh(c: Cluster, n: int, heartbeat: float, stagger: float, tag: str, env: dict,
                     timeout: float) -> tuple[list[NodeProc], float]:
    """Spawn n nodes (node 0 first and ready, the rest staggered, not waited on one by one)."""
    t0 = time.time()
    with trio.fail_after(timeout):
        first = await c.start(f"{tag}-0", "--backend", "none", heartbeat=heartbeat, env=env)
        nodes = [first]
        for i in range(1, n):
            await trio.sleep(stagger)
            nodes.append(await c.start(f"{tag}-{i}", "--backend", "none", bootstrap=first,
                                       heartbeat=heartbeat, wait=False, env=env))
        for node in nodes[1:]:
            await c.wait_ready(node)
    return nodes, t0


def counter_totals(st: dict | None) -> dict | None:
    if st is None:
        return None
    out = {"heartbeats_sent": st.get("heartbeats_sent", 0), "heartbeats_received": st.get("heartbeats_received", 0)}
    if "announced" in st:
        out["announced"] = dict(st["announced"])
    if "synced" in st:
        out["synced"] = dict(st["synced"])
    return out


async def snapshot_counters(c: Cluster, nodes: list[NodeProc]) -> list[dict | None]:
    return [counter_totals(await mesh_status(c, n)) for n in nodes]


def message_rates(before: list[dict | None], after: list[dict | None], seconds: float) -> dict:
    sent, recv, ann = [], [], []
    by_reason: dict[str, float] = {}
    has_announced = False
    for a, b in zip(before, after):
        if a is None or b is None:
            continue
        sent.append((b["heartbeats_sent"] - a["heartbeats_sent"]) / seconds)
        recv.append((b["heartbeats_received"] - a["heartbeats_received"]) / seconds)
        if "announced" in b:
            has_announced = True
            da = {k: v - a.get("announced", {}).get(k, 0) for k, v in b["announced"].items()}
            ann.append(sum(da.values()) / seconds)
            for k, v in da.items():
                by_reason[k] = by_reason.get(k, 0) + v
    res = {"nodes_read": len(sent), "heartbeats_sent_per_node_s": dist(sent, 4),
           "heartbeats_received_per_node_s": dist(recv, 4)}
    if has_announced:
        res["announced_per_node_s"] = dist(ann, 4)
        res["announced_by_reason_in_window"] = by_reason
    return res


async def idle_usage(c: Cluster, nodes: list[NodeProc], seconds: float) -> dict:
    counters0 = await snapshot_counters(c, nodes)
    pids = [n.proc.pid for n in nodes]
    la0 = loadavg()
    c0 = [cpu_seconds(p) for p in pids]
    t0 = time.monotonic()
    await trio.sleep(seconds)
    wall = time.monotonic() - t0
    c1 = [cpu_seconds(p) for p in pids]
    la1 = loadavg()
    cpu = [100.0 * (b - a) / wall for a, b in zip(c0, c1)]
    rss = [rss_mib(p) for p in pids]
    counters1 = await snapshot_counters(c, nodes)
    # the counter window is a little wider than the CPU window (the status reads); use its own length
    msg_wall = time.monotonic() - t0
    return {"seconds": round(wall, 2), "cpu_pct_per_node": dist(cpu, 3), "cpu_pct_total": round(sum(cpu), 2),
            "rss_mib_per_node": dist(rss, 1), "rss_mib_total": round(sum(rss), 1),
            "loadavg_start": la0, "loadavg_end": la1,
            "messages": message_rates(counters0, counters1, max(wall, msg_wall)),
            "counters_end_sample": counters1[0] if counters1 else None}


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


async def join_latency(c: Cluster, nodes: list[NodeProc], heartbeat: float, tag: str, timeout: float,
                       env: dict, step: float = 0.1) -> dict:
    t_spawn = time.time()
    la0 = loadavg()
    try:
        with trio.fail_after(120):
            new = await c.start(f"{tag}-join", "--backend", "none", bootstrap=nodes[0], heartbeat=heartbeat,
                                wait=True, env=env)
    except trio.TooSlowError:
        return {"error": "joiner did not write node.json within 120 s"}
    t_json = json_mtime(new)
    want_others = {n.peer_id for n in nodes}
    seen_at: dict[str, float] = {}
    sees_all_at: float | None = None
    rounds: list[float] = []
    with trio.move_on_after(timeout):
        while len(seen_at) < len(nodes) or sees_all_at is None:
            r0 = time.monotonic()
            if sees_all_at is None and want_others <= await alive_ids(c, new):
                sees_all_at = time.time()
            for n in nodes:
                if n.name not in seen_at and new.peer_id in await alive_ids(c, n):
                    seen_at[n.name] = time.time()
            rounds.append(time.monotonic() - r0)
            await trio.sleep(step)
    after = [t - t_json for t in seen_at.values()]
    everywhere = round(max(after), 2) if len(seen_at) == len(nodes) else None
    sees_all = round(sees_all_at - t_json, 2) if sees_all_at is not None else None
    st = await mesh_status(c, new)
    missed = []  # what the nodes that never saw the joiner say of themselves (the why, for the log)
    for n in nodes:
        if n.name not in seen_at:
            ns = await mesh_status(c, n) or {}
            peer = next((p for p in await c.peers(n) if p["peer_id"] == new.peer_id), None) \
                if ns else None
            missed.append({"node": n.name, "gossip": ns.get("gossip"),
                           "connected": len(ns.get("connected_peers") or ()),
                           "connected_to_joiner": new.peer_id in (ns.get("connected_peers") or ()),
                           "joiner_entry": peer, "heartbeats_received": ns.get("heartbeats_received"),
                           "heartbeats_dropped": ns.get("heartbeats_dropped"), "synced": ns.get("synced")})
    return {"startup_s": round(t_json - t_spawn, 2), "seen_by": len(seen_at), "of": len(nodes),
            "not_seen_by": missed,
            "joiner_gossip": (st or {}).get("gossip"),
            "visible_after_node_json_s": dist(after, 2),
            "visible_everywhere_s": everywhere,
            "joiner_sees_all_s": sees_all,
            "timeout_s": timeout,
            "joiner_synced": (st or {}).get("synced"),
            "joiner_announced": (st or {}).get("announced"),
            "poll_step_s": step, "poll_round_s": round(statistics.fmean(rounds), 3) if rounds else None,
            "loadavg": la0}


LOG_PAT = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")


def scan_logs(tmp: Path) -> dict:
    """Count WARNING/ERROR lines in the node logs; a few samples per distinct message."""
    counts: dict[str, int] = {}
    samples: dict[str, str] = {}
    for log in sorted(tmp.glob("*.log")):
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if not LOG_PAT.search(line):
                continue
            # key: level + logger + message with numbers/ids squashed
            body = line.split("Z ", 1)[-1]
            key = re.sub(r"[0-9A-Za-z]{30,}", "<id>", body)
            key = re.sub(r"\d+(\.\d+)?", "#", key)[:160]
            counts[key] = counts.get(key, 0) + 1
            samples.setdefault(key, f"{log.name}: {line[:400]}")
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:15]
    return {"dir": str(tmp), "distinct": len(counts), "total": sum(counts.values()),
            "top": [{"count": n, "sample": samples[k]} for k, n in top]}


async def run_size(n: int, heartbeat: float, args: argparse.Namespace, join: bool, env_extra: dict | None = None,
                   label: str = "") -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench_mesh_{args.label}_{label}{n}_"))
    tag = f"n{n}"
    env = spawn_env(args, env_extra)
    res: dict = {"nodes": n, "heartbeat_s": heartbeat, "env": {k: v for k, v in env.items()},
                 "loadavg_before": loadavg(), "log_dir": str(tmp)}
    print(f"[mesh] N={n} {label} load {res['loadavg_before']}: starting ...", file=sys.stderr)
    async with trio.open_nursery() as nursery:
        c = Cluster(tmp, nursery)
        c.client = httpx.AsyncClient(timeout=10.0, limits=httpx.Limits(max_keepalive_connections=0))
        try:
            try:
                nodes, t0 = await start_mesh(c, n, heartbeat, args.stagger, tag, env, args.start_timeout)
            except (trio.TooSlowError, AssertionError) as exc:
                res["error"] = f"start failed: {type(exc).__name__}: {str(exc)[:500]}"
                print(f"[mesh]   {res['error']}", file=sys.stderr)
                return res
            t_all_ready = time.time()
            t_last_up = max(json_mtime(x) for x in nodes)
            res["all_started_s"] = round(t_all_ready - t0, 2)
            res["last_up_after_first_spawn_s"] = round(t_last_up - t0, 2)
            st0 = await mesh_status(c, nodes[0]) or {}
            res["status_keys"] = sorted(st0)
            res["has_announced"] = "announced" in st0
            res["version"] = st0.get("version")
            res["refresh_interval_s"] = st0.get("refresh_interval")
            print(f"[mesh]   all {n} up after {res['all_started_s']} s (last node.json at "
                  f"{res['last_up_after_first_spawn_s']} s); waiting for convergence", file=sys.stderr)
            t_conv, round_s, t_round_end = await wait_converged(c, nodes, timeout=args.converge_timeout)
            res["converge_poll_round_s"] = round(round_s, 3)
            if t_conv is None:
                counts = [len(await alive_ids(c, node)) for node in nodes]
                res["converged"] = False
                res["converge_timeout_s"] = args.converge_timeout
                res["alive_counts_at_timeout"] = counts
                print(f"[mesh]   did not converge within {args.converge_timeout} s: alive counts {counts}",
                      file=sys.stderr)
            else:
                res["converged"] = True
                res["converge_from_first_spawn_s"] = round(t_conv - t0, 2)
                res["converge_after_last_up_s"] = round(t_conv - t_last_up, 2)
                res["converge_after_all_up_s"] = round(t_conv - t_all_ready, 2)
                res["converge_round_end_after_last_up_s"] = round(t_round_end - t_last_up, 2)
                print(f"[mesh]   converged {res['converge_after_last_up_s']} s after the last node was up",
                      file=sys.stderr)
            res["loadavg_after_converge"] = loadavg()
            statuses = [await mesh_status(c, node) or {} for node in nodes]
            res["gossip_at_converge"] = [st.get("gossip") for st in statuses]
            res["synced_at_converge"] = [st.get("synced") for st in statuses]
            # let start-up churn settle before measuring idle cost
            await trio.sleep(args.settle)
            refreshed = await mesh_status(c, nodes[0]) or {}
            res["refresh_interval_s"] = refreshed.get("refresh_interval", res.get("refresh_interval_s"))
            res["idle"] = await idle_usage(c, nodes, args.idle_seconds)
            res["staleness_s"] = await staleness(c, nodes)
            m = res["idle"]["messages"]
            print(f"[mesh]   idle cpu/node p50 {res['idle']['cpu_pct_per_node']['p50']}% mean "
                  f"{res['idle']['cpu_pct_per_node']['mean']}%  total {res['idle']['cpu_pct_total']}%  "
                  f"rss/node p50 {res['idle']['rss_mib_per_node']['p50']} MiB  hb recv/s/node "
                  f"{m['heartbeats_received_per_node_s'].get('mean')}  load {res['idle']['loadavg_end']}",
                  file=sys.stderr)
            if join:
                res["join"] = await join_latency(c, nodes, heartbeat, tag, timeout=args.join_timeout, env=env)
                j = res["join"]
                print(f"[mesh]   join: visible everywhere {j.get('visible_everywhere_s')} s, joiner sees all "
                      f"{j.get('joiner_sees_all_s')} s (seen by {j.get('seen_by')}/{j.get('of')})", file=sys.stderr)
        finally:
            await c.close()
            nursery.cancel_scope.cancel()
    res["loadavg_after"] = loadavg()
    res["logs"] = scan_logs(tmp)
    return res


def default_out(label: str) -> Path:
    ts = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return ROOT / "benchmarks" / "results" / f"mesh-{ts}-{label}.json"


def save_partial(args: argparse.Namespace, out: dict) -> None:
    """Write what we have so far, so a run cut short still leaves numbers."""
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**out, "partial": True}, indent=2))


async def main_async(args: argparse.Namespace) -> dict:
    t_start = time.monotonic()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    out: dict = {"benchmark": "mesh", "label": args.label,
                 "machine": {"platform": platform.platform(), "python": platform.python_version(),
                             "cpus": os.cpu_count()},
                 "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "code": code_under_test(spawn_env(args)),
                 "sizes": []}
    print(f"[mesh] code under test: {out['code']}", file=sys.stderr)
    for n in sizes:
        out["sizes"].append(await run_size(n, args.heartbeat, args, join=True))
        save_partial(args, out)
    out["degree_sweep"] = []
    for spec in [s for s in (args.degree_sweep or "").split(",") if s.strip()]:
        d, lo, hi = (int(x) for x in spec.split("/"))
        extra = {"MESHOLLAMA_P2P_GOSSIP_DEGREE": str(d), "MESHOLLAMA_P2P_GOSSIP_DEGREE_LOW": str(lo),
                 "MESHOLLAMA_P2P_GOSSIP_DEGREE_HIGH": str(hi)}
        if args.sweep_refresh:
            extra.update({"MESHOLLAMA_P2P_REFRESH_INTERVAL": str(args.sweep_refresh),
                          "MESHOLLAMA_P2P_REFRESH_PER_PEER": "0"})
        r = await run_size(args.sweep_nodes, args.heartbeat, args, join=True, env_extra=extra, label=f"D{d}-")
        r["degree"] = spec
        out["degree_sweep"].append(r)
        save_partial(args, out)
    out["total_s"] = round(time.monotonic() - t_start, 1)
    return out


def _f(v, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def print_tables(r: dict) -> None:
    print(f"\nmeshollama mesh benchmark [{r['label']}] ({r['machine']['cpus']} CPUs; total {r['total_s']} s; "
          f"code {r['code']})")
    hdr = (f"{'N':>4}{'D':>7}{'all up':>8}{'conv/last':>10}{'CPU%/node':>10}{'CPU% tot':>9}{'RSS/node':>9}"
           f"{'ann/s':>8}{'hb rx/s':>8}{'stale p50':>10}{'join all':>9}{'sees all':>9}  load")
    print(hdr)
    for s in list(r["sizes"]) + list(r.get("degree_sweep", [])):
        if "idle" not in s:
            print(f"{s['nodes']:>4}  {s.get('error', 'no result')}")
            continue
        conv = _f(s.get("converge_after_last_up_s")) if s.get("converged") else f">{s.get('converge_timeout_s')}"
        idle = s["idle"]
        m = idle["messages"]
        ann = m.get("announced_per_node_s", m["heartbeats_sent_per_node_s"]).get("mean")
        j = s.get("join", {})
        print(f"{s['nodes']:>4}{s.get('degree', '-'):>7}{s['all_started_s']:>8.1f}{conv:>10}"
              f"{idle['cpu_pct_per_node']['mean']:>10.3f}{idle['cpu_pct_total']:>9.2f}"
              f"{idle['rss_mib_per_node']['p50']:>9.1f}{_f(ann, '.3f'):>8}"
              f"{_f(m['heartbeats_received_per_node_s'].get('mean'), '.3f'):>8}"
              f"{_f(s['staleness_s'].get('p50')):>10}{_f(j.get('visible_everywhere_s')):>9}"
              f"{_f(j.get('joiner_sees_all_s')):>9}  {idle['loadavg_end']}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the results as JSON here "
                   "(default benchmarks/results/mesh-<UTC timestamp>-<label>.json)")
    p.add_argument("--label", default="head", help="a name for this run (in the default file name)")
    p.add_argument("--src", type=Path, help="put this directory first on the nodes' PYTHONPATH "
                   "(measure another checkout, e.g. /tmp/mesh-before/src)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE", help="extra environment for every node")
    p.add_argument("--sizes", default="5,10,25", help="comma-separated mesh sizes")
    p.add_argument("--heartbeat", type=float, default=2.0, help="--heartbeat-interval of every node")
    p.add_argument("--stagger", type=float, default=0.4, help="seconds between node spawns")
    p.add_argument("--settle", type=float, default=5.0, help="seconds after convergence before the idle window")
    p.add_argument("--idle-seconds", type=float, default=30.0)
    p.add_argument("--start-timeout", type=float, default=240.0, help="bound on starting the whole mesh")
    p.add_argument("--converge-timeout", type=float, default=120.0)
    p.add_argument("--join-timeout", type=float, default=30.0)
    p.add_argument("--degree-sweep", default="", help='gossipsub D/D_low/D_high list, e.g. "2/1/3,3/2/4,4/3/6"')
    p.add_argument("--sweep-nodes", type=int, default=10)
    p.add_argument("--sweep-refresh", type=float, default=2.0,
                   help="p2p.refresh_interval during the degree sweep (per-peer growth off); 0 keeps the default")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = default_out(args.label)
    result = trio.run(main_async, args)
    report(result, args.out, print_tables)
    return result


if __name__ == "__main__":
    main()

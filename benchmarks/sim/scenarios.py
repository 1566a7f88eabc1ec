"""The scenarios: cost vs N, convergence, churn, load balance, and the
calibration of the cost constants against the real-node measurements."""

from __future__ import annotations

import math
import random
import statistics
import tracemalloc

from meshollama.mesh.peertable import UP, PeerTable

from meshollama.mesh.cadence import GROWTH

from .gossip import ann_from_view
from .network import Network
from .node import KEY, Node, Request
from .params import Params

SEEDS = 3  # bootstrap nodes (always keep a table, never crash)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def build(params: Params, n: int, seed: int, *, gateways: int, gateways_serve: bool, full_max: int,
          observers: int, join_window: float) -> tuple[Network, list[Node]]:
    """``n`` nodes started over ``join_window`` seconds, each dialling one of the
    first :data:`SEEDS` nodes. The first ``gateways`` after the seeds route
    requests. Every node keeps a real table up to ``full_max`` nodes; above,
    only the seeds, the gateways and ``observers`` others do (their tables are
    what the measurements read; the cost counters cover every node)."""
    net = Network(params, seed)
    net.liveness_all = n <= params.ping_all_up_to + 1
    full = n <= full_max
    rng = random.Random(seed + 7)
    observer_idx = set(rng.sample(range(SEEDS + gateways, n), max(0, min(observers, n - SEEDS - gateways))))
    nodes = []
    for i in range(n):
        gw = SEEDS <= i < SEEDS + gateways or (n <= SEEDS and i < gateways)
        tabled = full or i < SEEDS + gateways or i in observer_idx
        nodes.append(net.add_node(serves=gateways_serve or not gw, gateway=gw, tabled=tabled))
    for i, node in enumerate(nodes):
        t = 0.0 if i == 0 else join_window * i / max(1, n - 1)
        boot = None if i == 0 else nodes[rng.randrange(min(i, SEEDS))]
        net.sim.at(t, net.start, node, boot)
    return net, nodes


def schedule_requests(net: Network, gateways: list[Node], rate: float, t0: float, t1: float, seed: int) -> None:
    if rate <= 0 or not gateways:
        return
    rng = random.Random(seed + 11)
    t, rid = t0, 0
    while True:
        t += rng.expovariate(rate)
        if t >= t1:
            break
        g = gateways[rng.randrange(len(gateways))]
        net.sim.at(t, _arrive, net, g, Request(rid, t))
        rid += 1


def _arrive(net: Network, g: Node, req: Request) -> None:
    if g.alive:
        net.submit(g, req)


def per_node(net: Network, a: dict, b: dict) -> dict:
    ns = max(1e-9, b["node_s"] - a["node_s"])
    msgs, pings, sync = (b["copies"] - a["copies"]) / ns, (b["pings"] - a["pings"]) / ns, (b["sync"] - a["sync"]) / ns
    verified = (b["verified"] - a["verified"]) / ns
    return {"msgs_per_s": msgs, "bytes_per_s": (b["bytes"] - a["bytes"]) / ns, "pings_per_s": pings,
            "sync_entries_per_s": sync, "sync_verified_per_s": verified,
            "cpu_pct": net.p.cpu_pct(msgs, pings, sync, verified),
            "announcements_per_s": (b["published"] - a["published"]) / (b["t"] - a["t"])}


def ramp(p: Params, peers: int) -> tuple[float, float]:
    """(seconds of silence until a node first announces the refresh for ``peers``,
    that refresh): from the floor it grows by at most GROWTH per announcement."""
    target = p.cadence(peers).refresh
    if p.mode == "legacy":
        return 0.0, target
    said, t = p.cadence(0).refresh, 0.0
    while said < target:
        t += said
        said = min(target, said * GROWTH)
    return t, target


def table_bytes_per_entry(node: Node, now: float) -> tuple[int, float]:
    """tracemalloc: a fresh PeerTable holding what ``node``'s table holds."""
    views = [v for v in node.table.snapshot(now).peers if not v.is_self]
    anns = [ann_from_view(v) for v in views]  # built outside the measurement
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t = PeerTable("sim-probe", interval=2.0, max_peers=1 << 20)
    for a in anns:
        t.apply(a, now)
    snap = t.snapshot(now)
    snap.serving(KEY)
    snap.serving(KEY)  # the index, built on second use
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del snap, t
    return len(anns), used / max(1, len(anns))


# --- 1. cost vs N ---------------------------------------------------------------------


def cost(n: int, mode: str, seed: int, *, load: bool, window: float, full_max: int = 300, observers: int = 48,
         base: Params | None = None, req_per_node: float = 0.02, load_window: float = 120.0) -> dict:
    """Cost per node after convergence. Idle: measured over ``window`` once every
    node has announced the refresh for the mesh's size (the ramp, GROWTH per
    announcement, takes up to ~1,500 s to reach 600 s). Light load: requests from
    60 s before a ``load_window`` measurement. Nothing crashes, so expire() runs
    every 30 s (it changes no counter here)."""
    p = Params.for_mode(base, mode)
    p.expire_every = max(p.expire_every, 30.0)
    join_window = min(20.0, 0.05 * n)
    gw = min(20, max(1, n - SEEDS)) if load else 0
    net, nodes = build(p, n, seed, gateways=gw, gateways_serve=True, full_max=full_max, observers=observers,
                       join_window=join_window)
    grow, target = ramp(p, n - 1)
    warm = join_window + (grow + target + 5.0 if mode == "new" else 10.0)
    w = load_window if load else window
    end = warm + w
    if load:
        schedule_requests(net, nodes[SEEDS:SEEDS + gw] or nodes[:1], req_per_node * n, warm - 60.0, end, seed)
    net.sim.run(warm)
    a = net.counters()
    reasons0 = dict(net.reasons)
    net.sim.run(end)
    b = net.counters()
    out = {"n": n, "mode": mode, "load": load, "window_s": w, "warm_s": round(warm, 1), "refresh_s": target,
           "full_tables": n <= full_max, **per_node(net, a, b)}
    out["reasons_per_s"] = {k: round((v - reasons0.get(k, 0)) / w, 4) for k, v in net.reasons.items()}
    out["heard_per_node_s"] = out["announcements_per_s"]  # every node hears every announcement
    probe = next(x for x in nodes if x.table is not None and x.alive)
    entries, per_entry = table_bytes_per_entry(probe, net.sim.now)
    out["table_entries"] = entries
    out["table_bytes_per_entry"] = round(per_entry)
    out["table_kib"] = round(entries * per_entry / 1024, 1)
    out["max_pings_per_s_node"] = max((x.pings_sent + x.pings_answered) for x in nodes) / end
    out["said_refresh_s"] = sorted({x.said_refresh[-1] for x in nodes if x.said_refresh})
    out["pulls_ok"], out["pulls_failed"] = net.pulls_ok, net.pulls_failed
    out["events"] = net.sim.events
    if load:
        done = [r for r in net.requests if r.done_at is not None]
        out["requests"] = len(net.requests)
        out["requests_done"] = len(done)
        out["route_us"] = round(1e6 * net.route_wall / max(1, net.route_calls), 1)
    return out


# --- 2. convergence ------------------------------------------------------------------


def convergence(n: int, mode: str, seed: int, *, base: Params | None = None) -> dict:
    p = Params.for_mode(base, mode)
    join_window = min(10.0, 0.1 * n)
    net, nodes = build(p, n, seed, gateways=0, gateways_serve=True, full_max=n, observers=0, join_window=join_window)
    t_last = join_window
    state: dict[str, float | None] = {"conv": None}
    check = 0.005

    def probe() -> None:
        if net.sim.now >= t_last and len(net.live) == n and net.converged():
            state["conv"] = net.sim.now
        else:
            net.sim.after(check, probe)

    net.sim.at(t_last, probe)
    limit = t_last + 700.0
    net.sim.run(limit, stop=lambda: state["conv"] is not None)
    out = {"n": n, "mode": mode, "join_window_s": join_window,
           "converge_after_last_join_s": None if state["conv"] is None else round(state["conv"] - t_last, 3),
           "announcements_during_joins": dict(net.reasons), "published": net.published, "unheard": net.unheard,
           "pulls_ok": net.pulls_ok}
    # one more node
    t_new = net.sim.now + 5.0
    net.sim.run(t_new)
    extra = net.add_node(serves=True, tabled=True)
    state["seen"] = None

    def seen() -> None:
        if all(len(obs.table) >= len(net.live) - 1 for obs in net.tabled.values()) and extra.pid in net._pos:
            state["seen"] = net.sim.now
        else:
            net.sim.after(0.001, seen)

    net.sim.at(t_new, net.start, extra, nodes[0])
    net.sim.at(t_new + 0.001, seen)
    r0 = dict(net.reasons)
    net.sim.run(t_new + 60.0, stop=lambda: state["seen"] is not None)
    net.sim.run(net.sim.now + 2.0)  # the forced announcements the join's connections cause
    out["join_visible_everywhere_s"] = None if state["seen"] is None else round(state["seen"] - t_new, 3)
    # announcements that reached the mesh (a FIRST before any connection reaches nobody)
    out["announcements_for_one_join"] = sum(net.reasons[k] - r0.get(k, 0) for k in ("first", "forced"))
    return out


# --- 3. churn ------------------------------------------------------------------------


def churn(n: int, mode: str, seed: int, *, duration: float = 120.0, full_max: int = 100, observers: int = 32,
          base: Params | None = None, rate_per_gateway: float = 1.0) -> dict:
    p = Params.for_mode(base, mode)
    if n > full_max:
        p.expire_every = max(p.expire_every, 5.0)
    gw = min(20, max(2, n // 4))
    join_window = min(20.0, 0.05 * n)
    net, nodes = build(p, n, seed, gateways=gw, gateways_serve=False, full_max=full_max, observers=observers,
                       join_window=join_window)
    gateways = nodes[SEEDS:SEEDS + gw]
    warm = join_window + 20.0
    end = warm + duration
    schedule_requests(net, gateways, rate_per_gateway * gw, join_window + 5.0, end, seed)
    rng = random.Random(seed + 13)
    k = max(2, round(0.03 * n))
    servers = [x for x in nodes[SEEDS + gw:]]
    victims = rng.sample(servers, min(len(servers) - 2, 2 * k))
    crashes, leaves = victims[:k], victims[k:]
    known: dict[str, float] = {}  # crashed peer -> when the last live gateway stopped listing it up

    def watch(pid: str, t0: float) -> None:
        now = net.sim.now
        if all(g.table.get(pid) is None or g.table.get(pid).state not in UP for g in gateways if g.alive):
            known[pid] = now - t0
        elif now - t0 < 600.0:
            net.sim.after(0.01, watch, pid, t0)

    def crash_and_watch(x: Node) -> None:
        net.crash(x)
        watch(x.pid, net.sim.now)

    for x in crashes:
        net.sim.at(rng.uniform(warm, end - 20.0), crash_and_watch, x)
    for x in leaves:
        net.sim.at(rng.uniform(warm, end - 20.0), net.leave, x)
    for _ in range(k):
        newcomer = net.add_node(serves=True, tabled=n <= full_max)
        net.sim.at(rng.uniform(warm, end - 20.0), net.start, newcomer, nodes[rng.randrange(SEEDS)])
    net.sim.run(warm)
    a = net.counters()
    net.sim.run(end + 30.0)  # let the last requests finish
    b = net.counters()
    detect = [net.last_route_to_dead.get(pid, t) - t for pid, t in net.crashed_at.items()]
    reqs = [r for r in net.requests if r.arrived >= warm and r.arrived < end]
    failed = [r for r in reqs if r.failed]
    fail_kinds: dict[str, int] = {}
    for r in failed:
        fail_kinds[",".join(r.kinds) or "none"] = fail_kinds.get(",".join(r.kinds) or "none", 0) + 1
    retried = [r for r in reqs if r.done_at is not None and r.failures > 0]
    lat = [r.done_at - r.arrived for r in reqs if r.done_at is not None]
    return {"n": n, "mode": mode, "gateways": gw, "crashes": len(crashes), "leaves": len(leaves), "joins": k,
            "route_after_crash_max_s": round(max(detect, default=0.0), 3),
            "route_after_crash_p99_s": round(_pct(detect, 0.99), 3),
            "route_after_crash_p50_s": round(_pct(detect, 0.50), 3),
            "gateways_know_max_s": round(max(known.values(), default=0.0), 3),
            "gateways_know_p99_s": round(_pct(list(known.values()), 0.99), 3),
            "gateways_know_p50_s": round(_pct(list(known.values()), 0.50), 3),
            "gateways_never_knew": len(crashes) - len(known),
            "attempts_to_crashed": net.attempts_to_dead, "attempts_to_leavers": net.attempts_to_leaver,
            "requests": len(reqs), "unfinished": sum(1 for r in reqs if r.done_at is None and not r.failed),
            "failed": len(failed), "retried": len(retried), "failed_kinds": fail_kinds,
            "reasons": dict(net.reasons), "hints_said": net.hints_said, "with_hints": net.with_hints,
            "hint_marks": net.hint_marks, "refutes": net.refutes,
            "pulls_ok": net.pulls_ok, "pulls_failed": net.pulls_failed,
            "latency_mean_s": round(statistics.fmean(lat), 3) if lat else None,
            "route_us": round(1e6 * net.route_wall / max(1, net.route_calls), 1),
            "full_tables": n <= full_max, **per_node(net, a, b)}


# --- 4. load balance ------------------------------------------------------------------


def balance(mode: str, seed: int, *, gateways: int = 20, speeds: tuple[float, ...] = (1, 2, 3, 4, 5),
            capacity: int = 2, utilisation: float = 0.7, duration: float = 600.0, warm: float = 20.0,
            base: Params | None = None) -> dict:
    p = Params.for_mode(base, mode)
    res = {}
    for oracle in (False, True):
        net = Network(p, seed)
        net.oracle = oracle
        rng = random.Random(seed + 7)
        gws = [net.add_node(serves=False, gateway=True) for _ in range(gateways)]
        servers = [net.add_node(serves=True, capacity=capacity, speed=s) for s in speeds]
        allnodes = servers + gws
        for i, node in enumerate(allnodes):
            net.sim.at(0.1 * i, net.start, node, None if i == 0 else allnodes[rng.randrange(min(i, SEEDS))])
        rate = utilisation * sum(capacity / net.mean_service(s) for s in servers)
        schedule_requests(net, gws, rate, warm / 2, warm + duration, seed)
        net.sim.run(warm + duration + 120.0)
        reqs = [r for r in net.requests if r.arrived >= warm]
        done = [r for r in reqs if r.done_at is not None]
        count = {s.pid: 0 for s in servers}
        for r in done:
            count[r.served_by] += 1
        lat = [r.done_at - r.arrived for r in done]
        res["oracle" if oracle else "mesh"] = {
            "share": [round(count[s.pid] / max(1, len(done)), 4) for s in servers],
            "latency_mean_s": round(statistics.fmean(lat), 3), "latency_p95_s": round(_pct(lat, 0.95), 3),
            "requests": len(reqs), "done": len(done), "rate_per_s": round(rate, 3),
            "route_us": round(1e6 * net.route_wall / max(1, net.route_calls), 1) if not oracle else None,
            "announcements_per_s": round(net.published / net.sim.now, 3)}
    diff = [abs(a - b) for a, b in zip(res["mesh"]["share"], res["oracle"]["share"])]
    prop = [s / sum(speeds) for s in speeds]  # each peer's share of the mesh's throughput
    diff_prop = [abs(a - b) for a, b in zip(res["mesh"]["share"], prop)]
    return {"mode": mode, "speeds": list(speeds), "capacity": capacity, "utilisation": utilisation,
            "gateways": gateways, "max_share_diff_pp": round(100 * max(diff), 1),
            "proportional_share": [round(x, 4) for x in prop],
            "max_diff_vs_proportional_pp": round(100 * max(diff_prop), 1), **res}


# --- 5. calibration -------------------------------------------------------------------

# Real nodes on this 2-core box (bench_mesh.py, docs/benchmarks.md), % of one core per node:
MEASURED = {
    "lone": 0.35,  # a lone idle node
    "refresh3": 6.0,  # 10 nodes, refresh 3 s (no per-peer growth), idle pings on (every 5 s)
    "refresh30_nopings": 0.66,  # 10 nodes, refresh 30 s (no per-peer growth), idle pings off
    "pings_on_minus_off": 0.8,  # 10 nodes, 2 s heartbeats: idle pings every 5 s 3.6 %, off 2.8 %
}


def calibrate(seed: int, *, base: Params | None = None, window: float = 300.0) -> dict:
    """Fit ``ping_ms`` and ``rpc_ms`` to :data:`MEASURED`, all at N=10 with every
    node connected to every other (the real receive loop dials every announced
    peer; ``dial_announced``): ``ping_ms`` from the pings-on-minus-off difference,
    then ``rpc_ms`` by least squares on the relative errors of the two refresh
    runs (base fixed at the lone node's 0.35 %)."""
    b = Params.for_mode(base, "new")
    b.dial_announced = True
    n = 10

    def run(mode: str, **kw) -> dict:
        p = Params.for_mode(b, mode)
        for k, v in kw.items():
            setattr(p, k, v)
        return cost(n, mode, seed, load=False, window=window, base=p)

    a = run("new", refresh_interval=3.0, refresh_per_peer=0.0)
    bb = run("new", refresh_interval=30.0, refresh_per_peer=0.0, ping_all_up_to=0)
    on = run("legacy")
    off = run("legacy", ping_all_up_to=0)
    d_pings = on["pings_per_s"] - off["pings_per_s"]
    ping_ms = 10.0 * MEASURED["pings_on_minus_off"] / d_pings if d_pings > 0 else b.ping_ms
    base_pct = MEASURED["lone"]
    pts = [(a, MEASURED["refresh3"]), (bb, MEASURED["refresh30_nopings"])]
    num = den = 0.0
    for r, m in pts:
        c = base_pct + (r["pings_per_s"] * ping_ms + r["sync_entries_per_s"] * b.sync_entry_ms
                        + r["sync_verified_per_s"] * b.sync_verify_ms) / 10.0
        k = r["msgs_per_s"] / 10.0
        num += k * (m - c) / m**2
        den += k * k / m**2
    rpc_ms = num / den
    fitted = Params.for_mode(b, "new")
    fitted.rpc_ms, fitted.ping_ms = round(rpc_ms, 2), round(ping_ms, 2)
    rows = []
    for name, r, m in (("refresh 3 s, pings on", a, MEASURED["refresh3"]),
                       ("refresh 30 s, idle pings off", bb, MEASURED["refresh30_nopings"]),
                       ("legacy 2 s, idle pings on", on, 3.6), ("legacy 2 s, idle pings off", off, 2.8)):
        model = fitted.cpu_pct(r["msgs_per_s"], r["pings_per_s"], r["sync_entries_per_s"], r["sync_verified_per_s"])
        rows.append({"run": name, "measured_pct": m, "model_pct": round(model, 2),
                     "heard_per_node_s": round(r["announcements_per_s"], 3), "msgs_per_s": round(r["msgs_per_s"], 2),
                     "pings_per_s": round(r["pings_per_s"], 2), "error_pct": round(100 * (model - m) / m, 1)})
    return {"rpc_ms": round(rpc_ms, 3), "ping_ms": round(ping_ms, 3), "ms_per_announcement_heard":
            round(rpc_ms * 2 * min(b.degree, n - 1), 2), "rows": rows, "measured": MEASURED}

#!/usr/bin/env python3
"""Mesh simulation: the real cadence / announce / peer-table / down-hint /
liveness / routing code over a modelled network with a virtual clock, 10 to
1,000 nodes (10,000 idle with ``--big``), with churn and request load. See
``benchmarks/sim/`` and the "Mesh simulation" section of ``docs/benchmarks.md``.

    .venv/bin/python benchmarks/sim_mesh.py --big      # everything, plus N=10,000 (idle cost only)
    .venv/bin/python benchmarks/sim_mesh.py            # without N=10,000
    .venv/bin/python benchmarks/sim_mesh.py --quick    # the test-suite sizes, seconds
    .venv/bin/python benchmarks/sim_mesh.py --scenarios calibrate   # fit rpc_ms / ping_ms to the real nodes

Writes ``benchmarks/results/sim_mesh-<UTC>.json`` and, with matplotlib,
``docs/img/sim_mesh_cost.png`` and ``docs/img/sim_mesh_balance.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "src"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from benchmarks.sim import scenarios
from benchmarks.sim.params import Params


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and short runs (what the tests use)")
    ap.add_argument("--big", action="store_true", help="add N=10,000 to the idle cost curve")
    ap.add_argument("--scenarios", default="calibrate,cost,convergence,churn,balance")
    ap.add_argument("--sizes", type=_ints, default=None, help="cost/churn sizes (default 10,30,100,300,1000)")
    ap.add_argument("--conv-sizes", type=_ints, default=None, help="convergence sizes (default 10,30,100,300,1000)")
    ap.add_argument("--modes", default="legacy,new")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--window", type=float, default=600.0,
                    help="idle cost window, seconds, after the refresh ramp (legacy: 30 s)")
    ap.add_argument("--load-window", type=float, default=120.0, help="light-load cost window, seconds")
    ap.add_argument("--churn-duration", type=float, default=120.0)
    ap.add_argument("--balance-duration", type=float, default=600.0)
    ap.add_argument("--full-max", type=int, default=300, help="above this N only sampled observers keep tables")
    ap.add_argument("--observers", type=int, default=48)
    ap.add_argument("--json", type=Path, default=None, help="result file (default benchmarks/results/sim_mesh-<UTC>.json)")
    ap.add_argument("--img-dir", type=Path, default=ROOT / "docs" / "img")
    ap.add_argument("--no-plots", action="store_true")
    model = ap.add_argument_group("model constants (Params)")
    for f in dataclasses.fields(Params):
        if f.name == "mode":
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            model.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes", "on"), default=f.default,
                               metavar="BOOL")
        else:
            model.add_argument(flag, type=type(f.default), default=f.default)
    return ap.parse_args(argv)


def base_params(args: argparse.Namespace) -> Params:
    return Params(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Params) if f.name != "mode"})


def _table(title: str, rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    print(f"\n== {title}")
    print(" | ".join(h for h, _, _ in cols))
    for r in rows:
        cells = []
        for _, key, fmt in cols:
            v = r
            for k in key.split("."):
                v = v.get(k) if isinstance(v, dict) else None
            cells.append("-" if v is None else format(v, fmt) if fmt else str(v))
        print(" | ".join(cells))


def run(args: argparse.Namespace) -> dict:
    base = base_params(args)
    modes = [m for m in args.modes.split(",") if m]
    todo = set(args.scenarios.split(","))
    sizes = args.sizes or ([10, 30] if args.quick else [10, 30, 100, 300, 1000])
    conv_sizes = args.conv_sizes or ([10, 30] if args.quick else [10, 30, 100, 300, 1000])
    window = args.window
    out: dict = {"meta": {"command": " ".join(["benchmarks/sim_mesh.py", *sys.argv[1:]]), "seed": args.seed,
                          "params": dataclasses.asdict(base), "quick": args.quick,
                          "started": datetime.now(UTC).isoformat(timespec="seconds")}}
    t0 = time.perf_counter()
    if "calibrate" in todo:
        t = time.perf_counter()
        cal = scenarios.calibrate(args.seed, base=base)
        cal["wall_s"] = round(time.perf_counter() - t, 2)
        out["calibrate"] = cal
        print(f"  calibrate: {cal['wall_s']} s", file=sys.stderr, flush=True)
        print(f"\n== calibration (N=10, every node connected to every other): fitted rpc_ms {cal['rpc_ms']}"
              f" ({cal['ms_per_announcement_heard']} ms per announcement heard), ping_ms {cal['ping_ms']};"
              f" the run uses rpc_ms {base.rpc_ms}, ping_ms {base.ping_ms}")
        _table("model with the fitted constants vs measured", cal["rows"], [
            ("run", "run", ""), ("measured %", "measured_pct", ""), ("model %", "model_pct", ""),
            ("error %", "error_pct", ""), ("heard/s", "heard_per_node_s", ""), ("copies/s", "msgs_per_s", ""),
            ("pings/s", "pings_per_s", "")])
    if "cost" in todo:
        rows = []
        for load in (False, True):
            for mode in modes:
                for n in sizes + ([10_000] if args.big and not load else []):
                    w = window if mode == "new" else 30.0
                    obs = args.observers if n <= 1000 else 16
                    if n >= 10_000 and mode == "legacy":
                        w = 20.0
                    rows.append(_timed(f"cost n={n} {mode} load={load}", lambda: scenarios.cost(
                        n, mode, args.seed, load=load, window=w, full_max=args.full_max, observers=obs, base=base,
                        load_window=args.load_window if mode == "new" else 30.0)))
        out["cost"] = rows
        _table("cost per node per second (after convergence)", rows, [
            ("N", "n", ""), ("mode", "mode", ""), ("load", "load", ""), ("refresh s", "refresh_s", ""),
            ("heard/s", "announcements_per_s", ".3f"), ("msgs/s", "msgs_per_s", ".2f"),
            ("B/s", "bytes_per_s", ".0f"), ("pings/s", "pings_per_s", ".2f"), ("sync/s", "sync_entries_per_s", ".2f"),
            ("CPU %", "cpu_pct", ".2f"), ("table KiB", "table_kib", ""),
            ("B/entry", "table_bytes_per_entry", ""), ("route us", "route_us", "")])
    if "convergence" in todo:
        rows = []
        for mode in modes:
            for n in conv_sizes:
                rows.append(_timed(f"convergence n={n} {mode}",
                                   lambda: scenarios.convergence(n, mode, args.seed, base=base)))
        out["convergence"] = rows
        _table("convergence", rows, [
            ("N", "n", ""), ("mode", "mode", ""), ("join window s", "join_window_s", ""),
            ("converged after last join s", "converge_after_last_join_s", ""),
            ("one more node visible everywhere s", "join_visible_everywhere_s", ""),
            ("announcements per join", "announcements_for_one_join", "")])
    if "churn" in todo:
        rows = []
        dur = 60.0 if args.quick else args.churn_duration
        for mode in modes:
            for n in sizes:
                rows.append(_timed(f"churn n={n} {mode}", lambda: scenarios.churn(
                    n, mode, args.seed, duration=dur, full_max=min(100, args.full_max),
                    observers=min(32, args.observers), base=base)))
        out["churn"] = rows
        _table("churn (crashes, leaves, joins under request load)", rows, [
            ("N", "n", ""), ("mode", "mode", ""), ("crash/leave/join", "crashes", ""),
            ("route->crashed max s", "route_after_crash_max_s", ""), ("p99 s", "route_after_crash_p99_s", ""),
            ("p50 s", "route_after_crash_p50_s", ""), ("gateways know max s", "gateways_know_max_s", ""),
            ("p99 s", "gateways_know_p99_s", ""), ("p50 s", "gateways_know_p50_s", ""),
            ("tries on crashed", "attempts_to_crashed", ""),
            ("hints said", "hints_said", ""), ("ann. with hints", "with_hints", ""), ("marked by hint", "hint_marks", ""),
            ("requests", "requests", ""), ("failed", "failed", ""), ("retried", "retried", ""),
            ("msgs/s/node", "msgs_per_s", ".1f"), ("CPU %", "cpu_pct", ".1f"), ("route us", "route_us", "")])
    if "balance" in todo:
        rows = []
        for mode in modes:
            t = time.perf_counter()
            r = scenarios.balance(mode, args.seed, duration=200.0 if args.quick else args.balance_duration, base=base)
            r["wall_s"] = round(time.perf_counter() - t, 2)
            rows.append(r)
        out["balance"] = rows
        _table("load balance: share of requests per peer (speeds 1..5), mesh vs oracle", rows, [
            ("mode", "mode", ""), ("mesh share", "mesh.share", ""), ("oracle share", "oracle.share", ""),
            ("max diff pp", "max_share_diff_pp", ""), ("vs proportional pp", "max_diff_vs_proportional_pp", ""),
            ("mesh latency s", "mesh.latency_mean_s", ""),
            ("oracle latency s", "oracle.latency_mean_s", "")])
    out["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def _timed(label: str, run) -> dict:
    """One scenario run, with its wall time in ``wall_s`` and a progress line on stderr."""
    t = time.perf_counter()
    r = run()
    r["wall_s"] = round(time.perf_counter() - t, 2)
    print(f"  {label}: {r['wall_s']} s", file=sys.stderr, flush=True)
    return r


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = run(args)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.json or ROOT / "benchmarks" / "results" / f"sim_mesh-{stamp}{'-quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"\nwrote {path} (simulation wall time {out['meta']['wall_s']} s)")
    if not args.no_plots:
        try:
            from benchmarks.sim import plots
        except ImportError:
            return 0
        try:
            if "cost" in out:
                plots.cost_plot(out["cost"], args.img_dir / "sim_mesh_cost.png")
            if "balance" in out:
                plots.balance_plot(out["balance"], args.img_dir / "sim_mesh_balance.png")
            print(f"wrote plots under {args.img_dir}")
        except ImportError:
            print("matplotlib missing: no plots (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

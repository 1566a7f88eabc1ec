#!/usr/bin/env python3
"""Run every meshollama benchmark and keep the results in benchmarks/results/.

  bench_gateway.py    direct vs local vs remote (libp2p) path, stand-in Ollama
  bench_p2p.py        the libp2p leg alone, in one process: fresh stream vs keep-alive
  bench_mesh.py       convergence, idle CPU/RSS, announcements heard, join latency
  bench_embedded.py   llama-cpp-python direct vs through node L / through G -> L (only if llama_cpp imports)
  bench_holders.py    a model found through DHT provider records vs one the announcements list

Each benchmark runs as its own process (so one crashing does not lose the
others) and writes ``results/<name>-<UTC timestamp>.json``; a combined
``results/all-<timestamp>.json`` and ``results/latest.json`` list them all.

    .venv/bin/python benchmarks/run_all.py                 # everything
    .venv/bin/python benchmarks/run_all.py --only gateway  # one of them
    .venv/bin/python benchmarks/run_all.py --mesh-sizes 5,10 --degree-sweep 2/1/3,3/2/4
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def run(name: str, argv: list[str], out: Path, timeout: float) -> dict:
    cmd = [sys.executable, str(HERE / argv[0]), *argv[1:], "--out", str(out)]
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    entry = {"name": name, "command": cmd, "rc": rc, "wall_s": round(time.monotonic() - t0, 1),
             "out": str(out.relative_to(ROOT)) if out.exists() else None}
    if out.exists():
        entry["result"] = json.loads(out.read_text())
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["gateway", "p2p", "mesh", "embedded", "holders"], action="append",
                   help="run only these (repeatable)")
    p.add_argument("--mesh-sizes", default="1,5,10,25")
    p.add_argument("--degree-sweep", default="", help="gossipsub degrees to compare at N=10, e.g. 2/1/3,3/2/4")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    wanted = set(args.only or ["gateway", "p2p", "mesh", "embedded", "holders"])
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    runs = []
    if "gateway" in wanted:
        runs.append(run("gateway", ["bench_gateway.py"], args.results / f"gateway-{stamp}.json", 600))
    if "p2p" in wanted:
        runs.append(run("p2p", ["bench_p2p.py"], args.results / f"p2p-{stamp}.json", 600))
    if "mesh" in wanted:
        mesh_argv = ["bench_mesh.py", "--sizes", args.mesh_sizes]
        if args.degree_sweep:
            mesh_argv += ["--degree-sweep", args.degree_sweep]
        runs.append(run("mesh", mesh_argv, args.results / f"mesh-{stamp}.json", 1800))
    if "holders" in wanted:
        runs.append(run("holders", ["bench_holders.py"], args.results / f"holders-{stamp}.json", 600))
    if "embedded" in wanted:
        if importlib.util.find_spec("llama_cpp") is None:
            print("\n=== embedded: skipped (llama_cpp not importable)")
            runs.append({"name": "embedded", "skipped": "llama_cpp not importable"})
        else:
            runs.append(run("embedded", ["bench_embedded.py"], args.results / f"embedded-{stamp}.json", 1800))

    combined = {"stamp": stamp, "machine": {"platform": platform.platform(), "python": platform.python_version(),
                                            "cpus": os.cpu_count()}, "runs": runs}
    text = json.dumps(combined, indent=2)
    (args.results / f"all-{stamp}.json").write_text(text)
    (args.results / "latest.json").write_text(text)
    print(f"\nwrote {args.results / f'all-{stamp}.json'}")
    for r in runs:
        print(f"  {r['name']:<9} rc={r.get('rc', '-')} {r.get('wall_s', '')} s {r.get('out') or r.get('skipped', '')}")
    return 0 if all(r.get("rc", 0) == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

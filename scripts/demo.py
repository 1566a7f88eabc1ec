"""A mesh of meshollama nodes on loopback, to watch routing; Ctrl-C stops them all.

Node 1's API listens on 127.0.0.1:11434 and the others join through it (their
APIs on 11444, 11454, ...). Every node runs the embedded backend with the same
small model, so requests for ``smollm2:135m`` are spread over them; the
``X-Meshollama-Peer`` header says which node answered, and the live table
below shows each node's load as the mesh sees it.

    curl -si http://127.0.0.1:11434/api/generate -d '{"model":"smollm2:135m","prompt":"hi","stream":false}' | grep -i peer
    .venv/bin/meshollama peers --api http://127.0.0.1:11434

Options: ``--nodes N`` (default 3), ``--base-port P`` (API of node i is
P + 10*i; 0 lets the OS choose), ``--data DIR`` (default .demo), ``--no-watch``
(no live table).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 120.0


class Stop(Exception):
    """SIGINT or SIGTERM: stop every node and leave."""


def _stop(signum, frame) -> None:
    raise Stop()


def start(i: int, args: argparse.Namespace, bootstrap: str | None) -> subprocess.Popen:
    data = args.data / f"node{i + 1}"
    data.mkdir(parents=True, exist_ok=True)
    (data / "node.json").unlink(missing_ok=True)
    port = args.base_port + 10 * i if args.base_port else 0
    cmd = [sys.executable, "-m", "meshollama", "start", "--data-dir", str(data),
           "--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--api-listen", f"127.0.0.1:{port}",
           "--no-mdns", "--backend", "embedded", "--heartbeat-interval", "1"]
    if bootstrap:
        cmd += ["--bootstrap", bootstrap]
    log = open(args.data / f"node{i + 1}.log", "w")
    # Own process group: Ctrl-C in the terminal reaches only this script, which
    # then stops the nodes in order (each announces that it leaves).
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"node {i + 1} exited; see {log.name}")
        try:
            info = json.loads((data / "node.json").read_text())
            if info.get("pid") == proc.pid:
                proc.info = info  # type: ignore[attr-defined]
                print(f"node {i + 1}: {info['api_url']}  {info['peer_id']}", flush=True)
                return proc
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"node {i + 1} did not start in {READY_TIMEOUT:.0f} s; see {log.name}")


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback only
        return json.loads(r.read())


def wait_for_mesh(api: str, n: int) -> None:
    """Until node 1 sees all ``n`` nodes alive and serving a model."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            peers = get_json(api + "/api/mesh/peers")
            serving = [p for p in peers if p.get("state") == "alive" and p.get("models")]
            if len(serving) >= n:
                return
        except (OSError, ValueError, KeyError, TypeError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"the mesh did not form within {READY_TIMEOUT:.0f} s (asked {api})")


def load_line(api: str, names: dict[str, str]) -> str:
    try:
        peers = get_json(api + "/api/mesh/peers")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"(status unavailable: {exc})"
    cells = []
    for p in sorted(peers, key=lambda p: names.get(p["peer_id"], p["peer_id"])):
        load = p.get("load") or {}
        name = names.get(p["peer_id"], p["peer_id"][-6:])
        cells.append(f"{name} {p.get('state', '?')} {load.get('in_flight', 0)}/{load.get('capacity', 0)}"
                     + (f" +{load['queued']} queued" if load.get("queued") else ""))
    return "load: " + " | ".join(cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--base-port", type=int, default=11434)
    parser.add_argument("--data", type=Path, default=ROOT / ".demo")
    parser.add_argument("--no-watch", action="store_true")
    args = parser.parse_args(argv)
    args.data.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    procs: list[subprocess.Popen] = []
    try:
        procs.append(start(0, args, None))
        first = procs[0].info  # type: ignore[attr-defined]
        for i in range(1, args.nodes):
            procs.append(start(i, args, first["p2p_addrs"][0]))
        api = first["api_url"]
        wait_for_mesh(api, args.nodes)
        names = {p.info["peer_id"]: f"node{i + 1}" for i, p in enumerate(procs)}  # type: ignore[attr-defined]
        print(f"mesh ready: {args.nodes} nodes serving smollm2:135m; ask any of them, e.g.", flush=True)
        print(f"  curl -si {api}/api/generate -d '{{\"model\":\"smollm2:135m\",\"prompt\":\"hi\",\"stream\":false}}'"
              " | grep -i peer", flush=True)
        print(f"  .venv/bin/meshollama peers --api {api}", flush=True)
        print(f"logs in {args.data}; Ctrl-C to stop", flush=True)
        last = ""
        while all(p.poll() is None for p in procs):
            if not args.no_watch:
                line = load_line(api, names)
                if line != last:
                    print(line, flush=True)
                    last = line
            time.sleep(1.0)
        dead = [i + 1 for i, p in enumerate(procs) if p.poll() is not None]
        print(f"node(s) {dead} exited on their own; see {args.data}", flush=True)
        return 1
    except Stop:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        print("demo stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())

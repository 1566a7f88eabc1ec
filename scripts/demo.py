"""Three meshollama nodes on loopback, to watch routing; Ctrl-C stops them all.

Node 1 listens on 127.0.0.1:11434 and the others join through it. Every node
runs the embedded backend with the same small model, so requests for
``smollm2:135m`` are spread over the three; the ``X-Meshollama-Peer`` header
says which one answered:

    curl -si http://127.0.0.1:11434/api/generate -d '{"model":"smollm2:135m","prompt":"hi","stream":false}' | grep -i peer
    .venv/bin/meshollama peers --api http://127.0.0.1:11434
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
API_PORTS = (11434, 11444, 11454)


def start(i: int, bootstrap: str | None) -> subprocess.Popen:
    data = DEMO / f"node{i + 1}"
    data.mkdir(parents=True, exist_ok=True)
    (data / "node.json").unlink(missing_ok=True)
    args = [sys.executable, "-m", "meshollama", "start", "--data-dir", str(data),
            "--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--api-listen", f"127.0.0.1:{API_PORTS[i]}",
            "--no-mdns", "--backend", "embedded", "--heartbeat-interval", "1"]
    if bootstrap:
        args += ["--bootstrap", bootstrap]
    log = open(DEMO / f"node{i + 1}.log", "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"node {i + 1} exited; see {log.name}")
        try:
            info = json.loads((data / "node.json").read_text())
            if info.get("pid") == proc.pid:
                print(f"node {i + 1}: {info['api_url']}  {info['peer_id']}")
                proc.info = info  # type: ignore[attr-defined]
                return proc
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    sys.exit(f"node {i + 1} did not start in 60 s; see {log.name}")


def main() -> None:
    procs: list[subprocess.Popen] = []
    try:
        first = start(0, None)
        procs.append(first)
        for i in (1, 2):
            procs.append(start(i, first.info["p2p_addrs"][0]))  # type: ignore[attr-defined]
        print(__doc__.split("\n\n", 2)[2])
        print("logs in .demo/; Ctrl-C to stop")
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        print("demo stopped")


if __name__ == "__main__":
    main()

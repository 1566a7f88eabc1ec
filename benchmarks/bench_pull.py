#!/usr/bin/env python3
"""Models over the mesh: one big model blob pulled from peers, against curl over the same path.

A stand-in Ollama store with one model (``write_model``, seeded bytes: a
``--size-mib`` layer, default 1 GiB) on holder h0; holders h1 and h2 get the
same files as hard links. Every node is a real ``meshollama start --backend
ollama`` in front of a stand-in Ollama (``tests.fakes.fake_ollama
--models-dir``, its own process) over its models directory. The puller P
starts with an empty store; ``POST /api/pull`` on P's gateway fetches the
manifest and blobs over ``/meshollama/blob/1`` (8 MiB pieces, 2 in flight per
holder, each piece sha256-checked, the whole blob verified, then committed).

Paths:

  loopback  every process on 127.0.0.1 in this namespace
  netns     two namespace hosts on one bridge (``tests/netns.py``, MTU 1500):
            A 198.18.9.1 (P, its stand-in, the pull client, curl) and
            B 198.18.9.2 (the holders, their stand-ins, the HTTP server)

Per path: ``--repeat`` times curl (``curl -o FILE`` from ``python -m
http.server`` serving h0's blob directory, in the holders' place, curl in
the puller's place), and a pull from 1 holder; then h1 and h2 start and
``--repeat`` pulls from 3 holders. Each pull starts from an empty puller
store (its models directory emptied, ``.meshollama/partial`` included).
Times are taken by a client in P's place from the POST to ``{"status":
"success"}``, with the progress lines in between: piece lists asked
(first progress line of the big layer), first 8 MiB piece verified, every
byte in (``completed == total``), verified and committed (``verifying sha256
digest``: after the fsync and the whole-file sha256). CPU is
``psutil.Process.cpu_times()`` (user + system, all threads) of the node
processes before and after; curl's from ``getrusage(RUSAGE_CHILDREN)``.
MB = 10^6 bytes (the 1 GbE target is 117 MB/s of TCP payload).

    .venv/bin/python benchmarks/bench_pull.py --out benchmarks/results/pull-<UTC>.json   # ~2 min, root for netns
    .venv/bin/python benchmarks/bench_pull.py --quick                                     # 128 MiB, 1 run each
    .venv/bin/python benchmarks/bench_pull.py --paths loopback --sources 1 --profile /tmp/pull-prof   # + py-spy
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import report

MIB = 1024 * 1024
GIB = 1024 * MIB
MB = 1e6
LINE_RATE_MBPS = 117.0  # 1 GbE, TCP payload
SUBNET = "198.18.9"
THIS = str(Path(__file__).resolve())


# --------------------------------------------------------------------------- clients (run in P's place)

def client_wait(a: argparse.Namespace) -> dict:
    """Until P's gateway lists ``holders`` alive peers (not itself) holding the model."""
    import httpx

    t0 = time.perf_counter()
    seen = -1
    with httpx.Client(timeout=5.0) as client:
        while time.perf_counter() - t0 < a.timeout:
            try:
                data = client.get(a.api + "/api/mesh/peers").json()
                listed = data.get("peers", data) if isinstance(data, dict) else data
                seen = sum(1 for p in listed if p.get("state") == "alive" and not p.get("is_self")
                           and any(m.get("name") == a.model for m in p.get("models", [])))
                if seen >= a.holders:
                    return {"ok": True, "seconds": round(time.perf_counter() - t0, 3), "holders": seen}
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
    return {"ok": False, "seconds": round(time.perf_counter() - t0, 3), "holders": seen}


def client_pull(a: argparse.Namespace) -> dict:
    """One streamed ``POST /api/pull``, timed line by line."""
    import httpx

    res: dict = {"events": 0, "progress": []}
    t0 = time.perf_counter()

    def at() -> float:
        return round(time.perf_counter() - t0, 4)

    try:
        with httpx.Client(timeout=httpx.Timeout(30.0, read=a.timeout)) as client, \
                client.stream("POST", a.api + "/api/pull", json={"model": a.model}) as r:
            res["http_status"] = r.status_code
            for line in r.iter_lines():
                if not line.strip():
                    continue
                t = at()
                ev = json.loads(line)
                res["events"] += 1
                res.setdefault("first_line_s", t)
                status = ev.get("status", "")
                if "error" in ev:
                    res["error"] = ev["error"]
                if status == "pulling manifest":
                    res["manifest_s"] = t
                if ev.get("digest") == a.digest:  # the big layer
                    done, total = ev.get("completed", 0), ev.get("total", 0)
                    res.setdefault("lists_s", t)  # its first line comes once the piece lists are in
                    if done > 0:
                        res.setdefault("first_piece_s", t)
                    if total and done >= total:
                        res.setdefault("all_bytes_s", t)
                    res["progress"].append([t, round(done / MIB, 1)])
                    if "meshollama" in ev:
                        res["from"] = ev["meshollama"].get("from", {})
                if status == "verifying sha256 digest":
                    res["verified_s"] = t
                if status == "success":
                    res["success_s"] = t
    except httpx.HTTPError as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
    res["client_wall_s"] = at()
    return res


# --------------------------------------------------------------------------- places and processes

@dataclass
class Place:
    """Where a process runs: this namespace (``ns`` None) or a namespace host."""

    ns: str | None
    ip: str

    def cmd(self, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *args] if self.ns else list(args)


@dataclass
class Node:
    name: str
    proc: trio.Process
    data_dir: Path
    models_dir: Path
    log: Path
    info: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    @property
    def api(self) -> str:
        return self.info["api_url"]

    def addr(self) -> str:
        addr = self.info["p2p_addrs"][0]
        return addr if "/p2p/" in addr else f"{addr}/p2p/{self.peer_id}"

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


class Procs:
    """Every process this run started; :meth:`close` kills what is left."""

    def __init__(self) -> None:
        self.procs: list[trio.Process] = []

    async def spawn(self, place: Place, args: list[str], log: Path, env: dict | None = None) -> trio.Process:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("MESHOLLAMA_CONFIG", None)
        out = open(log, "ab")  # noqa: SIM115, ASYNC230 (a log file, opened once)
        try:
            proc = await trio.lowlevel.open_process(place.cmd(args), stdout=out, stderr=subprocess.STDOUT,
                                                    env=full_env, cwd=str(ROOT))
        finally:
            out.close()
        self.procs.append(proc)
        return proc

    async def close(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
        with trio.move_on_after(10) as scope:
            scope.shield = True
            for proc in self.procs:
                await proc.wait()


async def run_checked(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    with trio.fail_after(timeout):
        return await trio.run_process(cmd, cwd=str(ROOT), capture_stdout=True, capture_stderr=True, check=False)


async def start_fake(procs: Procs, place: Place, tmp: Path, name: str, models_dir: Path) -> int:
    """A stand-in Ollama on 127.0.0.1 in ``place`` over ``models_dir``; its port."""
    port_file = tmp / f"{name}-fake.port"
    port_file.unlink(missing_ok=True)
    args = [sys.executable, "-m", "tests.fakes.fake_ollama", "--port", "0", "--models", "", "--name", name,
            "--models-dir", str(models_dir), "--port-file", str(port_file)]
    proc = await procs.spawn(place, args, tmp / f"{name}-fake.log")
    with trio.fail_after(30):
        while not port_file.exists() or not port_file.read_text().strip():
            if proc.poll() is not None:
                raise RuntimeError(f"stand-in {name} exited:\n{(tmp / f'{name}-fake.log').read_text()[-2000:]}")
            await trio.sleep(0.05)
    return int(port_file.read_text())


async def start_node(procs: Procs, place: Place, tmp: Path, name: str, models_dir: Path, p2p_port: int,
                     bootstrap: Node | None = None) -> Node:
    from tests.integration.modelstores import node_env

    fake_port = await start_fake(procs, place, tmp, name, models_dir)
    data_dir = tmp / name
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "node.json").unlink(missing_ok=True)
    args = [sys.executable, "-m", "meshollama", "start", "--data-dir", str(data_dir),
            "--p2p-listen", f"/ip4/{place.ip}/tcp/{p2p_port}", "--api-listen", "127.0.0.1:0", "--no-mdns",
            "--heartbeat-interval", "1", "--log-level", "info", "--backend", "ollama",
            "--ollama-url", f"http://127.0.0.1:{fake_port}"]
    if bootstrap is not None:
        args += ["--bootstrap", bootstrap.addr()]
    env = node_env(models_dir, MESHOLLAMA_MODELS_MIN_FREE_BYTES="0", MESHOLLAMA_OLLAMA_REFRESH_INTERVAL="1")
    log = tmp / f"{name}.log"
    proc = await procs.spawn(place, args, log, env)
    node = Node(name, proc, data_dir, models_dir, log)
    with trio.fail_after(60):
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"node {name} exited with {proc.returncode}:\n{node.tail()}")
            try:
                info = json.loads((data_dir / "node.json").read_text())
                if info.get("pid") == proc.pid:
                    node.info = info
                    return node
            except (OSError, ValueError):
                pass
            await trio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the model on disk

def write_models(tmp: Path, size: int, model: str) -> dict:
    """h0's store (seeded bytes), h1 and h2 as hard links, P's empty; returns the layer."""
    from tests.integration.modelstores import write_model

    t0 = time.perf_counter()
    stored = write_model(tmp / "h0-models", model, size, seed=b"x")
    layer = {"digest": stored.model_layer.digest, "size": stored.model_layer.size}
    del stored  # the bytes
    for name in ("h1", "h2"):
        src, dst = tmp / "h0-models", tmp / f"{name}-models"
        for path in src.rglob("*"):
            if path.is_file() and ".meshollama" not in path.parts:
                target = dst / path.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, target)
    (tmp / "p-models").mkdir(exist_ok=True)
    layer["write_s"] = round(time.perf_counter() - t0, 2)
    return layer


def empty_store(root: Path) -> None:
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# --------------------------------------------------------------------------- measuring

def cpu_s(pids: dict[str, int]) -> dict[str, float | None]:
    import psutil

    out: dict[str, float | None] = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            out[name] = None
    return out


def main_thread_s(pid: int) -> float | None:
    """CPU seconds of a process's main thread (trio's event loop in a node)."""
    import psutil

    try:
        for t in psutil.Process(pid).threads():
            if t.id == pid:
                return t.user_time + t.system_time
    except psutil.Error:
        pass
    return None


async def sample_main_threads(pids: dict[str, int], into: dict[str, list[float]], step: float = 0.5) -> None:
    """Every ``step`` s, the share of one core each main thread used since the last sample."""
    last, t_last = {k: main_thread_s(v) for k, v in pids.items()}, time.perf_counter()
    while True:
        await trio.sleep(step)
        now, t = {k: main_thread_s(v) for k, v in pids.items()}, time.perf_counter()
        for k, v in now.items():
            if v is not None and last[k] is not None:
                into.setdefault(k, []).append(round((v - last[k]) / (t - t_last), 3))
        last, t_last = now, t


def busy_share(samples: list[float]) -> float | None:
    """Median share of a core over the samples where the thread did anything (the transfer)."""
    active = [x for x in samples if x > 0.05]
    return round(statistics.median(active), 2) if active else None


def delta(after: dict, before: dict) -> dict[str, float | None]:
    return {k: (None if after.get(k) is None or before.get(k) is None else round(after[k] - before[k], 3))
            for k in before}


def machine_busy() -> float:
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Spies:
    """py-spy recording the given processes (``--profile``), raw collapsed stacks."""

    def __init__(self, procs: Procs, out_dir: Path | None) -> None:
        self.procs, self.out_dir, self.running = procs, out_dir, []

    async def start(self, label: str, pids: dict[str, int]) -> None:
        if self.out_dir is None:
            return
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in pids.items():
            out = self.out_dir / f"{label}-{name}.txt"
            out.unlink(missing_ok=True)
            args = [spy, "record", "--pid", str(pid), "--rate", "100", "--format", "raw", "--output", str(out),
                    "--threads", "--nonblocking"]
            proc = await self.procs.spawn(Place(None, ""), args, self.out_dir / f"{label}-{name}.log")
            self.running.append((name, out, proc))
        await trio.sleep(0.5)  # attached

    async def stop(self) -> dict:
        summary = {}
        for _, _, proc in self.running:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
        for name, out, proc in self.running:
            with trio.move_on_after(20):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
            summary[name] = top_frames(out)
        self.running = []
        return summary


def _frame(frame: str) -> str:
    """``func (path/file.py:line)`` -> ``func (file.py)``."""
    name, _, loc = frame.partition(" (")
    return f"{name} ({loc.rstrip(')').rsplit('/', 1)[-1].split(':')[0]})" if loc else name


def top_frames(path: Path, n: int = 15) -> dict:
    """From py-spy's raw output: share of samples by thread, by leaf function (self
    time) and by function anywhere on the stack (inclusive), in percent."""
    leaves, inclusive, threads, total = Counter(), Counter(), Counter(), 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or not stack:
            continue
        k = int(count)
        frames = stack.split(";")
        total += k
        if frames[0].startswith("thread "):  # "thread (TID): NAME"
            tid, _, tname = frames[0].removeprefix("thread ").partition(": ")
            threads[f"{tname or '?'} {tid}"] += k
            frames = frames[1:]
        if not frames:
            continue
        leaves[_frame(frames[-1])] += k
        for f in {_frame(f) for f in frames}:
            inclusive[f] += k

    def pct(c: Counter, m: int) -> dict:
        return {f: round(v / total * 100, 1) for f, v in c.most_common(m)}

    return {"samples": total, "threads": pct(threads, 8), "self_pct": pct(leaves, n),
            "inclusive_pct": pct(inclusive, 2 * n)} if total else {"samples": 0}


@dataclass
class Setup:
    """One path's setup: places, holders, puller."""

    name: str
    puller_place: Place
    holder_place: Place
    tmp: Path
    layer: dict
    model: str
    puller: Node | None = None
    holders: list[Node] = field(default_factory=list)


async def wait_holders(args, ctx: Setup, n: int) -> float:
    cmd = ctx.puller_place.cmd([sys.executable, THIS, "--client", "wait", "--api", ctx.puller.api,
                                "--model", ctx.model, "--holders", str(n), "--timeout", "90"])
    r = await run_checked(cmd, 120)
    out = json.loads(r.stdout or b"{}")
    if not out.get("ok"):
        raise RuntimeError(f"P never saw {n} holders (saw {out.get('holders')}): {r.stderr.decode()[-2000:]}\n"
                           f"P's log:\n{ctx.puller.tail()}")
    return out["seconds"]


async def one_pull(args, ctx: Setup, spies: Spies, run: int) -> dict:
    n = len(ctx.holders)
    label = f"{ctx.name}-{n}src-run{run}"
    await trio.to_thread.run_sync(empty_store, ctx.puller.models_dir)
    await trio.sleep(args.settle)
    pids = {"P": ctx.puller.pid, **{h.name: h.pid for h in ctx.holders}}
    await spies.start(label, pids)
    out = ctx.tmp / f"{label}.json"
    cmd = ctx.puller_place.cmd([sys.executable, THIS, "--client", "pull", "--api", ctx.puller.api,
                                "--model", ctx.model, "--digest", ctx.layer["digest"], "--timeout", str(args.pull_timeout),
                                "--client-out", str(out)])
    print(f"[pull] {label}: pulling {ctx.layer['size'] / MIB:.0f} MiB from {n} holder(s) ...", file=sys.stderr)
    mains: dict[str, list[float]] = {}
    main0 = {k: main_thread_s(v) for k, v in pids.items()}
    before, busy0, t0 = cpu_s(pids), machine_busy(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_main_threads, pids, mains)
        r = await run_checked(cmd, args.pull_timeout + 30)
        nursery.cancel_scope.cancel()
    wall = time.perf_counter() - t0
    used, busy = delta(cpu_s(pids), before), machine_busy() - busy0
    main_used = delta({k: main_thread_s(v) for k, v in pids.items()}, main0)
    profile = await spies.stop()
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"pull client failed ({r.returncode}): {r.stderr.decode()[-2000:]}")
    c = json.loads(out.read_text())
    blob = ctx.puller.models_dir / "blobs" / ctx.layer["digest"].replace(":", "-")
    size = ctx.layer["size"]
    ok = "success_s" in c and "error" not in c and blob.is_file() and blob.stat().st_size == size
    names = {h.peer_id: h.name for h in ctx.holders}
    holders_cpu = sum(v for k, v in used.items() if k != "P" and v is not None)
    res = {
        "path": ctx.name, "sources": n, "run": run, "ok": ok, "error": c.get("error"),
        "fresh_holders": run == 1,  # their first pull: each hashes the blob for its piece list
        "wall_s": round(wall, 3),
        "seconds": c.get("success_s"),
        "MBps": round(size / MB / c["success_s"], 1) if ok else None,
        "phases_s": {k: c.get(k) for k in ("first_line_s", "manifest_s", "lists_s", "first_piece_s", "all_bytes_s",
                                            "verified_s", "success_s")},
        "cpu_s": used,
        "main_thread_cpu_s": main_used,  # the rest of cpu_s is worker threads: disk writes, whole-file hash
        "puller_cpu_s_per_GiB": round(used["P"] / (size / GIB), 2) if used.get("P") is not None else None,
        "holders_cpu_s_per_GiB": round(holders_cpu / (size / GIB), 2),
        "machine_busy_cores": round(busy / wall, 2),
        # the event loop's share of one core, median of 0.5 s samples while it worked
        "main_thread_busy": {k: busy_share(v) for k, v in mains.items()},
        "main_thread_samples": mains,
        "from": {names.get(p, p): b for p, b in (c.get("from") or {}).items()},
        "progress_MiB": c.get("progress"),
        "http_status": c.get("http_status"),
    }
    ph = res["phases_s"]
    if ok and ph.get("first_piece_s") is not None and ph.get("all_bytes_s") is not None:
        # bytes after the first piece over the time they took: the streaming rate, no set-up, no verify
        rest = size - min(size, 8 * MIB)
        span = ph["all_bytes_s"] - ph["first_piece_s"]
        res["transfer_MBps"] = round(rest / MB / span, 1) if span > 0 else None
    if profile:
        res["profile"] = profile
    print(f"[pull] {label}: {'ok' if ok else 'FAILED'} {res['seconds']} s, {res['MBps']} MB/s "
          f"(transfer {res.get('transfer_MBps')} MB/s), P {res['puller_cpu_s_per_GiB']} CPU s/GiB, "
          f"holders {res['holders_cpu_s_per_GiB']} CPU s/GiB, machine {res['machine_busy_cores']} cores busy, "
          f"main threads {res['main_thread_busy']}",
          file=sys.stderr)
    return res


async def start_http_server(procs: Procs, ctx: Setup) -> tuple[trio.Process, str]:
    """``python -m http.server`` over h0's blobs, in the holders' place; its URL for the blob."""
    port = free_port() if ctx.holder_place.ns is None else 8080
    directory = ctx.tmp / "h0-models" / "blobs"
    args = [sys.executable, "-m", "http.server", str(port), "--bind", ctx.holder_place.ip, "--directory",
            str(directory)]
    proc = await procs.spawn(ctx.holder_place, args, ctx.tmp / f"{ctx.name}-http.log")
    url = f"http://{ctx.holder_place.ip}:{port}/{ctx.layer['digest'].replace(':', '-')}"
    head = ctx.puller_place.cmd(["curl", "-s", "-I", "-o", "/dev/null", "-w", "%{http_code}", url])
    with trio.fail_after(30):
        while (await run_checked(head, 10)).stdout != b"200":
            if proc.poll() is not None:
                raise RuntimeError("http.server exited")
            await trio.sleep(0.1)
    return proc, url


async def one_curl(args, ctx: Setup, server: trio.Process, url: str, run: int) -> dict:
    target = ctx.tmp / "curl-out.bin"
    target.unlink(missing_ok=True)
    await trio.sleep(args.settle)
    size = ctx.layer["size"]
    cmd = ctx.puller_place.cmd(["curl", "-sS", "--fail", "-o", str(target), "-w",
                                "%{time_starttransfer} %{time_total} %{size_download}", url])
    before, c0, busy0, t0 = cpu_s({"server": server.pid}), children_cpu(), machine_busy(), time.perf_counter()
    r = await run_checked(cmd, args.pull_timeout)
    wall = time.perf_counter() - t0
    curl_cpu, busy = children_cpu() - c0, machine_busy() - busy0
    server_cpu = delta(cpu_s({"server": server.pid}), before)["server"]
    got = target.stat().st_size if target.exists() else 0
    target.unlink(missing_ok=True)
    parts = r.stdout.decode().split()
    ok = r.returncode == 0 and got == size and len(parts) == 3
    total = float(parts[1]) if ok else None
    res = {"path": ctx.name, "run": run, "ok": ok, "seconds": total,
           "first_byte_s": float(parts[0]) if ok else None,
           "MBps": round(size / MB / total, 1) if ok else None,
           "curl_cpu_s": round(curl_cpu, 3), "server_cpu_s": server_cpu,
           "curl_cpu_s_per_GiB": round(curl_cpu / (size / GIB), 2),
           "server_cpu_s_per_GiB": round(server_cpu / (size / GIB), 2) if server_cpu is not None else None,
           "machine_busy_cores": round(busy / wall, 2)}
    if not ok:
        res["error"] = r.stderr.decode()[-500:]
    print(f"[curl] {ctx.name} run{run}: {res['MBps']} MB/s, curl {res['curl_cpu_s_per_GiB']} + server "
          f"{res['server_cpu_s_per_GiB']} CPU s/GiB", file=sys.stderr)
    return res


async def measure_path(args, name: str, tmp: Path, layer: dict, model: str) -> dict:
    from tests.netns import Net, sweep

    procs, net = Procs(), None
    spies = Spies(procs, args.profile)
    out: dict = {"pulls": [], "curl": []}
    t0 = time.perf_counter()
    try:
        if name == "netns":
            sweep()
            net = Net()
            _, (a, b) = net.lan(SUBNET, ["a", "b"])
            ctx = Setup(name, Place(a.name, a.ip), Place(b.name, b.ip), tmp, layer, model)
            mtu = (await run_checked(["ip", "-n", a.name, "-o", "link", "show", "eth0"], 10)).stdout.decode().split()
            out["topology"] = {"A (puller, curl)": a.ip, "B (holders, http.server)": b.ip,
                               "mtu": int(mtu[mtu.index("mtu") + 1]) if "mtu" in mtu else None}
        else:
            here = Place(None, "127.0.0.1")
            ctx = Setup(name, here, here, tmp, layer, model)
            out["topology"] = {"all": "127.0.0.1"}
        port = 0 if name == "loopback" else 4001
        h0 = await start_node(procs, ctx.holder_place, tmp, f"{name}-h0", tmp / "h0-models", port)
        ctx.holders.append(h0)
        ctx.puller = await start_node(procs, ctx.puller_place, tmp, f"{name}-P", tmp / "p-models", port, bootstrap=h0)
        await wait_holders(args, ctx, 1)
        server, url = (None, None) if args.no_curl else await start_http_server(procs, ctx)
        for count in sorted(args.sources):
            while len(ctx.holders) < count:
                i = len(ctx.holders)
                ctx.holders.append(await start_node(procs, ctx.holder_place, tmp, f"{name}-h{i}",
                                                    tmp / f"h{i}-models", 0 if name == "loopback" else 4001 + i,
                                                    bootstrap=h0))
            if count > 1:
                await wait_holders(args, ctx, count)
            for run in range(1, args.repeat + 1):
                if server is not None and count == min(args.sources):
                    out["curl"].append(await one_curl(args, ctx, server, url, run))
                out["pulls"].append(await one_pull(args, ctx, spies, run))
        out["setup_and_runs_s"] = round(time.perf_counter() - t0, 1)
        out["log_warnings"] = {n.name: [ln[-300:] for ln in n.log.read_text(errors="replace").splitlines()
                                        if (" WARNING " in ln or "failed" in ln) and "open mesh" not in ln][:8]
                               for n in [ctx.puller, *ctx.holders]}
        return out
    except BaseException:
        print(f"[pull] {name} failed; logs in {tmp}", file=sys.stderr)
        args.keep = True
        raise
    finally:
        with trio.CancelScope(shield=True):
            if spies.running:
                await spies.stop()
            await procs.close()
        if net is not None:
            net.close()


def summarize(r: dict) -> list[dict]:
    rows = []
    for path, p in r["paths"].items():
        if "pulls" not in p:
            continue
        curl = [c for c in p["curl"] if c["ok"]]
        curl_mbps = statistics.median(c["MBps"] for c in curl) if curl else None
        curl_cpu = (statistics.median(c["curl_cpu_s_per_GiB"] for c in curl),
                    statistics.median(c["server_cpu_s_per_GiB"] for c in curl)) if curl else None
        for n in sorted({x["sources"] for x in p["pulls"]}):
            runs = [x for x in p["pulls"] if x["sources"] == n and x["ok"]]
            if not runs:
                rows.append({"path": path, "sources": n, "ok": False})
                continue
            med = statistics.median
            mbps = med(x["MBps"] for x in runs)
            rows.append({
                "path": path, "sources": n, "runs": len(runs), "ok": True,
                "MBps": round(mbps, 1), "MBps_each": [x["MBps"] for x in runs],
                "transfer_MBps": round(med(x.get("transfer_MBps") or 0 for x in runs), 1),
                "first_piece_s": round(med(x["phases_s"]["first_piece_s"] for x in runs), 2),
                "verify_commit_s": round(med(x["phases_s"]["verified_s"] - x["phases_s"]["all_bytes_s"] for x in runs), 2),
                "puller_cpu_s_per_GiB": round(med(x["puller_cpu_s_per_GiB"] for x in runs), 2),
                "holders_cpu_s_per_GiB": round(med(x["holders_cpu_s_per_GiB"] for x in runs), 2),
                "machine_busy_cores": round(med(x["machine_busy_cores"] for x in runs), 2),
                "curl_MBps": curl_mbps,
                "curl_cpu_s_per_GiB": curl_cpu,
                "pull_vs_curl": round(mbps / curl_mbps, 3) if curl_mbps else None,
                "pull_vs_1GbE": round(mbps / LINE_RATE_MBPS, 2),
            })
    return rows


def print_result(r: dict) -> None:
    print(f"\npull of a {r['params']['size_mib']} MiB layer; MB = 10^6 B; 1 GbE target {LINE_RATE_MBPS} MB/s")
    hdr = (f"{'path':<9}{'src':>4}{'MB/s':>8}{'xfer MB/s':>10}{'1st piece':>10}{'verify':>8}{'P s/GiB':>9}"
           f"{'H s/GiB':>9}{'busy':>6}{'curl MB/s':>10}{'curl+srv s/GiB':>16}{'ratio':>7}{'/117':>6}")
    print(hdr)
    print("-" * len(hdr))
    for row in r["summary"]:
        if not row["ok"]:
            print(f"{row['path']:<9}{row['sources']:>4}  FAILED")
            continue
        cc = row["curl_cpu_s_per_GiB"]
        ccs = f"{cc[0]:.2f}+{cc[1]:.2f}" if cc else "-"
        print(f"{row['path']:<9}{row['sources']:>4}{row['MBps']:>8.1f}{row['transfer_MBps']:>10.1f}"
              f"{row['first_piece_s']:>10.2f}{row['verify_commit_s']:>8.2f}{row['puller_cpu_s_per_GiB']:>9.2f}"
              f"{row['holders_cpu_s_per_GiB']:>9.2f}{row['machine_busy_cores']:>6.2f}"
              f"{row['curl_MBps'] or 0:>10.1f}{ccs:>16}{row['pull_vs_curl'] or 0:>7.3f}{row['pull_vs_1GbE']:>6.2f}")
    for path, p in r["paths"].items():
        if "skipped" in p:
            print(f"{path}: skipped: {p['skipped']}")
    print(f"total {r['total_s']} s")


async def main_async(args) -> dict:
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench_pull_", dir=args.tmp_dir))
    model = f"benchpull:{args.size_mib}m"
    r: dict = {"benchmark": "pull",
               "machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
                           "curl": (await run_checked(["curl", "--version"], 10)).stdout.decode().split("\n")[0],
                           "http_server": f"python -m http.server (Python {platform.python_version()}, "
                                          "ThreadingHTTPServer, shutil.copyfileobj 64 KiB writes)"},
               "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "model": model, "paths": {}}
    try:
        print(f"[pull] writing a {args.size_mib} MiB model in {tmp} ...", file=sys.stderr)
        r["layer"] = await trio.to_thread.run_sync(write_models, tmp, args.size_mib * MIB, model)
        for name in args.paths:
            if name == "netns":
                from tests.netns import missing

                why = missing()
                if why:
                    print(f"[pull] netns skipped: {why}", file=sys.stderr)
                    r["paths"][name] = {"skipped": why}
                    continue
            r["paths"][name] = await measure_path(args, name, tmp, r["layer"], model)
    finally:
        if args.keep:
            print(f"[pull] kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    r["summary"] = summarize(r)
    r["machine"]["loadavg_after"] = os.getloadavg()
    r["total_s"] = round(time.perf_counter() - t0, 1)
    return r


async def stoppable(args) -> dict:
    """``main_async``, cancelled on SIGTERM or SIGHUP like on Ctrl-C: the nodes are killed
    and the namespaces deleted either way."""
    result: dict = {}

    async def run(cancel: trio.CancelScope) -> None:
        result.update(await main_async(args))
        cancel.cancel()

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, nursery.cancel_scope)
            async for _ in signals:
                print("[pull] signal: stopping", file=sys.stderr)
                nursery.cancel_scope.cancel()
                break
    if not result:
        raise KeyboardInterrupt("stopped by a signal")
    return result


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--size-mib", type=int, default=1024, help="size of the model layer (MiB)")
    p.add_argument("--quick", action="store_true", help="smoke run: 128 MiB, one run of each")
    p.add_argument("--repeat", type=int, default=2, help="pulls (and curls) per case")
    p.add_argument("--paths", default="loopback,netns", help="loopback, netns (root)")
    p.add_argument("--sources", default="1,3", help="holder counts to pull from (ascending, at most 3)")
    p.add_argument("--no-curl", action="store_true", help="skip the curl baseline")
    p.add_argument("--profile", type=Path, help="record py-spy (raw stacks) of P and the holders into this dir")
    p.add_argument("--pull-timeout", type=float, default=300.0, help="bound on one pull (s)")
    p.add_argument("--settle", type=float, default=1.0, help="pause before each pull or curl (s)")
    p.add_argument("--tmp-dir", help="where the stores go (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the stores and logs")
    # internal: the clients, run in P's place
    p.add_argument("--client", choices=("wait", "pull"), help=argparse.SUPPRESS)
    for name in ("--api", "--model", "--digest", "--client-out"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--holders", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client == "wait":
        print(json.dumps(client_wait(args)))
        return None
    if args.client == "pull":
        Path(args.client_out).write_text(json.dumps(client_pull(args)))
        return None
    if args.quick:
        args.size_mib, args.repeat = 128, 1
    args.paths = [x for x in args.paths.split(",") if x]
    args.sources = sorted({int(x) for x in args.sources.split(",") if x})
    if not args.sources or not 1 <= min(args.sources) <= max(args.sources) <= 3:
        sys.exit("bench_pull: --sources takes holder counts from 1 to 3")
    if args.profile and not (shutil.which("py-spy") or (Path(sys.executable).parent / "py-spy").exists()):
        sys.exit("bench_pull --profile: needs py-spy (.venv/bin/pip install py-spy)")
    if shutil.which("curl") is None and not args.no_curl:
        sys.exit("bench_pull: needs curl for the baseline (apt-get install -y curl), or --no-curl")
    try:
        result = trio.run(stoppable, args)
    except KeyboardInterrupt:
        sys.exit("bench_pull: interrupted (processes killed, namespaces deleted)")
    report(result, args.out, print_result)
    return result


if __name__ == "__main__":
    main()

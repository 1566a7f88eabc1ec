#!/usr/bin/env python3
"""Soak: many streams through a 3-holder mesh for a long time, one holder SIGKILLed now and then.

Topology (real processes on 127.0.0.1, OS-chosen ports, no mDNS, started the
way ``tests/integration/cluster.py`` starts them):

  G        ``meshollama start --backend none``: the gateway every client talks
           to, so every request crosses libp2p to a holder
  h0..h2   ``meshollama start --backend ollama``, each bootstrapping to G and
           backed by its own stand-in Ollama (``tests/fakes/fake_ollama.py`` as
           a subprocess) serving ``soak:latest`` with the same numbered text,
           so an answer resumed on another holder is checked word for word
           (resume needs equal model digests: the fake derives the digest from
           the model name, and the script checks all three agree)

``--streams`` client workers (httpx on trio, keep-alive) loop for ``--minutes``:
each sends a streamed ``/api/chat`` or ``/v1/chat/completions`` (alternately)
to G, reads it to the end under ``--deadline``, and classifies it with
``tests/faults/fates.py`` (complete / error / hung / truncated); a complete
answer must be exactly the expected words (``fates.continuous``). Every
``--kill-every`` minutes one holder (round robin) is SIGKILLed, restarted after
``--down-seconds`` with the same data dir (so the same peer id), and must be
seen alive, holding the model, by G before the next kill.

Every minute a row records: requests finished in that minute by fate, resumed
ones (the final object's ``"meshollama"`` field), time to first byte p50/p99,
total time p50/p99, VmRSS of G, each holder (empty while it is down; a restarted
holder is a new process) and each stand-in (whose request log is cleared every
minute), G's queue and resume counters (``/metrics``), and the load average.
Minute 0 is the idle baseline, taken before the first request. At the end: totals,
explicit errors by message, examples of every request that was not complete,
and the kills with how long each holder took to come back.

Exit status 0 when no request hung, none was truncated, no complete answer was
discontinuous, and every killed holder came back; 1 otherwise.

    .venv/bin/python benchmarks/bench_soak.py                      # 50 streams, 30 min, a kill every 5
    .venv/bin/python benchmarks/bench_soak.py --minutes 10 --kill-every 2.5 --streams 50
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.faults.fates import Fate, Outcome, discontinuity, numbered_text, send  # noqa: E402
from tests.integration.cluster import Cluster, NodeProc  # noqa: E402

from common import report  # noqa: E402

MODEL = "soak:latest"
PATHS = ("/api/chat", "/v1/chat/completions")
PEER_HEADER = "x-meshollama-peer"
EXAMPLES = 20  # kept per kind of failure
# G's counters copied into each minute's row (label values summed per outcome/kind).
G_METRICS = ("meshollama_queue_total", "meshollama_resumes_total", "meshollama_retries_total",
             "meshollama_upstream_errors_total", "meshollama_stream_errors_total",
             "meshollama_upstream_timeouts_total")


# --------------------------------------------------------------------------- measurements

def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return None


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100), None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 1)


@dataclass
class Done:
    """One finished request, as much as the per-minute rows need."""

    end: float  # seconds since the start of the run
    path: str
    fate: Fate
    ttfb: float | None
    total: float
    resumed: int
    discontinuous: bool


@dataclass
class Stats:
    expected: list[str]
    done: list[Done] = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)  # message -> count
    examples: dict[str, list[dict]] = field(default_factory=dict)  # kind -> details
    resumed_examples: list[dict] = field(default_factory=list)
    serving: dict[int, str | None] = field(default_factory=dict)  # worker -> peer that started its answer

    def add(self, t0: float, outcome: Outcome, ttfb: float | None, first_peer: str | None,
            names: dict[str, str]) -> None:
        final = outcome.final if isinstance(outcome.final, dict) else {}
        ext = final.get("meshollama") if isinstance(final.get("meshollama"), dict) else {}
        resumed = int(ext.get("resumed") or 0) or max(0, len(outcome.peers) - 1)
        why = discontinuity(outcome.text, self.expected) if outcome.fate is Fate.COMPLETE else None
        end = trio.current_time() - t0
        self.done.append(Done(end, outcome.path, outcome.fate, ttfb, outcome.elapsed or 0.0, resumed,
                              why is not None))
        detail = {"t_s": round(end, 1), "path": outcome.path, "status": outcome.status,
                  "first_peer": names.get(first_peer or "", first_peer),
                  "peers": [names.get(p, p) for p in outcome.peers], "resumed": resumed,
                  "elapsed_s": round(outcome.elapsed or 0.0, 2), "reason": outcome.reason,
                  "error": outcome.error, "text_words": len(outcome.text.split())}
        if outcome.fate is Fate.ERROR:
            self.errors[outcome.error or outcome.reason] += 1
        if outcome.fate is not Fate.COMPLETE:
            self._example(outcome.fate.value, {**detail, "text_tail": outcome.text[-80:]})
        elif why is not None:
            self._example("discontinuous", {**detail, "discontinuity": why})
        if resumed and len(self.resumed_examples) < EXAMPLES:
            self.resumed_examples.append(detail)

    def _example(self, kind: str, detail: dict) -> None:
        bucket = self.examples.setdefault(kind, [])
        if len(bucket) < EXAMPLES:
            bucket.append(detail)

    def totals(self) -> dict:
        fates = collections.Counter(d.fate for d in self.done)
        complete = [d for d in self.done if d.fate is Fate.COMPLETE]
        ttfb = [d.ttfb for d in complete if d.ttfb is not None]
        return {
            "requests": len(self.done),
            "completed": fates[Fate.COMPLETE],
            "errors": fates[Fate.ERROR],
            "errors_by_message": dict(self.errors.most_common()),
            "hung": fates[Fate.HUNG],
            "truncated": fates[Fate.TRUNCATED],
            "resumed": sum(1 for d in self.done if d.resumed),
            "resumed_completed": sum(1 for d in complete if d.resumed),
            "discontinuous": sum(1 for d in self.done if d.discontinuous),
            "by_path": {p: sum(1 for d in self.done if d.path == p) for p in PATHS},
            "ttfb_ms": {"p50": ms(pct(ttfb, 50)), "p99": ms(pct(ttfb, 99)), "max": ms(max(ttfb, default=None))},
            "total_s_p50": round(pct([d.total for d in complete], 50) or 0.0, 2),
            "total_s_p99": round(pct([d.total for d in complete], 99) or 0.0, 2),
        }


# --------------------------------------------------------------------------- processes

class Fake:
    """One stand-in Ollama as a child process (its CLI, with ``--port-file``)."""

    def __init__(self, tmp: Path, name: str, args: argparse.Namespace, text: str) -> None:
        self.name = name
        self.port_file = tmp / f"{name}.port"
        self.log_path = tmp / f"{name}.log"
        self.cmd = [sys.executable, "-m", "tests.fakes.fake_ollama", "--port", "0", "--models", MODEL,
                    "--port-file", str(self.port_file), "--name", name, "--text", text,
                    "--tokens", str(args.tokens), "--token-delay", str(args.token_delay)]
        self.proc: trio.Process | None = None
        self.url = ""

    async def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = await trio.lowlevel.open_process(self.cmd, cwd=str(ROOT), stdout=log,
                                                         stderr=subprocess.STDOUT)
        with trio.fail_after(30):
            while not self.port_file.exists():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"fake {self.name} exited: {self.log_path.read_text()[-2000:]}")
                await trio.sleep(0.05)
        self.url = f"http://127.0.0.1:{int(self.port_file.read_text())}"

    async def digest(self, client: httpx.AsyncClient) -> str:
        r = await client.get(self.url + "/api/tags")
        r.raise_for_status()
        return next(m["digest"] for m in r.json()["models"] if m["name"] == MODEL)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with trio.move_on_after(10) as scope:
                scope.shield = True
                await self.proc.wait()


async def holders_alive(c: Cluster, g: NodeProc, nodes: list[NodeProc]) -> bool:
    """G lists every one of ``nodes`` alive and holding the model."""
    try:
        peers = await c.peers(g)
    except (httpx.HTTPError, ValueError):
        return False
    ok = {p["peer_id"] for p in peers
          if p.get("state") == "alive" and any(m.get("name") == MODEL for m in p.get("models", []))}
    return all(n.peer_id in ok for n in nodes)


async def g_metrics(client: httpx.AsyncClient, g: NodeProc) -> dict:
    """G's counters of interest, label values flattened to ``outcome`` / ``kind`` / ``reason`` keys."""
    try:
        r = await client.get(g.api + "/metrics")
        r.raise_for_status()
    except httpx.HTTPError as e:
        return {"error": str(e)}
    out: dict = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            name = s.name.removesuffix("_total")
            if name + "_total" in G_METRICS or s.name in G_METRICS:
                key = next((s.labels[k] for k in ("outcome", "kind", "reason") if k in s.labels), "all")
                out.setdefault(name.removeprefix("meshollama_"), {})[key] = int(s.value)
            elif s.name in ("meshollama_queue_depth", "meshollama_in_flight_requests"):
                out[s.name.removeprefix("meshollama_")] = out.get(s.name.removeprefix("meshollama_"), 0) + int(s.value)
    return out


# --------------------------------------------------------------------------- one request

def payload(path: str) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "count"}], "stream": True}


async def send_timed(client: httpx.AsyncClient, path: str, body: dict, *, deadline: float,
                     on_head=lambda peer: None) -> tuple[Outcome, float | None, str | None]:
    """``fates.send`` plus what a soak needs: time to the first body byte and the
    serving peer (``x-meshollama-peer``), reported through ``on_head`` as soon as
    the head arrives. Classification is ``fates.classify``'s, unchanged."""
    peer: str | None = None
    ttfb: float | None = None
    start = trio.current_time()

    def head(headers: httpx.Headers) -> None:
        nonlocal peer
        peer = headers.get(PEER_HEADER)
        on_head(peer)

    async def first(body_so_far: bytearray) -> None:
        nonlocal ttfb
        if ttfb is None and body_so_far:
            ttfb = trio.current_time() - start

    outcome = await send(client, path, body, deadline=deadline, on_head=head, on_chunk=first)
    return outcome, ttfb, peer


# --------------------------------------------------------------------------- the run

@dataclass
class Run:
    args: argparse.Namespace
    c: Cluster
    g: NodeProc
    holders: list[NodeProc]
    fakes: list[Fake]
    stats: Stats
    t0: float = 0.0
    stop: trio.Event = field(default_factory=trio.Event)
    in_flight: int = 0
    kills: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)

    @property
    def names(self) -> dict[str, str]:
        return {n.peer_id: n.name for n in self.holders}

    def now(self) -> float:
        return trio.current_time() - self.t0

    async def worker(self, i: int, client: httpx.AsyncClient) -> None:
        answer_s = self.args.tokens * self.args.token_delay
        await trio.sleep(answer_s * i / self.args.streams)  # spread the starts over one answer
        n = 0
        while not self.stop.is_set():
            path = PATHS[(i + n) % len(PATHS)]
            n += 1
            self.in_flight += 1
            try:
                outcome, ttfb, peer = await send_timed(
                    client, path, payload(path), deadline=self.args.deadline,
                    on_head=lambda p: self.stats.serving.__setitem__(i, p))
            finally:
                self.in_flight -= 1
                self.stats.serving.pop(i, None)
            self.stats.add(self.t0, outcome, ttfb, peer, self.names)
            if outcome.fate is Fate.ERROR:
                await trio.sleep(0.5)  # an error is often instant: do not spin on it

    async def killer(self) -> None:
        period = self.args.kill_every * 60.0
        end = self.args.minutes * 60.0
        k = 0
        while True:
            k += 1
            at = k * period
            if at >= end - 1.0:
                return
            await trio.sleep_until(self.t0 + at)
            if self.stop.is_set():
                return
            victim = self.holders[(k - 1) % len(self.holders)]
            await self.kill_and_restart(k, victim)

    async def kill_and_restart(self, k: int, node: NodeProc) -> None:
        pid, peer = node.proc.pid, node.peer_id
        streams = sum(1 for p in self.stats.serving.values() if p == peer)
        ev: dict = {"n": k, "node": node.name, "t_s": round(self.now(), 1), "pid": pid,
                    "streams_on_it": streams, "rss_mib_before": rss_mib(pid)}
        print(f"[soak] {self.now():7.1f}s kill #{k}: SIGKILL {node.name} (pid {pid}, {streams} streams on it)",
              file=sys.stderr)
        self.kills.append(ev)  # filled in below; listed in this minute's row even while it is down
        t_kill = trio.current_time()
        node.proc.kill()
        await node.proc.wait()
        # While it is down: when does G stop listing it alive?
        with trio.move_on_after(self.args.down_seconds):
            while await holders_alive(self.c, self.g, [node]):
                await trio.sleep(0.1)
            ev["g_saw_it_gone_after_s"] = round(trio.current_time() - t_kill, 2)
        await trio.sleep_until(t_kill + self.args.down_seconds)
        t_spawn = trio.current_time()
        try:
            with trio.fail_after(120):
                await self.c.restart(node)
        except (trio.TooSlowError, AssertionError) as e:
            ev.update(restarted=False, error=str(e)[:2000])
            print(f"[soak] restart of {node.name} failed: {e}", file=sys.stderr)
            return
        ev["restart_s"] = round(trio.current_time() - t_spawn, 2)
        ev["same_peer_id"] = node.peer_id == peer
        ev["new_pid"] = node.proc.pid
        # Must be back in G's view before the next kill; waited for without bound
        # other than the run's end, and a late return is recorded.
        next_kill = self.t0 + (k + 1) * self.args.kill_every * 60.0
        deadline = self.t0 + self.args.minutes * 60.0 + self.args.deadline
        back = False
        with trio.move_on_at(deadline):
            while not await holders_alive(self.c, self.g, [node]):
                await trio.sleep(0.1)
            back = True
        ev["seen_alive_by_g"] = back
        if back:
            ev["alive_after_spawn_s"] = round(trio.current_time() - t_spawn, 2)
            ev["back_before_next_kill"] = trio.current_time() < next_kill
        print(f"[soak] {self.now():7.1f}s {node.name} back: node.json after {ev['restart_s']} s, "
              f"alive in G's view after {ev.get('alive_after_spawn_s')} s, same peer id {ev['same_peer_id']}",
              file=sys.stderr)

    async def sampler(self, client: httpx.AsyncClient) -> None:
        minute = 0
        while True:
            minute += 1
            await trio.sleep_until(self.t0 + minute * 60.0)
            await self.sample(client, minute)
            if self.stop.is_set():
                return

    async def sample(self, client: httpx.AsyncClient, minute: float) -> None:
        lo, hi = (math.ceil(minute) - 1) * 60.0, self.now()
        window = [d for d in self.stats.done if lo <= d.end < hi]
        fates = collections.Counter(d.fate for d in window)
        so_far = collections.Counter(d.fate for d in self.stats.done)
        ttfb = [d.ttfb for d in window if d.fate is Fate.COMPLETE and d.ttfb is not None]
        total = [d.total for d in window if d.fate is Fate.COMPLETE]
        rss = {"G": rss_mib(self.g.proc.pid)}
        rss.update({n.name: rss_mib(n.proc.pid) for n in self.holders})
        rss.update({f.name: rss_mib(f.proc.pid) for f in self.fakes})
        rss["client"] = rss_mib(os.getpid())
        row = {
            "minute": minute, "t_s": round(hi, 1),
            "finished": len(window), "completed": fates[Fate.COMPLETE], "errors": fates[Fate.ERROR],
            "hung": fates[Fate.HUNG], "truncated": fates[Fate.TRUNCATED],
            "resumed": sum(1 for d in window if d.resumed),
            "discontinuous": sum(1 for d in window if d.discontinuous),
            "ttfb_ms_p50": ms(pct(ttfb, 50)), "ttfb_ms_p99": ms(pct(ttfb, 99)),
            "total_s_p50": round(pct(total, 50), 2) if total else None,
            "total_s_p99": round(pct(total, 99), 2) if total else None,
            "so_far": {"completed": so_far[Fate.COMPLETE], "errors": so_far[Fate.ERROR],
                       "hung": so_far[Fate.HUNG], "truncated": so_far[Fate.TRUNCATED],
                       "resumed": sum(1 for d in self.stats.done if d.resumed)},
            "in_flight": self.in_flight,
            "serving_by_node": dict(collections.Counter(self.names.get(p or "", str(p))
                                                         for p in self.stats.serving.values())),
            "kills_in_minute": [k["node"] for k in self.kills if lo <= k["t_s"] < hi],
            "pids": {"G": self.g.proc.pid, **{n.name: n.proc.pid for n in self.holders}},
            "rss_mib": rss,
            "down": [n.name for n in self.holders if n.proc.poll() is not None],
            "g_metrics": await g_metrics(client, self.g),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        }
        self.rows.append(row)
        # The stand-ins log every request (tests read the log); forget them, so
        # that their RSS means something over a long run.
        for f in self.fakes:
            with trio.move_on_after(5):
                try:
                    await client.post(f.url + "/_fake/control", json={"clear_requests": True})
                except httpx.HTTPError:
                    pass
        print(f"[soak] min {row['minute']:>4}: done {row['finished']:>5} ok {row['completed']:>5} "
              f"err {row['errors']} hung {row['hung']} trunc {row['truncated']} resumed {row['resumed']} "
              f"ttfb p50/p99 {row['ttfb_ms_p50']}/{row['ttfb_ms_p99']} ms  "
              f"RSS G {rss['G']} h {[rss[n.name] for n in self.holders]} MiB  load {row['loadavg'][0]}",
              file=sys.stderr)
        save_partial(self)


def save_partial(run: Run) -> None:
    """Write what we have so far, so a run cut short still leaves numbers."""
    out = run.args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "soak", "partial": True, "params": params(run.args),
                               "rows": run.rows, "kills": run.kills, "totals": run.stats.totals()}, indent=2))


def params(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def log_digest(path: Path, names: dict[str, str]) -> dict:
    """How many WARNING / ERROR lines a node log has, and the last few of them (peer ids named)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    for peer_id, name in names.items():
        text = text.replace(peer_id, name)
    lines = text.splitlines()
    bad = [ln for ln in lines if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]
    return {"lines": len(lines), "warning": sum(1 for ln in bad if " WARNING " in ln),
            "error": sum(1 for ln in bad if " ERROR " in ln), "traceback": sum(1 for ln in bad if "Traceback" in ln),
            "last": [ln[:300] for ln in bad[-8:]]}


def rss_trend(rows: list[dict]) -> dict:
    """Per process (a restarted holder is a new one): RSS at its first and last row, and the most."""
    out: dict = {}
    for row in rows:
        for name, mib in row["rss_mib"].items():
            pid = row["pids"].get(name)
            key = name if pid is None else f"{name} (pid {pid})"
            if mib is None:
                continue
            seg = out.setdefault(key, {"first_minute": row["minute"], "first": mib, "max": mib})
            seg.update(last_minute=row["minute"], last=mib, max=max(seg["max"], mib))
    for seg in out.values():
        seg["growth"] = round(seg["last"] - seg["first"], 1)
    return out


async def main_async(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_soak_"))
    text = numbered_text(args.tokens)
    stats = Stats(text.split())
    result: dict = {"benchmark": "soak",
                    "machine": {"platform": platform.platform(), "python": platform.python_version(),
                                "cpus": os.cpu_count()},
                    "params": params(args), "log_dir": str(tmp), "loadavg_before": os.getloadavg()}
    print(f"[soak] logs and data dirs in {tmp}", file=sys.stderr)
    cfg = tmp / "holder.yaml"
    cfg.write_text(f"ollama:\n  num_parallel: {args.num_parallel}\n")
    fakes = [Fake(tmp, f"fake{i}", args, text) for i in range(3)]
    async with trio.open_nursery() as nursery:
        c = Cluster(tmp, nursery)
        client: httpx.AsyncClient | None = None
        try:
            for f in fakes:
                await f.start()
            digests = [await f.digest(c.client) for f in fakes]
            result["model_digests"] = digests
            if len(set(digests)) != 1:
                raise RuntimeError(f"stand-ins disagree on the digest of {MODEL}: {digests} (resume needs equal ones)")
            g = await c.start("G", "--backend", "none", heartbeat=args.heartbeat)
            holders = [await c.start(f"h{i}", "--backend", "ollama", "--ollama-url", f.url, "--config", str(cfg),
                                     bootstrap=g, heartbeat=args.heartbeat) for i, f in enumerate(fakes)]
            with trio.fail_after(60):
                while not await holders_alive(c, g, holders):
                    await trio.sleep(0.2)
            result["nodes"] = {n.name: n.peer_id for n in (g, *holders)}
            print(f"[soak] mesh up: G + {len(holders)} holders; {args.streams} streams for {args.minutes} min, "
                  f"a kill every {args.kill_every} min", file=sys.stderr)
            run = Run(args, c, g, holders, fakes, stats)
            # Keep-alive, as real clients do; one connection per worker.
            limits = httpx.Limits(max_connections=args.streams + 8, max_keepalive_connections=args.streams + 8)
            client = httpx.AsyncClient(base_url=g.api, timeout=httpx.Timeout(args.deadline, connect=10.0),
                                       limits=limits)
            run.t0 = trio.current_time()
            t_wall = time.time()
            await run.sample(c.client, 0)  # the idle baseline: RSS before any request
            async with trio.open_nursery() as inner:
                inner.start_soon(run.sampler, c.client)
                inner.start_soon(run.killer)
                async with trio.open_nursery() as workers:
                    for i in range(args.streams):
                        workers.start_soon(run.worker, i, client)
                    await trio.sleep_until(run.t0 + args.minutes * 60.0)
                    run.stop.set()
                    print(f"[soak] {run.now():7.1f}s time is up: letting {run.in_flight} requests finish",
                          file=sys.stderr)
                # The sampler took its last full minute when time ran out; one more row
                # covers the requests that finished after it (their last minute, partial).
                if run.now() > args.minutes * 60.0 + 0.5:
                    await run.sample(c.client, round(run.now() / 60.0, 2))
                inner.cancel_scope.cancel()
            result["wall_s"] = round(time.time() - t_wall, 1)
            result["end_all_alive_in_g"] = await holders_alive(c, g, holders)
            result["rows"] = run.rows
            result["kills"] = run.kills
            result["totals"] = stats.totals()
            result["examples"] = stats.examples
            result["resumed_examples"] = stats.resumed_examples
            result["g_metrics_end"] = await g_metrics(c.client, g)
            names = {n.peer_id: n.name for n in (g, *holders)}
            result["logs"] = {n.name: log_digest(n.log_path, names) for n in (g, *holders)}
            result["rss_trend"] = rss_trend(run.rows)
            result["loadavg_after"] = os.getloadavg()
        finally:
            if client is not None:
                await client.aclose()
            await c.close()
            for f in fakes:
                await f.stop()
            nursery.cancel_scope.cancel()
    t = result["totals"]
    bad_kills = [k for k in result["kills"] if not k.get("seen_alive_by_g")]
    result["ok"] = not (t["hung"] or t["truncated"] or t["discontinuous"] or bad_kills)
    return result


def show(r: dict) -> None:
    a = r["params"]
    t = r["totals"]
    nodes = ["G", "h0", "h1", "h2"]
    print(f"\nmeshollama soak: {a['streams']} streams, {a['minutes']} min, SIGKILL a holder every {a['kill_every']} min "
          f"({r['machine']['cpus']} CPUs; {r['wall_s']} s wall; logs {r['log_dir']})")
    print(f"{'min':>6}{'done':>6}{'ok':>6}{'err':>5}{'hung':>5}{'trunc':>6}{'resum':>6}{'disc':>5}"
          f"{'ttfb p50':>9}{'p99 ms':>8}  " + "".join(f"{n + ' MiB':>9}" for n in nodes) + "  kills   load")
    for row in r["rows"]:
        rss = row["rss_mib"]
        print(f"{row['minute']:>6}{row['finished']:>6}{row['completed']:>6}{row['errors']:>5}{row['hung']:>5}"
              f"{row['truncated']:>6}{row['resumed']:>6}{row['discontinuous']:>5}"
              f"{row['ttfb_ms_p50'] if row['ttfb_ms_p50'] is not None else '-':>9}"
              f"{row['ttfb_ms_p99'] if row['ttfb_ms_p99'] is not None else '-':>8}  "
              + "".join(f"{rss.get(n) if rss.get(n) is not None else '-':>9}" for n in nodes)
              + f"  {','.join(row['kills_in_minute']) or '-':<7}{row['loadavg'][0]:>5}")
    print(f"\ntotals: {t['requests']} requests: {t['completed']} complete ({t['resumed_completed']} of them resumed), "
          f"{t['errors']} errors, {t['hung']} hung, {t['truncated']} truncated, {t['discontinuous']} discontinuous; "
          f"TTFB p50 {t['ttfb_ms']['p50']} ms p99 {t['ttfb_ms']['p99']} ms")
    for msg, n in t["errors_by_message"].items():
        print(f"  error x{n}: {msg}")
    for kind, exs in r.get("examples", {}).items():
        for e in exs[:3]:
            print(f"  {kind}: {e}")
    for k in r["kills"]:
        print(f"  kill #{k['n']} {k['node']} at {k['t_s']} s ({k['streams_on_it']} streams on it): "
              f"G saw it gone after {k.get('g_saw_it_gone_after_s')} s; restarted after {a['down_seconds']} s down, "
              f"alive in G {k.get('alive_after_spawn_s')} s after the spawn, "
              f"before the next kill: {k.get('back_before_next_kill')}")
    print("RSS per process, first -> last row (max), MiB:")
    for key, seg in r.get("rss_trend", {}).items():
        print(f"  {key:<22} min {seg['first_minute']} -> {seg['last_minute']}: {seg['first']} -> {seg['last']} "
              f"({seg['growth']:+.1f}; max {seg['max']})")
    print(f"queue at G: {r['g_metrics_end'].get('queue', {})}; resumes at G: {r['g_metrics_end'].get('resumes', {})}")
    print("PASS" if r["ok"] else "FAIL: requests lost, answers discontinuous, or a holder did not come back")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / f"soak-{stamp}.json",
                   help="write the results as JSON here (default benchmarks/results/soak-<UTC time>.json)")
    p.add_argument("--streams", type=int, default=50, help="concurrent client workers")
    p.add_argument("--minutes", type=float, default=30.0, help="how long the workers send")
    p.add_argument("--kill-every", type=float, default=5.0, help="minutes between SIGKILLs of a holder")
    p.add_argument("--down-seconds", type=float, default=5.0, help="seconds a killed holder stays down")
    p.add_argument("--tokens", type=int, default=60, help="words per answer")
    p.add_argument("--token-delay", type=float, default=0.05, help="stand-ins' seconds between words")
    p.add_argument("--deadline", type=float, default=120.0, help="a client's deadline per request: past it, HUNG")
    p.add_argument("--num-parallel", type=int, default=32, help="ollama.num_parallel of each holder")
    p.add_argument("--heartbeat", type=float, default=2.0, help="nodes' --heartbeat-interval (the default)")
    args = p.parse_args(argv)
    result = trio.run(main_async, args)
    report(result, args.out, show)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Issue 13's "how we will know": twenty gateways' worth of clients, five peers
of different speeds, stale announcements, and the load split like the oracle's.

A real 8-process mesh on loopback: three gateway-only nodes (``--backend
none``) and five serving nodes, each in front of its own stand-in Ollama that
holds the same model. The stand-ins differ only in speed (per-token delay, so
their speeds are 1:2:3:4:5) and, like Ollama with ``OLLAMA_NUM_PARALLEL=2``,
each runs two generations at once and queues the rest; every serving node
announces that capacity (``ollama.num_parallel`` 2). Heartbeats carry load at
most every 0.5 s (the cluster's interval) and are otherwise rare, so every
gateway routes from stale announcements corrected only by its own sends.

Twenty closed-loop client streams (7 + 7 + 6 over the three gateways: each
sends its next request when the previous one ends) share a fixed budget of
requests. Twenty outstanding requests for ten slots keep every peer saturated,
so the ideal ("oracle") split is proportional to each peer's throughput, speed
x slots: 1/15, 2/15, ... 5/15. Who served each request is read from the
``X-Meshollama-Peer`` header (and checked against the stand-ins' own counts);
each peer's share must be within 10 percentage points of the oracle's (no
herding), with no failed request, the slowest peer serving the fewest and the
fastest the most.
"""

from __future__ import annotations

import json
import math
import time
from functools import partial

import httpx
import pytest
import trio

from tests.fakes.fake_ollama import FakeOllama

from .cluster import cluster

pytestmark = pytest.mark.slow

PEER = "x-meshollama-peer"
MODEL = "llama3:latest"
SLOTS = 2  # each stand-in runs this many generations at once (Ollama's OLLAMA_NUM_PARALLEL)
TOKENS = 5  # chunks per answer
SLOWEST_DELAY = 0.5  # seconds per token on the slowest peer: its answers take TOKENS x this
SPEEDS = (1, 2, 3, 4, 5)  # relative speeds of the five serving peers
CLIENTS = (7, 7, 6)  # closed-loop client streams per gateway: 20 in all
BUDGET = 360  # requests in all (about 30 s at the mesh's ideal 12 requests a second)
TOLERANCE = 0.10  # the largest |share - oracle share| allowed


class SlottedFake(FakeOllama):
    """A stand-in Ollama that, like Ollama, runs ``slots`` generations at once
    and queues the rest (first come, first served), so a peer's throughput is
    its speed x its slots however many requests it is sent."""

    def __init__(self, *args, slots: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slots = trio.CapacityLimiter(slots)
        self.running = 0
        self.peak_running = 0
        self.peak_waiting = 0
        self.waiting = 0
        self.served = 0

    async def _generate(self, req, w) -> None:
        self.waiting += 1
        self.peak_waiting = max(self.peak_waiting, self.waiting)
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        try:
            await super()._generate(req, w)
            if json.loads(req.body or b"{}").get("prompt"):
                self.served += 1
        finally:
            self.running -= 1
            self.slots.release()


async def _ready(c, gateway, serving_ids) -> bool:
    """The gateway sees every serving peer alive, with the model loaded and SLOTS slots."""
    view = await c.view(gateway)
    for pid in serving_ids:
        p = view.get(pid)
        if p is None or p["state"] != "alive" or p["load"]["capacity"] != SLOTS:
            return False
        if not any(m["name"] == MODEL and m["loaded"] for m in p.get("models", [])):
            return False
    return True


async def _start_into(c, out, name, *args, bootstrap, env=None):
    out[name] = await c.start(name, *args, bootstrap=bootstrap, env=env)


async def _client(http, gw, api, budget, served, failures, latencies, log):
    """One closed-loop stream: the next request goes when the previous one ends."""
    body = json.dumps({"model": MODEL, "prompt": "split me", "stream": True})
    while budget["left"] > 0:
        budget["left"] -= 1
        t0 = time.monotonic()
        try:
            async with http.stream("POST", api + "/api/generate", content=body) as r:
                lines = [json.loads(line) async for line in r.aiter_lines() if line]
                peer = r.headers.get(PEER)
                if r.status_code != 200 or not lines or lines[-1].get("done") is not True or \
                        any("error" in ln for ln in lines) or peer is None:
                    failures.append(f"{r.status_code} {peer} {lines[-1:] if lines else r.text!r}")
                    continue
        except httpx.HTTPError as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            continue
        served.append(peer)
        log.append((time.monotonic(), gw, peer))
        latencies.setdefault(peer, []).append(time.monotonic() - t0)


async def _watch(c, gateways, serving_ids, samples):
    """Every second, what each gateway believes of each serving peer (for the report if the split is off)."""
    while True:
        for g, gw in enumerate(gateways):
            try:
                view = await c.view(gw)
            except httpx.HTTPError:
                continue
            for pid in serving_ids:
                p = view.get(pid)
                if p is not None:
                    samples.append((g, pid, p["state"], p["load"]["in_flight"], p["load"]["queued"],
                                    p["seconds_since_heartbeat"]))
        await trio.sleep(1.0)


async def _metric_lines(c, node, prefixes):
    text = (await c.client.get(node.api + "/metrics")).text
    return [ln for ln in text.splitlines() if ln.startswith(prefixes) and not ln.endswith(" 0.0")]


async def _diagnostics(c, gateways, serving, log, samples, t_ready, t_done) -> None:
    """Printed every run, to tell where a split went wrong if it does: each
    gateway's split and the split over time, what the gateways believed of each
    peer, their retry/error/queue counters, the announcements each peer made,
    and the nodes' warnings."""
    ids = [n.peer_id for n in serving]
    for g in range(len(gateways)):
        print(f"  gateway g{g}: " + " ".join(f"{sum(1 for _, gg, p in log if gg == g and p == pid):3d}" for pid in ids))
    for k in range(4):
        lo, hi = t_ready + k * (t_done - t_ready) / 4, t_ready + (k + 1) * (t_done - t_ready) / 4
        print(f"  quarter {k + 1}: " + " ".join(f"{sum(1 for t, _, p in log if lo <= t < hi and p == pid):3d}"
                                                for pid in ids))
    for i, pid in enumerate(ids):
        mine = [x for x in samples if x[1] == pid]
        if mine:
            ages = " ".join(f"{max((x[5] for x in mine if x[0] == g), default=math.nan):.1f}"
                            for g in range(len(gateways)))
            print(f"  gateways' view of s{i}: {len(mine)} samples, not alive (state, gateway)"
                  f" {sorted((x[2], x[0]) for x in mine if x[2] != 'alive')}, announced busy mean"
                  f" {sum(x[3] + x[4] for x in mine) / len(mine):.1f} max {max(x[3] + x[4] for x in mine)},"
                  f" heartbeat age max per gateway {ages} s")
    counters = ("meshollama_retries_total", "meshollama_upstream_errors_total", "meshollama_upstream_timeouts_total",
                "meshollama_queue_total", "meshollama_heartbeats_dropped_total")
    for g, gw in enumerate(gateways):
        print(f"  g{g} metrics:", await _metric_lines(c, gw, counters))
    for i, node in enumerate(serving):
        sent = await _metric_lines(c, node, ("meshollama_heartbeats_sent_total",))
        print(f"  s{i} announcements:", [ln.split("{", 1)[1] for ln in sent])
    for node in c.nodes:
        warnings = [ln for ln in node.log_path.read_text().splitlines() if " WARNING " in ln or " ERROR " in ln]
        for ln in warnings[:5]:
            print(f"  {node.name} log: {ln[:200]}")


async def test_twenty_streams_split_like_the_oracle(tmp_path):
    env = {"MESHOLLAMA_OLLAMA_NUM_PARALLEL": str(SLOTS)}
    with trio.fail_after(150):
        async with trio.open_nursery() as fn, cluster(tmp_path) as c:
            fakes = []
            for i, speed in enumerate(SPEEDS):
                fake = SlottedFake([MODEL], name=f"s{i}", token_delay=SLOWEST_DELAY / speed, tokens=TOKENS,
                                   slots=SLOTS)
                await fn.start(fake.serve, 0)
                # Loaded before the nodes start, so no peer starts cold (the cold penalty is not the subject).
                r = await c.client.post(fake.url + "/api/generate", json={"model": MODEL, "prompt": ""})
                assert r.status_code == 200
                fakes.append(fake)

            t_start = time.monotonic()
            first = await c.start("s0", "--backend", "ollama", "--ollama-url", fakes[0].url, env=env)
            nodes = {"s0": first}
            async with trio.open_nursery() as starter:
                for i in range(1, len(SPEEDS)):
                    starter.start_soon(partial(_start_into, c, nodes, f"s{i}", "--backend", "ollama",
                                               "--ollama-url", fakes[i].url, bootstrap=first, env=env))
                for g in range(len(CLIENTS)):
                    starter.start_soon(partial(_start_into, c, nodes, f"g{g}", "--backend", "none",
                                               bootstrap=first))
            serving = [nodes[f"s{i}"] for i in range(len(SPEEDS))]
            gateways = [nodes[f"g{g}"] for g in range(len(CLIENTS))]
            serving_ids = [n.peer_id for n in serving]
            with trio.fail_after(30):
                for gw in gateways:
                    await c.wait_until(partial(_ready, c, gw, serving_ids))
            t_ready = time.monotonic()

            budget = {"left": BUDGET}
            served: list[str] = []
            failures: list[str] = []
            latencies: dict[str, list[float]] = {}
            log: list[tuple[float, int, str]] = []  # (when it ended, gateway, peer) per request
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
            samples: list[tuple] = []  # (gateway, peer, state, announced in_flight, queued, heartbeat age)
            async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits) as http:
                with trio.fail_after(90):
                    async with trio.open_nursery() as watcher:
                        watcher.start_soon(_watch, c, gateways, serving_ids, samples)
                        async with trio.open_nursery() as load:
                            for g, (gw, n) in enumerate(zip(gateways, CLIENTS)):
                                for _ in range(n):
                                    load.start_soon(_client, http, g, gw.api, budget, served, failures, latencies,
                                                    log)
                        watcher.cancel_scope.cancel()
            t_done = time.monotonic()

            counts = [served.count(pid) for pid in serving_ids]
            total = len(served)
            oracle = [s / sum(SPEEDS) for s in SPEEDS]
            shares = [n / max(total, 1) for n in counts]
            diffs = [s - o for s, o in zip(shares, oracle)]
            print(f"\nload split: {total} requests in {t_done - t_ready:.1f} s ({total / (t_done - t_ready):.1f}/s;"
                  f" ideal {SLOTS * sum(SPEEDS) / (TOKENS * SLOWEST_DELAY):.1f}/s), mesh up in {t_ready - t_start:.1f} s")
            for i, (speed, fake, pid) in enumerate(zip(SPEEDS, fakes, serving_ids)):
                lat = latencies.get(pid, [])
                mean = sum(lat) / len(lat) if lat else math.nan
                print(f"  s{i} speed {speed}: {counts[i]:4d} served = {shares[i]:6.1%} (oracle {oracle[i]:6.1%},"
                      f" diff {diffs[i]:+6.1%}); mean latency {mean:.2f} s, nominal"
                      f" {TOKENS * fake.knobs.token_delay:.2f} s; peak running {fake.peak_running},"
                      f" peak queued at the stand-in {fake.peak_waiting}")
            with trio.fail_after(10):
                await _diagnostics(c, gateways, serving, log, samples, t_ready, t_done)
            print(f"  largest |diff| {max(abs(d) for d in diffs):.1%}; failures {len(failures)}")

            assert not failures, failures[:5]
            assert total == BUDGET
            assert [f.served for f in fakes] == counts  # the header names the peer that really served it
            assert all(f.peak_running <= SLOTS for f in fakes)
            assert max(abs(d) for d in diffs) <= TOLERANCE, (shares, oracle)
            assert counts[0] == min(counts) and counts[-1] == max(counts), counts
            fn.cancel_scope.cancel()

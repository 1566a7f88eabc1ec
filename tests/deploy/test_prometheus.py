"""The shipped Prometheus config, rules and Grafana dashboard, against a real Prometheus.

Fast checks: ``promtool check config``/``check rules`` on the shipped files,
``promtool test rules`` on ``deploy/prometheus/tests/alerts_test.yml`` (every
alert has a firing test there), the PromQL helpers, and the gauges the node
sets from its peer table.

The slow test runs a real mesh of three ``meshollama start`` processes with
stand-in Ollama backends, a real Prometheus (``/usr/bin/prometheus``) with the
shipped scrape config and rules (only intervals, paths, the targets file and
the alerts' ``for:`` changed), makes traffic that touches every metric
(answers, errors, retries, resumes, a full queue, a timeout, a refused Host,
a model pull over the mesh, a copy-count target), and then asks Prometheus's
HTTP API for every recording rule, every alert expression and every
dashboard query: each must return data. A node SIGKILLed mid-stream makes
MeshollamaNodeDown fire, and the alerts in DRIVEN fire too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import trio
import yaml
from prometheus_client import CollectorRegistry

from meshollama.catalog import LoadInfo, ModelInfo, ReplicaTarget
from meshollama.gateway.metrics import MeshMetrics
from meshollama.mesh.peertable import PeerState
from tests.fakes.fake_ollama import serve_fake
from tests.integration.cluster import cluster
from tests.integration.modelstores import node_env, write_model

from .prom_exprs import PROMETHEUS, conditions, panel_queries, rules

PROMETHEUS_BIN = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
needs_promtool = pytest.mark.skipif(not os.access(PROMTOOL, os.X_OK),
                                    reason="promtool not installed (Debian package prometheus; scripts/install.sh)")
needs_prometheus = pytest.mark.skipif(not os.access(PROMETHEUS_BIN, os.X_OK),
                                      reason="prometheus not installed (Debian package prometheus; scripts/install.sh)")

# Alerts this test drives until Prometheus says they fire (with ``for:`` cut to 1 s).
# The queue refusal and the first-byte timeout happen once each: a labelled
# counter's series is born at 1, so its rate stays 0 until a second one (the
# alerts want sustained refusals, not one); their expressions are checked for
# data below and promtool's unit test makes them fire.
DRIVEN = {"MeshollamaNodeDown", "MeshollamaHighErrorRate", "MeshollamaResumeFailures",
          "MeshollamaModelUnderReplicated"}
# A label filter that keeps an alert quiet in a healthy mesh goes too, so its
# metric is still proven to exist: a healthy mesh drops only stale (duplicate)
# heartbeats, and every pull here succeeds.
# Allowed to be empty, and why. A libp2p stream failing with an error (reset,
# bad frame) is the one fault this test cannot cause at will on loopback: a
# peer killed mid-stream closes its streams cleanly (counted as a broken
# stream and a resume, not as a p2p stream error). promtool's unit test makes
# MeshollamaP2PStreamErrors fire; the metric is checked where it shows up.
MAY_BE_EMPTY = {"meshollama_p2p_stream_errors_total", "kind:meshollama_p2p_stream_errors:rate5m"}
RELAX = {"MeshollamaHeartbeatsDropped": ('{reason!="stale"}', ""),
         "MeshollamaModelPullFailures": ('{outcome="error"}', "")}


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS, check=False)


# --- fast: the shipped files --------------------------------------------------------------------


@needs_promtool
def test_promtool_check_config_and_rules():
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stdout + r.stderr, r.stdout + r.stderr
    r = promtool("check", "rules", "rules/recording.yml", "rules/alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_unit_tests_of_the_alerts():
    r = promtool("test", "rules", "tests/alerts_test.yml")
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_every_alert_has_a_firing_unit_test_and_what_operators_need():
    doc = yaml.safe_load((PROMETHEUS / "tests" / "alerts_test.yml").read_text())
    fired = {check["alertname"] for test in doc["tests"] for check in test.get("alert_rule_test", [])
             if check.get("exp_alerts")}
    alerts = rules("alerts")
    assert {a["alert"] for a in alerts} <= fired
    for alert in alerts:
        assert alert.get("for"), alert["alert"]
        assert alert["labels"]["severity"] in ("critical", "warning", "info"), alert["alert"]
        assert alert["annotations"].get("summary") and alert["annotations"].get("description"), alert["alert"]


def test_scrape_config_has_file_and_dns_discovery():
    text = (PROMETHEUS / "prometheus.yml").read_text()
    job = yaml.safe_load(text)["scrape_configs"][0]
    assert job["job_name"] == "meshollama" and job["metrics_path"] == "/metrics"
    assert job["file_sd_configs"][0]["files"] == ["targets/*.json"]
    assert "dns_sd_configs" in text and "type: SRV" in text  # the commented DNS example
    targets = json.loads((PROMETHEUS / "targets" / "meshollama.json").read_text())
    assert all(t["targets"] for t in targets)


def test_conditions_strip_thresholds_at_the_top_level_only():
    assert conditions('a{x=~"1|2"} > 0.05 and b > 1') == ['a{x=~"1|2"}', "b"]
    assert conditions("x < scalar(y) - 1") == ["x", "scalar(y) - 1"]
    assert conditions('max by (p) (s{state="down"}) == 1') == ['max by (p) (s{state="down"})']
    assert conditions("sum(rate(m{a!=\"b\"}[5m])) / sum(rate(n[5m])) >= 2e-3") == [
        'sum(rate(m{a!="b"}[5m])) / sum(rate(n[5m]))']
    assert conditions("vector_or_more{x='a and b'}") == ["vector_or_more{x='a and b'}"]


# --- fast: gauges from the peer table ------------------------------------------------------------


def _peer(pid, state, models=(), *, is_self=False, load=None):
    return SimpleNamespace(peer_id=pid, state=state, is_self=is_self, load=load or LoadInfo(),
                           models=tuple(ModelInfo(m) for m in models))


def _sample(registry, name, **labels):
    return registry.get_sample_value(name, labels)


def test_observe_sets_peer_model_and_node_gauges_and_forgets_what_left():
    registry = CollectorRegistry()
    m = MeshMetrics(registry)
    snap = SimpleNamespace(peers=(
        _peer("me", PeerState.ALIVE, ["llama3:latest"], is_self=True, load=LoadInfo(in_flight=1, capacity=2)),
        _peer("b", PeerState.ALIVE, ["llama3"]),
        _peer("c", PeerState.UNREACHABLE, ["llama3:latest"]),
    ))
    status = {"peer_id": "me", "version": "1.2.3", "host": "running", "draining": False,
              "connected_peers": ["b"]}
    m.observe(snap, status, [ReplicaTarget("llama3", 3), ReplicaTarget("gone:latest", 0)])
    assert _sample(registry, "meshollama_peers", state="alive") == 1
    assert _sample(registry, "meshollama_peers", state="unreachable") == 1
    assert _sample(registry, "meshollama_peers", state="down") == 0
    assert _sample(registry, "meshollama_peer_state", peer="c", state="unreachable") == 1
    assert _sample(registry, "meshollama_peer_state", peer="c", state="alive") == 0
    assert _sample(registry, "meshollama_peer_state", peer="me", state="alive") is None  # not a peer
    assert _sample(registry, "meshollama_peer_load", peer="me", kind="in_flight") == 1
    assert _sample(registry, "meshollama_peer_load", peer="me", kind="capacity") == 2
    assert _sample(registry, "meshollama_model_copies", model="llama3:latest") == 2  # c is not up
    assert _sample(registry, "meshollama_model_copies_target", model="llama3:latest") == 3
    assert _sample(registry, "meshollama_model_copies_target", model="gone:latest") is None
    assert _sample(registry, "meshollama_node_info", peer="me", version="1.2.3") == 1
    assert _sample(registry, "meshollama_p2p_host_up") == 1
    assert _sample(registry, "meshollama_p2p_connected_peers") == 1
    assert _sample(registry, "meshollama_node_start_time_seconds") > 1e9

    # c leaves the table, b goes down, the target is cleared, the host restarts, the node drains
    snap = SimpleNamespace(peers=(_peer("me", PeerState.DRAINING, is_self=True), _peer("b", PeerState.DOWN)))
    m.observe(snap, dict(status, host="restarting", draining=True, connected_peers=[]), [])
    assert _sample(registry, "meshollama_peer_state", peer="c", state="unreachable") is None
    assert _sample(registry, "meshollama_peer_load", peer="c", kind="in_flight") is None
    assert _sample(registry, "meshollama_peer_state", peer="b", state="down") == 1
    assert _sample(registry, "meshollama_peers", state="unreachable") == 0
    assert _sample(registry, "meshollama_model_copies", model="llama3:latest") is None
    assert _sample(registry, "meshollama_model_copies_target", model="llama3:latest") is None
    assert _sample(registry, "meshollama_node_draining") == 1
    assert _sample(registry, "meshollama_p2p_host_up") == 0


# --- slow: a real mesh, a real Prometheus --------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prom_config(tmp: Path, targets: list[str]) -> Path:
    """The shipped config with what must differ here: 1 s intervals, paths under ``tmp``,
    rule files whose alerts wait 1 s instead of minutes (their timing is promtool's test)."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    (tmp / "targets").mkdir()
    (tmp / "targets" / "mesh.json").write_text(json.dumps([{"targets": targets}]))
    job = config["scrape_configs"][0]
    job["file_sd_configs"][0]["files"] = [str(tmp / "targets" / "*.json")]
    alerts = yaml.safe_load((PROMETHEUS / "rules" / "alerts.yml").read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            rule["for"] = "1s"
    (tmp / "alerts.yml").write_text(yaml.safe_dump(alerts))
    config["rule_files"] = [str(PROMETHEUS / "rules" / "recording.yml"), str(tmp / "alerts.yml")]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class Prom:
    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx.AsyncClient(timeout=10)

    async def get(self, path: str, **params) -> dict:
        r = await self.client.get(self.url + path, params=params)
        body = r.json()
        assert body.get("status") == "success", (path, params, body)
        return body["data"]

    async def query(self, expr: str) -> list:
        return (await self.get("/api/v1/query", query=expr))["result"]

    async def empty(self, exprs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(what, expr) for what, expr in exprs if not await self.query(expr)]

    async def firing(self) -> set[str]:
        return {a["labels"]["alertname"] for a in (await self.get("/api/v1/alerts"))["alerts"]
                if a["state"] == "firing"}


def every_query() -> list[tuple[str, str]]:
    out = [(f"recording rule {r['record']}", r["record"]) for r in rules("recording")]
    for rule in rules("alerts"):
        expr = rule["expr"]
        old, new = RELAX.get(rule["alert"], ("", ""))
        expr = expr.replace(old, new) if old else expr
        out += [(f"alert {rule['alert']}", side) for side in conditions(expr)]
    out += [(f"panel {title!r}", expr) for title, expr in panel_queries()]
    return out


async def chat(client, node, model, *, stream=True, headers=None):
    r = await client.post(node.api + "/api/chat", headers=headers,
                          json={"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
    return r.status_code


async def queue_depth(client, node, model) -> float:
    text = (await client.get(node.api + "/metrics")).text
    m = re.search(rf'^meshollama_queue_depth{{model="{re.escape(model)}"}} (\S+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


async def wait_for(predicate, step=0.1):
    while not await predicate():
        await trio.sleep(step)


@needs_prometheus
@pytest.mark.slow
async def test_rules_alerts_and_dashboard_against_a_real_mesh(tmp_path):
    with trio.fail_after(150):
        async with trio.open_nursery() as nursery, cluster(tmp_path) as c:
            write_model(tmp_path / "a-models", "tiny:1b", 256 * 1024)
            dirs = {n: tmp_path / f"{n}-models" for n in "abc"}
            for d in dirs.values():
                d.mkdir(exist_ok=True)
            fa = await nursery.start(partial(serve_fake, ["shared:latest"], name="a", models_dir=dirs["a"]))
            fb = await nursery.start(partial(serve_fake, ["shared:latest", "bonly:latest"], name="b",
                                             models_dir=dirs["b"]))
            fc = await nursery.start(partial(serve_fake, ["conly:latest"], name="c", models_dir=dirs["c"]))
            # a: the entry node, with a one-request queue and a short first-byte timeout.
            a = await c.start("a", "--backend", "ollama", "--ollama-url", fa.url,
                              env=node_env(dirs["a"], MESHOLLAMA_GATEWAY_QUEUE_SIZE="1",
                                           MESHOLLAMA_GATEWAY_FIRST_BYTE_TIMEOUT="2"))
            # b: takes request bodies of at most 2 KiB from peers (a refusal to count).
            b = await c.start("b", "--backend", "ollama", "--ollama-url", fb.url, bootstrap=a,
                              env=node_env(dirs["b"], MESHOLLAMA_P2P_MAX_REQUEST_BYTES="2048"))
            k = await c.start("c", "--backend", "ollama", "--ollama-url", fc.url, bootstrap=a, env=node_env(dirs["c"]))
            nodes = (a, b, k)

            async def converged() -> bool:
                for node in nodes:
                    view = await c.view(node)
                    if sum(1 for p in view.values() if p["state"] == "alive") < 3:
                        return False
                return True

            with trio.fail_after(30):
                await wait_for(converged)

            port = free_port()
            config = prom_config(tmp_path, [n.api.removeprefix("http://") for n in nodes])
            prom_log = (tmp_path / "prometheus.log").open("wb")
            proc = await trio.lowlevel.open_process(
                [PROMETHEUS_BIN, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"], stdout=prom_log, stderr=subprocess.STDOUT)
            prom = Prom(f"http://127.0.0.1:{port}")
            try:
                await drive(prom, c, nodes, (fa, fb, fc), tmp_path)
            except BaseException:
                print((tmp_path / "prometheus.log").read_text()[-3000:])
                raise
            finally:
                proc.kill()
                with trio.move_on_after(5) as cleanup:
                    cleanup.shield = True
                    await proc.wait()
                    await prom.client.aclose()
                prom_log.close()
                nursery.cancel_scope.cancel()


async def drive(prom: Prom, c, nodes, fakes, tmp_path) -> None:
    a, b, k = nodes
    fa, fb, fc = fakes

    async def targets_up() -> bool:
        try:
            return len(await prom.query('up{job="meshollama"} == 1')) == 3
        except (httpx.HTTPError, AssertionError, ValueError):
            return False

    with trio.fail_after(30):
        await wait_for(targets_up, 0.2)

    async with httpx.AsyncClient(timeout=30) as client:
        # Answers, on two gateways.
        for _ in range(6):
            assert await chat(client, a, "shared:latest") == 200
        for _ in range(2):
            assert await chat(client, b, "conly:latest") == 200
        # A model nobody has (404), a backend that fails (500).
        assert await chat(client, a, "nobody:latest") == 404
        fb.set(fail_before_first_byte={"status": 500, "body": {"error": "boom"}}, fault_count=1,
               fault_paths=("/api/chat",))
        assert await chat(client, a, "bonly:latest", stream=False) >= 500
        # Both holders fail once before the first byte: a retry.
        for fake in (fa, fb):
            fake.set(fail_before_first_byte={"status": 503, "body": {"error": "busy"}}, fault_count=1,
                     fault_paths=("/api/chat",))
        await chat(client, a, "shared:latest", stream=False)
        for fake in fakes:
            fake.clear_faults()
        # Streams broken mid-answer: resumed on the other holder, or nowhere (one holder).
        for fake in (fa, fb):
            fake.set(fail_after_n_chunks={"n": 2, "mode": "close"}, fault_count=1, fault_paths=("/api/chat",))
        await chat(client, a, "shared:latest")
        for fake in fakes:
            fake.clear_faults()
        fb.set(fail_after_n_chunks={"n": 2, "mode": "close"}, fault_count=1, fault_paths=("/api/chat",))
        await chat(client, a, "bonly:latest")
        fb.clear_faults()
        # The queue: c's only slot hangs (then times out on a's first-byte timeout),
        # one request waits in a's one-place line, the next is turned away.
        fc.set(hang_before_first_byte=True, fault_count=1, fault_paths=("/api/chat",))
        seen = len(fc.requests)
        async with trio.open_nursery() as waiters:
            waiters.start_soon(chat, client, a, "conly:latest")
            await fc.wait_for(lambda: len(fc.requests) > seen)
            waiters.start_soon(chat, client, a, "conly:latest")
            await wait_for(lambda: _positive(queue_depth(client, a, "conly:latest")))
            assert await chat(client, a, "conly:latest") == 503
        fc.clear_faults()
        # A request body over b's limit for peers: b refuses the stream (too_large).
        r = await client.post(a.api + "/api/chat", json={"model": "bonly:latest", "stream": False,
                                                         "messages": [{"role": "user", "content": "x" * 8192}]})
        assert r.status_code >= 400, r.text
        # The gate: a foreign Host header.
        r = await client.get(a.api + "/api/tags", headers={"host": "evil.example"})
        assert r.status_code >= 400
        # Models: b pulls tiny:1b from a over the mesh; a copy-count target of 3.
        r = await client.post(b.api + "/api/pull", json={"model": "tiny:1b", "stream": False})
        assert r.status_code == 200 and r.json().get("status") == "success", r.text
        r = await client.post(a.api + "/api/mesh/replicate", json={"model": "tiny:1b", "copies": 3})
        assert r.status_code == 200, r.text
        # c dies mid-stream (SIGKILL): a's libp2p stream to it breaks (a p2p stream
        # error, a resume with no other holder), and Prometheus sees the node down.
        fc.set(token_delay=0.3)
        async with client.stream("POST", a.api + "/api/chat", json={
                "model": "conly:latest", "messages": [{"role": "user", "content": "hi"}]}) as resp:
            lines = resp.aiter_lines()
            assert resp.status_code == 200 and await lines.__anext__()
            c.signal(k, signal.SIGKILL)
            async for _ in lines:
                pass

    queries = every_query()
    missing = queries

    async def all_have_data() -> bool:
        nonlocal missing
        missing = await prom.empty(missing)
        return not missing

    with trio.move_on_after(30):
        await wait_for(all_have_data, 1.0)
    missing = [(what, expr) for what, expr in missing if not any(name in expr for name in MAY_BE_EMPTY)]
    assert not missing, "queries without data:\n" + "\n".join(f"  {w}: {e}" for w, e in missing)

    groups = (await prom.get("/api/v1/rules"))["groups"]
    bad = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
    assert not bad, bad

    # The alerts driven above fire (MeshollamaNodeDown: c, killed above).
    firing: set[str] = set()

    async def driven_fire() -> bool:
        nonlocal firing
        firing = await prom.firing()
        return DRIVEN <= firing

    with trio.move_on_after(20):
        await wait_for(driven_fire, 0.5)
    assert DRIVEN <= firing, f"not firing: {sorted(DRIVEN - firing)}; firing: {sorted(firing)}"


async def _positive(value) -> bool:
    return await value > 0

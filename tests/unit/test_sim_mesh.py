"""The mesh simulation (benchmarks/sim_mesh.py) on small meshes: invariants
that could really fail, all on the virtual clock (no wall-clock assertions)."""

from __future__ import annotations

import pytest

from benchmarks.sim import scenarios
from benchmarks.sim.network import Network
from benchmarks.sim.params import Params
from meshollama.mesh.cadence import GROWTH
from meshollama.mesh.peertable import UP


def test_small_mesh_converges_and_a_join_costs_one_announcement() -> None:
    new = scenarios.convergence(30, "new", seed=3)
    # the table pull gives a joiner the mesh; its one forced announcement (first gossip
    # neighbour) gives the mesh the joiner; the publish loop notices within a POLL
    assert new["converge_after_last_join_s"] is not None and new["converge_after_last_join_s"] < 0.6
    assert new["join_visible_everywhere_s"] is not None and new["join_visible_everywhere_s"] < 0.6
    assert new["announcements_for_one_join"] == 1
    assert new["announcements_during_joins"].get("first", 0) == 0  # said before any connection: heard by nobody
    assert new["announcements_during_joins"]["forced"] == 30
    # the code before 18fde4b: no pull (a joiner waits for the 2 s heartbeats), every connection forces one
    legacy = scenarios.convergence(30, "legacy", seed=3)
    assert 1.0 < legacy["converge_after_last_join_s"] < 3.0
    assert legacy["announcements_for_one_join"] >= 3


@pytest.mark.parametrize("n", [10, 30, 60])
def test_idle_rate_per_node_is_flat_in_n_up_to_the_ceiling(n: int) -> None:
    r = scenarios.cost(n, "new", seed=1, load=False, window=600.0)
    refresh = 10.0 * (n - 1)  # refresh_for: 10 s per peer (30 s floor, 600 s ceiling)
    assert r["refresh_s"] == pytest.approx(refresh)
    assert r["said_refresh_s"] == [refresh]  # every node has announced it (grown 1.5x at a time)
    assert {k for k, v in r["reasons_per_s"].items() if v} == {"refresh"}
    assert r["announcements_per_s"] == pytest.approx(n / refresh, rel=0.15)
    # each node hears ~1 refresh per 10 s whatever N: 2d copies each
    assert r["msgs_per_s"] == pytest.approx(2 * 3 * 0.1 * n / (n - 1), rel=0.15)
    assert r["table_entries"] == n - 1  # nobody expired while idle


def test_legacy_idle_cost_grows_with_n() -> None:
    a = scenarios.cost(10, "legacy", seed=1, load=False, window=30.0)
    b = scenarios.cost(30, "legacy", seed=1, load=False, window=30.0)
    assert a["msgs_per_s"] == pytest.approx(2 * 3 * 10 / 2.0, rel=0.1)
    assert b["msgs_per_s"] == pytest.approx(3 * a["msgs_per_s"], rel=0.1)
    assert b["cpu_pct"] > 10 * scenarios.cost(30, "new", seed=1, load=False, window=600.0)["cpu_pct"]


def test_refresh_grows_at_most_1_5x_per_announcement_and_one_loss_never_expires() -> None:
    net, nodes = scenarios.build(Params(), 20, 4, gateways=0, gateways_serve=True, full_max=100, observers=0,
                                 join_window=2.0)
    deaf = nodes[7]  # misses every second announcement of every peer (never two in a row)
    heard: dict[str, int] = {}
    deliver = net._deliver

    def lossy(ann) -> None:
        heard[ann.peer_id] = heard.get(ann.peer_id, 0) + 1
        if heard[ann.peer_id] % 2 or deaf.pid not in net.tabled:
            deliver(ann)
            return
        del net.tabled[deaf.pid]
        deliver(ann)
        net.tabled[deaf.pid] = deaf

    net._deliver = lossy
    net.sim.run(2500.0)
    for x in nodes:
        said = x.said_refresh
        assert said[0] == 30.0 and said[-1] == 190.0  # floor, then 10 s x 19 peers
        assert all(b <= a * GROWTH + 1e-9 for a, b in zip(said, said[1:]))
    assert sum(heard.values()) > 20 * 8 and net.expired_alive == 0
    assert len(deaf.table) == 19


def test_load_is_news_only_through_the_policy() -> None:
    r = scenarios.cost(30, "new", seed=2, load=True, window=600.0, load_window=120.0)
    reasons = {k for k, v in r["reasons_per_s"].items() if v}
    assert "forced" not in reasons and "first" not in reasons  # no announcement for a slot taken
    assert "load" in reasons
    assert r["requests_done"] > 0


def _mesh_with_load(mode: str, seed: int = 5) -> tuple[Network, list, list]:
    net, nodes = scenarios.build(Params.for_mode(None, mode), 12, seed, gateways=3, gateways_serve=False,
                                 full_max=100, observers=0, join_window=1.0)
    gateways = nodes[scenarios.SEEDS:scenarios.SEEDS + 3]
    scenarios.schedule_requests(net, gateways, 3.0, 2.0, 200.0, seed)
    return net, nodes, gateways


def test_a_crash_reaches_every_table_within_seconds_through_one_hint() -> None:
    net, nodes, gateways = _mesh_with_load("new")
    net.sim.run(30.0)
    victim = max(nodes[scenarios.SEEDS + 3:], key=lambda x: x.served)
    assert victim.served > 0
    net.sim.run(40.0)
    net.crash(victim)
    net.sim.run(43.0)  # hint delay 0.5-1.5 s, min_gap 0.25 s, gossip milliseconds
    for node in net.tabled.values():
        view = node.table.get(victim.pid)
        assert view is None or view.state not in UP, node.index
    assert net.hint_marks > 0  # some learnt it from a hint, not from their own connection
    assert 1 <= net.hints_said <= 3  # suppression: about one announcement per crash, not one per neighbour
    net.sim.run(200.0)
    assert net.last_route_to_dead.get(victim.pid, 40.0) - 40.0 < 3.0
    assert net.attempts_to_dead <= len(gateways)
    assert not [r for r in net.requests if r.failed]  # broken or refused tries were retried
    # still expired in the end: miss_limit x what it last said
    net.sim.run(40.0 + 3 * victim.said_refresh[-1] + 5.0)
    for node in net.tabled.values():
        assert node.table.get(victim.pid) is None
    assert net.expired_alive == 0


def test_legacy_crash_is_dropped_by_expiry() -> None:
    net, nodes, gateways = _mesh_with_load("legacy")
    net.sim.run(40.0)
    victim = max(nodes[scenarios.SEEDS + 3:], key=lambda x: x.served)
    net.crash(victim)
    net.sim.run(48.0)  # 3 x 2 s heartbeats, expire() every second
    for node in net.tabled.values():
        assert node.table.get(victim.pid) is None
    assert net.hints_said == 0
    net.sim.run(200.0)
    assert net.attempts_to_dead <= len(gateways)
    assert not [r for r in net.requests if r.failed]


def test_a_graceful_leave_is_seen_by_every_table_at_once() -> None:
    net, nodes, _ = _mesh_with_load("new")
    net.sim.run(30.0)
    leaver = nodes[-1]
    net.leave(leaver)
    net.sim.run(30.5)  # gossip takes milliseconds
    for node in net.tabled.values():
        if node is leaver:  # still finishing its requests
            continue
        assert node.table.get(leaver.pid) is None
    net.sim.run(60.0)
    assert not leaver.alive and not leaver.active and not leaver.queue
    assert net.hints_said == 0  # its closing connections name no one: it left the tables first


def test_load_split_is_close_to_the_oracle_at_small_scale() -> None:
    r = scenarios.balance("new", seed=1, duration=300.0)
    mesh = r["mesh"]["share"]
    assert sum(mesh) == pytest.approx(1.0, abs=1e-3)
    assert mesh == sorted(mesh)  # faster peers get more
    assert r["max_share_diff_pp"] <= 15.0
    assert r["mesh"]["done"] == r["mesh"]["requests"]
    assert r["mesh"]["latency_mean_s"] < 2.5 * r["oracle"]["latency_mean_s"]


def test_runs_are_deterministic() -> None:
    a = scenarios.cost(10, "new", seed=9, load=True, window=100.0, load_window=40.0)
    b = scenarios.cost(10, "new", seed=9, load=True, window=100.0, load_window=40.0)
    for k in ("route_us", "table_bytes_per_entry", "table_kib"):  # wall clock and tracemalloc: measured, not simulated
        a.pop(k), b.pop(k)
    assert a == b


def test_a_join_pulls_the_bootstrap_table() -> None:
    net, nodes = scenarios.build(Params(), 20, 2, gateways=0, gateways_serve=True, full_max=100, observers=0,
                                 join_window=2.0)
    net.sim.run(10.0)
    late = net.add_node(serves=True)
    net.sim.at(10.0, net.start, late, nodes[0])
    net.sim.run(10.06)  # connected (50 ms) and pulled, before any announcement of the others
    assert len(late.table) == 20
    assert late.pulls == 1 and late.sync_entries >= 20


def test_calibration_fits_the_two_refresh_measurements() -> None:
    cal = scenarios.calibrate(1, window=120.0)
    rows = {r["run"]: r for r in cal["rows"]}
    assert abs(rows["refresh 3 s, pings on"]["error_pct"]) < 25
    assert abs(rows["refresh 30 s, idle pings off"]["error_pct"]) < 25
    assert cal["rpc_ms"] == pytest.approx(Params().rpc_ms, rel=0.1)


def test_plots(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from benchmarks.sim import plots

    rows = [{"n": n, "mode": m, "load": False, "msgs_per_s": n * k, "cpu_pct": n * k / 10}
            for n in (10, 30) for m, k in (("new", 0.2), ("legacy", 3.0))]
    plots.cost_plot(rows, tmp_path / "cost.png")
    assert (tmp_path / "cost.png").stat().st_size > 1000

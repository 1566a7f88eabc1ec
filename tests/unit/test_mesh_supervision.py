"""The libp2p host is supervised: a failing host is rebuilt with backoff while
the peer table, ``snapshot()``, ``status()`` and the gateway side go on.

On the in-memory transport of ``test_mesh_transport``, in virtual time
(``autojump_clock``): every delay below is exact.
"""

from __future__ import annotations

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from meshollama.errors import P2PError, PortInUseError, UpstreamUnavailable
from meshollama.httpmsg import ProxyRequest
from meshollama.mesh.peertable import PeerState
from meshollama.mesh.service import TEST_FAULTS_ENV
from meshollama.mesh.supervisor import Backoff, leaf
from meshollama.p2p.httpstream import Guard
from meshollama.p2p.keys import peer_id_of
from tests.unit.test_mesh_transport import FakeNet, heartbeat, make_service

EPS = 1e-6
PEER = peer_id_of(create_new_key_pair())


def test_backoff_doubles_to_the_cap_and_starts_over_after_a_healthy_run():
    b = Backoff(first=0.5, cap=30.0, healthy_after=60.0)
    assert [b.after_failure(None) for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert b.after_failure(59.9) == 30  # not long enough to count as healthy
    assert b.after_failure(60.0) == 0.5
    assert b.after_failure(1.0) == 1
    with pytest.raises(ValueError):
        Backoff(first=0)


def test_leaf_unwraps_single_exception_groups_only():
    err = ValueError("x")
    assert leaf(ExceptionGroup("g", [ExceptionGroup("h", [err])])) is err
    two = ExceptionGroup("g", [err, KeyError("y")])
    assert leaf(two) is two


async def open_upstream(mesh, peer_id: str) -> None:
    async with mesh.upstream(peer_id).open(ProxyRequest("POST", "/api/generate", body=b"{}")):
        pass


async def test_a_failing_host_is_rebuilt_while_table_status_and_requests_go_on(autojump_clock):
    net = FakeNet()
    mesh = make_service(net, heartbeat_interval=2.0, miss_limit=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(mesh.serve)
        t0 = trio.current_time()
        first = net.host
        first.peer_connects(PEER)
        first.hear(heartbeat(PEER, 1, addrs=(f"/ip4/10.0.0.7/tcp/4001/p2p/{PEER}",)))
        net.reachable.add(PEER)
        guard = Guard()
        mesh.scopes.register(PEER, guard)  # a request streaming from the peer
        await trio.sleep_until(t0 + 1.0)
        assert mesh.status()["host"] == "running" and mesh.status()["connected_peers"] == [PEER]

        first.crash(P2PError("yamux exploded"))
        await trio.sleep_until(t0 + 1.0 + EPS)
        status = mesh.status()
        assert status["host"] == "restarting" and status["host_restarts"] == 1
        assert status["connected_peers"] == [] and status["peer_id"] == mesh.self_id
        assert mesh.snapshot().get(PEER).state is PeerState.DOWN  # kept, not routed to
        assert guard.down  # the streaming request was released
        # A request to a remote peer fails at once, and says why.
        before = trio.current_time()
        with pytest.raises(UpstreamUnavailable, match="libp2p host is restarting"):
            await open_upstream(mesh, PEER)
        assert trio.current_time() == before
        assert mesh.upstream(mesh.self_id) is None  # the local backend (None here) is still there

        await trio.sleep_until(t0 + 1.5 + EPS)  # the first pause: 0.5 s
        assert net.built_at == [t0, t0 + 1.5]
        assert mesh.status()["host"] == "running"
        assert mesh.counters.host_restarts == 1
        # The new host knows no connection yet, and dials the peers the table holds.
        assert net.host.dials == [t0 + 1.5]
        assert net.host.connected_peers() == {PEER}
        assert mesh.snapshot().get(PEER).state is PeerState.ALIVE
        assert net.host.publish_times()[0] == t0 + 1.5  # and tells them about us at once
        nursery.cancel_scope.cancel()


async def test_failures_in_a_row_double_the_pause_up_to_30s(autojump_clock):
    net = FakeNet()
    mesh = make_service(net)
    async with trio.open_nursery() as nursery:
        await nursery.start(mesh.serve)
        t0 = trio.current_time()
        net.start_errors = [P2PError("cannot listen")] * 7  # the next 7 starts fail
        await trio.sleep_until(t0 + 1.0)
        net.host.crash()
        await trio.sleep_until(t0 + 100.0)
        # Crash at 1, then pauses 0.5, 1, 2, 4, 8, 16, 30, 30 between the builds.
        assert [t - t0 for t in net.built_at] == [0, 1.5, 2.5, 4.5, 8.5, 16.5, 32.5, 62.5, 92.5]
        assert mesh.counters.host_restarts == 8
        assert mesh.status()["host"] == "running"
        nursery.cancel_scope.cancel()


async def test_the_pause_starts_over_after_a_minute_of_healthy_running(autojump_clock):
    net = FakeNet()
    mesh = make_service(net)
    async with trio.open_nursery() as nursery:
        await nursery.start(mesh.serve)
        t0 = trio.current_time()
        await trio.sleep_until(t0 + 1.0)
        net.host.crash()  # pause 0.5
        await trio.sleep_until(t0 + 2.0)
        net.host.crash()  # ran 0.5 s: pause 1
        await trio.sleep_until(t0 + 63.0)
        net.host.crash()  # ran 60 s: healthy, pause 0.5 again
        await trio.sleep_until(t0 + 64.0)
        assert [t - t0 for t in net.built_at] == [0, 1.5, 3.0, 63.5]
        nursery.cancel_scope.cancel()


async def test_a_bug_in_a_loop_restarts_the_host_too(autojump_clock, caplog):
    net = FakeNet()
    mesh = make_service(net)
    async with trio.open_nursery() as nursery:
        await nursery.start(mesh.serve)
        t0 = trio.current_time()
        net.host.break_receive(RuntimeError("a bug"))
        await trio.sleep_until(t0 + 0.5 + EPS)
        assert len(net.hosts) == 2 and mesh.counters.host_restarts == 1
        assert "libp2p host crashed: RuntimeError('a bug')" in caplog.text
        nursery.cancel_scope.cancel()


async def test_a_failing_first_start_leaves_serve_as_it_is(autojump_clock):
    net = FakeNet()
    net.start_errors = [PortInUseError("cannot listen on /ip4/0.0.0.0/tcp/4001: in use (change it with --p2p-listen)")]
    mesh = make_service(net)
    with pytest.raises(PortInUseError, match="--p2p-listen"):
        await mesh.serve()  # raised as it is, not in an exception group
    assert len(net.hosts) == 1 and mesh.counters.host_restarts == 0


async def test_the_first_start_failure_reaches_a_caller_that_starts_serve(autojump_clock):
    net = FakeNet()
    net.start_errors = [PortInUseError("in use")]
    mesh = make_service(net)
    async with trio.open_nursery() as nursery:
        with pytest.raises(PortInUseError):
            await nursery.start(mesh.serve)


async def test_fault_hook_makes_the_running_host_fail(autojump_clock, monkeypatch):
    monkeypatch.setenv(TEST_FAULTS_ENV, "1")
    net = FakeNet()
    mesh = make_service(net)
    async with trio.open_nursery() as nursery:
        await nursery.start(mesh.serve)
        t0 = trio.current_time()
        assert mesh.inject_host_failure() is True
        await trio.sleep_until(t0 + EPS)
        assert mesh.status()["host"] == "restarting"
        assert mesh.inject_host_failure() is False  # nothing running to fail
        await trio.sleep_until(t0 + 0.5 + EPS)
        assert mesh.status()["host"] == "running"
        assert mesh.counters.host_restarts == 1 and len(net.hosts) == 2
        nursery.cancel_scope.cancel()


async def test_fault_hook_is_off_without_the_environment_variable(autojump_clock, monkeypatch):
    monkeypatch.delenv(TEST_FAULTS_ENV, raising=False)
    mesh = make_service(FakeNet())
    with pytest.raises(RuntimeError, match=TEST_FAULTS_ENV):
        mesh.inject_host_failure()


async def test_status_before_the_first_start(autojump_clock):
    mesh = make_service(FakeNet())
    status = mesh.status()
    assert status["host"] == "starting" and status["host_restarts"] == 0 and status["draining"] is False
    assert status["connected_peers"] == [] and status["p2p_addrs"] == []

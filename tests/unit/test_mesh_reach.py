"""``mesh.reach.Reach.maybe_dial``: of two peers that hear of each other at once, one
dials and the other waits ``DIAL_DEFER``, then dials only if no connection came (at
N=25 started together both dialled: 1,042 TCP connections instead of 600): by peer id
(mDNS neighbours), or the one that heard of the other by gossip waits for the joiner
that pulled a table. Driven on trio's MockClock with a scripted host."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from meshollama.mesh import reach as reach_mod
from meshollama.mesh.peertable import PeerTable
from meshollama.mesh.reach import DIAL_DEFER, Reach

LOW = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
HIGH = "12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp"
assert LOW < HIGH


def addr(peer: str) -> tuple[str, ...]:
    return (f"/ip4/198.18.0.2/tcp/4001/p2p/{peer}",)


class Host:
    """What Reach asks of the transport: who is connected, and a dial that records."""

    relay = None

    def __init__(self) -> None:
        self.connected: set[str] = set()
        self.dials: list[tuple[float, str]] = []

    def connected_peers(self) -> set[str]:
        return set(self.connected)

    def known_addrs(self, peer_id: str) -> list[str]:
        return []

    async def connect(self, addrs, *, timeout=None) -> str:
        peer = addrs[0].rsplit("/p2p/", 1)[1]
        self.dials.append((trio.current_time(), peer))
        self.connected.add(peer)
        return peer


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def _run(me: str, script) -> Host:
    host = Host()
    async with trio.open_nursery() as nursery:
        r = Reach(PeerTable(me, interval=2.0), me, first_retry=5.0, max_connections=64,
                  spawn=nursery.start_soon, rng=random.Random(1))
        await script(r, host)
    return host


@pytest.mark.parametrize("wait", ["higher", "now"])
async def test_the_lower_id_dials_at_once(clock, wait):
    async def script(r, host):
        r.maybe_dial(host, HIGH, addr(HIGH), wait=wait)

    host = await _run(LOW, script)
    assert host.dials == [(0.0, HIGH)]


async def test_the_higher_id_waits_and_does_not_dial_once_the_lower_has(clock):
    async def script(r, host):
        r.maybe_dial(host, LOW, addr(LOW))
        r.maybe_dial(host, LOW, addr(LOW))  # heard again meanwhile: still one wait
        assert LOW in r.deferred and not r.dialing
        await trio.sleep(DIAL_DEFER / 2)
        host.connected.add(LOW)  # it dialled us

    host = await _run(HIGH, script)
    assert host.dials == []


async def test_the_higher_id_dials_when_nobody_dialled_it(clock):
    async def script(r, host):
        r.maybe_dial(host, LOW, addr(LOW))

    host = await _run(HIGH, script)
    [(at, peer)] = host.dials
    assert peer == LOW and DIAL_DEFER <= at <= DIAL_DEFER * 1.5


async def test_a_restart_or_a_pulled_table_dials_everyone_at_once(clock):
    async def script(r, host):
        r.maybe_dial(host, LOW, addr(LOW), wait="now")

    host = await _run(HIGH, script)
    assert host.dials == [(0.0, LOW)]


async def test_a_peer_heard_by_gossip_is_waited_for_whatever_the_ids(clock):
    """It announced itself new: it pulled a table and is dialling everyone in it."""

    async def script(r, host):
        r.maybe_dial(host, HIGH, addr(HIGH), wait="always")
        assert r.deferred == {HIGH}
        await trio.sleep(DIAL_DEFER / 2)
        host.connected.add(HIGH)

    host = await _run(LOW, script)
    assert host.dials == []


async def test_past_the_bound_on_waits_we_dial_at_once(clock, monkeypatch):
    monkeypatch.setattr(reach_mod, "MAX_DEFERRED", 1)
    other = "12D3KooWAX1NBuf9uThmMUEz3RuCcreUiwVwuxJVMJqUou7LdzJn"
    assert other < HIGH

    async def script(r, host):
        r.maybe_dial(host, other, addr(other))
        assert r.deferred == {other} and not r.dialing  # a wait takes no dial slot
        r.maybe_dial(host, LOW, addr(LOW))  # no room to wait: as before the wait existed
        await trio.testing.wait_all_tasks_blocked()
        assert host.dials == [(0.0, LOW)]

    host = await _run(HIGH, script)
    assert [p for _, p in host.dials] == [LOW, other]


async def test_behind_nat_we_never_wait(clock):
    """Nobody can dial us directly: the lower id's dial would come through a relay and
    leave the pair relayed, where ours to its public address makes a direct one."""

    class Relay:
        def behind_nat(self) -> bool:
            return True

    async def script(r, host):
        host.relay = Relay()
        r.maybe_dial(host, LOW, addr(LOW))

    host = await _run(HIGH, script)
    assert host.dials == [(0.0, LOW)]


async def test_a_peer_in_backoff_gets_no_wait_either(clock):
    async def script(r, host):
        r.retry[LOW] = (10.0, 5.0)  # unreachable a moment ago
        r.maybe_dial(host, LOW, addr(LOW))
        assert not r.deferred and not r.dialing

    host = await _run(HIGH, script)
    assert host.dials == []

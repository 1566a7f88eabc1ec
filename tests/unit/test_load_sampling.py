"""Large meshes: load is asked for, not announced (``mesh.load_server``, ``mesh.load_client``,
``RouteStats.sampled``, ``Cadence.announce_load``)."""

from __future__ import annotations

import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import trio

from meshollama import names
from meshollama.catalog import LoadInfo, ModelInfo
from meshollama.errors import P2PError
from meshollama.mesh import load_client, load_server
from meshollama.mesh.announce import Announcement, decode, encode
from meshollama.mesh.cadence import AnnouncePolicy, Cadence, Reason
from meshollama.mesh.peertable import PeerState, PeerView, Snapshot
from meshollama.mesh.service import MeshService
from meshollama.routing import ROUTE_SAMPLE, RouteStats, Strategy, choose, load_score
from tests.unit.test_mesh_sync import pipe


def peer(pid: str, *, in_flight: int = 0, capacity: int = 2) -> PeerView:
    return PeerView(peer_id=pid, addrs=(), api_url="", version="0.1.0", models=(ModelInfo(name="m:latest"),),
                    load=LoadInfo(in_flight=in_flight, capacity=capacity), seq=1, last_seen=0.0,
                    state=PeerState.ALIVE, is_self=False)


def test_answers_are_bounded_like_announcements():
    assert load_client.decode(b'{"f":1,"c":4,"q":2,"w":3}\n') == LoadInfo(1, 4, 2, 3)
    assert load_client.decode(b'{"f":1,"c":100000}') == LoadInfo(1, 128)  # a liar gets an honest 128-slot share
    for bad in (b"", b"[]", b'{"f":-1}', b'{"f":true}', b'{"c":"4"}', b"\xff"):
        with pytest.raises((ValueError, UnicodeDecodeError)):
            load_client.decode(bad)


def test_pick_asks_a_few_holders_not_asked_lately():
    holders = [peer(f"p{i}") for i in range(10_000)]
    fresh = {f"p{i}" for i in range(0, 10_000, 2)}
    got = load_client.pick(holders, fresh.__contains__, random.Random(1))
    assert len(got) == load_client.SAMPLE and not set(got) & fresh
    assert load_client.pick(holders[:2], lambda p: False, random.Random(1)) and load_client.pick([], bool, random.Random(1)) == []


async def test_the_server_answers_its_load_once_per_peer_per_tenth_of_a_second(autojump_clock):
    counts: list[str] = []
    server = load_server.LoadServer(lambda: LoadInfo(3, 4, 1, 0), allow=lambda p: p != "stranger",
                                    on_count=counts.append)

    async def opener(peer_id, protocol, *, timeout):
        assert protocol == load_server.PROTOCOL
        client, far = pipe(peer_id)
        nursery.start_soon(server.handle, far)
        return client

    async with trio.open_nursery() as nursery:
        assert await load_client.ask(opener, "friend") == LoadInfo(3, 4, 1, 0)
        with pytest.raises(P2PError):
            await load_client.ask(opener, "friend")  # again at once: reset
        await trio.sleep(load_server.PER_PEER_GAP)
        assert await load_client.ask(opener, "friend") == LoadInfo(3, 4, 1, 0)
        with pytest.raises(P2PError):
            await load_client.ask(opener, "stranger")
    assert counts == ["answered", "refused_too_often", "answered", "refused_not_admitted"]


async def test_a_silent_peer_costs_the_decision_the_timeout_and_no_more(autojump_clock):
    async def opener(peer_id, protocol, *, timeout):
        client, far = pipe(peer_id)  # nobody answers on the far end
        return client

    started = trio.current_time()
    with pytest.raises(P2PError, match="no answer"):
        await load_client.ask(opener, "frozen")
    assert trio.current_time() - started == pytest.approx(load_client.TIMEOUT)


def test_a_large_mesh_does_not_announce_load_changes():
    p = AnnouncePolicy(Cadence(refresh=30.0, announce_load=False))
    p.sent(0.0, "cat", LoadInfo(0, 1), Reason.FIRST)
    assert [p.decide(t, "cat", LoadInfo(1, 1)) for t in (2.0, 10.0, 20.0)] == [None, None, None]
    assert p.decide(30.0, "cat", LoadInfo(1, 1)) is Reason.REFRESH  # the refresh still carries it
    assert p.decide(30.0, "new", LoadInfo(1, 1)) is Reason.CATALOG


def test_an_asked_load_counts_as_our_own_heartbeat_until_the_next_real_one():
    stats = RouteStats()
    p = peer("a", in_flight=0)
    stats.heartbeat_seen("a", 1)
    stats.started("a", 0.0)  # one request of ours since its heartbeat
    assert load_score(p, stats.view("a", 0.0)) == 0.5
    stats.sampled("a", LoadInfo(in_flight=2, capacity=2), 1.0)  # it says: both slots busy (ours included)
    assert load_score(p, stats.view("a", 1.0)) == 1.0
    stats.asking("a", 1.0)
    assert stats.asked_within("a", 1.5, load_client.FRESH) and not stats.asked_within("a", 2.5, load_client.FRESH)
    stats.heartbeat_seen("a", 2)  # its next announcement is newer than what we asked
    assert stats.view("a", 3.0).load is None


def test_asked_holders_join_a_sampled_decision():
    peers = tuple(peer(f"p{i:05d}", in_flight=2) for i in range(1_000))  # all busy, as announced
    s, stats = Snapshot(peers=peers, taken_at=0.0), RouteStats()
    stats.sampled("p00777", LoadInfo(in_flight=0, capacity=2), 0.0)  # asked: it is idle now
    firsts = {choose(s, names.key("m"), stats, 0.0, random.Random(seed), prefer=("p00777",))[0] for seed in range(50)}
    assert firsts == {"p00777"}
    assert ROUTE_SAMPLE < len(peers)


def test_pick_skips_peers_we_are_not_connected_to_and_ourselves():
    holders = [peer(f"p{i}") for i in range(100)]
    connected = {"p3", "p50", "p77", "me"}
    got = load_client.pick(holders + [peer("me")], lambda pid: pid == "me" or pid not in connected,
                           random.Random(2), k=3)
    assert set(got) <= {"p3", "p50", "p77"}


def test_an_announcement_says_when_its_sender_does_not_announce_load():
    a = Announcement(peer_id="p", seq=1, version="t", models=(), load=LoadInfo(0, 1), quiet_load=True)
    assert decode(encode(a)).quiet_load and b'"lq":true' in encode(a)
    assert not decode(encode(replace(a, quiet_load=False))).quiet_load
    assert b"lq" not in encode(replace(a, quiet_load=False))


def test_a_node_goes_quiet_past_full_view_and_loud_again_only_well_below_it():
    node = SimpleNamespace(settings=SimpleNamespace(full_view_up_to=32), table=[], _quiet_load=False)
    said = []
    for size in (32, 33, 32, 29, 28, 33, 31):
        node.table = [None] * size
        said.append(MeshService.announces_load(node))
    assert said == [True, False, False, False, True, False, False]


async def test_a_small_meshs_gateway_asks_only_the_holders_that_say_they_do_not_announce_load(autojump_clock):
    from meshollama.gateway.asking import Asking

    asked: list[list[str]] = []

    class Mesh:
        self_id = "me"

        def load_sampling(self):
            return False

        def connected(self):
            return {"loud", "quiet"}

        async def ask_loads(self, peers):
            asked.append(list(peers))
            return {p: LoadInfo(0, 2) for p in peers}

    proxy = SimpleNamespace(mesh=Mesh(), strategy=Strategy.LEAST_LOADED, stats=RouteStats(), rng=random.Random(1))
    asking = Asking(proxy)
    s = Snapshot(peers=(peer("loud"), replace(peer("quiet"), quiet_load=True)), taken_at=0.0)
    assert await asking.loads(s, names.key("m")) == ("quiet",)
    assert asked == [["quiet"]]
    s = Snapshot(peers=(peer("loud"),), taken_at=0.0)
    assert await asking.loads(s, names.key("m")) == () and len(asked) == 1

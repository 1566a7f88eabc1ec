"""A route decision costs O(holders of the model), not O(peers in the table).

Counted, not timed: every test peer is a :class:`Counted` view that records
which views had an attribute read. A decision over 10 peers and over 10,000
peers, with the same 5 holders, must touch the same views; the table builds
the index once per change, not per request; and the index gives what the old
full scan gave, on random tables.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from meshollama import names
from meshollama.catalog import LoadInfo, ModelInfo
from meshollama.mesh.announce import Announcement
from meshollama.mesh.peertable import PeerState, PeerTable, PeerView, Snapshot
from meshollama.routing import RouteStats, Strategy, candidates, choose, has_free_slot, load_score

MODEL = names.key("llama3")
HOLDERS = 5
TOUCHED: set[int] = set()


class Counted(PeerView):
    """A PeerView that notes each read of one of its attributes."""

    def __getattribute__(self, name: str):
        TOUCHED.add(id(self))
        return object.__getattribute__(self, name)


def view(pid: str, models: tuple[str, ...], *, state: PeerState = PeerState.ALIVE, capacity: int = 1,
         in_flight: int = 0, cls: type[PeerView] = Counted) -> PeerView:
    return cls(peer_id=pid, addrs=(), api_url="", version="0.1.0",
               models=tuple(ModelInfo(name=m) for m in models),
               load=LoadInfo(in_flight=in_flight, capacity=capacity), seq=1, last_seen=0.0, state=state,
               is_self=False)


def table_of(n: int) -> Snapshot:
    """``n`` peers: the first HOLDERS hold llama3, the rest one of 50 other models."""
    peers = [view(f"p{i:05d}", ("llama3:latest",) if i < HOLDERS else (f"other{i % 50}:7b",)) for i in range(n)]
    return Snapshot(peers=tuple(peers), taken_at=0.0)


def decision(s: Snapshot, stats: RouteStats, strategy: Strategy = Strategy.LEAST_LOADED) -> list[str]:
    order = choose(s, MODEL, stats, 1.0, random.Random(7), strategy)
    assert has_free_slot(s, MODEL, stats, 1.0)
    assert len(candidates(s, MODEL)) == HOLDERS
    return order


@pytest.mark.parametrize("strategy", list(Strategy))
def test_a_decision_touches_as_many_peers_at_10000_as_at_10(strategy):
    touched = {}
    for n in (10, 10_000):
        s, stats = table_of(n), RouteStats()
        decision(s, stats, strategy)  # the first lookup scans, the second builds the index
        TOUCHED.clear()
        order = decision(s, stats, strategy)
        touched[n] = len(TOUCHED)
        assert sorted(order) == [f"p{i:05d}" for i in range(HOLDERS)]
    assert touched[10] == touched[10_000] == HOLDERS


def test_the_first_lookup_scans_the_second_builds_the_index_and_later_ones_reuse_it():
    s = table_of(1000)
    for _ in range(2):
        TOUCHED.clear()
        assert len(s.serving(MODEL)) == HOLDERS
        assert len(TOUCHED) == 1000
    assert s.serving_index.built
    TOUCHED.clear()
    for _ in range(50):
        s.serving(MODEL)
        s.serving("other3:7b")
    assert len(TOUCHED) == 0  # lookups read the index, not the views


def ann(pid: str, seq: int, models: tuple[str, ...] = ("llama3:latest",), **kw) -> Announcement:
    return Announcement(peer_id=pid, seq=seq, addrs=(), api_url="http://x", version="0.1.0",
                        models=tuple(ModelInfo(name=m) for m in models), load=LoadInfo(capacity=1), **kw)


def test_the_table_rebuilds_the_index_only_when_it_changes():
    table = PeerTable("me", interval=2.0, max_peers=20_000)
    for i in range(2000):
        table.apply(ann(f"p{i:05d}", 1, ("llama3:latest",) if i < HOLDERS else ("other:7b",)), 0.0)
    first = table.snapshot(1.0)
    first.serving(MODEL)
    assert not first.serving_index.built  # one look: a scan
    table.snapshot(1.2).serving(MODEL)  # the next request's snapshot shares it: the second look builds it
    version = table.version
    for now in (1.5, 2.0, 2.5):  # one snapshot per request, table unchanged: same peers, same built index
        s = table.snapshot(now)
        assert s.taken_at == now and s.peers is first.peers and s.serving_index is first.serving_index
        assert s.serving_index.built and len(s.serving(MODEL)) == HOLDERS
    assert table.version == version
    assert table.apply(ann("p00001", 1), 3.0).value == "stale"  # refused: nothing changed
    assert table.snapshot(3.0).serving_index is first.serving_index
    table.apply(ann("p00001", 2, ("other:7b",)), 3.0)  # a holder dropped the model
    after = table.snapshot(3.0)
    assert table.version == version + 1 and after.serving_index is not first.serving_index
    assert [p.peer_id for p in after.serving(MODEL)] == ["p00000", "p00002", "p00003", "p00004"]
    assert len(first.serving(MODEL)) == HOLDERS  # the old snapshot still shows its own moment
    for change in (lambda: table.mark_down("p00000", 4.0), lambda: table.mark_unreachable("p00002", 4.0),
                   lambda: table.mark_up("p00000", 4.0), lambda: table.expire(100.0)):
        before = table.snapshot(4.0)
        change()
        assert table.snapshot(4.0).serving_index is not before.serving_index


def test_observe_walks_the_table_only_when_the_snapshot_changes():
    table = PeerTable("me", interval=2.0, max_peers=20_000)
    for i in range(1000):
        table.apply(ann(f"p{i:05d}", 1), 0.0)
    stats = RouteStats()
    stats.observe(table.snapshot(1.0))
    stats.started("gone", 1.0)  # an entry for a peer not in the table
    stats.sideline("gone2", 1.0, 5.0)
    s = table.snapshot(2.0)
    assert s.peers is stats._seen
    stats.observe(s)
    assert stats._unseen == {"gone", "gone2"}  # kept: one is busy, one sidelined
    stats.finished("gone", 2.0, ok=True, latency=0.1, ttfb=None)
    stats.observe(table.snapshot(3.0))
    assert "gone" not in stats._peers and "gone2" in stats._peers
    stats.observe(table.snapshot(7.0))
    assert "gone2" not in stats._peers and not stats._unseen


# --- the index equals the old full scan -----------------------------------------------------------------


def old_serving(s: Snapshot, key: str) -> tuple[PeerView, ...]:
    return tuple(p for p in s.peers if p.state is PeerState.ALIVE and p.serves(key))


def old_candidates(s: Snapshot, key: str) -> tuple[PeerView, ...]:
    return tuple(p for p in old_serving(s, key) if p.load.capacity > 0)


def old_observe(stats: RouteStats, snapshot: Snapshot) -> None:
    for p in snapshot.peers:
        stats.heartbeat_seen(p.peer_id, p.seq)
    for pid in [pid for pid, e in stats._peers.items()
                if snapshot.get(pid) is None and e.in_flight == 0 and e.sidelined_until < snapshot.taken_at]:
        del stats._peers[pid]


MODELS = ("llama3:latest", "Llama3", "llama3:8b", "qwen:7b", "hf.co/org/m:q4", "mistral")


def random_snapshot(rng: random.Random) -> Snapshot:
    peers = [view(f"p{i:03d}", tuple(rng.sample(MODELS, rng.randint(0, 3))), state=rng.choice(list(PeerState)),
                  capacity=rng.choice((0, 1, 1, 2, 4)), in_flight=rng.randint(0, 3), cls=PeerView)
             for i in range(rng.randint(0, 40))]
    return Snapshot(peers=tuple(peers), taken_at=rng.uniform(0, 10))


@pytest.mark.parametrize("seed", range(200))
def test_indexed_candidates_equal_the_full_scan(seed):
    rng = random.Random(seed)
    s = random_snapshot(rng)
    for model in (*MODELS, "absent:1b"):
        key = names.key(model)
        assert s.serving(key) == old_serving(s, key)
        assert candidates(s, key) == old_candidates(s, key)
        stats = RouteStats()
        for p in s.peers[:5]:
            stats.started(p.peer_id, 0.0)
        assert has_free_slot(s, key, stats, 1.0) == any(
            load_score(p, stats.view(p.peer_id, 1.0, key)) < 1.0 for p in old_candidates(s, key))
        for strategy in Strategy:
            got = choose(s, key, stats, 1.0, random.Random(seed), strategy, rr_counter=seed)
            assert sorted(got) == sorted(p.peer_id for p in old_candidates(s, key))

@pytest.mark.parametrize("seed", range(50))
def test_observe_equals_the_full_walk(seed):
    rng = random.Random(seed)
    table = PeerTable("me", interval=2.0, max_peers=1000)
    new, old = RouteStats(), RouteStats()
    now = 0.0
    for _ in range(300):
        now += rng.uniform(0, 0.5)
        pid = f"p{rng.randint(0, 15)}"
        op = rng.random()
        if op < 0.3:
            table.apply(ann(pid, rng.randint(1, 40), leaving=rng.random() < 0.1), now)
        elif op < 0.4:
            table.expire(now)
        elif op < 0.55:
            for st in (new, old):
                st.started(pid, now)
        elif op < 0.7:
            for st in (new, old):
                st.finished(pid, now, ok=True, latency=0.1, ttfb=None)
        elif op < 0.8:
            secs = rng.uniform(0, 3)
            for st in (new, old):
                st.sideline(pid, now, secs)
        s = table.snapshot(now)
        new.observe(s)
        old_observe(old, s)
        assert new._peers == old._peers


def test_looking_a_peer_up_by_id_builds_its_map_once_per_table_version():
    """The gateway asks ``snapshot.get(peer)`` on every try (digest, warmth): the id map
    is shared by the snapshots of one version, not rebuilt per request (found by review:
    it made every routed request O(peers) again)."""
    table = PeerTable("me", interval=2.0, max_peers=20_000)
    for i in range(2000):
        table.apply(ann(f"p{i:05d}", 1), 0.0)
    first = table.snapshot(1.0)
    assert first.get("p00003").peer_id == "p00003"
    for now in (1.1, 1.2, 1.3):
        s = table.snapshot(now)
        assert s.get("p00003") is first.get("p00003") and s.get("nobody") is None
        assert s._index is first._index  # the same map: not one pass over 2000 views per request
    table.apply(ann("p00003", 2), 2.0)
    assert table.snapshot(2.1)._index is not first._index  # a change: a new map


@pytest.mark.parametrize("strategy", list(Strategy))
def test_with_10000_holders_a_decision_looks_at_a_bounded_sample(strategy):
    """Every peer holds the model: a decision still touches ROUTE_SAMPLE views, not 10,000."""
    from meshollama.routing import ROUTE_SAMPLE

    peers = tuple(view(f"p{i:05d}", ("llama3:latest",)) for i in range(10_000))
    s, stats = Snapshot(peers=peers, taken_at=0.0), RouteStats()
    choose(s, MODEL, stats, 1.0, random.Random(1), strategy)
    choose(s, MODEL, stats, 1.0, random.Random(2), strategy)  # the index (and our own entry) found once per version
    TOUCHED.clear()
    order = choose(s, MODEL, stats, 1.0, random.Random(7), strategy, rr_counter=9_990)
    assert 1 <= len(order) <= ROUTE_SAMPLE and len(TOUCHED) <= ROUTE_SAMPLE
    if strategy is Strategy.ROUND_ROBIN:  # a window from the counter, wrapping round
        assert order[:12] == [f"p{i:05d}" for i in range(9_990, 10_000)] + ["p00000", "p00001"]
    TOUCHED.clear()
    assert has_free_slot(s, MODEL, stats, 1.0, random.Random(1)) and len(TOUCHED) <= ROUTE_SAMPLE
    # Another decision samples others: over many, the load spreads over all holders.
    picked = {choose(s, MODEL, stats, 1.0, random.Random(seed))[0] for seed in range(300)}
    assert len(picked) > 250
    # Peers already tried are never offered again, even when the sample held only those.
    tried = frozenset(order)
    assert not set(choose(s, MODEL, stats, 1.0, random.Random(7), strategy, exclude=tried, rr_counter=9_990)) & tried


def test_sampling_still_prefers_the_free_holders_it_sees():
    from meshollama.routing import ROUTE_SAMPLE

    busy = [view(f"b{i:04d}", ("llama3:latest",), in_flight=1, cls=PeerView) for i in range(ROUTE_SAMPLE * 3)]
    free = [view(f"f{i:04d}", ("llama3:latest",), cls=PeerView) for i in range(ROUTE_SAMPLE * 3)]
    s = Snapshot(peers=tuple(sorted(busy + free, key=lambda p: p.peer_id)), taken_at=0.0)
    firsts = [choose(s, MODEL, RouteStats(), 1.0, random.Random(seed))[0] for seed in range(200)]
    assert all(pid.startswith("f") for pid in firsts)  # a sample of 32 of 192 always holds a free one here


def test_a_liveness_round_in_a_large_mesh_looks_at_the_peers_in_focus_only():
    from meshollama.mesh.liveness import IDLE_PING_EVERY, peers_to_ping

    peers = tuple(view(f"p{i:05d}", ("llama3:latest",)) for i in range(10_000))
    s = Snapshot(peers=peers, taken_at=0.0)
    s.get("p00000")  # the id map, built once per table version
    connected = {p.peer_id for p in peers}
    TOUCHED.clear()
    picked = [peers_to_ping(s, connected, r, urgent=lambda p: p == "p00007", busy=lambda p: False,
                            recent={"p00042"}.__contains__, focus=["p00007", "p00042"])
              for r in range(IDLE_PING_EVERY)]
    assert len(TOUCHED) == 2
    assert all("p00007" in got for got in picked) and sum("p00042" in got for got in picked) == 1


def test_a_resume_among_many_holders_finds_those_with_the_same_weights():
    """``only`` filters before the sample: 4 holders with the right digest among 1,000 are all found."""
    from dataclasses import replace as dc_replace

    peers = []
    for i in range(1_000):
        v = view(f"p{i:05d}", ("llama3:latest",), cls=PeerView)
        digest = "same" if i % 250 == 7 else "other"
        peers.append(dc_replace(v, models=(ModelInfo(name="llama3:latest", digest=digest),)))
    s = Snapshot(peers=tuple(peers), taken_at=0.0)
    for seed in range(20):
        order = choose(s, MODEL, RouteStats(), 1.0, random.Random(seed), exclude=frozenset({"p00007"}),
                       only=lambda p: p.model(MODEL).digest == "same")
        assert sorted(order) == ["p00257", "p00507", "p00757"]


def test_round_robin_past_its_window_goes_on_to_the_rest():
    from meshollama.routing import ROUTE_SAMPLE

    peers = tuple(view(f"p{i:05d}", ("llama3:latest",), cls=PeerView) for i in range(100))
    s = Snapshot(peers=peers, taken_at=0.0)
    window = choose(s, MODEL, RouteStats(), 1.0, random.Random(1), Strategy.ROUND_ROBIN, rr_counter=10)
    assert window == [f"p{i:05d}" for i in range(10, 10 + ROUTE_SAMPLE)]
    after = choose(s, MODEL, RouteStats(), 1.0, random.Random(1), Strategy.ROUND_ROBIN,
                   exclude=frozenset(window), rr_counter=10)
    assert after and not set(after) & set(window)


def test_a_large_meshs_line_does_not_wait_for_ever_on_load_nobody_will_announce():
    """Past full_view_up_to, load is not announced: a holder last heard busy long ago is free
    enough to try (``stale_after``), while a fresh 'busy' still holds the line."""
    loud = tuple(view(f"p{i}", ("llama3:latest",), in_flight=1, cls=PeerView) for i in range(3))
    stats = RouteStats()
    # Holders that announce their load changes: a busy one stays busy until it says otherwise.
    assert not has_free_slot(Snapshot(peers=loud, taken_at=0.0), MODEL, stats, 100.0, stale_after=5.0)
    # A gateway whose own table is large: older holders go quiet without saying so.
    assert has_free_slot(Snapshot(peers=loud, taken_at=0.0), MODEL, stats, 100.0, stale_after=5.0, all_quiet=True)
    peers = tuple(replace(p, quiet_load=True) for p in loud)  # they say they do not (lq)
    s = Snapshot(peers=peers, taken_at=0.0)  # last_seen 0: announced busy at t=0
    assert not has_free_slot(s, MODEL, stats, 100.0)
    assert has_free_slot(s, MODEL, stats, 100.0, stale_after=5.0)
    assert not has_free_slot(s, MODEL, stats, 3.0, stale_after=5.0)
    for p in peers:  # our own requests still count
        stats.started(p.peer_id, 99.0)
    assert not has_free_slot(s, MODEL, stats, 100.0, stale_after=5.0)

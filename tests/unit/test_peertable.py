from __future__ import annotations

import dataclasses

import pytest

from meshollama import names
from meshollama.catalog import LoadInfo, ModelInfo
from meshollama.mesh.announce import MAX_REFRESH_MS, Announcement
from meshollama.mesh.peertable import LEFT_MEMORY, ApplyResult, PeerState, PeerTable, PeerView, Snapshot

SELF = "self"
INTERVAL = 2.0  # ttl = 6.0 with miss_limit 3


def ann(
    peer: str = "a",
    seq: int = 1,
    *,
    models: tuple[str, ...] = ("llama3:latest",),
    loaded: bool = False,
    load: LoadInfo = LoadInfo(),
    leaving: bool = False,
    refresh_ms: int = 0,
) -> Announcement:
    return Announcement(
        peer_id=peer,
        seq=seq,
        version="0.1.0",
        models=tuple(ModelInfo(name=m, loaded=loaded) for m in models),
        load=load,
        addrs=(f"/ip4/127.0.0.1/tcp/1/p2p/{peer}",),
        api_url="",
        leaving=leaving,
        refresh_ms=refresh_ms,
    )


@pytest.fixture
def table() -> PeerTable:
    return PeerTable(SELF, interval=INTERVAL)


def state(t: PeerTable, peer: str, now: float = 0.0) -> PeerView | None:
    return t.snapshot(now).get(peer)


# --- apply ------------------------------------------------------------------


def test_new_then_update(table: PeerTable) -> None:
    assert table.apply(ann(seq=1), 10.0) is ApplyResult.NEW
    v = state(table, "a")
    assert v is not None and v.seq == 1 and v.last_seen == 10.0 and v.state is PeerState.ALIVE
    assert not v.is_self
    assert table.apply(ann(seq=2, load=LoadInfo(3, 4, 1)), 11.0) is ApplyResult.UPDATED
    v = state(table, "a")
    assert v is not None and v.seq == 2 and v.last_seen == 11.0 and v.load == LoadInfo(3, 4, 1)


@pytest.mark.parametrize("seq", [5, 4, 0])
def test_equal_or_older_seq_is_stale(table: PeerTable, seq: int) -> None:
    table.apply(ann(seq=5, load=LoadInfo(1, 1, 0)), 1.0)
    assert table.apply(ann(seq=seq, load=LoadInfo(0, 9, 0)), 2.0) is ApplyResult.STALE
    v = state(table, "a")
    assert v is not None and v.seq == 5 and v.last_seen == 1.0 and v.load == LoadInfo(1, 1, 0)


def test_stale_does_not_refresh_expiry(table: PeerTable) -> None:
    table.apply(ann(seq=5), 0.0)
    table.apply(ann(seq=5), 5.0)
    assert table.expire(6.5) == ["a"]


def test_announcement_from_self_is_ignored(table: PeerTable) -> None:
    assert table.apply(ann(SELF, seq=99), 1.0) is ApplyResult.SELF
    assert table.snapshot(1.0).peers == ()
    assert len(table) == 0


def test_fields_are_copied_from_the_announcement(table: PeerTable) -> None:
    a = dataclasses.replace(ann(), api_url="http://x:1", version="9.9")
    table.apply(a, 3.0)
    v = state(table, "a")
    assert v == PeerView(
        peer_id="a",
        addrs=a.addrs,
        api_url="http://x:1",
        version="9.9",
        models=a.models,
        load=a.load,
        seq=1,
        last_seen=3.0,
        state=PeerState.ALIVE,
        is_self=False,
    )


# --- expiry -------------------------------------------------------------------


def test_expiry_boundary(table: PeerTable) -> None:
    table.apply(ann("a"), 0.0)
    table.apply(ann("b"), 1.0)
    assert table.expire(6.0) == []  # exactly interval*miss_limit: still there
    assert table.expire(6.0001) == ["a"]
    assert [p.peer_id for p in table.snapshot(6.5).peers] == ["b"]
    assert table.expire(7.5) == ["b"]
    assert table.snapshot(7.5).peers == ()


def test_heartbeats_keep_a_peer(table: PeerTable) -> None:
    for i in range(10):
        table.apply(ann(seq=i + 1), i * INTERVAL)
        assert table.expire(i * INTERVAL + 0.5) == []
    assert state(table, "a") is not None


def test_expiry_uses_our_interval_and_set_interval(table: PeerTable) -> None:
    table.apply(ann(), 0.0)
    table.set_interval(10.0)
    assert table.ttl == 30.0
    assert table.expire(29.0) == []
    assert table.expire(31.0) == ["a"]


def test_miss_limit() -> None:
    t = PeerTable(SELF, interval=1.0, miss_limit=5)
    t.apply(ann(), 0.0)
    assert t.expire(5.0) == []
    assert t.expire(5.5) == ["a"]


@pytest.mark.parametrize("kwargs", [{"interval": 0}, {"interval": -1}, {"interval": 1, "miss_limit": 0}])
def test_bad_config(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PeerTable(SELF, **kwargs)  # type: ignore[arg-type]


def test_expired_peer_comes_back_as_new_but_a_replay_of_its_last_announcement_does_not(table: PeerTable) -> None:
    table.apply(ann(seq=3), 0.0)
    assert table.expire(100.0) == ["a"]
    # A table sync from a peer that still holds it hands us its last announcement: stale.
    assert table.apply(ann(seq=3), 101.0) is ApplyResult.STALE
    assert table.apply(ann(seq=4), 102.0) is ApplyResult.NEW  # restarted (seqs start at the wall clock)
    assert table.expire(300.0) == ["a"]
    table.expire(300.0 + LEFT_MEMORY + 1)
    assert table.apply(ann(seq=2), 300.0 + LEFT_MEMORY + 1) is ApplyResult.NEW  # forgotten in the end


# --- down / up ------------------------------------------------------------------


def test_mark_down_and_up(table: PeerTable) -> None:
    table.apply(ann(), 0.0)
    assert table.mark_down("a", 1.0) is True
    assert table.mark_down("a", 1.5) is False
    snap = table.snapshot(2.0)
    assert snap.get("a") is not None and snap.get("a").state is PeerState.DOWN  # type: ignore[union-attr]
    assert snap.alive() == ()
    assert snap.serving(names.key("llama3")) == ()
    assert table.mark_up("a", 3.0) is True
    assert table.mark_up("a", 3.0) is False
    v = state(table, "a")
    assert v is not None and v.state is PeerState.ALIVE and v.last_seen == 0.0  # needs a fresh heartbeat


def test_mark_unknown_peer(table: PeerTable) -> None:
    assert table.mark_down("zz", 0.0) is False
    assert table.mark_up("zz", 0.0) is False


def test_down_peer_revived_by_newer_heartbeat(table: PeerTable) -> None:
    table.apply(ann(seq=1), 0.0)
    table.mark_down("a", 1.0)
    assert table.apply(ann(seq=1), 2.0) is ApplyResult.STALE
    assert state(table, "a").state is PeerState.DOWN  # type: ignore[union-attr]
    assert table.apply(ann(seq=2), 3.0) is ApplyResult.UPDATED
    v = state(table, "a")
    assert v is not None and v.state is PeerState.ALIVE and v.last_seen == 3.0


def test_down_peer_expires_on_the_same_rule(table: PeerTable) -> None:
    table.apply(ann(), 0.0)
    table.mark_down("a", 5.9)
    assert table.expire(6.0) == []
    assert table.expire(6.1) == ["a"]


def test_mark_up_does_not_extend_life(table: PeerTable) -> None:
    table.apply(ann(), 0.0)
    table.mark_down("a", 1.0)
    table.mark_up("a", 5.0)
    assert table.expire(6.1) == ["a"]


# --- leaving ------------------------------------------------------------------


def test_leave_removes_at_once(table: PeerTable) -> None:
    table.apply(ann(seq=1), 0.0)
    assert table.apply(ann(seq=2, leaving=True), 1.0) is ApplyResult.LEFT
    assert table.snapshot(1.0).get("a") is None


def test_stale_leave_is_ignored(table: PeerTable) -> None:
    table.apply(ann(seq=5), 0.0)
    assert table.apply(ann(seq=4, leaving=True), 1.0) is ApplyResult.STALE
    assert state(table, "a") is not None


def test_late_heartbeat_cannot_resurrect_a_peer_that_left(table: PeerTable) -> None:
    table.apply(ann(seq=1), 0.0)
    table.apply(ann(seq=3, leaving=True), 1.0)
    assert table.apply(ann(seq=2), 1.5) is ApplyResult.STALE
    assert table.apply(ann(seq=3), 1.5) is ApplyResult.STALE
    assert table.snapshot(1.5).peers == ()
    # it restarts with a newer seq: welcome back
    assert table.apply(ann(seq=4), 2.0) is ApplyResult.NEW


def test_leave_memory_is_forgotten_after_ttl(table: PeerTable) -> None:
    table.apply(ann(seq=10, leaving=True), 0.0)  # never seen before: still LEFT, nothing added
    assert table.snapshot(0.0).peers == ()
    assert table.apply(ann(seq=9), 1.0) is ApplyResult.STALE
    table.expire(7.0)  # past the ttl, but a goodbye is kept LEFT_MEMORY at least (a synced table may replay)
    assert table.apply(ann(seq=9), 7.0) is ApplyResult.STALE
    table.expire(LEFT_MEMORY + 1)
    assert table.apply(ann(seq=9), LEFT_MEMORY + 1) is ApplyResult.NEW


def test_a_peer_expires_after_miss_limit_of_its_own_refresh_intervals(table: PeerTable) -> None:
    """A peer that says it refreshes every 30 s is kept 3 x 30 s; one that says 0.1 s
    (or nothing: an older node) is kept our interval x 3; one that says 10 h is capped."""
    slow, fast, huge, PEER = "s", "f", "h", "a"
    table.apply(ann(slow, seq=1, refresh_ms=30_000), 0.0)
    table.apply(ann(fast, seq=1, refresh_ms=100), 0.0)
    table.apply(ann(huge, seq=1, refresh_ms=36_000_000), 0.0)
    table.apply(ann(seq=1), 0.0)
    assert table.legacy_peers == 1
    assert table.expire(table.ttl + 0.1) == sorted([PEER, fast])
    assert table.expire(90.0) == []
    assert table.expire(90.1) == [slow]
    assert table.expire(3 * MAX_REFRESH_MS / 1000) == []
    assert table.expire(3 * MAX_REFRESH_MS / 1000 + 0.1) == [huge]
    assert table.legacy_peers == 0


# --- self ------------------------------------------------------------------------


def test_self_entry(table: PeerTable) -> None:
    table.set_self(ann(SELF, seq=1), 0.0)
    v = state(table, SELF)
    assert v is not None and v.is_self and v.state is PeerState.ALIVE
    assert table.expire(1e9) == []
    assert table.mark_down(SELF, 1.0) is False
    assert table.snapshot(1e9).get(SELF) is not None
    assert len(table) == 0  # only remote peers counted
    # set_self replaces, whatever the seq
    table.set_self(ann(SELF, seq=1, load=LoadInfo(2, 2, 0)), 5.0)
    v = state(table, SELF)
    assert v is not None and v.load == LoadInfo(2, 2, 0) and v.last_seen == 5.0


def test_set_self_with_someone_elses_announcement(table: PeerTable) -> None:
    with pytest.raises(ValueError):
        table.set_self(ann("other"), 0.0)


# --- snapshot ---------------------------------------------------------------------


def test_snapshot_sorted_and_immutable(table: PeerTable) -> None:
    for p in ["c", "a", "b"]:
        table.apply(ann(p), 0.0)
    table.set_self(ann(SELF), 0.0)
    snap = table.snapshot(1.0)
    assert [p.peer_id for p in snap.peers] == ["a", "b", "c", "self"]
    assert snap.taken_at == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.peers = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.peers[0].state = PeerState.DOWN  # type: ignore[misc]
    # later changes to the table do not show in an old snapshot
    table.mark_down("a", 2.0)
    table.apply(ann("b", seq=2, load=LoadInfo(5, 5, 5)), 2.0)
    table.apply(ann("c", leaving=True, seq=2), 2.0)
    table.apply(ann("d"), 2.0)
    assert [p.peer_id for p in snap.peers] == ["a", "b", "c", "self"]
    assert snap.get("a").state is PeerState.ALIVE  # type: ignore[union-attr]
    assert snap.get("b").load == LoadInfo()  # type: ignore[union-attr]
    assert snap.get("d") is None
    assert [p.peer_id for p in table.snapshot(3.0).peers] == ["a", "b", "d", "self"]


def test_serving_compares_normalised_keys(table: PeerTable) -> None:
    table.apply(ann("a", models=("llama3:latest", "user/m:v1")), 0.0)
    table.apply(ann("b", models=("Llama3:Latest",)), 0.0)
    table.apply(ann("c", models=("mistral:latest",)), 0.0)
    table.set_self(ann(SELF, models=("llama3:latest",)), 0.0)
    table.mark_down("b", 0.0)
    snap = table.snapshot(0.0)
    for query in ["llama3", "LLAMA3:latest", "registry.ollama.ai/library/llama3:latest"]:
        assert [p.peer_id for p in snap.serving(names.key(query))] == ["a", "self"]
    assert [p.peer_id for p in snap.serving(names.key("user/m:v1"))] == ["a"]
    assert snap.serving(names.key("user/m")) == ()  # tag latest is a different model
    assert [p.peer_id for p in snap.alive()] == ["a", "c", "self"]


def test_peer_view_model_lookup() -> None:
    t = PeerTable(SELF, interval=1.0)
    t.apply(ann("a", models=("llama3:latest",), loaded=True), 0.0)
    v = t.snapshot(0.0).get("a")
    assert v is not None
    m = v.model(names.key("llama3"))
    assert m is not None and m.loaded
    assert v.serves(names.key("llama3"))
    assert v.model(names.key("other")) is None
    # by_key is rebuilt by dataclasses.replace and is not a field
    assert dataclasses.replace(v, models=()).model(names.key("llama3")) is None
    assert "by_key" not in [f.name for f in dataclasses.fields(PeerView)]
    assert v == dataclasses.replace(v)


def test_empty_snapshot() -> None:
    snap = Snapshot(peers=(), taken_at=0.0)
    assert snap.get("x") is None and snap.alive() == () and snap.serving("x") == ()


def test_unreachable_peer_is_not_routed_to_and_stays_so_through_gossip_until_connected():
    t = PeerTable("me", interval=1.0)
    t.apply(ann("p1", 1, models=("a",)), 0.0)
    assert t.mark_unreachable("p1", 0.1) is True
    assert t.mark_unreachable("p1", 0.2) is False
    assert t.snapshot(0.2).serving(names.key("a")) == ()
    t.apply(ann("p1", 2, models=("a",)), 0.5)  # gossip through others proves no path
    assert t.snapshot(0.5).get("p1").state is PeerState.UNREACHABLE
    assert t.mark_up("p1", 0.6) is True  # a connection does
    assert [p.peer_id for p in t.snapshot(0.6).serving(names.key("a"))] == ["p1"]

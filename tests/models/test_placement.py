"""Copy counts: rendezvous placement and the replicator's decisions (pure, no network)."""

from __future__ import annotations

from types import SimpleNamespace

from meshollama import names
from meshollama.catalog import LoadInfo, ModelInfo, ReplicaTarget, StoreInfo
from meshollama.config import ModelsConfig
from meshollama.mesh.peertable import PeerState, PeerView, Snapshot
from meshollama.models.placement import Candidate, merge, volunteers, weight
from meshollama.models.replicator import Replicator

GB = 10**9
ROOMY = StoreInfo("ollama", 100 * GB, True)


def test_exactly_the_missing_copies_go_to_the_highest_ranked_able_nodes():
    peers = [f"p{i}" for i in range(8)]
    target = ReplicaTarget("m:1b", 3)
    cands = [Candidate(p, ROOMY) for p in peers]
    ranked = sorted(peers, key=lambda p: weight(names.key("m:1b"), p), reverse=True)
    assert volunteers(names.key("m:1b"), target, GB, ["p0"], cands) == [p for p in ranked if p != "p0"][:2]
    assert volunteers(names.key("m:1b"), target, GB, ["p0", "p1", "p2"], cands) == []


def test_nodes_without_room_labels_or_willingness_are_skipped():
    target = ReplicaTarget("m:1b", 4, labels=("gpu",))
    cands = [Candidate("full", StoreInfo("ollama", GB // 2, True, ("gpu",))),
             Candidate("nolabel", ROOMY),
             Candidate("refuses", StoreInfo("ollama", 100 * GB, False, ("gpu",))),
             Candidate("down", StoreInfo("ollama", 100 * GB, True, ("gpu",)), up=False),
             Candidate("nostore", None),
             Candidate("ok", StoreInfo("embedded", 100 * GB, True, ("gpu", "x")))]
    assert volunteers("k", target, GB, [], cands) == ["ok"]


def test_the_newest_stamp_wins_and_ties_go_to_the_higher_count():
    got = merge([ReplicaTarget("m", 2, 5), ReplicaTarget("m", 4, 3), ReplicaTarget("m:latest", 1, 5),
                 ReplicaTarget("n", 1, 0)], names.key)
    assert got[names.key("m")].copies == 2 and got[names.key("n")].copies == 1


def view(pid, models=(), *, store=ROOMY, state=PeerState.ALIVE, me=False, replicas=()):
    return PeerView(pid, (), "", "", tuple(ModelInfo(m, digest="d", size=GB) for m in models), LoadInfo(), 1, 0.0,
                    state, me, store=store, replicas=tuple(replicas))


class Mesh:
    def __init__(self, self_id, admission=None):
        self.self_id = self_id
        self.admission = admission
        self.beats = 0

    def request_heartbeat(self):
        self.beats += 1


def replicator(self_id, tmp_path=None, **cfg):
    config = ModelsConfig(replica_grace=10.0, **cfg)
    return Replicator(config, Mesh(self_id), SimpleNamespace(), data_dir=tmp_path)


def ranked(model, peers):
    return sorted(peers, key=lambda p: weight(names.key(model), p), reverse=True)


def test_a_target_heard_from_a_peer_makes_the_top_ranked_node_pull_and_only_it():
    peers = ["a", "b", "c", "d"]
    order = [p for p in ranked("m:1b", peers) if p != "a"]
    snap_for = lambda me: Snapshot(tuple(view(p, ["m:1b"] if p == "a" else [], me=(p == me),  # noqa: E731
                                              replicas=[ReplicaTarget("m:1b", 2, 7)] if p == "a" else [])
                                         for p in peers), 0.0)
    decisions = {me: replicator(me).decide(snap_for(me), 0.0) for me in peers}
    assert [me for me, d in decisions.items() if d] == [order[0]]
    assert decisions[order[0]] == [names.key("m:1b")]


def test_a_holder_gone_counts_for_the_grace_then_the_next_one_steps_in():
    r = replicator("z", replicas=("m:1b=2",))
    others = [p for p in ranked("m:1b", ["a", "b", "c", "z"]) if p not in ("a", "b")]
    both = Snapshot((view("a", ["m:1b"]), view("b", ["m:1b"]), view("c"), view("z", me=True)), 0.0)
    assert r.decide(both, 0.0) == []
    one = Snapshot((view("a", ["m:1b"]), view("c"), view("z", me=True)), 0.0)  # b vanished
    assert r.decide(one, 5.0) == []  # within the grace: b still counts
    expect = [names.key("m:1b")] if others[0] == "z" else []
    assert r.decide(one, 10.5) == expect


def test_closed_mesh_takes_targets_from_admins_only_and_targets_persist(tmp_path):
    admission = SimpleNamespace(known_role=lambda peer: "admin" if peer == "boss" else "serve")
    r = replicator("me", tmp_path)
    r.mesh.admission = admission
    snap = Snapshot((view("boss", replicas=[ReplicaTarget("x:1b", 2, 9)]),
                     view("member", replicas=[ReplicaTarget("y:1b", 60, 9)]), view("me", me=True)), 0.0)
    r.decide(snap, 0.0)
    assert [t.model for t in r.targets()] == ["x:1b"]
    r.set_target("z:1b", 1)
    assert r.mesh.beats == 1
    again = replicator("me", tmp_path)
    assert {t.model: t.copies for t in again.targets()} == {"x:1b": 2, "z:1b": 1}
    cleared = again.set_target("x:1b", 0)
    assert cleared.stamp > 9 and again.target("x:1b") is None


def test_a_node_pulling_a_copy_counts_as_a_holder_so_no_second_node_starts_one():
    peers = ["a", "b", "c", "d", "e"]
    me_rank = [p for p in ranked("m:1b", peers) if p != "a"]
    puller, second = me_rank[0], me_rank[1]
    r = replicator(second, replicas=("m:1b=2",))
    low = StoreInfo("ollama", 0, True, pulling=("m:1b",))  # its claimed space: no room left to announce
    snap = Snapshot(tuple(view(p, ["m:1b"] if p == "a" else [], me=(p == second),
                               store=low if p == puller else ROOMY) for p in peers), 0.0)
    assert r.decide(snap, 0.0) == []


def test_a_volunteer_that_never_becomes_a_holder_is_skipped_after_the_patience():
    peers = ["a", "b", "c", "d"]
    order = [p for p in ranked("m:1b", peers) if p != "a"]
    r = replicator(order[1], replicas=("m:1b=2",))
    snap = Snapshot(tuple(view(p, ["m:1b"] if p == "a" else [], me=(p == order[1])) for p in peers), 0.0)
    assert r.decide(snap, 0.0) == []  # order[0] is expected to pull
    assert r.decide(snap, r.patience - 1) == []
    assert r.decide(snap, r.patience + 1) == [names.key("m:1b")]  # it never did: the next one goes

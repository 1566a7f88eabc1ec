"""Which peers get a liveness ping each round (pure)."""

from __future__ import annotations

from collections import Counter

from meshollama.catalog import LoadInfo
from meshollama.mesh.liveness import IDLE_PING_EVERY, peers_to_ping
from meshollama.mesh.peertable import PeerState, PeerView, Snapshot


def view(pid: str, state: PeerState = PeerState.ALIVE, is_self: bool = False) -> PeerView:
    return PeerView(peer_id=pid, addrs=(), api_url="", version="0.1.0", models=(), load=LoadInfo(),
                    seq=1, last_seen=0.0, state=state, is_self=is_self)


PEERS = [f"12D3KooWpeer{i:02d}" for i in range(20)]
SNAP = Snapshot(peers=tuple([view("me", is_self=True)] + [view(p) for p in PEERS]), taken_at=0.0)


def rounds(n: int, *, urgent=frozenset(), busy=frozenset(), connected=frozenset(PEERS), snap=SNAP,
           recent=frozenset(), ping_all_up_to: int = len(PEERS)) -> Counter:
    got: Counter = Counter()
    for r in range(n):
        got.update(peers_to_ping(snap, set(connected), r, urgent=urgent.__contains__, busy=busy.__contains__,
                                 recent=recent.__contains__, ping_all_up_to=ping_all_up_to))
    return got


def test_idle_peers_are_pinged_once_every_few_rounds_spread_out():
    got = rounds(IDLE_PING_EVERY * 4)
    assert set(got) == set(PEERS) and set(got.values()) == {4}  # each exactly once per IDLE_PING_EVERY rounds
    per_round = [len(peers_to_ping(SNAP, set(PEERS), r, urgent=lambda p: False, busy=lambda p: False,
                                   recent=lambda p: False, ping_all_up_to=len(PEERS)))
                 for r in range(IDLE_PING_EVERY)]
    assert sum(per_round) == len(PEERS) and max(per_round) < len(PEERS)  # spread, not all in one round


def test_peers_callers_wait_on_are_pinged_every_round():
    got = rounds(10, urgent=frozenset({PEERS[3]}))
    assert got[PEERS[3]] == 10 and got[PEERS[4]] == 2


def test_never_self_unconnected_or_already_pinging():
    got = rounds(10, busy=frozenset({PEERS[0]}), connected=frozenset(PEERS[1:]) - {PEERS[1]})
    assert "me" not in got and PEERS[0] not in got and PEERS[1] not in got


def test_down_peers_are_pinged_only_while_urgent():
    snap = Snapshot(peers=(view(PEERS[0], PeerState.DOWN),), taken_at=0.0)
    assert rounds(10, snap=snap) == Counter()
    assert rounds(10, snap=snap, urgent=frozenset({PEERS[0]}))[PEERS[0]] == 10


def test_above_the_threshold_only_urgent_and_recent_peers_are_pinged():
    got = rounds(IDLE_PING_EVERY * 4, urgent=frozenset({PEERS[3]}), recent=frozenset({PEERS[3], PEERS[7]}),
                 ping_all_up_to=len(PEERS) - 1)
    assert got == Counter({PEERS[3]: IDLE_PING_EVERY * 4, PEERS[7]: 4})  # urgent: every round; recent: every 5th


def test_the_threshold_counts_every_peer_in_the_table_but_us():
    everyone = Counter({p: 4 for p in PEERS})
    assert rounds(IDLE_PING_EVERY * 4, ping_all_up_to=len(PEERS)) == everyone  # "me" is not counted
    assert rounds(IDLE_PING_EVERY * 4, ping_all_up_to=len(PEERS) - 1) == Counter()
    down = Snapshot(peers=SNAP.peers + (view("12D3KooWdown", PeerState.DOWN),), taken_at=0.0)
    assert rounds(IDLE_PING_EVERY * 4, snap=down, ping_all_up_to=len(PEERS)) == Counter()  # down peers count too


# --- local health (Lifeguard) ------------------------------------------------------


def test_local_health_stretches_the_timeout_per_miss_up_to_a_cap():
    from meshollama.mesh.liveness import LocalHealth

    h = LocalHealth()
    assert h.timeout(2.0, 0.0) == 2.0
    h.missed(0.0)
    assert h.timeout(2.0, 0.0) == 4.0
    for _ in range(20):
        h.missed(0.1)
    assert h.score == LocalHealth.MAX_SCORE and h.timeout(2.0, 0.1) == 2.0 * (1 + LocalHealth.MAX_SCORE)


def test_local_health_comes_back_with_answers_and_with_quiet_time():
    from meshollama.mesh.liveness import LocalHealth

    h = LocalHealth()
    for _ in range(4):
        h.missed(10.0)
    h.answered(10.5)
    assert h.score == 3
    h.answered(10.6)
    h.answered(10.7)
    h.answered(10.8)
    h.answered(10.9)  # never below zero
    assert h.score == 0
    for _ in range(3):
        h.missed(20.0)
    assert h.timeout(1.0, 20.0 + LocalHealth.DECAY - 0.01) == 4.0  # not yet a quiet period
    assert h.timeout(1.0, 20.0 + LocalHealth.DECAY) == 3.0  # one quiet period: one point
    assert h.timeout(1.0, 20.0 + 2 * LocalHealth.DECAY + 0.5) == 2.0
    h.missed(20.0 + 2 * LocalHealth.DECAY + 1)  # a miss restarts the quiet count
    assert h.score == 2
    assert h.timeout(1.0, 20.0 + 3 * LocalHealth.DECAY) == 3.0
    assert h.timeout(1.0, 1000.0) == 1.0

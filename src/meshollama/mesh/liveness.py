"""Which peers get a liveness ping this round (pure).

A ping to every peer every second was about 30 % of an idle node's CPU in a
10-node mesh, and it grows with the mesh. Peers our callers are waiting on
(requests in flight), and peers that just missed a ping, are pinged every
round: a frozen one must release its callers fast. Other peers that are up
(alive, or draining: it still finishes requests) are pinged every
:data:`IDLE_PING_EVERY` rounds, each on its own stable offset so pings
spread evenly, but in a large mesh (more than ``ping_all_up_to`` peers in
the table) only those we had requests with ``recent``\\ ly: the ones we are
likely to route to again. The rest are left to what costs nothing per peer:
a closed connection marks a peer down at once, a frozen one stops sending
heartbeats and expires, and the moment a request goes to it, it is "waited
on" and pinged at once. So the pings a node sends grow with the peers it
works with, not with the size of the mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .peertable import UP, Snapshot

IDLE_PING_EVERY = 5  # rounds between pings to a peer nobody waits on
PING_ALL_UP_TO = 16  # peers in the table up to which every idle peer is pinged (p2p.liveness_ping_all_up_to)


def peers_to_ping(
    snapshot: Snapshot,
    connected: set[str],
    round_no: int,
    *,
    urgent: Callable[[str], bool],
    busy: Callable[[str], bool],
    recent: Callable[[str], bool] = lambda peer_id: False,
    ping_all_up_to: int = PING_ALL_UP_TO,
    focus: Iterable[str] | None = None,
) -> list[str]:
    """Who gets a liveness ping in round ``round_no`` (pure): connected peers
    without a ping in flight that are ``urgent`` (callers wait on them, or a
    ping just missed), and idle peers that are up (alive or draining) every
    :data:`IDLE_PING_EVERY` rounds, each on its own stable offset so the
    pings spread over rounds. Idle peers count only while the table holds
    at most ``ping_all_up_to`` peers besides us, or if they are ``recent``
    (we had requests with them a moment ago). ``focus``: every peer that may be
    urgent or recent (a superset); in a large mesh only those are looked at."""
    small = len(snapshot.peers) - 1 <= ping_all_up_to  # our own entry is one of them
    if not small and focus is not None:
        # A large mesh pings only urgent and recent peers: the caller names them
        # (``focus``), so a round costs O(those), not O(table).
        peers = [p for p in (snapshot.get(pid) for pid in sorted(set(focus))) if p is not None]
    else:
        peers = snapshot.peers
    out = []
    for peer in peers:
        pid = peer.peer_id
        if peer.is_self or pid not in connected or busy(pid):
            continue
        idle_due = peer.state in UP and (round_no + _stagger(pid)) % IDLE_PING_EVERY == 0
        if urgent(pid) or (idle_due and (small or recent(pid))):
            out.append(pid)
    return out


def _stagger(peer_id: str) -> int:
    """A stable per-peer offset (not ``hash()``, which is salted per process)."""
    return sum(peer_id.encode()) % IDLE_PING_EVERY


class LocalHealth:
    """Lifeguard's local health multiplier (Dadgar et al., 2018, as in HashiCorp
    memberlist's "awareness"), one per host: how much to distrust our own
    missed pings.

    A ping that times out says "that peer, or we, or the box we share, could
    not turn 32 bytes around in time". On a saturated 2-core box (25 nodes
    starting within 10 s) most misses were the prober's or the box's, not the
    peer's: at N=25 about 70 false "down" marks came after the last node was
    up, and each held convergence back until a later ping answered. So every
    streak of misses raises a score (its first miss only: a frozen peer pinged
    every round must not keep stretching everyone's timeout; and with no
    indirect probes, unlike memberlist, a dead peer's first miss counts too),
    up to :data:`MAX_SCORE`; every answered ping lowers it, and so does each
    :data:`DECAY` seconds since the score last changed (in a large mesh few
    pings go out to lower it). An idle peer's ping timeout is the configured
    one times ``1 + score``. A healthy node (score 0) waits ``liveness_timeout``
    for the first ping to a frozen idle peer, and twice that for the second,
    which marks it down (the first miss made the score 1, unless answers from
    others brought it back); at the worst (score 8) that is about
    ``2 x 9 x liveness_timeout`` plus a round, 37 s with the defaults. A
    node whose pings time out all around waits that much longer before it
    calls anyone down. Pure state on the clock it is handed.
    """

    MAX_SCORE = 8  # memberlist's default AwarenessMaxMultiplier
    DECAY = 5.0  # seconds without a miss that lower the score by one

    def __init__(self) -> None:
        self.score = 0
        self._since = 0.0  # when the score last changed (the decay counts from it)

    def _decay(self, now: float) -> None:
        if self.score and now - self._since >= self.DECAY:
            steps = int((now - self._since) // self.DECAY)
            self.score = max(0, self.score - steps)
            self._since += steps * self.DECAY

    def missed(self, now: float) -> None:
        """A ping timed out."""
        self._decay(now)
        self.score = min(self.MAX_SCORE, self.score + 1)
        self._since = now

    def answered(self, now: float) -> None:
        """A ping came back in time."""
        self._decay(now)
        if self.score:
            self.score -= 1
            self._since = now

    def timeout(self, base: float, now: float) -> float:
        """The ping timeout now: ``base`` times ``1 + score``."""
        self._decay(now)
        return base * (1 + self.score)

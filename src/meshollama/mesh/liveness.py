"""Which peers get a liveness ping this round (pure).

A ping to every peer every second was about 30 % of an idle node's CPU in a
10-node mesh, and it grows with the mesh. Peers our callers are waiting on
(requests in flight), and peers that just missed a ping, are pinged every
round: a frozen one must release its callers fast. Every other peer that is
up (alive, or draining: it still finishes requests) is pinged every
:data:`IDLE_PING_EVERY` rounds, each on its own stable offset so pings
spread evenly; a frozen idle peer is also caught by heartbeat expiry, and
the moment a request goes to it, it is "waited on" and pinged at once.
"""

from __future__ import annotations

from collections.abc import Callable

from .peertable import UP, Snapshot

IDLE_PING_EVERY = 5  # rounds between pings to a peer nobody waits on


def peers_to_ping(
    snapshot: Snapshot,
    connected: set[str],
    round_no: int,
    *,
    urgent: Callable[[str], bool],
    busy: Callable[[str], bool],
) -> list[str]:
    """Who gets a liveness ping in round ``round_no`` (pure): connected peers
    without a ping in flight that are ``urgent`` (callers wait on them, or a
    ping just missed), and idle peers that are up (alive or draining) every
    :data:`IDLE_PING_EVERY` rounds, each on its own stable offset so the
    pings spread over rounds."""
    out = []
    for peer in snapshot.peers:
        pid = peer.peer_id
        if peer.is_self or pid not in connected or busy(pid):
            continue
        due = (round_no + _stagger(pid)) % IDLE_PING_EVERY == 0
        if urgent(pid) or (peer.state in UP and due):
            out.append(pid)
    return out


def _stagger(peer_id: str) -> int:
    """A stable per-peer offset (not ``hash()``, which is salted per process)."""
    return sum(peer_id.encode()) % IDLE_PING_EVERY



"""Down hints: spreading "this peer is gone" (pure state, SWIM-style suspicion).

Nodes announce rarely now, so a peer that crashes stays in the tables of
nodes never connected to it until it expires (``miss_limit`` refreshes,
minutes in a large mesh), and each of their gateways would try it once
before learning. Instead, a node that sees a peer go down (its connection
closed and stayed closed, or it failed its liveness pings) names it, with the
sequence number it last announced, in the ``dn`` field of its next
announcement. A node that hears the hint marks that peer down unless it is
connected to it itself (it knows better) or has heard something newer from
it. So the news costs one announcement, and every gateway stops routing to
the crashed peer within a gossip hop of its detection.

Only hearsay, never proof, so it is bounded the way SWIM bounds suspicion:

* a hint names a seq: an announcement from the peer with a higher one undoes
  it (the peer is ALIVE again);
* a peer that hears a hint about itself *refutes* it by announcing at once
  (at most once per :data:`REFUTE_EVERY`), and that fresh announcement undoes
  the hint everywhere;
* many nodes see the same crash at the same moment; each waits a random
  :data:`DELAY` first and stays quiet if it hears the hint from someone else
  (suppression), so a crash costs about one announcement, not N;
* a node repeats its hints in its announcements for :data:`TTL` seconds,
  at most :data:`MAX` of them.

:class:`DownHints` is the state (what we say, what we heard); the mesh loops
(``mesh.loops``) do the I/O.
"""

from __future__ import annotations

from .gate import remember

DELAY = (0.5, 1.5)  # seconds, uniform: wait before saying a peer is down (a reconnect or another's hint may come)
TTL = 30.0  # seconds a hint is repeated in our announcements
MAX = 16  # hints one announcement carries (announce.MAX_DOWN)
MAX_HEARD = 4096  # others' hints remembered for suppression (and senders, for SENDER_GAP)
SENDER_GAP = 1.0  # seconds: one peer's hints are acted on at most this often
REFUTE_EVERY = 2.0  # seconds: the fastest we answer hints about ourselves


class DownHints:
    def __init__(self) -> None:
        self.ours: dict[str, tuple[int, float]] = {}  # peer -> (seq it last announced, when we said it was down)
        self.heard: dict[tuple[str, int], float] = {}  # (peer, seq) -> when someone else said it
        self.refuted_at: float | None = None
        self.senders: dict[str, float] = {}  # peer -> when we last acted on its hints

    def heard_of(self, peer_id: str, seq: int, now: float) -> None:
        """Someone else said ``peer_id`` (at ``seq``) is down: we need not say it too."""
        remember(self.heard, (peer_id, seq), now, MAX_HEARD)  # a liar naming made-up peers: bounded

    def sender_may(self, sender: str, now: float) -> bool:
        """Act on ``sender``'s hints now? At most once per :data:`SENDER_GAP`."""
        last = self.senders.get(sender)
        if last is not None and now - last < SENDER_GAP:
            return False
        remember(self.senders, sender, now, MAX_HEARD)
        return True

    def should_say(self, peer_id: str, seq: int) -> bool:
        """After the delay: say it, unless someone else did (or we already do)."""
        return (peer_id, seq) not in self.heard and self.ours.get(peer_id, (None,))[0] != seq

    def say(self, peer_id: str, seq: int, now: float) -> None:
        self.ours[peer_id] = (seq, now)

    def alive(self, peer_id: str, seq: int) -> None:
        """The peer announced ``seq`` (or we reached it): stop saying it is down."""
        said = self.ours.get(peer_id)
        if said is not None and seq > said[0]:
            del self.ours[peer_id]

    def current(self, now: float) -> tuple[tuple[str, int], ...]:
        """The hints for our next announcement (fresh ones, newest first, at most :data:`MAX`);
        forgets the stale ones."""
        self.ours = {p: v for p, v in self.ours.items() if now - v[1] < TTL}
        self.heard = {k: t for k, t in self.heard.items() if now - t < TTL}
        newest = sorted(self.ours.items(), key=lambda item: -item[1][1])[:MAX]
        return tuple((p, seq) for p, (seq, _) in newest)

    def refute(self, now: float) -> bool:
        """A hint names us: True if we should announce now (rate limited)."""
        if self.refuted_at is not None and now - self.refuted_at < REFUTE_EVERY:
            return False
        self.refuted_at = now
        return True


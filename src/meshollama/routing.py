"""Choosing which peer serves a request (pure).

:func:`choose` is a function of an immutable :class:`Snapshot`, this
gateway's own observations (:class:`RouteStats`), ``now`` and a seeded
``random.Random``, so every strategy is tested with tables and no network.
It returns the peers to try, best first; the gateway tries them in order
and passes the ones already tried as ``exclude`` if it asks again.

LEAST_LOADED, the default, is built for real load balancing:

* **Fresh load.** A peer's heartbeat is up to one interval old, so on its own
  every gateway would send a burst to whoever looked idle. We add the
  requests *we* sent it since its last heartbeat (``sent_since_heartbeat``)
  and never count less than what we know is still running there
  (``max(announced in_flight + sent_since_heartbeat, our in_flight)``: the
  announced number already includes ours, so adding both would double count).
  Queued requests count too, and the sum is divided by the peer's capacity.
* **Warm models.** A peer with the model already in memory gets
  :data:`LOADED_BONUS` off its score: a cold load costs seconds.
* **Latency.** An EWMA of time-to-first-byte, relative to the fastest
  candidate and capped, adds at most :data:`LATENCY_WEIGHT`; load dominates,
  latency breaks near-ties. Peers never measured get no penalty, and the
  penalty fades with the age of the last measurement
  (:data:`LATENCY_HALF_LIFE`): one slow answer (a cold model load) must not
  bench a peer forever, since a peer we avoid is never measured again.
* **Failures.** Sidelined peers (after a failure, until a time) go last.
* **Power of two choices.** Other gateways route too and do not see our
  sends, so always taking the single best peer makes them all herd onto it.
  The pick is the better of two peers sampled at random from the best tier
  (scores below best + :data:`TIER_WIDTH`: with capacity 1, peers with the
  same number of busy slots; a warm peer and a cold idle one are different
  tiers); scores within :data:`TIE_EPSILON` are a tie, broken at random,
  so a faded latency penalty lets a once-slow peer be measured again.
  The rest follow by score as the retry order.

Peers announcing capacity 0 (pure gateways) never serve.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from .mesh.peertable import PeerView, Snapshot

LOADED_BONUS = 0.5  # score taken off when the model is already loaded there
LATENCY_WEIGHT = 0.5  # most a slow peer's latency adds to its score
LATENCY_CAP = 4.0  # ttfb ratio to the fastest candidate at which the penalty is full
LATENCY_HALF_LIFE = 120.0  # seconds; an old measurement weighs less, so a slow peer gets retried
TIER_WIDTH = 0.5  # peers scoring less than best + this are sampled for the pick
TIE_EPSILON = 0.05  # two sampled peers closer than this are a tie, broken at random
DEFAULT_ALPHA = 0.3  # EWMA weight of the newest ttfb sample


class Strategy(enum.Enum):
    LEAST_LOADED = "least_loaded"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
    LOCAL_FIRST = "local_first"


@dataclass(frozen=True)
class PeerStats:
    """What this gateway has seen of one peer, at one moment."""

    in_flight: int = 0  # our requests to it not finished yet
    sent_since_heartbeat: int = 0  # our requests to it since its last heartbeat
    latency_ewma: float | None = None  # seconds to first byte, EWMA; None if never measured
    sidelined: bool = False  # recently failed: try it last
    latency_at: float | None = None  # when latency_ewma last took a sample


@dataclass
class _Entry:
    in_flight: int = 0
    sent_since_heartbeat: int = 0
    latency_ewma: float | None = None
    latency_at: float | None = None
    sidelined_until: float = float("-inf")
    heartbeat_seq: int = -1


@dataclass
class RouteStats:
    """This gateway's own observations of peers, mutated only by the gateway.

    Call :meth:`observe` with each fresh snapshot (or :meth:`heartbeat_seen`
    per peer) so ``sent_since_heartbeat`` resets when a peer's new heartbeat
    has taken our requests into account.
    """

    alpha: float = DEFAULT_ALPHA
    _peers: dict[str, _Entry] = field(default_factory=dict, repr=False)

    def _get(self, peer_id: str) -> _Entry:
        e = self._peers.get(peer_id)
        if e is None:
            e = self._peers[peer_id] = _Entry()
        return e

    def started(self, peer_id: str, now: float) -> None:
        """A request was sent to ``peer_id``."""
        e = self._get(peer_id)
        e.in_flight += 1
        e.sent_since_heartbeat += 1

    def finished(
        self, peer_id: str, now: float, *, ok: bool, latency: float | None, ttfb: float | None
    ) -> None:
        """A request to ``peer_id`` ended. Successful ones feed the latency EWMA
        with ``ttfb`` (or ``latency`` when no ttfb was measured)."""
        e = self._get(peer_id)
        e.in_flight = max(0, e.in_flight - 1)
        sample = ttfb if ttfb is not None else latency
        if ok and sample is not None and sample >= 0:
            if e.latency_ewma is None:
                e.latency_ewma = float(sample)
            else:
                e.latency_ewma += self.alpha * (sample - e.latency_ewma)
            e.latency_at = now

    def sideline(self, peer_id: str, now: float, seconds: float) -> None:
        """Try ``peer_id`` last until ``now + seconds`` (extends, never shortens)."""
        e = self._get(peer_id)
        e.sidelined_until = max(e.sidelined_until, now + seconds)

    def heartbeat_seen(self, peer_id: str, seq: int) -> None:
        """A heartbeat with ``seq`` from ``peer_id`` is in our table; a newer one
        than last time resets ``sent_since_heartbeat``."""
        e = self._get(peer_id)
        if seq > e.heartbeat_seq:
            e.heartbeat_seq = seq
            e.sent_since_heartbeat = 0

    def observe(self, snapshot: Snapshot) -> None:
        """:meth:`heartbeat_seen` for every peer in ``snapshot``; forgets idle
        entries of peers no longer in it."""
        for p in snapshot.peers:
            self.heartbeat_seen(p.peer_id, p.seq)
        for pid in [
            pid
            for pid, e in self._peers.items()
            if snapshot.get(pid) is None and e.in_flight == 0 and e.sidelined_until < snapshot.taken_at
        ]:
            del self._peers[pid]

    def view(self, peer_id: str, now: float) -> PeerStats:
        e = self._peers.get(peer_id)
        if e is None:
            return PeerStats()
        return PeerStats(
            in_flight=e.in_flight,
            sent_since_heartbeat=e.sent_since_heartbeat,
            latency_ewma=e.latency_ewma,
            sidelined=now < e.sidelined_until,
            latency_at=e.latency_at,
        )


def candidates(snapshot: Snapshot, model_key: str) -> tuple[PeerView, ...]:
    """Alive peers serving ``model_key`` (a :func:`meshollama.names.key`) with capacity > 0."""
    return tuple(p for p in snapshot.serving(model_key) if p.load.capacity > 0)


def load_score(peer: PeerView, stats: PeerStats) -> float:
    """Busy slots per capacity, counting what we sent since the heartbeat."""
    busy = max(peer.load.in_flight + stats.sent_since_heartbeat, stats.in_flight) + peer.load.queued
    return busy / max(peer.load.capacity, 1)


def scores(
    peers: tuple[PeerView, ...] | list[PeerView], model_key: str, stats: RouteStats, now: float
) -> dict[str, float]:
    """LEAST_LOADED score of each peer (lower is better), sidelining not included."""
    views = {p.peer_id: stats.view(p.peer_id, now) for p in peers}
    measured = [v.latency_ewma for v in views.values() if v.latency_ewma is not None]
    fastest = min(measured) if measured else None
    out: dict[str, float] = {}
    for p in peers:
        v = views[p.peer_id]
        s = load_score(p, v)
        m = p.model(model_key)
        if m is not None and m.loaded:
            s -= LOADED_BONUS
        if v.latency_ewma is not None and fastest is not None:
            s += _latency_penalty(v, fastest, now)
        out[p.peer_id] = s
    return out


def _latency_penalty(v: PeerStats, fastest: float, now: float) -> float:
    assert v.latency_ewma is not None
    if fastest > 0:
        ratio = v.latency_ewma / fastest
    else:
        ratio = 1.0 if v.latency_ewma <= 0 else LATENCY_CAP
    penalty = LATENCY_WEIGHT * min(max(ratio - 1.0, 0.0), LATENCY_CAP - 1.0) / (LATENCY_CAP - 1.0)
    age = max(0.0, now - v.latency_at) if v.latency_at is not None else 0.0
    return penalty * 0.5 ** (age / LATENCY_HALF_LIFE)


def _least_loaded(
    peers: list[PeerView], model_key: str, stats: RouteStats, now: float, rng: random.Random
) -> list[str]:
    if not peers:
        return []
    score = scores(peers, model_key, stats, now)
    sidelined = {p.peer_id: stats.view(p.peer_id, now).sidelined for p in peers}
    tiebreak = {p.peer_id: rng.random() for p in peers}
    order = sorted(score, key=lambda pid: (sidelined[pid], score[pid], tiebreak[pid]))
    first_group = [pid for pid in order if sidelined[pid] == sidelined[order[0]]]
    best = score[first_group[0]]
    tier = [pid for pid in first_group if score[pid] < best + TIER_WIDTH]
    if len(tier) >= 2:
        a, b = rng.sample(tier, 2)
        if abs(score[a] - score[b]) <= TIE_EPSILON:
            pick = a if tiebreak[a] <= tiebreak[b] else b
        else:
            pick = a if score[a] < score[b] else b
    else:
        pick = tier[0]
    return [pick] + [pid for pid in order if pid != pick]


def choose(
    snapshot: Snapshot,
    model_key: str,
    stats: RouteStats,
    now: float,
    rng: random.Random,
    strategy: Strategy = Strategy.LEAST_LOADED,
    exclude: frozenset[str] = frozenset(),
    rr_counter: int = 0,
) -> list[str]:
    """Peer ids to try for ``model_key``, best first; empty if nobody alive serves it.

    ``exclude`` drops peers already tried. With every strategy, sidelined
    peers come after the others. ROUND_ROBIN rotates the peer-id-sorted list
    by ``rr_counter``; RANDOM shuffles; LOCAL_FIRST puts this node first when
    it serves the model and is not sidelined, then the LEAST_LOADED order.
    """
    peers = [p for p in candidates(snapshot, model_key) if p.peer_id not in exclude]
    if not peers:
        return []
    if strategy is Strategy.LEAST_LOADED:
        return _least_loaded(peers, model_key, stats, now, rng)
    side = {p.peer_id: stats.view(p.peer_id, now).sidelined for p in peers}
    ok = [p for p in peers if not side[p.peer_id]]
    bad = [p for p in peers if side[p.peer_id]]
    if strategy is Strategy.LOCAL_FIRST:
        local = [p.peer_id for p in ok if p.is_self]
        rest = [p for p in peers if p.peer_id not in local]
        return local + _least_loaded(rest, model_key, stats, now, rng)
    if strategy is Strategy.ROUND_ROBIN:

        def rotate(group: list[PeerView]) -> list[str]:
            ids = sorted(p.peer_id for p in group)
            if not ids:
                return ids
            i = rr_counter % len(ids)
            return ids[i:] + ids[:i]

        return rotate(ok) + rotate(bad)
    if strategy is Strategy.RANDOM:
        ok_ids = [p.peer_id for p in ok]
        bad_ids = [p.peer_id for p in bad]
        rng.shuffle(ok_ids)
        rng.shuffle(bad_ids)
        return ok_ids + bad_ids
    raise ValueError(f"unknown strategy {strategy!r}")

"""Choosing which peer serves a request (pure).

:func:`choose` is a function of an immutable :class:`Snapshot`, this
gateway's own observations (:class:`RouteStats`), ``now`` and a seeded
``random.Random``, so every strategy is tested with tables and no network.
It returns the peers to try, best first; the gateway tries them in order
and passes the ones already tried as ``exclude`` if it asks again.

LEAST_LOADED, the default, estimates how long a new request would take on
each peer and picks among the quickest, the way "peak EWMA" balancers do
(Finagle, Linkerd): ``score = rounds x slowness``.

* **Rounds: fresh load.** ``(busy + 1) / capacity``: how many turns of the
  peer's slots this request waits, its own included. A heartbeat is up to
  one interval old, so on its own every gateway would send a burst to
  whoever looked idle (or shun one that just finished a burst). We correct
  the announced count by our own net change since that heartbeat, the
  requests we sent minus those that finished, and never count less than
  what we know is still running there: ``max(announced in_flight +
  sent_since_heartbeat - finished_since_heartbeat, our in_flight)`` (the
  announced number already includes ours, so adding both would double
  count). Queued requests count.
* **Cold models.** A peer without the model in memory gets
  :data:`COLD_PENALTY` more rounds: a cold load costs seconds.
* **Slowness.** Counting requests alone treats every peer as equally fast,
  so a peer 20x slower per token would get as many requests as a fast one
  whenever both are busy. This gateway keeps, per (peer, model), an EWMA of
  time to first byte and of the time between streamed chunks (throughput).
  Each is compared with the fastest candidate's as ``(x + floor) / (fastest
  + floor)`` (the floor, :data:`SPEED_FLOOR`, keeps millisecond jitter on
  loopback from counting), the larger ratio is capped at
  :data:`SLOWNESS_CAP`, and the excess over 1 fades with the age of the
  measurement (:data:`LATENCY_HALF_LIFE`): a peer we avoid is never
  measured again, so one slow answer (a cold load) must not bench it for
  good. Peers never measured count as fast, so they get tried.
* **Failures.** Sidelined peers (after a failure, until a time) go last.
* **Power of two choices.** Other gateways route too and do not see our
  sends, so always taking the single best peer makes them all herd onto it.
  The pick is the better of two peers sampled at random from the best tier
  (scores below best + :data:`TIER_WIDTH`: with capacity 1 and equal speed,
  peers with the same number of busy slots); scores within
  :data:`TIE_EPSILON` are a tie, broken at random. The rest follow by
  score as the retry order.

Peers announcing capacity 0 (pure gateways) never serve.

Cost: a decision touches only the holders of the model (the snapshot's
index, :meth:`Snapshot.serving`), never the whole table, and of those at most
:data:`ROUTE_SAMPLE`: with more holders it scores a random sample of them
(power of d choices, the way large balancers do; the best of 32 random
holders is a near-best peer, and every gateway sampling differently is what
keeps them from herding), so it costs the same at 10,000 peers, or 10,000
holders, as at 10 (``tests/unit/test_route_index.py``,
``benchmarks/bench_route.py``). :meth:`RouteStats.observe` walks the table
only when the snapshot holds another peers tuple than last time.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .catalog import LoadInfo
from .mesh.peertable import PeerState, PeerView, Snapshot

COLD_PENALTY = 0.5  # rounds added when the model is not loaded on the peer
SLOWNESS_CAP = 8.0  # the most a slow peer's estimate is multiplied by
SPEED_FLOOR = 0.02  # seconds added to both sides of a speed ratio: ignore ms jitter
LATENCY_HALF_LIFE = 120.0  # seconds; an old measurement weighs less, so a slow peer gets retried
TIER_WIDTH = 0.5  # peers scoring less than best + this are sampled for the pick
TIE_EPSILON = 0.05  # two sampled peers closer than this are a tie, broken at random
DEFAULT_ALPHA = 0.3  # EWMA weight of the newest sample
WARM_FOR = 60.0  # seconds after an answer during which the model counts as loaded there
ROUTE_SAMPLE = 32  # holders a decision looks at, at most (a random sample when there are more)


class Strategy(enum.Enum):
    LEAST_LOADED = "least_loaded"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
    LOCAL_FIRST = "local_first"


@dataclass(frozen=True)
class PeerStats:
    """What this gateway has seen of one peer (and one model), at one moment."""

    in_flight: int = 0  # our requests to it not finished yet
    sent_since_heartbeat: int = 0  # our requests to it since its last heartbeat
    finished_since_heartbeat: int = 0  # ... and those that ended since then
    latency_ewma: float | None = None  # seconds to first byte, EWMA; None if never measured
    sidelined: bool = False  # recently failed: try it last
    latency_at: float | None = None  # when a speed EWMA last took a sample
    gap_ewma: float | None = None  # seconds between streamed chunks, EWMA; None if never measured
    load: LoadInfo | None = None  # load we asked the peer for since its last heartbeat (RouteStats.sampled)


@dataclass
class _Speed:
    ttfb: float | None = None
    gap: float | None = None
    at: float | None = None
    answered_at: float | None = None  # last successful answer from this (peer, model)


@dataclass
class _Entry:
    in_flight: int = 0
    sent_since_heartbeat: int = 0
    finished_since_heartbeat: int = 0
    sidelined_until: float = float("-inf")
    heartbeat_seq: int = -1
    speed: dict[str, _Speed] = field(default_factory=dict)  # by model key ("" = any model)
    sampled: LoadInfo | None = None  # asked for since the last heartbeat (a large mesh: mesh.load_client)
    sampled_at: float = float("-inf")
    asked_at: float = float("-inf")  # when we last asked it for its load


def _ewma(old: float | None, sample: float, alpha: float) -> float:
    return float(sample) if old is None else old + alpha * (sample - old)


@dataclass
class RouteStats:
    """This gateway's own observations of peers, mutated only by the gateway.

    Call :meth:`observe` with each fresh snapshot (or :meth:`heartbeat_seen`
    per peer) so ``sent_since_heartbeat`` resets when a peer's new heartbeat
    has taken our requests into account. Load is per peer (slots are shared
    by its models); speed is per (peer, model), since one peer's models can
    differ in speed by orders of magnitude.
    """

    alpha: float = DEFAULT_ALPHA
    _peers: dict[str, _Entry] = field(default_factory=dict, repr=False)
    _seen: tuple[PeerView, ...] | None = field(default=None, repr=False)  # peers of the last observe
    _unseen: set[str] = field(default_factory=set, repr=False)  # entries maybe not in _seen

    def _get(self, peer_id: str) -> _Entry:
        e = self._peers.get(peer_id)
        if e is None:
            e = self._peers[peer_id] = _Entry()
            self._unseen.add(peer_id)
        return e

    def started(self, peer_id: str, now: float) -> None:
        """A request was sent to ``peer_id``."""
        e = self._get(peer_id)
        e.in_flight += 1
        e.sent_since_heartbeat += 1

    def first_byte(self, peer_id: str, now: float, ttfb: float, *, model: str = "") -> None:
        """The answer from ``peer_id`` started after ``ttfb`` seconds: feed the
        time-to-first-byte EWMA now, not when a long stream ends, so a peer that
        turned slow is seen as slow after its first slow answer starts."""
        if ttfb >= 0:
            sp = self._get(peer_id).speed.setdefault(model, _Speed())
            sp.ttfb = _ewma(sp.ttfb, ttfb, self.alpha)
            sp.at = now

    def finished(
        self,
        peer_id: str,
        now: float,
        *,
        ok: bool,
        latency: float | None,
        ttfb: float | None,
        model: str = "",
        chunks: int = 0,
        count_ttfb: bool = True,
    ) -> None:
        """A request to ``peer_id`` ended after ``latency`` seconds. A successful
        one feeds the speed EWMAs of (peer, ``model``): time to first byte
        (``ttfb``, or ``latency`` when none was measured; skipped with
        ``count_ttfb=False`` when :meth:`first_byte` already took it) and, for
        answers streamed in ``chunks`` >= 2 pieces, the time between pieces."""
        e = self._get(peer_id)
        e.in_flight = max(0, e.in_flight - 1)
        e.finished_since_heartbeat += 1
        sample = ttfb if ttfb is not None else latency
        if not ok or sample is None or sample < 0:
            return
        sp = e.speed.setdefault(model, _Speed())
        sp.answered_at = now
        if count_ttfb:
            self.first_byte(peer_id, now, sample, model=model)
        if chunks >= 2 and ttfb is not None and latency is not None and latency >= ttfb:
            sp.gap = _ewma(sp.gap, (latency - ttfb) / (chunks - 1), self.alpha)
            sp.at = now

    def recently_answered(self, peer_id: str, model: str, now: float, within: float = WARM_FOR) -> bool:
        """A successful answer for ``model`` came from ``peer_id`` in the last
        ``within`` seconds: the model is loaded there (Ollama keeps it 5 min),
        even if no heartbeat has said so yet."""
        e = self._peers.get(peer_id)
        sp = e.speed.get(model) if e is not None else None
        return sp is not None and sp.answered_at is not None and now - sp.answered_at <= within

    def sideline(self, peer_id: str, now: float, seconds: float) -> None:
        """Try ``peer_id`` last until ``now + seconds`` (extends, never shortens)."""
        e = self._get(peer_id)
        e.sidelined_until = max(e.sidelined_until, now + seconds)

    def heartbeat_seen(self, peer_id: str, seq: int) -> None:
        """A heartbeat with ``seq`` from ``peer_id`` is in our table; a newer one
        than last time resets ``sent_since_heartbeat`` and ``finished_since_heartbeat``."""
        e = self._get(peer_id)
        if seq > e.heartbeat_seq:
            e.heartbeat_seq = seq
            e.sent_since_heartbeat = 0
            e.finished_since_heartbeat = 0
            e.sampled = None

    def sampled(self, peer_id: str, load: LoadInfo, now: float) -> None:
        """We asked ``peer_id`` for its load (a large mesh, where load is not gossiped):
        it counts as a heartbeat of ours alone, so the corrections restart from it."""
        e = self._get(peer_id)
        e.sampled, e.sampled_at = load, now
        e.sent_since_heartbeat = 0
        e.finished_since_heartbeat = 0

    def asking(self, peer_id: str, now: float) -> None:
        """We are asking ``peer_id`` for its load now (an answer or not, not again soon)."""
        self._get(peer_id).asked_at = now

    def asked_within(self, peer_id: str, now: float, seconds: float) -> bool:
        e = self._peers.get(peer_id)
        return e is not None and now - e.asked_at < seconds

    def observe(self, snapshot: Snapshot) -> None:
        """:meth:`heartbeat_seen` for every peer in ``snapshot``; forgets idle
        entries of peers no longer in it.

        The gateway calls this per request, and the table hands out the same
        peers tuple until it changes. For the tuple seen last time every
        heartbeat is already counted (an entry's ``heartbeat_seq`` only grows,
        and only this method deletes entries), so only the entries not in it
        (kept last time, or made since) are looked at: O(those), not O(peers)."""
        if snapshot.peers is not self._seen:
            for p in snapshot.peers:
                self.heartbeat_seen(p.peer_id, p.seq)
            absent = [pid for pid in self._peers if snapshot.get(pid) is None]
        else:
            absent = [pid for pid in self._unseen if pid in self._peers and snapshot.get(pid) is None]
        for pid in absent:
            e = self._peers[pid]
            if e.in_flight == 0 and e.sidelined_until < snapshot.taken_at:
                del self._peers[pid]
        self._seen = snapshot.peers
        self._unseen = {pid for pid in absent if pid in self._peers}

    def view(self, peer_id: str, now: float, model: str = "") -> PeerStats:
        e = self._peers.get(peer_id)
        if e is None:
            return PeerStats()
        sp = e.speed.get(model) or _Speed()
        return PeerStats(
            in_flight=e.in_flight,
            sent_since_heartbeat=e.sent_since_heartbeat,
            finished_since_heartbeat=e.finished_since_heartbeat,
            latency_ewma=sp.ttfb,
            sidelined=now < e.sidelined_until,
            latency_at=sp.at,
            gap_ewma=sp.gap,
            load=e.sampled,
        )


def candidates(snapshot: Snapshot, model_key: str) -> tuple[PeerView, ...]:
    """Alive peers serving ``model_key`` (a :func:`meshollama.names.key`) with capacity > 0,
    sorted by peer id: O(holders of the model), from the snapshot's index."""
    return tuple(p for p in snapshot.serving(model_key) if p.load.capacity > 0)


def load_score(peer: PeerView, stats: PeerStats) -> float:
    """Busy slots per capacity, corrected by what we sent and saw finish since the heartbeat
    (or since we last asked the peer for its load)."""
    load = stats.load or peer.load
    announced = load.in_flight + stats.sent_since_heartbeat - stats.finished_since_heartbeat
    busy = max(announced, stats.in_flight, 0) + load.queued
    return busy / max(load.capacity, 1)


def rounds(peer: PeerView, stats: PeerStats, model_key: str) -> float:
    """Turns of the peer's slots a new request would wait, its own included."""
    m = peer.model(model_key)
    cold = 0.0 if m is not None and m.loaded else COLD_PENALTY
    return load_score(peer, stats) + 1.0 / max((stats.load or peer.load).capacity, 1) + cold


def slowness(stats: PeerStats, fastest_ttfb: float | None, fastest_gap: float | None, now: float) -> float:
    """1 for the fastest candidate (or an unmeasured one), up to :data:`SLOWNESS_CAP`."""
    ratio = 1.0
    if stats.latency_ewma is not None and fastest_ttfb is not None:
        ratio = max(ratio, (stats.latency_ewma + SPEED_FLOOR) / (fastest_ttfb + SPEED_FLOOR))
    if stats.gap_ewma is not None and fastest_gap is not None:
        ratio = max(ratio, (stats.gap_ewma + SPEED_FLOOR) / (fastest_gap + SPEED_FLOOR))
    excess = min(ratio, SLOWNESS_CAP) - 1.0
    age = max(0.0, now - stats.latency_at) if stats.latency_at is not None else 0.0
    return 1.0 + excess * 0.5 ** (age / LATENCY_HALF_LIFE)


def scores(
    peers: tuple[PeerView, ...] | list[PeerView], model_key: str, stats: RouteStats, now: float
) -> dict[str, float]:
    """LEAST_LOADED score of each peer (lower is better), sidelining not included."""
    views = {p.peer_id: stats.view(p.peer_id, now, model_key) for p in peers}
    ttfbs = [v.latency_ewma for v in views.values() if v.latency_ewma is not None]
    gaps = [v.gap_ewma for v in views.values() if v.gap_ewma is not None]
    fastest_ttfb = min(ttfbs) if ttfbs else None
    fastest_gap = min(gaps) if gaps else None
    return {
        p.peer_id: rounds(p, views[p.peer_id], model_key) * slowness(views[p.peer_id], fastest_ttfb, fastest_gap, now)
        for p in peers
    }


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
    prefer: tuple[str, ...] = (),
    only: Callable[[PeerView], bool] | None = None,
) -> list[str]:
    """Peer ids to try for ``model_key``, best first; empty if nobody alive serves it.

    ``exclude`` drops peers already tried. With every strategy, sidelined
    peers come after the others. ROUND_ROBIN rotates the peer-id-sorted list
    by ``rr_counter``; RANDOM shuffles; LOCAL_FIRST puts this node first when
    it serves the model and is not sidelined, then the LEAST_LOADED order.
    ``prefer``: holders to include in a sample (those whose load we just asked).
    ``only``: holders that qualify at all (a resume needs the same weights),
    applied before any sample.
    """
    serving = snapshot.serving(model_key)
    if only is not None:
        serving = tuple(p for p in serving if only(p))
    large = len(serving) > ROUTE_SAMPLE
    if large and strategy is Strategy.ROUND_ROBIN:  # a window of the id-sorted holders, rotated
        start = rr_counter % len(serving)
        window = [serving[(start + i) % len(serving)] for i in range(ROUTE_SAMPLE)]
        peers = [p for p in window if p.load.capacity > 0 and p.peer_id not in exclude]
        if not peers:  # every peer of the window was tried: the rest, in order
            peers = [p for p in serving if p.load.capacity > 0 and p.peer_id not in exclude][:ROUTE_SAMPLE]
        side = {p.peer_id: stats.view(p.peer_id, now).sidelined for p in peers}
        return [p.peer_id for p in peers if not side[p.peer_id]] + [p.peer_id for p in peers if side[p.peer_id]]
    pool = [serving[i] for i in sorted(rng.sample(range(len(serving)), ROUTE_SAMPLE))] if large else serving
    if large and prefer:
        by_id = snapshot.serving_index.by_id()
        pool += [v for pid in prefer if (v := by_id.get(pid)) is not None and v not in pool and v.serves(model_key)
                 and v.state is PeerState.ALIVE]
    if large and strategy is Strategy.LOCAL_FIRST:
        me = snapshot.serving_index.me()
        if me is not None and me.serves(model_key) and me not in pool and me.state is PeerState.ALIVE:
            pool.append(me)
    peers = [p for p in pool if p.load.capacity > 0 and p.peer_id not in exclude]
    if not peers:
        if large and len(exclude) < len(serving):  # every sampled holder was tried: look at the rest
            peers = [p for p in serving if p.load.capacity > 0 and p.peer_id not in exclude][:ROUTE_SAMPLE]
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


FREE_SAMPLE = 256  # holders has_free_slot looks at, at most (it stops at the first free one)


def has_free_slot(snapshot: Snapshot, model_key: str, stats: RouteStats, now: float,
                  rng: random.Random | None = None, stale_after: float | None = None,
                  all_quiet: bool = False) -> bool:
    """Some alive holder of ``model_key`` has a slot free by this gateway's
    estimate (:func:`load_score` below 1: busy slots, queued included, under
    capacity). False also when nobody holds it: the caller answers that.
    Among more than :data:`FREE_SAMPLE` holders, a random sample is looked at.
    ``stale_after``: a holder that does not announce load changes (``quiet_load``,
    or any holder when ``all_quiet``: our own table is large, and older nodes go
    quiet without saying so) whose load we last learnt longer ago than this counts
    only what we sent it, so a line never waits for ever on figures that will not change."""
    serving = snapshot.serving(model_key)
    if len(serving) > FREE_SAMPLE:
        pick = (rng or random).sample(range(len(serving)), FREE_SAMPLE)
        serving = tuple(serving[i] for i in pick)

    def free(p: PeerView) -> bool:
        view = stats.view(p.peer_id, now, model_key)
        if (stale_after is not None and (p.quiet_load or all_quiet) and view.load is None
                and now - p.last_seen > stale_after):
            view = replace(view, load=LoadInfo(in_flight=0, capacity=p.load.capacity))
        return load_score(p, view) < 1.0

    return any(free(p) for p in serving if p.load.capacity > 0)

"""When a node speaks: the announcement cadence (pure, sans-IO).

Every node used to publish its whole state every 2 s. Each heartbeat costs
every other node about 10 ms of CPU in py-libp2p (Yamux, Noise, protobuf,
the signature, the signed peer record pubsub attaches, forwarding to its
gossip neighbours: ``docs/benchmarks.md``), so an idle node's cost grew with
the mesh and the mesh's with N squared. Now a node says something only when
it has something to say:

* **catalog** (models, addresses, draining, store, copy targets, ...): at
  once when it changes (at most one announcement per ``min_gap``);
* **load**: when it changes *meaningfully* (:func:`meaningful`: a free slot
  appears or goes, a queue starts or empties, or the busy count moves by a
  quarter of the slots), at most once per ``load_gap``; a smaller change is
  said within ``load_silence`` of when it happened;
* **refresh**: after ``refresh`` seconds of silence, whatever happened, so
  a peer that missed a message (or joined through a partition) catches up,
  and peers that hear nothing for ``miss_limit`` refreshes expire us
  (the announcement carries ``refresh`` so they know how long to wait).
  Every node hears every refresh, so the mesh's refreshes reach each node at
  ``N / refresh`` per second: :func:`refresh_for` lengthens the refresh with
  the mesh (``p2p.refresh_per_peer`` seconds per peer), which keeps that rate,
  and an idle node's cost, flat in N. A longer refresh is used only after an
  announcement has said so (peers expire us by the interval we last
  announced), and each announcement lengthens it by at most :data:`GROWTH`.

An idle node sends one small message per ``refresh``; a busy one at most one
per ``load_gap``, the old cadence. In a large mesh (``announce_load`` off,
past ``p2p.full_view_up_to`` peers) load changes are not announced at all:
every node would hear every busy node's changes; gateways ask a few holders
for their load when they route instead (``mesh.load_client``). Gateways keep routing right in between:
they correct the last announced load with the requests they sent and saw
finish since (``routing``), and a peer that dies closes its connections or
fails the liveness pings of those with requests on it.

:class:`Cadence` is frozen settings, :class:`AnnouncePolicy` the state (what
was last said, when); :meth:`AnnouncePolicy.decide` is a function of them,
``now`` and what the node would say now, so it is tested with scripted
inputs and driven unchanged by the mesh simulation (``benchmarks/sim_mesh.py``).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Any

from ..catalog import LoadInfo

GROWTH = 1.5  # the most one announcement may lengthen the refresh it says, see AnnouncePolicy.refresh_to_say
MIN_GAP = 0.25  # a burst of catalog changes (a pull finishing, draining) costs one message per this


class Reason(enum.Enum):
    FIRST = "first"  # nothing said yet
    FORCED = "forced"  # asked for (addresses changed, a new gossip neighbour, draining)
    CATALOG = "catalog"  # models, store, copy targets, ... changed
    LOAD = "load"  # the load moved meaningfully
    LOAD_SILENCE = "load_silence"  # a small load change, said late
    REFRESH = "refresh"  # nothing to say for ``refresh`` seconds


@dataclass(frozen=True)
class Cadence:
    refresh: float = 30.0  # longest silence; peers expire us after miss_limit of them
    load_gap: float = 2.0  # shortest gap between announcements for load (p2p.heartbeat_interval)
    load_silence: float = 10.0  # a load change too small to be meaningful is said this late at most
    min_gap: float = MIN_GAP  # shortest gap between any two announcements
    announce_load: bool = True  # False in a large mesh: load is asked for (mesh.load_client), not announced
    jitter: float = 0.0  # each refresh comes up to this fraction early: nodes started together drift apart

    def __post_init__(self) -> None:
        if not (0 < self.min_gap <= self.load_gap <= self.refresh and self.load_silence > 0):
            raise ValueError(f"inconsistent cadence: {self}")


def _busy(load: LoadInfo) -> int:
    return load.in_flight + load.queued


def meaningful(old: LoadInfo, new: LoadInfo) -> bool:
    """Would routing elsewhere decide differently? True when the slot count
    changes, a free slot appears or goes, a queue (ours or our gateway's
    ``waiting`` line) starts or empties, or the busy count moves by at least
    a quarter of the slots (every change, up to 4 slots)."""
    if new.capacity != old.capacity:
        return True
    if (old.in_flight < old.capacity) != (new.in_flight < new.capacity):
        return True
    if (old.queued > 0) != (new.queued > 0) or (old.waiting > 0) != (new.waiting > 0):
        return True
    step = max(1, -(-new.capacity // 4))
    return abs(_busy(new) - _busy(old)) >= step or abs(new.waiting - old.waiting) >= step


def refresh_for(peers: int, *, floor: float, per_peer: float, ceiling: float) -> float:
    """The refresh interval for a mesh of ``peers`` others: ``floor`` in a small mesh,
    ``per_peer`` seconds per peer in a larger one (each node then hears about
    ``1 / per_peer`` refreshes a second, whatever the size), at most ``ceiling``."""
    return max(floor, min(ceiling, peers * per_peer))


class AnnouncePolicy:
    """What was last announced and when; decides whether to announce now."""

    def __init__(self, cadence: Cadence, rng: random.Random | None = None) -> None:
        self.cadence = cadence
        self.rng = rng or random.Random()
        self.early = 1.0  # this refresh's share of the interval (jitter: drawn at each announcement)
        self.last_at: float | None = None
        self.catalog: Any = None  # any value compared with ==; the caller's notion of its catalog
        self.load: LoadInfo | None = None
        self.load_moved_at: float | None = None  # when the load first differed from what we said
        self.refresh_said: float | None = None  # the refresh interval our last announcement carried
        self.load_news = False  # the load moved meaningfully since we said it (as of the last decide)
        self.sent_by_reason: dict[Reason, int] = {}

    def decide(self, now: float, catalog: Any, load: LoadInfo, *, forced: bool = False) -> Reason | None:
        """Why to announce now, or None to stay quiet (ask again later)."""
        c = self.cadence
        if self.last_at is None:
            return Reason.FIRST
        gap = now - self.last_at
        if load != self.load:
            if self.load_moved_at is None:
                self.load_moved_at = now
            self.load_news = self.load is not None and meaningful(self.load, load)
        else:
            self.load_moved_at = None
            self.load_news = False
        if gap < c.min_gap:
            return None
        if forced:
            return Reason.FORCED
        if catalog != self.catalog:
            return Reason.CATALOG
        if c.announce_load and self.load_moved_at is not None and gap >= c.load_gap:
            if self.load_news:
                return Reason.LOAD
            if now - self.load_moved_at >= c.load_silence:
                return Reason.LOAD_SILENCE
        if gap >= self._refresh():
            return Reason.REFRESH
        return None

    def refresh_to_say(self) -> float:
        """The refresh interval our next announcement carries: the cadence's, but at most
        :data:`GROWTH` times the last one said. A peer that misses the announcement
        that lengthens it still expires us after ``miss_limit`` of the *old* interval
        since the one before; growing by at most 1.5x keeps our next announcement
        inside that (with miss_limit 3: 1.5 R + R < 3 R), so one lost message never
        expires a live node."""
        said = self.refresh_said
        return self.cadence.refresh if said is None else min(self.cadence.refresh, said * GROWTH)

    def sent(self, now: float, catalog: Any, load: LoadInfo, reason: Reason, *, refresh: float | None = None) -> None:
        """The announcement built from ``catalog`` and ``load`` went out at ``now``, saying
        ``refresh`` (what :meth:`refresh_to_say` gave when it was built)."""
        self.last_at = now
        self.catalog = catalog
        self.load = load
        self.load_moved_at = None
        self.load_news = False
        self.refresh_said = self.refresh_to_say() if refresh is None else refresh
        self.early = 1.0 - self.rng.random() * self.cadence.jitter
        self.sent_by_reason[reason] = self.sent_by_reason.get(reason, 0) + 1

    def quiet_for(self, now: float) -> float:
        """Seconds until :meth:`decide` could answer REFRESH (the longest a caller may sleep
        without a wake-up; load changes need polling, catalog changes a wake-up)."""
        if self.last_at is None:
            return 0.0
        return max(0.0, self.last_at + self._refresh() - now)

    def next_check(self, now: float) -> float:
        """Seconds until :meth:`decide` could answer differently with nothing else new:
        the refresh, and while the load differs from what we said, the load gap and
        the load silence."""
        if self.last_at is None:
            return 0.0
        due = now + self.quiet_for(now)
        if self.load_moved_at is not None and self.cadence.announce_load:
            due = min(due, self.load_moved_at + self.cadence.load_silence)
            if self.load_news:
                due = min(due, self.last_at + self.cadence.load_gap)
        return max(0.0, due - now)

    def _refresh(self) -> float:
        """Peers expire us by the interval we last announced: a longer one waits until said."""
        said = self.refresh_said
        return (self.cadence.refresh if said is None else min(said, self.cadence.refresh)) * self.early

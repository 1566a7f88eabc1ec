"""Who is in the mesh, what they serve and how busy they are (pure state).

All peer state lives here and changes only through :meth:`PeerTable.apply`,
:meth:`~PeerTable.expire`, :meth:`~PeerTable.mark_down` and friends, each
taking ``now`` as an argument. The mesh service feeds it decoded heartbeats
and connection events; the gateway and router only ever see an immutable
:class:`Snapshot`, so a request is routed against one consistent view even
while heartbeats keep arriving.

Rules:

* a heartbeat is accepted only if its ``seq`` is greater than the last one
  accepted from that peer (duplicates and reordered gossip are ``STALE``);
* a peer not heard from for more than ``miss_limit`` of its announced
  refresh intervals (``Announcement.refresh_ms``, clamped to at least our
  configured ``interval`` and at most ``announce.MAX_REFRESH_MS``; a peer that
  announces none is an older node beating every ``interval``) is removed by
  :meth:`expire`, whether ALIVE or DOWN;
* a ``leaving`` heartbeat removes the peer at once; its ``seq`` is remembered
  for the same expiry period so a late, older heartbeat cannot resurrect it;
* a peer whose heartbeat says it is ``draining`` (finishing its requests
  before a restart) is DRAINING instead of ALIVE while it is up: alive for
  liveness and listings, never routed to (:meth:`Snapshot.serving`); a lost
  connection makes it DOWN like any peer, and it comes back DRAINING;
* our own node is set with :meth:`set_self`, is always ALIVE (or DRAINING)
  and never expires; our own heartbeats echoed back by gossip are ignored (``SELF``);
* at most ``max_peers`` remote peers are kept: a new one beyond that is
  refused (``FULL``) while known peers keep updating, so a flood of signed
  heartbeats from freshly made peer ids cannot grow the table (and the pass
  routing makes over it after each change) without bound. The goodbyes
  remembered for unknown peers are bounded the same way.

A route decision must cost the same at 10,000 peers as at 10, so it never
walks the table: :meth:`Snapshot.serving` looks the model up in an index
(model key -> routable holders) built on second use, once per table change.
:meth:`PeerTable.snapshot` hands out the same sorted peers tuple, and the same
index, until the table changes; any change drops both.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from types import MappingProxyType

from .. import names
from ..catalog import LoadInfo, ModelInfo, ReplicaTarget, StoreInfo
from .announce import MAX_REFRESH_MS, Announcement

MAX_REFRESH = MAX_REFRESH_MS / 1000  # seconds; decode clamps too, the table never trusts more


class PeerState(enum.Enum):
    ALIVE = "alive"
    DRAINING = "draining"  # up, but finishing its requests before a restart: not routed to
    DOWN = "down"  # connection closed or liveness failed; kept for status, not routed to
    UNREACHABLE = "unreachable"  # heard of (gossip) but no path to it worked: not routed to


@dataclass(frozen=True)
class PeerView:
    """One peer as last announced, plus our view of its liveness."""

    peer_id: str
    addrs: tuple[str, ...]
    api_url: str
    version: str
    models: tuple[ModelInfo, ...]
    load: LoadInfo
    seq: int
    last_seen: float  # time of last accepted announcement
    state: PeerState
    is_self: bool
    relay: bool = False  # offers Circuit Relay v2 service
    draining: bool = False  # its last heartbeat said so; while up its state is DRAINING
    store: StoreInfo | None = None  # where it keeps models (model distribution)
    replicas: tuple[ReplicaTarget, ...] = ()  # copy-count targets it relays
    refresh: float = 0.0  # seconds between its announcements at the longest; 0: an older node (our interval)
    more: bool = False  # it holds models its announcement leaves out (found through the DHT)
    quiet_load: bool = False  # it does not announce load changes: ask it (mesh.load_client)

    # cached_property writes the instance __dict__ directly, so it works on a
    # frozen dataclass without becoming a field (eq, repr, replace unaffected).
    @cached_property
    def by_key(self) -> Mapping[str, ModelInfo]:
        """``names.key(model.name) -> model`` (first wins), so routing never re-parses names."""
        index: dict[str, ModelInfo] = {}
        for m in self.models:
            index.setdefault(names.key(m.name), m)
        return MappingProxyType(index)

    def model(self, model_key: str) -> ModelInfo | None:
        """The announced model whose ``names.key`` is ``model_key``, if any."""
        return self.by_key.get(model_key)

    def serves(self, model_key: str) -> bool:
        return model_key in self.by_key


class ServingIndex:
    """``model key -> ALIVE peers announcing it`` over one peers tuple.

    Snapshots of one table version share one, so routing pays a pass over the
    table once per table change, not once per request. The first lookup is a
    plain scan and the second builds the index (one pass, about 1.4 scans):
    a snapshot looked at once, like those the mesh service filters per call
    in a closed mesh, costs what it did before the index existed.
    """

    __slots__ = ("peers", "_by_key", "_scanned", "_by_id", "_me")

    def __init__(self, peers: tuple[PeerView, ...]) -> None:
        self.peers = peers
        self._by_key: dict[str, tuple[PeerView, ...]] | None = None
        self._scanned = False
        self._by_id: Mapping[str, PeerView] | None = None
        self._me: tuple[PeerView | None] | None = None

    def me(self) -> PeerView | None:
        """This node's own entry, found once for these peers."""
        if self._me is None:
            self._me = (next((p for p in self.peers if p.is_self), None),)
        return self._me[0]

    def by_id(self) -> Mapping[str, PeerView]:
        """``peer id -> view``, built once for these peers (the gateway asks per try)."""
        if self._by_id is None:
            self._by_id = MappingProxyType({p.peer_id: p for p in self.peers})
        return self._by_id

    @property
    def built(self) -> bool:
        return self._by_key is not None

    def serving(self, model_key: str) -> tuple[PeerView, ...]:
        by_key = self._by_key
        if by_key is None:
            if not self._scanned:
                self._scanned = True
                return tuple(p for p in self.peers if p.state is PeerState.ALIVE and p.serves(model_key))
            lists: dict[str, list[PeerView]] = {}
            for p in self.peers:  # sorted by peer_id, so each list is too
                if p.state is PeerState.ALIVE:
                    for k in p.by_key:
                        lists.setdefault(k, []).append(p)
            by_key = self._by_key = {k: tuple(v) for k, v in lists.items()}
        return by_key.get(model_key, ())


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of the table at ``taken_at``."""

    peers: tuple[PeerView, ...]  # sorted by peer_id
    taken_at: float
    # The table's index for these very peers (shared between its snapshots);
    # ignored unless it was built over this ``peers`` tuple, so a snapshot made
    # by hand or with ``dataclasses.replace(peers=...)`` builds its own.
    shared_index: ServingIndex | None = field(default=None, compare=False, repr=False)

    @cached_property
    def _index(self) -> Mapping[str, PeerView]:
        return self.serving_index.by_id()  # shared by the snapshots of one table version

    @cached_property
    def serving_index(self) -> ServingIndex:
        shared = self.shared_index
        return shared if shared is not None and shared.peers is self.peers else ServingIndex(self.peers)

    @property
    def self_seq(self) -> int:
        """The seq of our own latest announcement (0 before the first)."""
        return self._self.seq if self._self is not None else 0

    def get(self, peer_id: str) -> PeerView | None:
        return self._index.get(peer_id)

    def alive(self) -> tuple[PeerView, ...]:
        """Peers that are up: ALIVE, and DRAINING ones (still in the mesh, not routed to)."""
        return tuple(p for p in self.peers if p.state in UP)

    def serving(self, model_key: str) -> tuple[PeerView, ...]:
        """Peers to route to for ``model_key``: ALIVE (not draining, down or
        unreachable) and announcing a model with ``names.key(name) == model_key``,
        sorted by peer id. An index lookup: O(holders), whatever the table size."""
        return self.serving_index.serving(model_key)


LEFT_MEMORY = 120.0  # seconds a goodbye's seq is remembered at least
UP = frozenset({PeerState.ALIVE, PeerState.DRAINING})  # states of a peer that answers


class ApplyResult(enum.Enum):
    NEW = "new"  # first heartbeat from this peer
    UPDATED = "updated"  # newer heartbeat from a known peer
    STALE = "stale"  # seq not newer than what we have: ignored
    LEFT = "left"  # the peer said goodbye and was removed
    SELF = "self"  # our own heartbeat came back: ignored
    FULL = "full"  # a new peer while the table holds max_peers: ignored


def _view(ann: Announcement, now: float, *, is_self: bool) -> PeerView:
    return PeerView(
        peer_id=ann.peer_id,
        addrs=ann.addrs,
        api_url=ann.api_url,
        version=ann.version,
        models=ann.models,
        load=ann.load,
        seq=ann.seq,
        last_seen=now,
        state=_up(ann.draining),
        is_self=is_self,
        relay=ann.relay,
        draining=ann.draining,
        store=ann.store,
        replicas=ann.replicas,
        refresh=ann.refresh_ms / 1000,
        more=ann.more,
        quiet_load=ann.quiet_load,
    )


def _up(draining: bool) -> PeerState:
    """The state of a peer that answers."""
    return PeerState.DRAINING if draining else PeerState.ALIVE


class PeerTable:
    """The mesh's membership, keyed by peer id. Not thread-safe; one trio task owns it."""

    def __init__(self, self_id: str, *, interval: float, miss_limit: int = 3, max_peers: int = 4096) -> None:
        if miss_limit < 1:
            raise ValueError("miss_limit must be >= 1")
        if max_peers < 1:
            raise ValueError("max_peers must be >= 1")
        self.self_id = self_id
        self.miss_limit = miss_limit
        self.max_peers = max_peers
        self.interval = 0.0
        self.set_interval(interval)
        self._peers: dict[str, PeerView] = {}
        self._self: PeerView | None = None
        # peer_id -> (last seq, forget at): peers that left or expired, so a replay of their
        # last announcement (gossip, or a table sync from a peer that missed it) is STALE.
        self._left: dict[str, tuple[int, float]] = {}
        self._version = 0  # bumped by every change to the peers (see version)
        self._cached: tuple[tuple[PeerView, ...], ServingIndex] | None = None  # for self._version
        self._legacy: tuple[int, int] | None = None  # (version, legacy_peers)

    @property
    def version(self) -> int:
        """Counts changes to the peers; snapshots of one version share their peers and index."""
        return self._version

    def _changed(self) -> None:
        self._version += 1
        self._cached = None

    @property
    def ttl(self) -> float:
        """Seconds without an accepted heartbeat after which a peer is removed."""
        return self.interval * self.miss_limit

    def set_interval(self, interval: float) -> None:
        if not interval > 0:
            raise ValueError("interval must be > 0")
        self.interval = float(interval)

    def apply(self, ann: Announcement, now: float) -> ApplyResult:
        """Take in one decoded heartbeat from the network."""
        if ann.peer_id == self.self_id:
            return ApplyResult.SELF
        old = self._peers.get(ann.peer_id)
        known_seq = old.seq if old is not None else None
        if known_seq is None and ann.peer_id in self._left:
            known_seq = self._left[ann.peer_id][0]
        if known_seq is not None and ann.seq <= known_seq:
            return ApplyResult.STALE
        if ann.leaving:
            if old is None and ann.peer_id not in self._left and len(self._left) >= self.max_peers:
                return ApplyResult.FULL  # a stranger's goodbye we have no room to remember
            if self._peers.pop(ann.peer_id, None) is not None:
                self._changed()
            self._left[ann.peer_id] = (ann.seq, now + max(self.ttl, LEFT_MEMORY))
            return ApplyResult.LEFT
        if old is None and len(self._peers) >= self.max_peers:
            return ApplyResult.FULL
        self._left.pop(ann.peer_id, None)
        view = _view(ann, now, is_self=False)
        if old is not None and old.state is PeerState.UNREACHABLE:
            # Gossip reaches us through others; only a connection proves a path.
            view = replace(view, state=PeerState.UNREACHABLE)
        self._peers[ann.peer_id] = view
        self._changed()
        return ApplyResult.NEW if old is None else ApplyResult.UPDATED

    def set_self(self, ann: Announcement, now: float) -> None:
        """Our own entry, from what we announce; always ALIVE (or DRAINING), never expires."""
        if ann.peer_id != self.self_id:
            raise ValueError("set_self: announcement is not ours")
        self._self = _view(ann, now, is_self=True)
        self._changed()

    @property
    def self_seq(self) -> int:
        """The seq of our own latest announcement (0 before the first)."""
        return self._self.seq if self._self is not None else 0

    def get(self, peer_id: str) -> PeerView | None:
        """A remote peer's entry (O(1), no snapshot)."""
        return self._peers.get(peer_id)

    def mark_down(self, peer_id: str, now: float) -> bool:
        """Connection closed or liveness failed. True if the peer was not DOWN already."""
        p = self._peers.get(peer_id)
        if p is None or p.state is PeerState.DOWN:
            return False
        self._peers[peer_id] = replace(p, state=PeerState.DOWN)
        self._changed()
        return True

    def mark_unreachable(self, peer_id: str, now: float) -> bool:
        """Every path to the peer failed. True if it was routable (ALIVE) before."""
        p = self._peers.get(peer_id)
        if p is None or p.state is PeerState.UNREACHABLE:
            return False
        self._peers[peer_id] = replace(p, state=PeerState.UNREACHABLE)
        self._changed()
        return p.state is PeerState.ALIVE

    def mark_up(self, peer_id: str, now: float) -> bool:
        """Connection back. Keeps models and ``last_seen``: it still needs a fresh
        heartbeat before ``expire`` removes it; a draining peer comes back DRAINING.
        True if the peer was DOWN or UNREACHABLE."""
        p = self._peers.get(peer_id)
        if p is None or p.state in UP:
            return False
        self._peers[peer_id] = replace(p, state=_up(p.draining))
        self._changed()
        return True

    def ttl_of(self, peer: PeerView) -> float:
        """Seconds without an accepted announcement after which ``peer`` is removed:
        ``miss_limit`` of its refresh intervals, never fewer than of ours."""
        return max(self.interval, min(peer.refresh, MAX_REFRESH)) * self.miss_limit

    @property
    def legacy_peers(self) -> int:
        """Remote peers that announce no refresh interval (older nodes, which expire
        a peer after ``miss_limit`` of *their* heartbeat intervals): while there is one,
        we keep their cadence (``mesh.loops``)."""
        cached = self._legacy
        if cached is None or cached[0] != self._version:
            cached = self._legacy = (self._version, sum(1 for p in self._peers.values() if not p.refresh))
        return cached[1]

    def expire(self, now: float) -> list[str]:
        """Remove peers silent for longer than their :meth:`ttl_of`; return their ids, sorted.
        Their last seq is remembered as a goodbye's is (for ``max(ttl_of, LEFT_MEMORY)``):
        a table synced from a peer that still holds one must not bring it back."""
        gone = sorted(pid for pid, p in self._peers.items() if now - p.last_seen > self.ttl_of(p))
        for pid in gone:
            view = self._peers.pop(pid)
            if pid in self._left or len(self._left) < self.max_peers:
                self._left[pid] = (view.seq, now + max(self.ttl_of(view), LEFT_MEMORY))
        if gone:
            self._changed()
        for pid in [pid for pid, (_, until) in self._left.items() if now > until]:
            del self._left[pid]
        return gone

    def snapshot(self, now: float) -> Snapshot:
        """The table at ``now``. Until the table changes, every snapshot shares one
        sorted peers tuple and one :class:`ServingIndex`: taking one is O(1)."""
        cached = self._cached
        if cached is None:
            peers = list(self._peers.values())
            if self._self is not None:
                peers.append(self._self)
            peers.sort(key=lambda p: p.peer_id)
            frozen = tuple(peers)
            cached = self._cached = (frozen, ServingIndex(frozen))
        return Snapshot(peers=cached[0], taken_at=now, shared_index=cached[1])

    def __len__(self) -> int:
        """Remote peers in the table (whatever their state), not counting ourselves."""
        return len(self._peers)

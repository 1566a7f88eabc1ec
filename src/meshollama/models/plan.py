"""Which piece of a blob to fetch next, from which peer: a sans-IO state machine.

A blob is cut into :data:`~.wire.PIECE_SIZE` pieces. Holders each claim a
list of piece hashes (``pieces`` on the blob protocol); the plan checks every
piece it receives against one *chosen* list before the bytes are written, so a
bad byte from one peer fails that piece only: the piece goes back to be
fetched elsewhere and the peer is dropped from this blob. The chosen list is
the one most holders agree on; the blob's own sha256 (checked over the whole
file at the end) decides whether that choice was right. When it was not (a
holder whose disk is corrupt claims hashes of its corrupt bytes, and it was
the only one asked), :meth:`BlobPlan.reject_hashes` drops the peers that
claimed it, switches to the next list and marks the pieces the two lists
disagree on as missing again.

No I/O and no clock of its own (``now`` is passed in): the pull drives it
(:mod:`.pull`), and ``tests/models/test_plan.py`` drives it with scripted
events. Each peer has at most ``depth`` requests in flight; when nothing is
left to assign, an idle peer duplicates the piece in flight longest
(end game), so one frozen holder cannot hold back the end of a pull.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .wire import PIECE_SIZE

MAX_FAILURES = 3  # failed requests in a row before a peer is dropped from a blob
BUSY_BACKOFF = 1.0  # seconds a peer that answered "busy" is given no work


@dataclass(frozen=True)
class Request:
    index: int
    offset: int
    length: int


@dataclass
class _Peer:
    hashes: tuple[bytes, ...] | None = None  # the list it claimed; None: it was not asked
    in_flight: set[int] = field(default_factory=set)
    failures: int = 0
    dropped: str = ""  # why, once dropped
    paused_until: float = 0.0
    received: int = 0  # bytes of verified pieces it gave us


class BlobPlan:
    def __init__(self, digest: str, size: int, *, piece_size: int = PIECE_SIZE, depth: int = 2,
                 done: set[int] | frozenset[int] = frozenset()) -> None:
        self.digest = digest
        self.size = size
        self.piece_size = piece_size
        self.depth = depth
        self.count = -(-size // piece_size) if size else 0
        self.done: set[int] = {i for i in done if 0 <= i < self.count}
        self.peers: dict[str, _Peer] = {}
        self._started: dict[int, float] = {}  # piece -> when first assigned (end game picks the oldest)
        self._holders: dict[int, set[str]] = {}  # piece -> peers fetching it now
        self._lists: list[tuple[bytes, ...]] = []  # candidate hash lists, most claimed first
        self._rejected: list[tuple[bytes, ...]] = []
        if self.count == 1:  # one piece: its hash is the blob's digest; nobody needs to be asked
            self._lists = [(bytes.fromhex(digest.removeprefix("sha256:")),)]

    # --- peers and their claims ---------------------------------------------------------------

    def add_peer(self, peer: str, hashes: list[bytes] | tuple[bytes, ...] | None = None) -> None:
        """A holder to fetch from, with the piece hashes it claimed (None: not asked).
        A claim of the wrong length drops the peer at once."""
        state = self.peers.setdefault(peer, _Peer())
        if hashes is None or self.count <= 1:
            return
        claimed = tuple(hashes)
        if len(claimed) != self.count or any(len(h) != 32 for h in claimed):
            self.drop(peer, "claimed a piece list of the wrong shape")
            return
        state.hashes = claimed
        if claimed in self._rejected:
            self.drop(peer, "claimed piece hashes that failed the blob's digest")
            return
        self._rank()

    def _rank(self) -> None:
        # Every claim counts, a dropped peer's too (a holder that left or sent one
        # bad piece may still have claimed the truth); rejected lists never do.
        if self.count <= 1:
            return
        votes = Counter(p.hashes for p in self.peers.values() if p.hashes is not None)
        for wrong in self._rejected:
            votes.pop(wrong, None)
        self._lists = [h for h, _ in sorted(votes.items(), key=lambda kv: -kv[1])]

    @property
    def hashes(self) -> tuple[bytes, ...] | None:
        """The piece list pieces are checked against now, or None when no holder gave one."""
        return self._lists[0] if self._lists else None

    def drop(self, peer: str, why: str) -> None:
        state = self.peers.setdefault(peer, _Peer())
        if not state.dropped:
            state.dropped = why
        for index in list(state.in_flight):
            self._release(peer, index)

    def usable(self) -> list[str]:
        return [p for p, s in self.peers.items() if not s.dropped]

    # --- assigning work --------------------------------------------------------------------

    def piece(self, index: int) -> Request:
        offset = index * self.piece_size
        return Request(index, offset, min(self.piece_size, self.size - offset))

    def _eligible(self, peer: _Peer, index: int) -> bool:
        # A peer that claimed another hash for this piece would only fail it.
        chosen = self.hashes
        return peer.hashes is None or chosen is None or peer.hashes[index] == chosen[index]

    def next_request(self, peer: str, now: float) -> Request | None:
        """The next piece for ``peer`` to fetch, or None (nothing for it now)."""
        state = self.peers.get(peer)
        if state is None or state.dropped or len(state.in_flight) >= self.depth or now < state.paused_until:
            return None
        if self.hashes is None:
            return None  # no list to check pieces against yet
        for index in range(self.count):
            if index not in self.done and index not in self._holders and self._eligible(state, index):
                return self._assign(peer, index, now)
        # End game: duplicate the piece in flight longest that this peer is not already on.
        waiting = [i for i in self._holders if i not in state.in_flight and len(self._holders[i]) < 2
                   and self._eligible(state, i)]
        if waiting:
            return self._assign(peer, min(waiting, key=lambda i: self._started[i]), now)
        return None

    def _assign(self, peer: str, index: int, now: float) -> Request:
        self.peers[peer].in_flight.add(index)
        self._holders.setdefault(index, set()).add(peer)
        self._started.setdefault(index, now)
        return self.piece(index)

    def _release(self, peer: str, index: int) -> None:
        self.peers[peer].in_flight.discard(index)
        holders = self._holders.get(index)
        if holders is not None:
            holders.discard(peer)
            if not holders:
                del self._holders[index]
                self._started.pop(index, None)

    # --- outcomes --------------------------------------------------------------------------

    def received(self, peer: str, index: int, piece_hash: bytes) -> bool:
        """A whole piece arrived from ``peer`` with this sha256. True: write it
        (it matches and is not done yet). False: drop the bytes; a mismatch has
        dropped the peer and put the piece back."""
        state = self.peers[peer]
        self._release(peer, index)
        chosen = self.hashes
        if chosen is None or piece_hash != chosen[index]:
            self.drop(peer, f"sent a piece whose hash does not match (piece {index})")
            return False
        state.failures = 0
        if index in self.done:
            return False  # the end game's other copy won
        self.done.add(index)
        state.received += self.piece(index).length
        for other in list(self._holders.get(index, ())):
            self._release(other, index)  # its copy, when it comes, is discarded
        return True

    def failed(self, peer: str, index: int, *, busy: bool, now: float, why: str = "") -> None:
        """A request ended without a piece (stream error, timeout, "busy")."""
        state = self.peers[peer]
        self._release(peer, index)
        if busy:
            state.paused_until = now + BUSY_BACKOFF
            return
        state.failures += 1
        if state.failures >= MAX_FAILURES:
            self.drop(peer, why or "failed repeatedly")

    def cancelled(self, peer: str, index: int) -> None:
        """A request we gave up ourselves (the pull is cancelled): no blame."""
        self._release(peer, index)

    def reject_hashes(self) -> bool:
        """The whole blob failed its digest: the chosen list was wrong. Drop the
        peers that claimed it and mark the pieces it disagrees with the next
        list on as missing. False when there is no other list to try."""
        wrong = self.hashes
        if wrong is None:
            return False
        self._rejected.append(wrong)
        for peer, state in self.peers.items():
            if state.hashes == wrong:
                self.drop(peer, "claimed piece hashes that failed the blob's digest")
        self._rank()
        chosen = self.hashes
        if chosen is None:
            self.done.clear()
            return False
        self.done -= {i for i in range(self.count) if chosen[i] != wrong[i]}
        return True

    # --- where it stands -------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return len(self.done) == self.count

    @property
    def completed_bytes(self) -> int:
        return sum(self.piece(i).length for i in self.done)

    def stuck(self) -> str | None:
        """Why the blob cannot be finished from the peers it has, or None."""
        if self.finished:
            return None
        if self.hashes is None:
            return "no holder could list the blob's pieces"
        if not self.usable():
            reasons = sorted({s.dropped for s in self.peers.values() if s.dropped})
            return "no holder left to fetch from" + (f" ({'; '.join(reasons)})" if reasons else "")
        return None

    def unservable(self) -> bool:
        """Some missing piece no usable peer may fetch (they all claim another hash for it)."""
        alive = [self.peers[p] for p in self.usable()]
        return any(i not in self.done and not any(self._eligible(p, i) for p in alive) for i in range(self.count))

    def live_alternative(self) -> bool:
        """A usable peer claims a list other than the chosen one."""
        chosen = self.hashes
        return any(self.peers[p].hashes not in (None, chosen) for p in self.usable())

    def in_flight(self) -> int:
        return len(self._holders)

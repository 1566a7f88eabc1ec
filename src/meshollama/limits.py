"""Non-blocking limits on what peers can make this node hold (pure).

Inbound work is shed, never queued without bound: when a peer (or all peers
together) is over a limit the caller answers "busy" at once, so the sender
can retry elsewhere instead of hanging.

* :class:`InboundLimiter` counts requests (slots), in total and per peer.
* :class:`ByteBudget` counts bytes held at once by everyone together, and a
  :class:`Reservation` is one holder's share of it (one inbound stream): it
  knows what it holds, so whatever ends the stream gives all of it back.
"""

from __future__ import annotations

from collections import Counter


class InboundLimiter:
    def __init__(self, total: int, per_peer: int) -> None:
        if total < 1 or per_peer < 1:
            raise ValueError("limits must be >= 1")
        self.total = total
        self.per_peer = per_peer
        self._by_peer: Counter[str] = Counter()
        self._count = 0
        self.closed = False  # the node drains: every new request is refused (busy), so peers go elsewhere

    def try_acquire(self, peer_id: str) -> bool:
        if self.closed or self._count >= self.total or self._by_peer[peer_id] >= self.per_peer:
            return False
        self._count += 1
        self._by_peer[peer_id] += 1
        return True

    def release(self, peer_id: str) -> None:
        if self._by_peer[peer_id] <= 0:
            raise RuntimeError(f"release without acquire for {peer_id}")
        self._by_peer[peer_id] -= 1
        if not self._by_peer[peer_id]:
            del self._by_peer[peer_id]
        self._count -= 1

    @property
    def in_use(self) -> int:
        return self._count

    def of(self, peer_id: str) -> int:
        return self._by_peer.get(peer_id, 0)


class ByteBudget:
    """At most ``total`` bytes reserved at once; ``peak`` is the most ever reserved.

    Reserving never waits: bytes that do not fit are refused, and the caller
    sheds the work that brought them (a slot limit alone bounds requests, not
    memory: 128 admitted requests of 32 MiB each would be 4 GiB)."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("total must be >= 1")
        self.total = total
        self.in_use = 0
        self.peak = 0

    def try_reserve(self, n: int) -> bool:
        if n < 0:
            raise ValueError("cannot reserve a negative size")
        if self.in_use + n > self.total:
            return False
        self.in_use += n
        self.peak = max(self.peak, self.in_use)
        return True

    def release(self, n: int) -> None:
        if not 0 <= n <= self.in_use:
            raise RuntimeError(f"release of {n} bytes with {self.in_use} reserved")
        self.in_use -= n

    def reservation(self) -> Reservation:
        return Reservation(self)


class Reservation:
    """One holder's bytes in a :class:`ByteBudget`; :meth:`close` returns all of them."""

    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        self.held = 0

    def try_reserve(self, n: int) -> bool:
        if not self._budget.try_reserve(n):
            return False
        self.held += n
        return True

    def release(self, n: int) -> None:
        """Give back ``n`` bytes (at most what is held: a miscount never frees others' bytes)."""
        n = min(n, self.held)
        self._budget.release(n)
        self.held -= n

    def close(self) -> None:
        self.release(self.held)

"""A non-blocking limiter for inbound work, in total and per peer (pure).

Inbound streams are shed, never queued without bound: when a peer (or all
peers together) is over its limit the caller answers "busy" at once, so the
sender can retry elsewhere instead of hanging.
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

    def try_acquire(self, peer_id: str) -> bool:
        if self._count >= self.total or self._by_peer[peer_id] >= self.per_peer:
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

"""Who should hold the copies of a model: rendezvous hashing over peer ids (pure).

Every node computes the same answer from the same heartbeats, so exactly the
missing number of copies is made without a leader: for a model with a target
of N copies and H holders, the N - H candidates ranked highest by
``sha256(model key, peer id)`` volunteer and pull it; everyone else waits.
A candidate is a node that is up, takes replicas (``models.accept_replicas``),
has every label the target asks for, and announces enough free room for the
model (its free bytes less its own ``models.min_free_bytes``). Ranking by a
hash of both names spreads models evenly and moves few of them when nodes
come and go (Thaler and Ravishankar's highest-random-weight hashing).

Holders count while they are up, and for ``grace`` seconds after they were
last seen holding the model (a reboot is not a departure), so a restart does
not make a new copy and the holder's return an extra one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..catalog import ReplicaTarget, StoreInfo


def weight(model_key: str, peer_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{model_key}\0{peer_id}".encode()).digest()[:8], "big")


@dataclass(frozen=True)
class Candidate:
    peer_id: str
    store: StoreInfo | None
    up: bool = True


def volunteers(model_key: str, target: ReplicaTarget, size: int, holders: Iterable[str],
               candidates: Iterable[Candidate]) -> list[str]:
    """The peers that should pull the model now, best first (empty: enough copies)."""
    held = set(holders)
    missing = target.copies - len(held)
    if missing <= 0:
        return []
    able = [c.peer_id for c in candidates
            if c.up and c.peer_id not in held and c.store is not None and c.store.accepts
            and c.store.free >= size and set(target.labels) <= set(c.store.labels)]
    able.sort(key=lambda pid: weight(model_key, pid), reverse=True)
    return able[:missing]


def merge(targets: Iterable[ReplicaTarget], key_of) -> dict[str, ReplicaTarget]:
    """Newest stamp per model (ties: the higher copy count, so every node picks the same)."""
    out: dict[str, ReplicaTarget] = {}
    for t in targets:
        k = key_of(t.model)
        old = out.get(k)
        if old is None or (t.stamp, t.copies) > (old.stamp, old.copies):
            out[k] = t
    return out


def holders_within(seen: Mapping[str, float], now: float, grace: float) -> set[str]:
    """Peers last seen holding a model within ``grace`` seconds of ``now``."""
    return {peer for peer, when in seen.items() if now - when <= grace}

"""What a node serves: its models and its load, as announced in heartbeats.

These are plain frozen values shared by the backends (which produce them),
the heartbeat codec (which puts them on the wire), the peer table and the
router (which read them) and the gateway (which lists them as ``/api/tags``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping


def _frozen(d: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(d or {}))


# Facts of a *loaded* model that a backend may put in ``ModelInfo.details``
# (Ollama's /api/ps reports them); they are not part of Ollama's ModelDetails,
# so /api/tags leaves them out and only /api/ps shows them.
RUNNING_FACTS = ("expires_at", "size_vram", "context_length")


@dataclass(frozen=True)
class ModelInfo:
    """One model a node serves.

    ``name`` is Ollama's canonical short form (``llama3:latest``,
    ``user/model:tag``), see :mod:`meshollama.names`. ``digest`` is 64 hex
    characters without ``sha256:``. ``details`` is Ollama's ``details``
    object (format, family, parameter_size, quantization_level, ...).
    ``capabilities`` mirrors ``/api/show`` (e.g. ``("completion",)`` or
    ``("embedding",)``) when known.
    """

    name: str
    digest: str = ""
    size: int = 0
    loaded: bool = False
    modified_at: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    capabilities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "details", _frozen(self.details))

    def __hash__(self) -> int:  # details is a mapping; hash by identity fields
        return hash((self.name, self.digest, self.size, self.loaded))


@dataclass(frozen=True)
class LoadInfo:
    """How busy a node is: requests being served, slots, requests waiting."""

    in_flight: int = 0
    capacity: int = 1
    queued: int = 0  # waiting in the node's backend for one of its slots (routing counts them as busy)
    # Waiting in the node's gateway line for a slot on any holder of their model:
    # not this node's load (routing ignores it), the mesh's unmet demand, shown in status.
    waiting: int = 0


@dataclass(frozen=True)
class StoreInfo:
    """Where a node keeps models, as it announces it (for placement): the store's
    kind (``ollama`` or ``embedded``), its free bytes, and whether it takes
    replicas other nodes ask the mesh for (``models.accept_replicas``)."""

    kind: str = ""
    free: int = 0
    accepts: bool = False
    labels: tuple[str, ...] = ()
    pulling: tuple[str, ...] = ()  # models it is pulling now (placement counts them as copies)


@dataclass(frozen=True)
class ReplicaTarget:
    """A copy count for one model, as set by ``meshollama replicate`` (or config):
    the newest ``stamp`` (ms since the epoch) wins everywhere; ``copies`` 0 clears it."""

    model: str
    copies: int
    stamp: int = 0
    labels: tuple[str, ...] = ()  # only nodes with every one of these labels hold copies


"""The mesh as a source of models: who holds what (heartbeats) and a blob stream to them."""

from __future__ import annotations

from .. import names
from ..mesh.peertable import PeerState
from .wire import PROTOCOL

_ORDER = {PeerState.ALIVE: 0, PeerState.DRAINING: 1}  # a draining node still serves blobs, last


class MeshSources:
    def __init__(self, mesh) -> None:
        self.mesh = mesh

    def holders(self, name: str) -> list[tuple[str, str]]:
        key = names.key(name)
        found = []
        for peer in self.mesh.snapshot().peers:
            model = peer.model(key)
            if model is None or peer.is_self or peer.state not in _ORDER:
                continue
            found.append((_ORDER[peer.state], peer.peer_id, model.digest))
        return [(pid, digest) for _, pid, digest in sorted(found)]

    async def open(self, peer_id: str):
        return await self.mesh.open_stream(peer_id, PROTOCOL)

    @staticmethod
    def label(peer_id: str) -> str:
        return f"peer {peer_id[:8]}…{peer_id[-6:]}"

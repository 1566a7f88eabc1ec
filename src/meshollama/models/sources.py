"""The mesh as a source of models: who holds what and a blob stream to them.

Holders are known from heartbeats first. Where heartbeats do not carry every
model (a node with more than ``announce.MAX_MODELS``, or a mesh where not
everyone hears everyone), the DHT has provider records: every serving node
provides a key per model name it holds (``mesh.providing.name_key``, said by
the mesh service) and per blob (:func:`blob_key`, the blob's sha256 as a
multihash, said by :class:`~.service.ModelService`).
"""

from __future__ import annotations

import trio

from .. import names
from ..mesh.providing import name_key
from ..mesh.peertable import PeerState
from .wire import PROTOCOL

DHT_WAIT = 2.0  # seconds a pull waits for provider records before deciding nobody has the model


def blob_key(digest: str) -> str:
    """``sha256:<hex>`` as a hex multihash (sha2-256 is code 0x12, 32 bytes long)."""
    return "1220" + digest.removeprefix("sha256:")


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

    async def dht_holders(self, name: str) -> list[tuple[str, str]]:
        """(peer id, "") of the peers the DHT says hold ``name`` (the digest they hold is unknown)."""
        with trio.move_on_after(DHT_WAIT):
            return [(pid, "") for pid in await self.mesh.find_providers(name_key(name))
                    if pid != self.mesh.self_id]
        return []

    async def providers(self, digest: str) -> list[str]:
        """Peers the DHT says hold this blob."""
        with trio.move_on_after(DHT_WAIT):
            return [pid for pid in await self.mesh.find_providers(blob_key(digest)) if pid != self.mesh.self_id]
        return []

    async def open(self, peer_id: str):
        return await self.mesh.open_stream(peer_id, PROTOCOL)

    @staticmethod
    def label(peer_id: str) -> str:
        return f"peer {peer_id[:8]}…{peer_id[-6:]}"

"""Process-wide workarounds for py-libp2p 0.8.1, each with a test in tests/p2p.

1. ``KadDHT(protocol_prefix=...)`` is ignored: every module of ``kad_dht``
   imports the constant ``PROTOCOL_ID = "/ipfs/kad/1.0.0"`` by value. We
   rebind it in each module so our DHT speaks ``/meshollama/kad/1.0.0`` and
   never mixes records with an IPFS node it happens to meet.
2. ``Pubsub.stream_handler`` catches libp2p's ``ParseError`` but not
   protobuf's ``DecodeError`` (nor anything else), so 8 junk bytes from any
   peer raise out of the handler and take the host down. :class:`SafePubsub`
   catches everything on that stream, resets it, and reports it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

import trio

log = logging.getLogger("meshollama.p2p")

DHT_PROTOCOL_ID = "/meshollama/kad/1.0.0"
_DHT_MODULES = (
    "libp2p.kad_dht.common",
    "libp2p.kad_dht.kad_dht",
    "libp2p.kad_dht.peer_routing",
    "libp2p.kad_dht.provider_store",
    "libp2p.kad_dht.value_store",
)


def patch_dht_protocol(protocol_id: str = DHT_PROTOCOL_ID) -> None:
    """Make py-libp2p's Kademlia DHT speak ``protocol_id`` (idempotent)."""
    from libp2p.custom_types import TProtocol

    for name in _DHT_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "PROTOCOL_ID"):
            module.PROTOCOL_ID = TProtocol(protocol_id)


def make_safe_pubsub_class(on_junk: Callable[[str, BaseException], None]):
    """A ``Pubsub`` subclass whose stream handler survives any bad input."""
    from libp2p.pubsub.pubsub import Pubsub

    class SafePubsub(Pubsub):
        async def stream_handler(self, stream) -> None:  # type: ignore[override]
            peer_id = stream.muxed_conn.peer_id
            try:
                await super().stream_handler(stream)
            except trio.Cancelled:
                raise
            except BaseException as exc:  # noqa: BLE001 - any junk must not kill the host
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                log.debug("dropping bad pubsub stream from %s: %r", peer_id, exc)
                on_junk(str(peer_id), exc)
                with trio.move_on_after(1.0) as scope:
                    scope.shield = True
                    try:
                        await stream.reset()
                    except Exception:
                        pass

    return SafePubsub

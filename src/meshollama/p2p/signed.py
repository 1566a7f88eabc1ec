"""Check a signed heartbeat handed on by a peer other than its author (mesh.sync).

Gossipsub delivers a heartbeat only after checking its author's signature.
A table sync hands us many authors' heartbeats through one peer, so each one
is checked here exactly as pubsub checks it (``libp2p.pubsub.validators``):
the whole signed message, on our topic, signed by the key its sender id
names. The peer handing it on can replay an old one (the peer table's
sequence numbers refuse what we already know better) but never forge one.
"""

from __future__ import annotations

from .host import TOPIC, Message

MAX_SIGNED = 64 * 1024 + 4096  # an announcement (announce.MAX_ANNOUNCEMENT_BYTES) plus id, key, seqno, signature


def verify(raw: bytes) -> Message | None:
    """The message ``raw`` carries if its signature holds and it is on our topic; else None."""
    if not raw or len(raw) > MAX_SIGNED:
        return None
    try:
        from libp2p.peer.id import ID
        from libp2p.pubsub.pb import rpc_pb2
        from libp2p.pubsub.validators import signature_validator

        msg = rpc_pb2.Message.FromString(raw)
        if list(msg.topicIDs) != [TOPIC] or not signature_validator(msg):
            return None
        return Message(ID(msg.from_id).to_base58(), bytes(msg.data), raw)
    except Exception:  # protobuf, key or id garbage: not a heartbeat
        return None

"""The node's libp2p key pair: create it, (de)serialise it, derive its peer ID.

Keys use libp2p's protobuf private-key encoding (the same bytes go-libp2p and
js-libp2p use). py-libp2p is imported inside each function, so importing this
module stays cheap; :mod:`meshollama.identity` keeps the key file on disk.
"""

from __future__ import annotations


def new_key_pair():
    """A fresh Ed25519 ``KeyPair``."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    return create_new_key_pair()


def private_key_bytes(key_pair) -> bytes:
    """The private key of ``key_pair`` in libp2p's protobuf encoding."""
    return key_pair.private_key.serialize()


def key_pair_from_bytes(data: bytes):
    """The ``KeyPair`` whose private key ``data`` encodes; raises libp2p's errors on bad bytes."""
    from libp2p.crypto.keys import KeyPair
    from libp2p.crypto.serialization import deserialize_private_key

    private = deserialize_private_key(data)
    return KeyPair(private, private.get_public_key())


def peer_id_of(key_pair) -> str:
    """The base58 peer ID (``12D3KooW...``) of ``key_pair``."""
    from libp2p.peer.id import ID

    return ID.from_pubkey(key_pair.public_key).to_base58()

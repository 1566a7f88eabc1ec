"""Provider records through real py-libp2p hosts: the library's edges and our workarounds
in ``P2PHost`` (``find_providers`` asks the network, ``forget_provider``, no unpaced republish)."""

from __future__ import annotations

import trio
from libp2p.kad_dht.kad_dht import _encode_key
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from meshollama.mesh.providing import name_key

from .helpers import running_hosts, settings

KEY = name_key("llama3")


async def _dht_ready(host) -> None:
    """The dialler puts the peer into its DHT table once connected (``dial``)."""
    while host.dht_size() == 0:
        await trio.sleep(0.05)


async def test_the_stock_lookup_answers_from_the_local_store_alone_and_ours_asks_the_network():
    """py-libp2p's ``find_providers`` returns its local records whenever it holds any (and it
    keeps every provider a lookup found, for 48 h): a holder that provided later was never
    found. Ours sets them aside for the lookup and returns both."""
    with trio.fail_after(30):
        async with running_hosts(settings(dht=True), settings(dht=True)) as (a, b):
            await a.provide(KEY)  # before they meet: the record is in a's own store only
            await b.connect(a.addrs())
            await _dht_ready(b)
            stale = ID.from_base58("12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp")
            b._dht.provider_store.add_provider(_encode_key(KEY), PeerInfo(stale, [Multiaddr("/ip4/198.18.0.9/tcp/4001")]))
            assert [i.peer_id for i in b._dht.provider_store.get_providers(_encode_key(KEY))] == [stale]
            stock = [i.peer_id.to_base58() for i in await b._dht.find_providers(KEY)]
            assert stock == [stale.to_base58()]  # the edge: a, which provides it, is not found
            got = await b.find_providers(KEY)
            assert set(got) == {a.peer_id, stale.to_base58()}
            b.forget_provider(KEY, stale.to_base58())  # it said no: our store drops it
            assert await b.find_providers(KEY) == [a.peer_id]


async def test_a_provided_key_is_marked_republished_so_the_dht_does_not_say_it_again_unpaced():
    with trio.fail_after(30):
        async with running_hosts(settings(dht=True), settings(dht=True)) as (a, b):
            await b.connect(a.addrs())
            await _dht_ready(b)
            store = b._dht.provider_store
            assert await b.provide(KEY)
            # py-libp2p's 600 s republish loop re-provides keys whose mark is 22 h old (0: never).
            assert store._last_republish.get(_encode_key(KEY), 0) > 0


async def test_a_key_we_no_longer_hold_is_forgotten_by_the_dht():
    with trio.fail_after(30):
        async with running_hosts(settings(dht=True), settings(dht=True)) as (a, b):
            await b.connect(a.addrs())
            await _dht_ready(b)
            store, dkey = b._dht.provider_store, _encode_key(KEY)
            assert await b.provide(KEY)
            assert dkey in store.providing_keys
            b.unprovide(KEY)
            assert dkey not in store.providing_keys and dkey not in store._last_republish
            assert b.peer_id not in store.providers.get(dkey, {})

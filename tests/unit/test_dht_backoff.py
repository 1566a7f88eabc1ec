"""The DHT walk backs off while it finds nobody new (mesh.loops.HostLoops.dht_loop)."""

from __future__ import annotations

import dataclasses
import itertools
from types import SimpleNamespace

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from meshollama.mesh.service import MeshService
from meshollama.mesh.settings import MeshSettings
from tests.unit.test_mesh_transport import HOST_SETTINGS, FakeNet

NEW = "12D3KooWnewPeer"


def dht_mesh() -> tuple[FakeNet, MeshService]:
    """A mesh service over a fake host with a DHT: walks after 4 s, 10 s later, then 60 s doubling to 300 s."""
    net = FakeNet()
    mesh = MeshService(
        create_new_key_pair(), dataclasses.replace(HOST_SETTINGS, dht=True),
        MeshSettings(heartbeat_interval=2.0, refresh_jitter=0.0, dht_refresh_first=10.0, dht_refresh_every=60.0,
                     dht_refresh_max=300.0),
        models=lambda: net.models, load=lambda: net.load, changed=net.changed, local_upstream=None,
        http_server_factory=lambda on_reject, on_error: SimpleNamespace(handle=None), host_factory=net.factory,
    )
    return net, mesh


async def test_walks_that_find_nobody_new_back_off_and_news_brings_the_wait_back(autojump_clock):
    net, mesh = dht_mesh()
    walks: list[float] = []
    news_at = {4}  # the fifth walk names a peer we are not connected to

    async def dht_refresh():
        await trio.lowlevel.checkpoint()
        walks.append(trio.current_time() - t0)
        return [(NEW, (f"/ip4/10.0.0.7/tcp/4001/p2p/{NEW}",))] if len(walks) - 1 in news_at else []

    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(mesh.serve)
        net.host.dht_refresh = dht_refresh
        await trio.sleep(1200)
        nursery.cancel_scope.cancel()
    # soon after start (2 heartbeats), dht_refresh_first later, then 60, 120, 240 s while quiet;
    # news at the fifth: 60 s again, then doubling up to dht_refresh_max
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(walks)]
    assert round(walks[0], 3) == 4.0
    assert gaps[:8] == [10.0, 60.0, 120.0, 240.0, 60.0, 120.0, 240.0, 300.0]


async def test_walks_are_skipped_while_every_known_peer_is_connected_except_at_the_ceiling(autojump_clock):
    from tests.unit.test_mesh_transport import heartbeat

    net, mesh = dht_mesh()
    walks: list[float] = []

    async def dht_refresh():
        await trio.lowlevel.checkpoint()
        walks.append(round(trio.current_time() - t0, 3))
        return []

    peer = "12D3KooWknownPeer"
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(mesh.serve)
        net.host.dht_refresh = dht_refresh
        net.host.peer_connects(peer)
        net.host.hear(heartbeat(peer, 1, refresh_ms=600_000))
        await trio.sleep(1100)
        nursery.cancel_scope.cancel()
    # the first walk always runs; the next ones (14, 74, 194 s) are skipped while the only
    # peer we know is connected, but a real walk still runs every dht_refresh_max (300 s)
    assert walks == [4.0, 304.0, 604.0, 904.0]

"""Helpers to run real libp2p hosts on loopback inside a test's nursery."""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from meshollama.p2p.host import HostSettings, P2PHost

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def settings(**kw) -> HostSettings:
    base = dict(listen=LOOPBACK, mdns=False, dht=False, stream_timeout=5.0)
    base.update(kw)
    return HostSettings(**base)


@asynccontextmanager
async def running_hosts(*settings_list: HostSettings, handlers=None, on_junk=None):
    """Start one P2PHost per settings; yields the list; closes them all on exit."""
    hosts = []
    async with trio.open_nursery() as nursery:
        for s in settings_list:
            h = P2PHost(create_new_key_pair(), s, on_junk=on_junk)
            for proto, handler in (handlers or {}).items():
                h.set_handler(proto, handler)
            await nursery.start(h.serve)
            hosts.append(h)
        try:
            yield hosts
        finally:
            nursery.cancel_scope.cancel()

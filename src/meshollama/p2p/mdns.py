"""LAN discovery with py-libp2p's mDNS, on a service name of our own.

Given the host, py-libp2p's broadcaster puts its raw listen address
(``0.0.0.0``) in the TXT records, so every node that finds us dials itself:
we hand it our advertised addresses instead (``P2PHost.addrs``). A private
mesh (PSK) announces a service name that is an HMAC keyed by the PSK, since
mDNS is broadcast to the whole segment: nodes holding the key find each
other, and what a stranger hears reveals nothing of the key (no bits of it,
no unkeyed hash to test guesses against offline). Discoveries come from zeroconf's
thread and reach the mesh as ``discovered`` events; what they name is dialled
through ``addrs.dial_plan`` like any other address.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import TYPE_CHECKING

import trio

from .addrs import parse

if TYPE_CHECKING:
    from .host import P2PHost

log = logging.getLogger("meshollama.p2p")


MDNS_LABEL = b"meshollama mdns service name v1"


def service_fingerprint(psk: str | None) -> str:
    """The mDNS service name: ``meshollama`` for an open mesh, else ``mo`` and 48 bits
    of HMAC-SHA256(PSK, label) (a DNS label must stay short)."""
    if not psk:
        return "meshollama"
    return "mo" + hmac.new(bytes.fromhex(psk), MDNS_LABEL, hashlib.sha256).hexdigest()[:12]


def start_mdns(host: P2PHost, nursery: trio.Nursery) -> None:
    """Advertise us and report peers found on the LAN; best-effort (containers
    often have no multicast): a failure is logged, never fatal."""
    from .host import Event

    try:
        from libp2p.discovery.events.peerDiscovery import peerDiscovery
        from libp2p.discovery.mdns.mdns import create_mdns_discovery

        ours = [a for a in host.addrs() if "/p2p-circuit" not in a]
        port = parse(ours[0]).port if ours else 0  # the SRV record's; the TXT records carry every address
        mdns = create_mdns_discovery(
            host._host.get_network(), port=port, private_network_fingerprint=service_fingerprint(host.settings.psk),
            listen_addrs=ours,
        )
        token = trio.lowlevel.current_trio_token()

        def discovered(info) -> None:  # called from zeroconf's thread
            pid = info.peer_id.to_base58()
            # The listener strips /p2p/<id>; put it back so the addresses are checked as the peer's own.
            event = Event("discovered", pid, tuple(f"{a}/p2p/{pid}" for a in info.addrs))
            try:
                token.run_sync_soon(host._emit, event)
            except trio.RunFinishedError:
                pass

        peerDiscovery.register_peer_discovered_handler(discovered)
        mdns.start()
        host._host.mDNS = mdns  # so host.close() stops it

        async def unregister():
            try:
                await trio.sleep_forever()
            finally:
                peerDiscovery.unregister_peer_discovered_handler(discovered)

        nursery.start_soon(unregister)
    except Exception as exc:
        log.warning("mDNS discovery disabled: %r", exc)

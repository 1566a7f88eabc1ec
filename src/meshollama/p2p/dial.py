"""Dialling one peer by each of its addresses in turn (``P2PHost.connect``).

py-libp2p's swarm keeps one address per transport class for a peer
(``swarm.py`` ``MAX_ADDRS_PER_PEER``), so a peer whose first TCP address is
dead (a docker bridge, a stale LAN IP) is never reached by ``host.connect``,
and it never dials ``/p2p-circuit`` addresses at all. We dial each address of
:func:`addrs.dial_plan` ourselves: direct ones with ``swarm.dial_addr``,
relayed ones through ``p2p.relay``; a direct address gets a short try when a
relay is there to fall back on, and the relay keeps part of the time budget.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from ..errors import P2PError
from . import addrs as addrs_mod
from .host import _p2p_errors

if TYPE_CHECKING:
    from .host import P2PHost

log = logging.getLogger("meshollama.p2p")


async def connect(host: P2PHost, addrs: Sequence[str], *, timeout: float | None = None) -> str:
    """Connect to one peer given multiaddrs ending in its ``/p2p/<id>``.

    The addresses are dialled one at a time in :func:`addrs.dial_plan`
    order (best direct address first, relays last, never our own), each
    bounded by ``dial_timeout``; the first that works wins. Returns the
    peer id; raises :class:`P2PError` when none did.
    """
    import multiaddr
    from libp2p.peer.id import ID

    peer_ids = set()
    for a in addrs:
        try:
            parsed = addrs_mod.parse(a)
        except ValueError as exc:
            raise P2PError(f"bad peer address {a!r}: {exc}") from None
        if parsed.peer_id is None:
            raise P2PError(f"bad peer address {a!r}: no /p2p/<peer id> at the end")
        peer_ids.add(parsed.peer_id)
    if not peer_ids:
        raise P2PError("no address to dial")
    if len(peer_ids) > 1:
        raise P2PError(f"addresses of several peers given to one dial: {sorted(peer_ids)}")
    target = peer_ids.pop()
    if target == host.peer_id:
        return host.peer_id
    try:
        pid = ID.from_base58(target)
    except Exception as exc:
        raise P2PError(f"bad peer id {target!r}: {exc}") from None
    if target in host.connected_peers():
        return target
    plan = addrs_mod.dial_plan(addrs, host.own_addrs(), host.interface_ips(), self_id=host.peer_id)
    if not plan:
        raise P2PError(f"no dialable address for {target} (given: {', '.join(addrs)})")
    network = host._host.get_network()
    steps = [(a, addrs_mod.parse(a).relayed) for a in plan]
    # With a relay to fall back on, a direct address gets a short try: a
    # private address of a peer behind NAT would otherwise hold up every
    # dial for the whole dial_timeout (a LAN answers in milliseconds).
    has_relay = any(relayed for _, relayed in steps)
    total = timeout or host.settings.stream_timeout * max(1, len(plan))
    deadline = trio.current_time() + total
    # Direct addresses must leave the relay its turn: however many a peer
    # announces (LAN, ULA, docker bridges...), part of the budget is kept.
    keep_for_relay = min(host.settings.dial_timeout, total / 2) if has_relay else 0.0
    failures: list[str] = []
    for a, relayed in steps:
        if target in host.connected_peers():  # they dialled us meanwhile
            break
        per_addr = host.settings.dial_timeout if relayed or not has_relay else min(2.0, host.settings.dial_timeout)
        left = deadline - trio.current_time() - (0.0 if relayed else keep_for_relay)
        if left <= 0 and not relayed:
            failures.append(f"{a}: skipped, the relay's turn")
            continue
        limit = min(per_addr, left)
        bare = None if relayed else multiaddr.Multiaddr(a).decapsulate(multiaddr.Multiaddr(f"/p2p/{target}"))
        if limit <= 0:
            failures.append(f"{a}: out of time")
            break
        try:
            with _p2p_errors(f"dial {a}", limit):
                if relayed:
                    if host.relay is None:
                        raise P2PError("no relay transport")
                    await host.relay.dial(a)
                else:
                    conn = await network.dial_addr(bare, pid)
                    started = getattr(conn, "event_started", None)
                    if started is not None:
                        await started.wait()
        except P2PError as exc:
            failures.append(str(exc))
            log.debug("%s", exc)
            continue
        if bare is not None:  # the swarm cannot dial circuit addresses: keep them out of its store
            host._host.get_peerstore().add_addrs(pid, [bare], 600)
        schedule = getattr(host._host, "_schedule_identify", None)
        if schedule is not None:
            schedule(pid, reason="connect")
        break
    if target not in host.connected_peers():
        raise P2PError(f"cannot reach {target}: " + ("; ".join(failures) or "connection closed at once"))
    if host._dht is not None:
        await host._dht_add(pid)
    return target

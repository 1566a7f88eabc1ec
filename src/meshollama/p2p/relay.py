"""Reaching nodes behind NAT: py-libp2p's Circuit Relay v2 and DCUtR, wired for us.

Every node runs the relay protocol's STOP side (it accepts connections that a
relay forwards to it) and, unless disabled, DCUtR (after a relayed connection
is up, both ends try to punch a direct TCP connection through their NATs and
move traffic to it). A node started with ``--relay-service`` also runs the
HOP side: it forwards connections for nodes that hold a reservation on it,
within :class:`RelaySettings` limits. A node that finds itself behind NAT
keeps a reservation on relays it is connected to and advertises the
``/p2p-circuit`` addresses that reach it through them.

What py-libp2p 0.8.1 does not do for us, measured in network namespaces
(the sharp edges and their workarounds):

* the swarm never dials a ``/p2p-circuit`` address (``swarm.py`` drops
  "relay-only" addresses and the circuit transport is not registered with
  it): :meth:`Relay.dial` calls the circuit transport's ``dial`` itself;
* the transport's reservation refresher spins with no sleep once its relay
  is gone (``transport.py`` ``_refresh_reservations_worker``: thousands of
  log lines a second) and throws the reservation's addresses away: we
  reserve by hand (:meth:`Relay.keep_reservation`), read the relay's
  addresses from the answer, and renew at half the TTL with backoff;
* the transport's CLIENT role reserves a slot on the relay before every
  dial: we dial with the STOP role only;
* AutoNAT v1's dial-back reuses the existing connection, so it reports any
  node as public: "behind NAT" is read from identify instead
  (:meth:`Relay.behind_nat`: a peer saw us at an IP that is not ours);
* DCUtR first dials every non-relayed address it knows for ``dial_timeout``
  (10 s by default, mostly private LAN addresses learned over the relay):
  we give it 3 s.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..errors import P2PError

log = logging.getLogger("meshollama.p2p.relay")

HOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/hop"


@dataclass(frozen=True)
class RelaySettings:
    service: bool = False  # serve HOP: forward connections for others
    client: str = "auto"  # auto: reserve when behind NAT; on: always; off: never
    hole_punching: bool = True  # DCUtR
    max_reservations: int = 128
    max_circuits: int = 16  # relayed connections to one reserved node at once
    circuit_seconds: int = 3600
    circuit_bytes: int = 1 << 30
    reservation_ttl: int = 600
    max_relays: int = 2  # reservations we keep at once
    announced: bool = False  # --announce given: the user says we are reachable (auto reserves nothing)

GIVE_UP_AFTER = 3  # failed reservations in a row before a relay is set aside
SET_ASIDE_SECONDS = 300.0


class Relay:
    """The relay pieces of one running libp2p host (created by ``P2PHost``)."""

    def __init__(self, host, settings: RelaySettings, interface_ips: Callable[[], list], on_change: Callable[[], None]):
        self._host = host  # libp2p BasicHost
        self.settings = settings
        self._interface_ips = interface_ips
        self._on_change = on_change
        self._proto = None
        self._transport = None
        self._circuits: dict[str, list[str]] = {}  # relay peer id -> our circuit addresses through it
        self.reserving: set[str] = set()
        self._set_aside: dict[str, float] = {}  # relay -> time it may be tried again (it kept refusing)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
        from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
        from libp2p.relay.circuit_v2.resources import RelayLimits
        from libp2p.relay.circuit_v2.transport import CircuitV2Transport
        from libp2p.tools.anyio_service import background_trio_service

        s = self.settings
        limits = RelayLimits(duration=s.circuit_seconds, data=s.circuit_bytes, max_circuit_conns=s.max_circuits,
                             max_reservations=s.max_reservations, reservation_ttl=s.reservation_ttl)
        self._proto = CircuitV2Protocol(self._host, limits=limits, allow_hop=s.service)
        self._transport = CircuitV2Transport(self._host, self._proto, RelayConfig(roles=RelayRole.STOP))
        async with contextlib.AsyncExitStack() as services:
            await services.enter_async_context(background_trio_service(self._proto))
            await self._proto.event_started.wait()
            if s.hole_punching:
                from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

                await services.enter_async_context(background_trio_service(DCUtRProtocol(self._host, dial_timeout=3)))
            task_status.started()
            await trio.sleep_forever()

    # --- reachability -------------------------------------------------------

    def behind_nat(self) -> bool:
        """A peer saw us at an IP that is none of our interfaces' (identify)."""
        manager = getattr(self._host, "_observed_addr_manager", None)
        if manager is None:
            return False
        own = set(self._interface_ips())
        try:
            observed = manager.addrs(min_observers=1)
        except Exception:
            return False
        for addr in observed:
            for proto in ("ip4", "ip6"):
                try:
                    ip = ipaddress.ip_address(addr.value_for_protocol(proto))
                except Exception:
                    continue
                if ip not in own:
                    return True
        return False

    def wants_reservation(self) -> bool:
        if self.settings.client == "off" or self.settings.service:
            return False
        if self.settings.client == "auto" and self.settings.announced:
            return False  # a port forward: peers dial us directly
        if len(self.reserving) >= self.settings.max_relays:
            return False
        return self.settings.client == "on" or self.behind_nat()

    def may_try(self, relay_id: str) -> bool:
        """False for a while after a relay refused us several times (full, or
        not a relay after all), so the slot goes to another one."""
        return trio.current_time() >= self._set_aside.get(relay_id, 0.0)

    def circuit_addrs(self) -> list[str]:
        return [a for addrs in self._circuits.values() for a in addrs]

    # --- reservations ----------------------------------------------------------

    async def keep_reservation(self, relay_id: str, still_connected: Callable[[], bool]) -> None:
        """Hold a reservation on ``relay_id`` while we are connected to it:
        reserve, advertise the circuit addresses, renew at half the TTL; on
        failure drop the addresses and retry with backoff."""
        self.reserving.add(relay_id)
        backoff = 1.0
        failures = 0
        try:
            while still_connected():
                try:
                    expire_in = await self._reserve(relay_id)
                    backoff, failures = 1.0, 0
                    # Renew at half the TTL (the relay's clock may differ from
                    # ours: never wait past half our own TTL), but leave as soon
                    # as the relay goes, so its circuit addresses stop being
                    # advertised and a restarted relay is reserved on again.
                    renew = trio.current_time() + min(max(5.0, expire_in / 2), self.settings.reservation_ttl / 2)
                    while trio.current_time() < renew and still_connected():
                        await trio.sleep(1.0)
                except P2PError as exc:
                    if self._circuits.pop(relay_id, None) is not None:
                        self._on_change()
                    failures += 1
                    if failures >= GIVE_UP_AFTER:
                        self._set_aside[relay_id] = trio.current_time() + SET_ASIDE_SECONDS
                        log.info("relay %s refused %d reservations in a row (%s): trying others for %.0fs",
                                 relay_id, failures, exc, SET_ASIDE_SECONDS)
                        return
                    log.info("reservation on relay %s failed: %s; retrying in %.0fs", relay_id, exc, backoff)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 60.0)
        finally:
            self.reserving.discard(relay_id)
            if self._circuits.pop(relay_id, None) is not None:
                self._on_change()

    async def _reserve(self, relay_id: str) -> float:
        import multiaddr
        from libp2p.custom_types import TProtocol
        from libp2p.peer.id import ID
        from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
        from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
        from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

        me = self._host.get_id()
        try:
            with trio.fail_after(15):
                stream = await self._host.new_stream(ID.from_base58(relay_id), [TProtocol(HOP_PROTOCOL)])
                try:
                    await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE,
                                                                 peer=CircuitPeerId(id=me.to_bytes())))
                    answer = await read_delimited_msg(stream, HopMessage)
                finally:
                    await stream.close()
        except trio.TooSlowError:
            raise P2PError("reservation timed out") from None
        except Exception as exc:
            raise P2PError(f"reservation failed: {type(exc).__name__}: {exc}") from exc
        if answer is None or answer.status != 100:  # 100 = OK in the relay v2 spec
            raise P2PError(f"relay refused the reservation (status {getattr(answer, 'status', '?')})")
        circuits = []
        for raw in answer.reservation.addrs:
            try:
                circuits.append(f"{multiaddr.Multiaddr(raw)}/p2p-circuit/p2p/{me.to_base58()}")
            except Exception:
                continue
        if self._circuits.get(relay_id) != circuits:
            self._circuits[relay_id] = circuits
            log.info("reachable through relay %s: %s", relay_id, " ".join(circuits) or "(no address)")
            self._on_change()
        return float(answer.reservation.expire) - time.time()  # the relay's expiry is a Unix time

    # --- dialling ----------------------------------------------------------------

    async def dial(self, circuit_addr: str):
        """Connect to a peer through the relay named in ``circuit_addr``."""
        import multiaddr

        if self._transport is None:
            raise P2PError("relay transport is not running")
        # The transport reaches the relay with host.connect, which the swarm
        # refuses for 60 s after a failed dial ("negative cache"): a relay that
        # restarted would stay unusable for a minute. Our callers back off.
        relay_id = circuit_addr.partition("/p2p-circuit")[0].rsplit("/p2p/", 1)[-1]
        cache = getattr(self._host.get_network(), "_negative_peer_cache", None)
        if cache is not None:
            cache.evict(relay_id)
        conn = await self._transport.dial(multiaddr.Multiaddr(circuit_addr))
        started = getattr(conn, "event_started", None)
        if started is not None:
            await started.wait()
        return conn

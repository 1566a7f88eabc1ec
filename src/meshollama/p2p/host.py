"""Build and run our libp2p host: Noise only, Yamux, optional PSK, GossipSub, DHT, mDNS.

Sharp edges handled here (see docs/architecture.md for the list):

* the default security options also accept plaintext and SECIO: we pass a
  Noise-only ``sec_opt``;
* ``new_host(bootstrap=...)`` deadlocks with pubsub: we start pubsub first,
  then dial bootstrap peers ourselves (``mesh.service``);
* leaving ``host.run()`` does not close sockets, so peers never notice we are
  gone: ``serve`` always ends with a shielded, time-boxed ``host.close()``;
* ``max_connections_per_peer=1`` avoids a 250 ms happy-eyeballs sleep per dial;
* the DHT ignores ``protocol_prefix`` and never adds connected peers to its
  routing table: ``patches.patch_dht_protocol`` and ``_on_connected`` fix both;
* a junk pubsub message kills a stock host: ``safe_pubsub.make_safe_pubsub_class``;
* ``host.get_addrs()`` advertises a wildcard bind as ``0.0.0.0`` (identify
  and the DHT then hand out an address every peer dials itself on), and
  mDNS puts the same wildcard in its TXT records: we pass an
  ``addrs_factory`` that expands it to interface addresses (``addrs``);
* the swarm dials only the first TCP address it holds for a peer (swarm.py
  ``MAX_ADDRS_PER_PEER``, one per transport class), so a peer whose first
  address is a docker bridge is never reached: :meth:`P2PHost.connect`
  dials each address of :func:`addrs.dial_plan` in turn itself;
* the swarm's notifee may not wait: connection events go to an
  :class:`~meshollama.p2p.events.EventQueue`, which coalesces them per peer
  instead of dropping them when the consumer falls behind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import trio

from ..errors import P2PError, PortInUseError
from . import addrs as addrs_mod
from . import patches
from .events import Event, EventQueue
from .gossip import router as gossip_router
from .mdns import start_mdns
from .relay import Relay, RelaySettings
from .safe_pubsub import make_safe_pubsub_class
from .stream import Stream

LOOKUP_TIMEOUT = 1.5  # seconds a provider lookup may take (mesh.holders.WAIT leaves room for the questions)
log = logging.getLogger("meshollama.p2p")

TOPIC = "/meshollama/heartbeat/1"
ADVERTISED_TTL = 1.0  # seconds our advertised addresses are reused for (libp2p asks per RPC)


@dataclass(frozen=True)
class HostSettings:
    """What the mesh asks of libp2p (built from ``Config.p2p``)."""

    listen: tuple[str, ...]
    psk: str | None = None  # 64 hex chars
    mdns: bool = True
    dht: bool = True
    gossip_degree: int = 3
    gossip_degree_low: int = 2
    gossip_degree_high: int = 4
    gossip_heartbeat: int = 5  # seconds between gossipsub heartbeats (p2p.gossip says why; tests use 1)
    gossip_prune_back_off: int = 15  # seconds a PRUNE keeps two peers out of each other's mesh (p2p.gossip)
    stream_timeout: float = 10.0
    dial_timeout: float = 5.0  # one address; a dead LAN IP would otherwise take a TCP SYN timeout
    max_pubsub_message: int = 256 * 1024
    announce: tuple[str, ...] = ()  # replaces the addresses we advertise (--announce)
    relay: RelaySettings = RelaySettings()


@dataclass(frozen=True)
class Message:
    """A pubsub message whose signature libp2p has verified against ``from_peer``."""

    from_peer: str
    data: bytes
    raw: bytes = b""  # the whole signed pubsub message, for handing on (mesh.sync): p2p.signed.verify checks it


Handler = Callable[[Stream], Awaitable[None]]


class P2PHost:
    """One libp2p host and its services. Create, then ``await nursery.start(host.serve)``."""

    def __init__(self, key_pair, settings: HostSettings, *, on_junk: Callable[[str, str], None] | None = None,
                 on_addrs_changed: Callable[[], None] | None = None, admission=None) -> None:
        from libp2p.peer.id import ID

        self.key_pair = key_pair
        self.settings = settings
        self.peer_id = ID.from_pubkey(key_pair.public_key).to_base58()
        self._on_junk = on_junk or (lambda peer, why: None)
        self.events = EventQueue()  # connected/disconnected/discovered, never blocking the swarm
        self._handlers: dict[str, Handler] = {}
        self._host = None
        self._pubsub = None
        self._dht = None
        self._subscription = None
        self._advertised_cache: tuple[list[str], float, tuple] | None = None  # (candidates, when, result)
        self.own_message = b""  # our latest heartbeat as pubsub signed it (mesh.sync hands it on)
        self._closed = False
        self._ifaces = addrs_mod.Interfaces((), frozenset())
        self._ifaces_at = -1e9
        self._on_addrs_changed = on_addrs_changed or (lambda: None)
        self.relay: Relay | None = None
        # A closed mesh (trust.admission.Admission): every new connection is checked
        # and every other inbound stream waits at the gate until it is decided.
        self.admission = admission

    # --- lifecycle ---------------------------------------------------------

    def set_handler(self, protocol: str, handler: Handler) -> None:
        """Register ``handler(stream)`` for inbound streams on ``protocol`` (before serve)."""
        self._handlers[protocol] = handler

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the host until cancelled; ``started()`` with our dialable addresses.

        py-libp2p closes connections properly only while its own service tasks
        are still running; a plain outside cancellation tears those down first
        and leaves the sockets open, so peers never notice we left. So the host
        runs in a shielded scope, and outside cancellation is turned into an
        orderly stop: close every connection, then let libp2p's tasks end.
        """
        stop = trio.Event()
        finished = trio.Event()
        inner = trio.CancelScope(shield=True)

        async def body(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with inner:
                try:
                    await self._serve_until(stop, task_status)
                finally:
                    finished.set()

        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(body)
            task_status.started(addrs)
            try:
                await finished.wait()  # returns early only if the host died
            finally:
                stop.set()
                with trio.move_on_after(8.0) as deadline:
                    deadline.shield = True
                    await finished.wait()
                inner.cancel()  # closing hung: stop waiting for it

    async def _serve_until(self, stop: trio.Event, task_status) -> None:
        import multiaddr
        from libp2p.tools.anyio_service import background_trio_service

        patches.patch_dht_protocol()
        patches.patch_yamux_window_updates()
        patches.patch_buffered_tcp_reads()
        patches.patch_provider_lookup()
        patches.patch_yamux_upkeep()
        patches.pace_library_loops()
        host, pubsub, gossip = self._build()
        listen = [multiaddr.Multiaddr(a) for a in _bindable(self.settings.listen)]
        try:
            async with host.run(listen):
                if not host.get_transport_addrs():
                    raise P2PError("libp2p did not bind any listen address")
                async with background_trio_service(pubsub), background_trio_service(gossip):
                    await pubsub.wait_until_ready()
                    self._subscription = await pubsub.subscribe(TOPIC)
                    async with trio.open_nursery() as nursery:
                        if self.admission is not None:
                            self.admission.attach(self.open_stream, nursery, self.connected_peers)
                            nursery.start_soon(self.admission.recheck_loop)
                        if self.settings.dht:
                            await self._start_dht(nursery)
                        if self.settings.mdns:
                            start_mdns(self, nursery)
                        await self._start_relay(nursery)
                        task_status.started(self.addrs())
                        await stop.wait()
                        nursery.cancel_scope.cancel()
                    # Still inside run(): connections close for real here.
                    await self._close(host)
        except OSError as exc:
            raise PortInUseError(
                f"cannot listen on {', '.join(self.settings.listen)}: {exc.strerror or exc} "
                "(change it with --p2p-listen)"
            ) from exc
        finally:
            if self.admission is not None:
                self.admission.detach()
            await self._close(host)

    def _build(self):
        import multiaddr
        from libp2p import new_host
        from libp2p.crypto.x25519 import create_new_key_pair as new_x25519
        from libp2p.network.config import ConnectionConfig
        from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
        from libp2p.security.noise.transport import Transport as NoiseTransport
        from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
        from libp2p.stream_muxer.yamux.yamux import Yamux

        kp = self.key_pair
        s = self.settings
        try:
            host = new_host(
                key_pair=kp,
                # Noise only: the defaults would also accept plaintext and SECIO.
                sec_opt={NOISE_ID: NoiseTransport(kp, noise_privkey=new_x25519().private_key)},
                muxer_opt={YAMUX_ID: Yamux},
                connection_config=ConnectionConfig(
                    max_connections_per_peer=1,
                    dial_timeout=s.stream_timeout,
                    inbound_upgrade_timeout=s.stream_timeout,
                    outbound_upgrade_timeout=s.stream_timeout,
                ),
                listen_addrs=[multiaddr.Multiaddr(a) for a in _bindable(s.listen)],
                addrs_factory=self._advertised,
                psk=s.psk,
                enable_mDNS=False,  # we run our own on a private service name
            )
        except Exception as exc:
            raise P2PError(f"cannot create libp2p host: {exc}") from exc
        gossip = gossip_router(s)  # p2p.gossip: our parameters, IHAVE despite back-off
        safe_pubsub = make_safe_pubsub_class(lambda peer, exc: self._on_junk(peer, type(exc).__name__))
        pubsub = safe_pubsub(
            host,
            gossip,
            strict_signing=True,
            max_inbound_rpc_size=s.max_pubsub_message,
            allowed_topics={TOPIC},
        )
        # py-libp2p numbers messages from int(time.time()), one more per publish, and
        # peers drop a message id (sender + number) seen in the last 120 s. A node that
        # published faster than once a second ran ahead of the clock, so after a restart
        # (or a host rebuild) it reused its last run's ids and peers ignored its heartbeats
        # for up to half its previous uptime. Nanoseconds never repeat across runs.
        pubsub.counter = time.time_ns()
        host.get_network().register_notifee(_Notifee(self))
        for protocol, handler in self._handlers.items():
            host.set_stream_handler(protocol, self._wrap_handler(handler))
        if self.admission is not None:
            from ..trust.admission import PROTOCOL as TRUST_PROTOCOL

            host.set_stream_handler(TRUST_PROTOCOL, self._wrap_handler(self.admission.handle))
            patches.gate_inbound_streams(host, TRUST_PROTOCOL, self.admission.allows)
        self._host, self._pubsub, self._gossip = host, pubsub, gossip
        return host, pubsub, gossip

    async def _close(self, host) -> None:
        # Leaving host.run() leaves sockets open; close explicitly, shielded and time-boxed.
        if self._closed:
            return
        self._closed = True
        with trio.move_on_after(5.0) as scope:
            scope.shield = True
            try:
                await host.close()
            except Exception as exc:
                log.warning("error closing libp2p host: %r", exc)
        self.events.close()

    # --- services ----------------------------------------------------------

    async def _start_dht(self, nursery: trio.Nursery) -> None:
        from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
        from libp2p.tools.anyio_service import background_trio_service

        self._dht = KadDHT(self._host, DHTMode.SERVER)

        async def run_dht(task_status=trio.TASK_STATUS_IGNORED):
            try:
                async with background_trio_service(self._dht):
                    task_status.started()
                    await trio.sleep_forever()
            except Exception as exc:  # the DHT is an optimisation: never fatal
                log.warning("DHT stopped: %r", exc)
                self._dht = None

        await nursery.start(run_dht)

    async def _start_relay(self, nursery: trio.Nursery) -> None:
        relay = Relay(self._host, self.settings.relay, self.interface_ips, self._on_addrs_changed)

        async def run_relay(task_status=trio.TASK_STATUS_IGNORED):
            try:
                await relay.run(task_status=task_status)
            except Exception as exc:  # NAT traversal is best-effort: never fatal
                log.warning("relay/hole punching stopped: %r", exc)
                self.relay = None
                try:
                    task_status.started()  # it failed before starting: the host goes on without it
                except RuntimeError:
                    pass

        self.relay = relay
        await nursery.start(run_relay)

    # --- events ------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        # Connection events are never dropped (coalesced per peer); only a
        # discovery beyond the queue's bound, or anything after close, is.
        if not self.events.emit(event):
            log.debug("dropping p2p event %s", event)

    def _wrap_handler(self, handler: Handler):
        async def run(raw) -> None:
            peer = raw.muxed_conn.peer_id.to_base58()
            stream = Stream(raw, peer, timeout=self.settings.stream_timeout)
            try:
                await handler(stream)
            except trio.Cancelled:
                raise
            except Exception as exc:  # a handler failure is that stream's problem only
                log.warning("stream handler failed for %s: %r", peer, exc)
                await stream.reset()

        return run

    # --- operations ----------------------------------------------------------

    def interfaces(self) -> addrs_mod.Interfaces:
        """This host's interface IPs, re-read at most every 10 s (cheap, but
        identify asks for our addresses on every connection)."""
        now = time.monotonic()
        if now - self._ifaces_at > 10.0:
            try:
                self._ifaces = addrs_mod.interfaces()
            except Exception as exc:  # psutil on an odd platform: a wildcard bind advertises loopback
                log.warning("cannot list network interfaces: %r", exc)
                self._ifaces = addrs_mod.Interfaces((), frozenset())
            self._ifaces_at = now
        return self._ifaces

    def interface_ips(self) -> list:
        return list(self.interfaces().ips)

    def _advertised(self, candidates) -> list:
        """libp2p's ``addrs_factory``: transport and confirmed observed addresses in,
        the addresses peers can dial out (identify, DHT, mDNS, heartbeats)."""
        import multiaddr

        # py-libp2p asks for these on every pubsub RPC it sends (the signed peer record it
        # attaches), and building them was a quarter of an idle node's CPU: kept for a
        # moment, as long as libp2p offers the same candidates.
        now = time.monotonic()
        texts = [str(a) for a in candidates]
        cached = self._advertised_cache
        if cached is not None and cached[0] == texts and now - cached[1] < ADVERTISED_TTL:
            return list(cached[2])
        transport = {str(a) for a in self._host.get_transport_addrs()} if self._host is not None else set()
        listen = [t for t in texts if t in transport] or texts
        observed = [t for t in texts if t not in transport]
        ifaces = self.interfaces()
        out = addrs_mod.advertise(listen, ifaces.ips, self.peer_id, observed=observed,
                                  announce=self.settings.announce, virtual=ifaces.virtual)
        result = [multiaddr.Multiaddr(a.rsplit("/p2p/", 1)[0]) for a in out]
        self._advertised_cache = (texts, now, tuple(result))
        return result

    def addrs(self) -> list[str]:
        """Our advertised multiaddrs with ``/p2p/<id>``, LAN addresses first, then
        ``/p2p-circuit`` ones through relays we hold a reservation on. (Circuit
        addresses stay out of ``get_addrs``: it would cut ``/p2p/<relay>/p2p-circuit``
        down to the relay's own address and claim it as ours.)"""
        direct = [str(a) for a in self._host.get_addrs()]
        relayed = self.relay.circuit_addrs() if self.relay is not None else []
        return list(dict.fromkeys([*direct, *relayed]))

    def own_addrs(self) -> list[str]:
        """Every address that reaches this very node, for never dialling ourselves."""
        return [*self.addrs(), *(str(a) for a in self._host.get_transport_addrs())]

    def connected_peers(self) -> set[str]:
        return {p.to_base58() for p in self._host.get_connected_peers()}

    async def connect(self, addrs: Sequence[str], *, timeout: float | None = None) -> str:
        """Connect to one peer given multiaddrs ending in its ``/p2p/<id>``
        (each address in :func:`addrs.dial_plan` order, see ``p2p.dial``)."""
        from .dial import connect

        return await connect(self, addrs, timeout=timeout)

    def known_addrs(self, peer_id: str) -> list[str]:
        """Addresses the peerstore holds for a peer (identify, DHT, mDNS), with ``/p2p/``."""
        from libp2p.peer.id import ID

        try:
            found = self._host.get_peerstore().addrs(ID.from_base58(peer_id))
        except Exception:
            return []
        return [str(a) if str(a).endswith(f"/p2p/{peer_id}") else f"{a}/p2p/{peer_id}" for a in found]

    async def open_stream(self, peer_id: str, protocol: str, *, timeout: float | None = None) -> Stream:
        """Open a stream; fails fast (P2PError) on a dead or frozen peer."""
        from libp2p.custom_types import TProtocol
        from libp2p.peer.id import ID

        with _p2p_errors(f"opening {protocol} to {peer_id}", timeout or self.settings.stream_timeout):
            raw = await self._host.new_stream(ID.from_base58(peer_id), [TProtocol(protocol)])
        return Stream(raw, peer_id, timeout=self.settings.stream_timeout)

    async def publish(self, data: bytes) -> None:
        with _p2p_errors("publish", self.settings.stream_timeout):
            await self._pubsub.publish(TOPIC, data)

    async def next_message(self) -> Message:
        """Next heartbeat-topic message (signature already verified by pubsub)."""
        from libp2p.peer.id import ID

        while True:
            msg = await self._subscription.get()
            try:
                sender = ID(msg.from_id).to_base58()
            except Exception:
                continue
            if sender == self.peer_id:
                self.own_message = msg.SerializeToString()  # our latest, as signed: mesh.sync hands it on
                continue
            return Message(sender, bytes(msg.data), msg.SerializeToString())

    def topic_peers(self) -> int:
        """Peers known to subscribe to the heartbeat topic: 0 means a publish reaches nobody."""
        pubsub = self._pubsub
        return len(pubsub.peer_topics.get(TOPIC, ())) if pubsub is not None else 0

    def gossip_view(self) -> dict:
        """How this host takes part in the heartbeat topic (``/api/mesh/status``'s
        ``gossip``): peers with a pubsub stream of ours (``streams``), those known to
        subscribe (``topic``), and our gossipsub mesh for it (``mesh``). A connected
        peer missing from ``topic`` neither hears our announcements from us nor
        sends us its own; a ``mesh`` of 0 with ``topic`` > 0 relies on gossip alone."""
        pubsub, gossip = self._pubsub, self._gossip
        if pubsub is None:
            return {"streams": 0, "topic": 0, "mesh": 0, "backoff": 0}
        mesh = getattr(gossip, "mesh", None) or {}
        now = int(time.time())  # py-libp2p keeps gossipsub back-offs in whole wall-clock seconds
        backoff = (getattr(gossip, "back_off", None) or {}).get(TOPIC, {})
        return {"streams": len(pubsub.peers), "topic": len(pubsub.peer_topics.get(TOPIC, ())),
                "mesh": len(mesh.get(TOPIC, ())), "backoff": sum(1 for t in backoff.values() if t > now)}

    async def disconnect(self, peer_id: str) -> None:
        from libp2p.peer.id import ID

        with trio.move_on_after(2.0):
            try:
                await self._host.disconnect(ID.from_base58(peer_id))
            except Exception:
                pass

    async def _dht_add(self, peer) -> None:
        # Only admitted peers go into the DHT: it would hand their addresses out.
        if self.admission is not None and await self.admission.wait(peer.to_base58()) is None:
            return
        try:
            with trio.move_on_after(self.settings.stream_timeout):
                await self._dht.add_peer(peer, skip_server_mode_check=True)
        except trio.Cancelled:
            raise
        except Exception as exc:
            log.debug("DHT add_peer(%s) failed: %r", peer, exc)

    async def dht_refresh(self) -> list[tuple[str, tuple[str, ...]]]:
        """Ask the DHT for peers close to us; returns (peer_id, addrs) we could dial."""
        if self._dht is None:
            return []
        from libp2p.peer.id import ID

        found: dict[str, tuple[str, ...]] = {}
        try:
            with trio.move_on_after(self.settings.stream_timeout):
                peers = await self._dht.peer_routing.find_closest_peers_network(
                    ID.from_base58(self.peer_id).to_bytes()
                )
            for p in peers or ():
                pid = p.to_base58()
                if pid == self.peer_id or pid in found:
                    continue
                addrs = tuple(
                    str(a) if "/p2p/" in str(a) else f"{a}/p2p/{pid}"
                    for a in self._host.get_peerstore().addrs(p)
                )
                if addrs:
                    found[pid] = addrs
        except trio.Cancelled:
            raise
        except Exception as exc:
            log.debug("DHT refresh failed: %r", exc)
        return list(found.items())

    async def provide(self, key: str) -> bool:
        """Announce in the DHT that we hold ``key`` (a hex multihash); False if there is no DHT.

        py-libp2p re-provides, every 600 s and unpaced, each key it has not
        republished for 22 h, which is every key said since its last check: a
        burst its receivers' rate limit drops (``mesh.providing``). The key is
        marked as republished first; ``mesh.providing`` says it again itself."""
        if self._dht is None:
            return False
        from libp2p.kad_dht.kad_dht import _encode_key

        self._dht.provider_store._last_republish[_encode_key(key)] = time.time()
        try:
            with trio.move_on_after(self.settings.stream_timeout * 3):
                return bool(await self._dht.provide(key))
        except trio.Cancelled:
            raise
        except Exception as exc:
            log.debug("DHT provide(%s) failed: %r", key[:16], exc)
        return False

    def unprovide(self, key: str) -> None:
        """We no longer hold ``key``: py-libp2p forgets it (it would republish it every 22 h)
        and drops our own record; remote records expire (48 h; askers hear "no" first)."""
        if self._dht is None:
            return
        from libp2p.kad_dht.kad_dht import _encode_key

        store, dkey = self._dht.provider_store, _encode_key(key)
        store.providing_keys.discard(dkey)
        store._last_republish.pop(dkey, None)
        records = store.providers.get(dkey)
        if records is not None:
            records.pop(self.peer_id, None)

    async def find_providers(self, key: str, count: int = 20, timeout: float = LOOKUP_TIMEOUT) -> list[str]:
        """Peer ids the DHT says hold ``key``, each once (py-libp2p repeats them), not us:
        the network's answer (``patches.network_lookup``: py-libp2p would answer from its
        local store alone) and the local store's, within ``timeout``; a lookup cut short
        returns what it found by then (each find goes into the local store)."""
        if self._dht is None:
            return []
        from libp2p.kad_dht.kad_dht import _encode_key

        store = self._dht.provider_store
        found: dict[str, None] = {}
        try:
            with trio.move_on_after(timeout), patches.network_lookup():
                for info in await self._dht.find_providers(key, count) or ():
                    pid = info.peer_id.to_base58()
                    if pid != self.peer_id:
                        found.setdefault(pid)
                        self._provider_addrs(info)
        except trio.Cancelled:
            raise
        except Exception as exc:
            log.debug("DHT find_providers(%s) failed: %r", key[:16], exc)
        for info in store.get_providers(_encode_key(key)):
            pid = info.peer_id.to_base58()
            if pid != self.peer_id:
                found.setdefault(pid)
        return list(found)[:count]

    def _provider_addrs(self, info) -> None:
        """A provider's addresses from a DHT answer (a stranger's claim, unsigned): only
        for a peer we know no address of, at most 8, for 10 minutes."""
        peerstore = self._host.get_peerstore()
        try:
            known = peerstore.addrs(info.peer_id)
        except Exception:  # PeerStoreError: not known (or expired)
            known = []
        if info.addrs and not known:
            peerstore.add_addrs(info.peer_id, list(info.addrs)[:8], 600)

    def forget_provider(self, key: str, peer_id: str) -> None:
        """Drop our DHT's record that ``peer_id`` provides ``key``: it said it does not."""
        if self._dht is None:
            return
        from libp2p.kad_dht.kad_dht import _encode_key

        records = self._dht.provider_store.providers.get(_encode_key(key))
        if records is not None:
            records.pop(peer_id, None)  # keyed by str(ID), the base58 form

    def dht_size(self) -> int:
        if self._dht is None:
            return 0
        try:
            return self._dht.routing_table.size()
        except Exception:
            return 0


class _Notifee:
    """Turns swarm callbacks into ``Event``s without blocking the swarm."""

    def __init__(self, owner: P2PHost) -> None:
        self._owner = owner

    async def opened_stream(self, network, stream) -> None:
        pass

    async def closed_stream(self, network, stream) -> None:
        pass

    async def connected(self, network, conn) -> None:
        peer = conn.muxed_conn.peer_id.to_base58()
        if self._owner.admission is not None:
            self._owner.admission.connected(peer)
        self._owner._emit(Event("connected", peer))

    async def disconnected(self, network, conn) -> None:
        pubsub = self._owner._pubsub
        if pubsub is not None and hasattr(pubsub, "connection_closed"):
            try:
                pubsub.connection_closed(conn)  # p2p.safe_pubsub: a stream off a closed connection
            except Exception as exc:  # noqa: BLE001 - the events below must still go out
                log.debug("pubsub on a closed connection: %r", exc)
        peer = conn.muxed_conn.peer_id.to_base58()
        if self._owner.admission is not None and peer not in self._owner.connected_peers():
            self._owner.admission.disconnected(peer)
        self._owner._emit(Event("disconnected", peer))

    async def listen(self, network, multiaddr) -> None:
        pass

    async def listen_close(self, network, multiaddr) -> None:
        pass


@contextmanager
def _p2p_errors(what: str, limit: float) -> Iterator[None]:
    """Bound an operation by ``limit`` seconds; whatever py-libp2p raises becomes
    a :class:`P2PError` naming ``what`` (cancellation passes through)."""
    try:
        with trio.fail_after(limit):
            yield
    except trio.TooSlowError:
        raise P2PError(f"{what} timed out after {limit:.1f}s") from None
    except trio.Cancelled:
        raise
    except P2PError:
        raise
    except Exception as exc:
        raise P2PError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


def _bindable(listen: Sequence[str]) -> list[str]:
    """``listen`` less its IPv6 addresses on a host that cannot bind IPv6 (a
    kernel booted with ipv6.disable=1, some containers), so the IPv4/IPv6
    default works everywhere; an explicit IPv6-only list is left to fail loudly."""
    if all(a.startswith("/ip6/") for a in listen) or _has_ipv6():
        return list(listen)
    log.info("IPv6 is not available here: listening on IPv4 only")
    return [a for a in listen if not a.startswith("/ip6/")]


def _has_ipv6() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False

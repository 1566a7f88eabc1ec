"""The mesh service: heartbeats out and in, the peer table, discovery, liveness.

It owns the peer table (pure, ``mesh.peertable``) and drives it from network
events delivered by a :class:`~meshollama.mesh.transport.Transport` (a
:class:`~meshollama.p2p.host.P2PHost` unless a ``host_factory`` says
otherwise). The loops that run on a host (``mesh.loops``) publish our
heartbeat on a timer and at once on change, apply others' (dropping and
counting forged, malformed and stale ones), mark a peer down the moment its
connection closes or a liveness ping fails and release the streams waiting
on it, and dial bootstrap peers with backoff; peers heard of are dialled by
every path we know (``mesh.reach``). Here:

* peers that miss ``miss_limit`` intervals expire;
* :meth:`MeshService.set_draining` makes every later announcement say
  ``draining``, so peers stop routing new requests to us (a rolling restart);
* on shutdown we publish a ``leaving`` announcement so others drop us at once;
* in a closed mesh (``admission``), heartbeats of peers the mesh authority has
  not admitted are dropped, only peers admitted on a live connection are
  routed to (and streams to a peer wait for its admission), peers admitted
  as ``gateway`` are never routed to, and a peer refused or revoked is
  disconnected, marked down and its streams cancelled at once.

The libp2p host is supervised (``mesh.supervisor``): if it or one of its
loops fails, the error is logged and counted (``host_restarts``), every peer
is marked down and its streams released, requests to remote peers fail at
once (:class:`~meshollama.errors.UpstreamUnavailable`, "restarting"), and a
fresh host is built with backoff (it dials the peers the table still holds),
while the peer table, :meth:`snapshot`, :meth:`status` and the HTTP side keep
running. Only a failure of the very first start (a port in use) leaves
:meth:`MeshService.serve`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any
from functools import partial

import trio

from .. import __version__, names, pace
from ..catalog import LoadInfo, ModelInfo
from ..errors import P2PError
from ..p2p.host import HostSettings, P2PHost
from ..p2p.httpstream import PROTOCOL as HTTP_PROTOCOL
from ..p2p.httpstream import HttpStreamServer, PeerScopes, PeerUpstream, StreamPool
from . import announce, holders, load_client, load_server, providing, sync
from .loops import STREAM_ABORT_MISSES, HostLoops  # noqa: F401 - STREAM_ABORT_MISSES lived here
from .peertable import PeerState, PeerTable, ServingIndex, Snapshot
from .reach import Reach
from .settings import MeshCounters, MeshSettings
from .supervisor import Backoff, HostStopped, supervise
from .transport import HostFactory, Transport

log = logging.getLogger("meshollama.mesh")

# Model details that move by themselves: Ollama renews a loaded model's expires_at with
# every request, so a busy node would announce its "catalog" at every poll.
VOLATILE_DETAILS = frozenset({"expires_at"})
TEST_FAULTS_ENV = "MESHOLLAMA_TEST_FAULTS"  # "1": inject_host_failure() works (the fault suite)


class MeshService:
    """Runs the mesh. Also the gateway's ``MeshView``."""

    def __init__(
        self,
        key_pair,
        host_settings: HostSettings,
        settings: MeshSettings,
        *,
        models: Callable[[], tuple[ModelInfo, ...]],
        load: Callable[[], LoadInfo],
        changed: Callable[[], trio.Event],
        local_upstream,
        http_server_factory: Callable[[Callable[[str], None], Callable[[str], None]], HttpStreamServer],
        on_counter: Callable[[str, str], None] | None = None,
        admission=None,
        host_factory: HostFactory | None = None,
    ) -> None:
        from ..p2p.keys import peer_id_of

        self.key_pair = key_pair
        self.host_settings = host_settings
        self.settings = settings
        self.self_id = peer_id_of(key_pair)
        self.table = PeerTable(self.self_id, interval=settings.heartbeat_interval, miss_limit=settings.miss_limit,
                               max_peers=settings.max_peers)
        self.counters = MeshCounters()
        self.scopes = PeerScopes()
        self.pool = StreamPool(
            self._open_stream,
            connect_timeout=settings.connect_timeout,
            on_acquire=lambda reused: self._count("request_streams", "reused" if reused else "opened"),
        )
        self._models = models
        self._load = load
        self._changed = changed
        self._local = local_upstream
        self._http_server_factory = http_server_factory
        self._on_counter = on_counter or (lambda name, label: None)
        self._host_factory: HostFactory = host_factory or P2PHost
        self._host: Transport | None = None
        self._host_ready = trio.Event()  # set while a host is up; a fresh one after each failure
        self._host_state = "starting"  # then "running", "restarting" while a failed host is rebuilt
        self._loops: HostLoops | None = None
        # Sequence numbers start at the wall clock (ns) so a restarted node's
        # heartbeats are never taken for stale ones; I/O code may read it.
        self._seq = time.time_ns()
        self._started_at = trio.current_time()
        self._publish_now = trio.Event()
        self._wake_publisher: Callable[[], None] | None = None  # set by the running publish loop
        self._rng = random.Random()
        self.reach = Reach(self.table, self.self_id, settings.unreachable_retry, settings.max_connections,
                           spawn=lambda fn: self._spawn(fn), rng=self._rng)
        self._addrs: list[str] = []
        self._leaving = False
        self._draining = False
        self.bootstrap_self: set[str] = set()  # bootstrap URLs that led back to this node (not dialled)
        self._test_faults = os.environ.get(TEST_FAULTS_ENV) == "1"
        self._nursery: trio.Nursery | None = None  # the running host's, for background work
        self.admission = admission  # trust.admission.Admission, or None: an open mesh
        # Set by the node for model distribution (models/): more protocols to
        # serve on every host built, and what the heartbeat says of the store.
        self.handlers: dict[str, Any] = {}
        self.store_info: Callable[[], Any] = lambda: None
        self.replica_targets: Callable[[], tuple] = lambda: ()
        self.signed: dict[str, bytes] = {}  # peer -> its latest heartbeat as signed (mesh.sync hands them on)
        self._closed_view: tuple | None = None  # (table peers, admission generation, admitted peers, index)
        self._quiet_load = False  # past full_view_up_to (announces_load, with hysteresis)
        self._pace = providing.Pace()  # our ADD_PROVIDER records, whoever says them
        self.provider: providing.Provider | None = None  # our models' records, once a host runs
        self.finder = holders.HolderFinder(
            self.find_providers,
            lambda peer_id, model: load_client.ask_holds(self._open_stream, peer_id, model, holders.ASK_TIMEOUT),
            self_id=self.self_id, rank=self._provider_rank, forget_provider=self._forget_provider, rng=self._rng,
            on_count=lambda what: self._count("holder_lookups", what))
        if admission is not None:
            admission.on_refused = self._refused
            admission.on_admitted = self._admitted

    # --- MeshView (for the gateway) ------------------------------------------

    def snapshot(self) -> Snapshot:
        snap = self.table.snapshot(trio.current_time())
        adm = self.admission
        if adm is None:
            return snap
        # Closed mesh: only peers admitted on a live connection are seen (and routed to).
        # Filtered once per table change or admission decision, not per request: the
        # filtered peers and their route index are shared until either changes.
        cached = self._closed_view
        if cached is None or cached[0] is not snap.peers or cached[1] != adm.generation:
            peers = tuple(p for p in snap.peers if p.is_self or adm.role(p.peer_id) is not None)
            cached = self._closed_view = (snap.peers, adm.generation, peers, ServingIndex(peers))
        return Snapshot(cached[2], snap.taken_at, shared_index=cached[3])

    def load_sampling(self) -> bool:
        """A large mesh (past ``full_view_up_to`` peers): load is not announced, so the
        gateway asks a few holders before it routes (:meth:`ask_loads`)."""
        return not self.announces_load() and self._host_ready.is_set()

    def announces_load(self) -> bool:
        """Whether our load changes are announced: up to ``full_view_up_to`` peers. Once
        past it, only back below seven eighths of it, so a table that hovers around the
        size does not flip (each flip is announced: ``lq``)."""
        up_to, size = self.settings.full_view_up_to, len(self.table)
        if size > up_to:
            self._quiet_load = True
        elif size <= up_to - max(1, up_to // 8):
            self._quiet_load = False
        return not self._quiet_load

    def finds_holders(self, snapshot: Snapshot) -> bool:
        """Whether a model no announcement lists may still be held: the mesh is large
        (not everyone's catalog need reach us), or an alive peer says its announcement
        leaves models out (``announce.fit``) and lists enough for that to be true (a peer
        with two models saying ``mm`` would send every gateway to the DHT for every unknown
        name). Then the DHT is asked (:meth:`find_holders`)."""
        return self.load_sampling() or any(p.more and len(p.models) >= holders.MORE_MIN
                                           for p in snapshot.peers if p.state is PeerState.ALIVE)

    async def find_holders(self, model: str) -> holders.Holders:
        """Peers that hold ``model`` by their own word just now, found through DHT
        provider records (``mesh.holders``), least busy first. A model we hold
        ourselves (our own announcement may leave it out too) is ours to serve: no lookup."""
        mine = self.holds(names.key(model)) if self._local is not None else None
        if mine is not None:
            return holders.Holders([holders.Found(self.self_id, mine.digest, mine.loaded, self._load())])
        return await self.finder.find(model) if self._host_ready.is_set() else holders.Holders()

    def holds(self, key: str) -> ModelInfo | None:
        """The model we hold under ``key`` (``names.key``), from our whole list: what an
        announcement leaves out is still ours to serve. None while draining: no new requests."""
        if self._draining:
            return None
        return next((m for m in self._models() if names.key(m.name) == key), None)

    def _provider_rank(self, peer_id: str) -> int | None:
        """Whom a holds question goes to first: a connected alive table peer (0), another
        alive table peer (1), a stranger (2); never a peer our table has down, and in a
        closed mesh only one the mesh's documents admit."""
        adm = self.admission
        if adm is not None and adm.known_role(peer_id) is None:
            return None
        view = self.table.get(peer_id)
        if view is not None and view.state is not PeerState.ALIVE:
            return holders.NOT_NOW
        if view is None:
            return 2
        return 0 if peer_id in self.connected() else 1

    def _forget_provider(self, key: str, peer_id: str) -> None:
        host = self._host
        forget = getattr(host, "forget_provider", None) if host is not None else None
        if forget is not None:
            forget(key, peer_id)

    def connected(self) -> set[str]:
        """Peers we hold a connection to now (empty while no host runs)."""
        host = self._host
        return host.connected_peers() if host is not None and self._host_ready.is_set() else set()

    async def ask_loads(self, peers: list[str]) -> dict[str, LoadInfo]:
        """Ask these peers for their load, all at once, for ``load_client.TIMEOUT`` at most;
        those that answered in time."""
        out: dict[str, LoadInfo] = {}

        async def one(peer_id: str) -> None:
            try:
                out[peer_id] = await load_client.ask(self._open_stream, peer_id)
                self._count("load_queries", "answered")
            except P2PError:
                self._count("load_queries", "failed")

        async with trio.open_nursery() as nursery:
            for peer_id in peers:
                if peer_id != self.self_id:
                    nursery.start_soon(one, peer_id)
        return out

    def _refused(self, peer_id: str, why: str) -> None:
        """Admission refused or revoked ``peer_id``: cut it off now."""
        if self.table.mark_down(peer_id, trio.current_time()):
            log.warning("peer %s cut off: %s", peer_id, why)
        self._abort_peer(peer_id)
        host = self._host
        if host is not None and self._nursery is not None:
            self._spawn(lambda: host.disconnect(peer_id))

    def _admitted(self, peer_id: str, role: str) -> None:
        # Its heartbeats before the decision were dropped. The pull a new connection
        # starts waits for admission, so only if none ran (or it failed): pull now.
        loops = self._loops
        if loops is not None and loops.last_pull is None and self._nursery is not None:
            self._spawn(partial(loops.sync_with, peer_id))

    def upstream(self, peer_id: str):
        if peer_id == self.self_id:
            return self._local
        return PeerUpstream(
            self.pool,
            peer_id,
            self.scopes,
            on_error=lambda kind: self._count("stream_errors", kind),
        )

    @property
    def addrs(self) -> list[str]:
        """What we advertise now (interfaces come and go), LAN addresses first."""
        host = self._host
        if host is not None and self._host_ready.is_set():
            try:
                self._addrs = host.addrs()
            except Exception as exc:  # never let a status call fail on it
                log.debug("cannot read our addresses: %r", exc)
        return list(self._addrs)

    def status(self) -> dict:
        host = self._host if self._host_ready.is_set() else None
        return {
            "peer_id": self.self_id,
            "version": __version__,
            "host": self._host_state,
            "draining": self._draining,
            "bootstrap_self": sorted(self.bootstrap_self),
            "p2p_addrs": list(self.addrs),
            "api_url": self.settings.api_url,
            "uptime_seconds": round(trio.current_time() - self._started_at, 3),
            "heartbeat_interval": self.settings.heartbeat_interval,
            "connected_peers": sorted(host.connected_peers()) if host is not None else [],
            "gossip": view() if host is not None and (view := getattr(host, "gossip_view", None)) else None,
            "dht_routing_table_size": host.dht_size() if host is not None else 0,
            "dht_models": self.provider.status() if self.provider is not None else None,
            "holder_lookups": dict(self.counters.holder_lookups),
            "heartbeats_sent": self.counters.heartbeats_sent,
            "heartbeats_received": self.counters.heartbeats_received,
            "refresh_interval": self._refresh_said(),
            "announced": dict(self.counters.announced),
            "synced": dict(self.counters.synced),
            "load_queries": dict(self.counters.load_queries),
            "load_sampling": self.load_sampling(),
            "heartbeats_dropped": dict(self.counters.dropped),
            "request_streams": dict(self.counters.request_streams),
            "addrs_dropped": dict(self.counters.addrs_dropped),
            "host_restarts": self.counters.host_restarts,
            "admission": self._admission_status(),
        }

    def _admission_status(self) -> dict:
        adm = self.admission
        if adm is None:
            return {"mode": "open"}
        state = adm.state
        own = state.own
        return {
            "mode": "closed",
            "authority": state.authority.text,
            "policy_version": state.policy.version,
            "role": own.role if own is not None else None,
            "certificate_expires_at": (own.exp or None) if own is not None else None,
        }

    def _abort_peer(self, peer_id: str) -> None:
        """The peer is down or gone: release callers waiting on it, drop its idle streams."""
        self.scopes.cancel_peer(peer_id)
        for stream in self.pool.forget(peer_id):
            # The connection may still be up (a liveness blip): give its slots back.
            # With no host running, its connections are gone already.
            if self._nursery is not None:
                self._spawn(stream.reset)

    # --- draining and leaving ------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    def set_draining(self, draining: bool = True) -> None:
        """Tell the mesh we are draining (finishing our requests before a
        restart: route no new ones to us), or no longer are. Our own entry
        shows it at once, a heartbeat saying so goes out at once (rate
        limited), and every later one says it too."""
        if draining == self._draining:
            return
        self._draining = draining
        log.info("draining: %s", "announcing it" if draining else "no longer")
        self.table.set_self(self.announcement(), trio.current_time())
        self.request_heartbeat()

    async def leave(self, timeout: float = 1.0) -> None:
        """Tell the mesh we are leaving (before shutdown), so peers drop us at once."""
        host = self._host
        if host is None or not self._host_ready.is_set():
            return
        self._leaving = True
        with trio.move_on_after(timeout):
            try:
                await host.publish(announce.encode(self.announcement(leaving=True)))
                # Give pubsub a moment to flush it before connections close.
                await trio.sleep(min(0.2, timeout / 2))
            except Exception as exc:
                log.debug("could not publish leave: %r", exc)

    # --- heartbeats --------------------------------------------------------------

    def announcement(self, *, leaving: bool = False) -> announce.Announcement:
        """Our next announcement (a fresh ``seq``)."""
        self._seq += 1
        return announce.fit(
            announce.Announcement(
                peer_id=self.self_id,
                seq=self._seq,
                version=__version__,
                models=tuple(self._models()),
                load=self._load(),
                addrs=tuple(self.addrs),
                api_url=self.settings.api_url,
                leaving=leaving,
                relay=self.host_settings.relay.service,
                draining=self._draining,
                store=self.store_info(),
                replicas=tuple(self.replica_targets())[: announce.MAX_REPLICAS],
                refresh_ms=self._refresh_ms(),
                down=self._loops.hints.current(trio.current_time()) if self._loops is not None else (),
                quiet_load=not self.announces_load(),
            )
        )

    def catalog(self) -> tuple:
        """What our announcement says besides load, for ``mesh.cadence`` to compare:
        a change is announced at once. Free room counts in GiB (a log line is no news)."""
        store = self.store_info()
        if store is not None:
            store = dataclasses.replace(store, free=store.free >> 30)
        models = tuple(m if not VOLATILE_DETAILS.intersection(m.details) else
                       dataclasses.replace(m, details={k: v for k, v in m.details.items() if k not in VOLATILE_DETAILS})
                       for m in self._models())
        return (models, tuple(self._addrs), self._draining, store, tuple(self.replica_targets()),
                self.announces_load())

    def _refresh_ms(self) -> int:
        loops = self._loops
        if loops is not None:
            refresh = loops.policy.refresh_to_say()
        else:
            refresh = max(self.settings.heartbeat_interval, self.settings.refresh_interval)
        return min(announce.MAX_REFRESH_MS, max(1, round(refresh * 1000)))

    def _refresh_said(self) -> float:
        """The refresh interval our last announcement carried (what peers expire us by)."""
        loops = self._loops
        said = loops.policy.refresh_said if loops is not None else None
        return said if said is not None else self._refresh_ms() / 1000

    def request_heartbeat(self) -> None:
        """Publish a heartbeat now (at most one per 0.25 s; while no host runs, once one does)."""
        self._publish_now.set()
        if self._wake_publisher is not None:
            self._wake_publisher()

    def _drop(self, reason: str) -> None:
        MeshCounters.bump(self.counters.dropped, reason)
        self._on_counter("heartbeats_dropped", reason)

    def _count(self, what: str, label: str) -> None:
        MeshCounters.bump(getattr(self.counters, what), label)
        self._on_counter(what, label)

    def _count_n(self, what: str, label: str, n: int) -> None:
        for _ in range(n):
            self._count(what, label)

    # --- running ---------------------------------------------------------------

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ``started(addrs)`` once the first host is up.

        The host is rebuilt with backoff whenever it fails (``mesh.supervisor``);
        if the very first start fails (a port in use), that error is raised,
        as it is, not in an exception group."""
        self.table.set_self(self.announcement(), trio.current_time())
        failed: Exception | None = None
        async with trio.open_nursery() as nursery:
            try:
                addrs = await nursery.start(partial(supervise, self._run_host, self._host_failed, Backoff()))
            except Exception as exc:  # nothing else runs in the nursery yet: it closes cleanly
                failed = exc
            else:
                nursery.start_soon(self._expiry_loop)
                task_status.started(addrs)
        if failed is not None:
            raise failed

    async def _run_host(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Build one host and run it, and its loops, until one of them fails."""
        host = self._host_factory(self.key_pair, self.host_settings,
                                  on_junk=lambda peer, why: self._drop("junk_rpc"),
                                  on_addrs_changed=self.request_heartbeat, admission=self.admission)
        server = self._http_server_factory(
            lambda reason: self._count("inbound_rejected", reason),
            lambda kind: self._count("stream_errors", kind),
        )
        host.set_handler(HTTP_PROTOCOL, server.handle)
        self._loops = loops = HostLoops(self, host)
        host.set_handler(sync.PROTOCOL, loops.sync_server().handle)
        host.set_handler(sync.HELLO_PROTOCOL, loops.hello_server().handle)
        load = loops.load_server()
        host.set_handler(load_server.PROTOCOL, load.handle)
        host.set_handler(load_server.HOLDS_PROTOCOL, load.handle_holds)
        for protocol, handler in self.handlers.items():
            host.set_handler(protocol, handler)
        self._host = host
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._addrs = await nursery.start(self._watched, host.serve)
                self._host_ready.set()
                self._host_state = "running"
                self.table.set_self(self.announcement(), trio.current_time())
                await nursery.start(self._watched, loops.run)
                if self._local is not None:  # we serve: our models go into the DHT (mesh.holders)
                    self.provider = providing.Provider(self._models, self.provide, self._changed, host.dht_size,
                                                       self._pace, unprovide=self.unprovide)
                    nursery.start_soon(self.provider.run)
                task_status.started(list(self._addrs))
        finally:
            self._nursery = None  # closed: nothing more may be spawned into it

    async def _watched(self, part, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run one part of the host (the host itself, its loops). The moment it
        fails, requests stop going to the host, before the host is torn down."""
        try:
            await part(task_status=task_status)
        except Exception:
            self._host_down()
            raise
        self._host_down()
        raise HostStopped(f"{getattr(part, '__qualname__', part)} ended while the host should run")

    def _host_down(self) -> None:
        if self._host_ready.is_set():
            self._host_ready = trio.Event()
        self._host_state = "restarting"

    def _host_failed(self, error: BaseException, delay: float) -> None:
        """The supervisor's ``on_failure``: the host is gone; a fresh one comes after ``delay``."""
        self.counters.host_restarts += 1
        self._on_counter("host_restarts", "")
        if isinstance(error, P2PError):
            log.error("libp2p host failed: %s; restarting in %.1fs", error, delay)
        else:
            log.error("libp2p host crashed: %r; restarting in %.1fs", error, delay, exc_info=error)
        self._host_down()
        self._loops = None
        self.pool.forget()  # their connections are gone with the host
        now = trio.current_time()
        for peer in self.table.snapshot(now).peers:
            if not peer.is_self:
                self.table.mark_down(peer.peer_id, now)
                self._abort_peer(peer.peer_id)

    def inject_host_failure(self) -> bool:
        """Test-only fault hook (the fault suite, ``MESHOLLAMA_TEST_FAULTS=1``):
        make the running host fail as a crash inside it would. False if no
        host is running now."""
        if not self._test_faults:
            raise RuntimeError(f"inject_host_failure() needs {TEST_FAULTS_ENV}=1")
        nursery = self._nursery
        if nursery is None or not self._host_ready.is_set():
            return False
        log.warning("injecting a libp2p host failure (%s=1)", TEST_FAULTS_ENV)
        self._host_down()  # failing from now on, as a crash is the moment it happens
        nursery.start_soon(partial(self._watched, _injected_failure))
        return True

    def _spawn(self, fn) -> None:
        # Dials run in the host's nursery so a slow dial never blocks the
        # receive loop, and all of them stop with the host.
        self._nursery.start_soon(_swallow_cancel, fn)

    async def _expiry_loop(self) -> None:
        while True:
            # Every half beat in a table of up to 1,000 peers; a scan costs O(peers), so a
            # larger table is scanned less often (at most every 10 s; ttls are minutes there).
            period = self.settings.heartbeat_interval / 2
            await pace.tick(min(max(period, 10.0), period * max(1.0, len(self.table) / 1000)))
            now = trio.current_time()
            for peer_id in self.table.expire(now):
                self.signed.pop(peer_id, None)
                log.info("peer %s expired (no heartbeat for %d intervals)", peer_id, self.settings.miss_limit)
                self._abort_peer(peer_id)
            self.reach.prune(now)

    async def provide(self, key: str, *, later: bool = False) -> bool:
        """A DHT provider record for ``key`` (hex multihash); False without a host or DHT.
        Paced for every caller together (``providing.Pace``: py-libp2p drops a burst);
        ``later``: after the model names (a blob). An empty DHT table: False at once
        (the record would reach nobody; a later pass says it)."""
        if not self._host_ready.is_set() or self._host is None or not self._host.dht_size():
            return False
        await self._pace.wait(later=later)
        host = self._host
        provide = getattr(host, "provide", None) if self._host_ready.is_set() else None
        return bool(await provide(key)) if provide is not None else False

    def unprovide(self, key: str) -> None:
        """We no longer hold ``key``: stop saying it (``P2PHost.unprovide``)."""
        host = self._host
        unprovide = getattr(host, "unprovide", None) if host is not None else None
        if unprovide is not None:
            unprovide(key)

    async def find_providers(self, key: str) -> list[str]:
        host = self._host
        find = getattr(host, "find_providers", None) if self._host_ready.is_set() else None
        return list(await find(key)) if find is not None else []

    async def open_stream(self, peer_id: str, protocol: str, *, timeout: float | None = None):
        """A stream to an admitted peer on ``protocol`` (dialled if need be); P2PError if not."""
        return await self._open_stream(peer_id, protocol, timeout=timeout)

    async def _open_stream(self, peer_id: str, protocol: str, *, timeout: float | None = None):
        host = self._host
        if host is None or not self._host_ready.is_set():
            # PeerUpstream turns this into UpstreamUnavailable: the gateway tries elsewhere.
            raise P2PError(f"libp2p host is {'restarting' if self._host_state == 'restarting' else 'not running'}")
        budget = timeout or self.settings.connect_timeout
        started = trio.current_time()
        if peer_id not in host.connected_peers():  # one deadline for the dial and the stream open
            await self.reach.reach(host, peer_id, timeout=budget)
        if self.admission is not None and await self.admission.wait(peer_id, budget) is None:
            # Never a request (a prompt, a key) to a peer the mesh has not admitted.
            raise P2PError(f"peer {peer_id} is not admitted to this mesh")
        budget = max(0.5, budget - (trio.current_time() - started))
        return await host.open_stream(peer_id, protocol, timeout=budget)


async def _injected_failure(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
    raise P2PError(f"injected libp2p host failure ({TEST_FAULTS_ENV}=1)")


async def _swallow_cancel(fn) -> None:
    try:
        await fn()
    except trio.Cancelled:
        raise
    except Exception as exc:
        log.debug("background task failed: %r", exc)

"""The mesh service: heartbeats out and in, the peer table, discovery, liveness.

It owns the peer table (pure, ``mesh.peertable``) and drives it from network
events delivered by :class:`~meshollama.p2p.host.P2PHost`:

* publish our announcement every ``heartbeat_interval``, and at once (rate
  limited) when the backend reports a change;
* apply verified announcements from others; an announcement whose signer is
  not the peer it describes, or that does not decode, is dropped and counted;
* a closed connection marks the peer down at once and releases every stream
  waiting on it; a failed liveness ping does the same for a frozen peer;
* peers that miss ``miss_limit`` intervals expire;
* bootstrap addresses are dialled with backoff until they answer, and again
  whenever the connection is lost; peers learned from heartbeats, the DHT
  and mDNS are dialled too, up to ``max_connections``: their announced
  addresses first (only those that end in the announcer's own ``/p2p/`` id
  are kept, the rest dropped and counted), then what the DHT and identify
  know, then relays; a peer no path reaches is ``unreachable`` (not routed
  to) and retried with backoff until one does;
* on shutdown we publish a ``leaving`` announcement so others drop us at once;
* in a closed mesh (``admission``), heartbeats of peers the mesh authority has
  not admitted are dropped, only peers admitted on a live connection are
  routed to (and streams to a peer wait for its admission), peers admitted
  as ``gateway`` are never routed to, and a peer refused or revoked is
  disconnected, marked down and its streams cancelled at once.

The libp2p host is supervised: if it fails, the error is logged and it is
rebuilt with backoff, while the peer table and the HTTP side keep running.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .. import __version__
from ..catalog import LoadInfo, ModelInfo
from ..errors import AnnouncementError, P2PError, StreamReset
from ..p2p import addrs as addrs_mod
from .reach import Reach
from ..p2p.host import Event, HostSettings, P2PHost
from ..p2p.httpstream import PROTOCOL as HTTP_PROTOCOL
from ..p2p.httpstream import HttpStreamServer, PeerScopes, PeerUpstream, StreamPool
from ..p2p.ping import Pinger
from . import announce
from . import liveness
from .peertable import ApplyResult, PeerTable, Snapshot

log = logging.getLogger("meshollama.mesh")

STREAM_ABORT_MISSES = 2  # liveness misses in a row before a peer's streams are cancelled


@dataclass(frozen=True)
class MeshSettings:
    heartbeat_interval: float = 2.0
    miss_limit: int = 3
    liveness_interval: float = 1.0
    liveness_timeout: float = 2.0
    bootstrap: tuple[str, ...] = ()
    bootstrap_retry_max: float = 30.0
    max_connections: int = 64
    dht_refresh_first: float = 10.0
    dht_refresh_every: float = 60.0
    api_url: str = ""
    connect_timeout: float = 10.0  # opening a request stream to a peer (gateway.connect_timeout)
    max_peers: int = 4096  # peer table cap (p2p.max_peers)
    unreachable_retry: float = 5.0  # first retry of a peer no path reached; doubles up to 60 s (mesh.reach)


@dataclass
class MeshCounters:
    """Plain counters, mirrored into Prometheus by the node."""

    heartbeats_sent: int = 0
    heartbeats_received: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    stream_errors: dict[str, int] = field(default_factory=dict)
    inbound_rejected: dict[str, int] = field(default_factory=dict)
    request_streams: dict[str, int] = field(default_factory=dict)  # "opened" / "reused"
    addrs_dropped: dict[str, int] = field(default_factory=dict)  # announced addresses not used, by reason
    host_restarts: int = 0

    @staticmethod
    def bump(d: dict[str, int], key: str) -> None:
        d[key] = d.get(key, 0) + 1


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
        self._host: P2PHost | None = None
        self._host_ready = trio.Event()
        # Sequence numbers start at the wall clock (ns) so a restarted node's
        # heartbeats are never taken for stale ones; I/O code may read it.
        self._seq = time.time_ns()
        self._started_at = trio.current_time()
        self._publish_now = trio.Event()
        self._rng = random.Random()
        self.reach = Reach(self.table, self.self_id, settings.unreachable_retry, settings.max_connections,
                           spawn=lambda fn: self._spawn(fn), rng=self._rng)
        self._addrs: list[str] = []
        self._leaving = False
        self._misses: dict[str, int] = {}
        self._nursery: trio.Nursery | None = None  # the running host's, for background work
        self.admission = admission  # trust.admission.Admission, or None: an open mesh
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
        return Snapshot(tuple(p for p in snap.peers if p.is_self or adm.role(p.peer_id) is not None), snap.taken_at)

    def _refused(self, peer_id: str, why: str) -> None:
        """Admission refused or revoked ``peer_id``: cut it off now."""
        if self.table.mark_down(peer_id, trio.current_time()):
            log.warning("peer %s cut off: %s", peer_id, why)
        self._abort_peer(peer_id)
        host = self._host
        if host is not None and self._nursery is not None:
            self._spawn(lambda: host.disconnect(peer_id))

    def _admitted(self, peer_id: str, role: str) -> None:
        self.request_heartbeat()  # its first heartbeats may have come before the decision

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
        host = self._host
        return {
            "peer_id": self.self_id,
            "version": __version__,
            "p2p_addrs": list(self.addrs),
            "api_url": self.settings.api_url,
            "uptime_seconds": round(trio.current_time() - self._started_at, 3),
            "heartbeat_interval": self.settings.heartbeat_interval,
            "connected_peers": sorted(host.connected_peers()) if host is not None and self._host_ready.is_set() else [],
            "dht_routing_table_size": host.dht_size() if host is not None and self._host_ready.is_set() else 0,
            "heartbeats_sent": self.counters.heartbeats_sent,
            "heartbeats_received": self.counters.heartbeats_received,
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

    # --- running ---------------------------------------------------------------

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled, restarting the libp2p host if it fails."""
        self.table.set_self(self._announcement(), trio.current_time())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expiry_loop)
            backoff = 0.5
            first = True
            while True:
                try:
                    if first:
                        await nursery.start(self._run_host)
                        task_status.started(list(self.addrs))
                        first = False
                        await trio.sleep_forever()
                    else:
                        await self._run_host()
                except P2PError as exc:
                    if first:
                        raise
                    log.error("libp2p host failed: %s; restarting in %.1fs", exc, backoff)
                except Exception as exc:
                    if first:
                        raise
                    log.exception("libp2p host crashed: %r; restarting in %.1fs", exc, backoff)
                self.counters.host_restarts += 1
                self._host_ready = trio.Event()
                self.pool.forget()
                for peer in list(self.table.snapshot(trio.current_time()).peers):
                    if not peer.is_self:
                        self.table.mark_down(peer.peer_id, trio.current_time())
                        self._abort_peer(peer.peer_id)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _run_host(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        host = P2PHost(self.key_pair, self.host_settings, on_junk=lambda peer, why: self._drop("junk_rpc"),
                       on_addrs_changed=self.request_heartbeat, admission=self.admission)
        server = self._http_server_factory(
            lambda reason: self._count("inbound_rejected", reason),
            lambda kind: self._count("stream_errors", kind),
        )
        host.set_handler(HTTP_PROTOCOL, server.handle)
        self._host = host
        self._pinger = Pinger(host.open_stream, timeout=self.settings.liveness_timeout)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._addrs = await nursery.start(host.serve)
                self._host_ready.set()
                self.table.set_self(self._announcement(), trio.current_time())
                nursery.start_soon(self._publish_loop, host)
                nursery.start_soon(self._receive_loop, host)
                nursery.start_soon(self._event_loop, host)
                nursery.start_soon(self._liveness_loop, host)
                for addr in self.settings.bootstrap:
                    nursery.start_soon(self._bootstrap_loop, host, addr)
                if self.host_settings.dht:
                    nursery.start_soon(self._dht_loop, host)
                nursery.start_soon(self.reach.relay_loop, host, min(1.0, self.settings.heartbeat_interval))
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None  # closed: nothing more may be spawned into it

    async def leave(self, timeout: float = 1.0) -> None:
        """Tell the mesh we are leaving (before shutdown), so peers drop us at once."""
        host = self._host
        if host is None or not self._host_ready.is_set():
            return
        self._leaving = True
        with trio.move_on_after(timeout):
            try:
                await host.publish(announce.encode(self._announcement(leaving=True)))
                # Give pubsub a moment to flush it before connections close.
                await trio.sleep(min(0.2, timeout / 2))
            except Exception as exc:
                log.debug("could not publish leave: %r", exc)

    # --- heartbeats --------------------------------------------------------------

    def _announcement(self, *, leaving: bool = False) -> announce.Announcement:
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
            )
        )

    def request_heartbeat(self) -> None:
        self._publish_now.set()

    async def _publish_loop(self, host: P2PHost) -> None:
        interval = self.settings.heartbeat_interval
        min_gap = min(interval, 0.25)  # rate limit for change-triggered heartbeats
        changed = self._changed()
        async with trio.open_nursery() as nursery:

            async def watch_backend() -> None:
                nonlocal changed
                while True:
                    await changed.wait()
                    changed = self._changed()
                    self._publish_now.set()

            nursery.start_soon(watch_backend)
            while True:
                if self._leaving:
                    return
                ann = self._announcement()
                self.table.set_self(ann, trio.current_time())
                try:
                    await host.publish(announce.encode(ann))
                    self.counters.heartbeats_sent += 1
                    self._on_counter("heartbeats_sent", "")
                except P2PError as exc:
                    log.debug("heartbeat publish failed: %s", exc)
                except Exception as exc:
                    log.warning("heartbeat publish failed: %r", exc)
                last = trio.current_time()
                self._publish_now = trio.Event()
                with trio.move_on_after(interval):
                    await self._publish_now.wait()
                gap = trio.current_time() - last
                if gap < min_gap:
                    await trio.sleep(min_gap - gap)

    async def _receive_loop(self, host: P2PHost) -> None:
        while True:
            msg = await host.next_message()
            try:
                ann = announce.decode(msg.data)
            except AnnouncementError as exc:
                log.debug("dropping heartbeat from %s: %s", msg.from_peer, exc)
                self._drop("malformed")
                continue
            if ann.peer_id != msg.from_peer:
                # Signed by one peer, describing another: forged. Drop.
                self._drop("signer_mismatch")
                continue
            if self.admission is not None:
                role = self.admission.known_role(ann.peer_id)
                if role is None:  # not admitted (or revoked): it does not exist for us
                    self._drop("not_admitted")
                    continue
                if role == "gateway" and ann.models:  # sends requests, never serves them
                    ann = dataclasses.replace(ann, models=())
            checked = addrs_mod.check_announced(ann.addrs, ann.peer_id)
            if checked.dropped:
                self._count_n("addrs_dropped", "foreign_or_invalid", checked.dropped)
            if checked.trimmed:
                self._count_n("addrs_dropped", "over_limit", checked.trimmed)
            if checked.kept != ann.addrs:
                ann = dataclasses.replace(ann, addrs=checked.kept)
            now = trio.current_time()
            result = self.table.apply(ann, now)
            if result is ApplyResult.STALE:
                self._drop("stale")
                continue
            if result is ApplyResult.FULL:  # the table is at p2p.max_peers: a flood of new ids
                self._drop("table_full")
                continue
            if result is ApplyResult.SELF:
                continue
            self.counters.heartbeats_received += 1
            self._on_counter("heartbeats_received", "")
            if result is ApplyResult.LEFT:
                log.info("peer %s left the mesh", ann.peer_id)
                self._abort_peer(ann.peer_id)
                continue
            if result is ApplyResult.NEW:
                log.info("peer %s joined with %d model(s)", ann.peer_id, len(ann.models))
            if ann.peer_id not in host.connected_peers():
                self.reach.maybe_dial(host, ann.peer_id, ann.addrs)

    def _drop(self, reason: str) -> None:
        MeshCounters.bump(self.counters.dropped, reason)
        self._on_counter("heartbeats_dropped", reason)

    def _count(self, what: str, label: str) -> None:
        MeshCounters.bump(getattr(self.counters, what), label)
        self._on_counter(what, label)

    def _count_n(self, what: str, label: str, n: int) -> None:
        for _ in range(n):
            self._count(what, label)

    # --- connections -------------------------------------------------------------

    async def _event_loop(self, host: P2PHost) -> None:
        async with trio.open_nursery() as nursery:
            async for event in host.events:
                self._on_event(host, event, nursery)

    def _on_event(self, host: P2PHost, event: Event, nursery: trio.Nursery) -> None:
        now = trio.current_time()
        if event.kind == "disconnected":
            if event.peer_id not in host.connected_peers():
                if self.table.mark_down(event.peer_id, now):
                    log.info("peer %s disconnected", event.peer_id)
                self._abort_peer(event.peer_id)
                self._misses.pop(event.peer_id, None)
                nursery.start_soon(self._pinger.forget, event.peer_id)
        elif event.kind == "connected":
            self.reach.connected(event.peer_id)
            if self.table.mark_up(event.peer_id, now):
                log.info("peer %s reachable", event.peer_id)
            self.request_heartbeat()  # let the new peer learn about us now
        elif event.kind == "discovered":
            self.reach.maybe_dial(host, event.peer_id, event.addrs)

    def _spawn(self, fn) -> None:
        # Dials run in the host's nursery so a slow dial never blocks the
        # receive loop, and all of them stop with the host.
        self._nursery.start_soon(_swallow_cancel, fn)

    async def _bootstrap_loop(self, host: P2PHost, addr: str) -> None:
        """Dial a bootstrap peer until it answers; re-dial whenever it is lost."""
        backoff = 0.25
        target = addr.rsplit("/p2p/", 1)[-1]
        while True:
            if target in host.connected_peers():
                backoff = 0.25
                await trio.sleep(self.settings.heartbeat_interval)
                continue
            try:
                await host.connect([addr])
                # In a closed mesh a connection counts once both sides admit each
                # other: one cut right after the handshake must not end the back-off,
                # or a node not yet admitted would redial in a tight loop.
                admitted = self.admission is None or await self.admission.wait(target) is not None
                if admitted and target in host.connected_peers():
                    log.info("connected to bootstrap peer %s", target)
                    backoff = 0.25
                    continue
                log.info("bootstrap peer %s closed the connection (not admitted?); retry in %.1fs", target, backoff)
            except P2PError as exc:
                log.debug("bootstrap %s not reachable (%s); retry in %.1fs", addr, exc, backoff)
            await trio.sleep(backoff * (0.5 + self._rng.random()))
            backoff = min(backoff * 2, self.settings.bootstrap_retry_max)

    async def _dht_loop(self, host: P2PHost) -> None:
        await trio.sleep(min(self.settings.dht_refresh_first, 2 * self.settings.heartbeat_interval))
        delay = self.settings.dht_refresh_first
        while True:
            for peer_id, addrs in await host.dht_refresh():
                if peer_id not in host.connected_peers():
                    self.reach.maybe_dial(host, peer_id, addrs)
            await trio.sleep(delay)
            delay = self.settings.dht_refresh_every

    async def _liveness_loop(self, host: P2PHost) -> None:
        """Ping, each interval, the peers :func:`liveness.peers_to_ping` picks:
        those our callers wait on every round, idle ones every few rounds."""
        round_no = 0
        async with trio.open_nursery() as nursery:
            while True:
                snap = self.table.snapshot(trio.current_time())
                for pid in liveness.peers_to_ping(
                    snap,
                    host.connected_peers(),
                    round_no,
                    urgent=lambda p: p in self._misses or self.scopes.count(p) > 0,
                    busy=self._pinger.busy,
                ):
                    nursery.start_soon(self._check, pid)
                round_no += 1
                await trio.sleep(self.settings.liveness_interval)

    async def _check(self, peer_id: str) -> None:
        """One liveness ping. A miss stops new requests to the peer at once;
        its in-flight streams are cancelled only after ``STREAM_ABORT_MISSES``
        misses in a row, so a peer that is merely slow to answer (a loaded
        2-core box) does not lose the generations it is streaming."""
        try:
            try:
                await self._pinger.ping(peer_id)
            except StreamReset:
                # The kept stream's connection closed under it while the peer is
                # still connected by another (a relayed connection gone after hole
                # punching moved us to a direct one): one more try on a fresh stream.
                host = self._host
                if host is None or peer_id not in host.connected_peers():
                    raise
                await self._pinger.ping(peer_id)
            missed = self._misses.pop(peer_id, None)
            if self.table.mark_up(peer_id, trio.current_time()) and missed:
                # Slow, not gone (a CPU-starved box): route to it again now rather
                # than after its next heartbeat; expiry still needs fresh ones.
                log.info("peer %s answers its liveness check again: alive", peer_id)
        except P2PError as exc:
            misses = self._misses.get(peer_id, 0) + 1
            self._misses[peer_id] = misses
            if self.table.mark_down(peer_id, trio.current_time()):
                log.warning("peer %s failed its liveness check (%s): marked down", peer_id, exc)
            if misses >= STREAM_ABORT_MISSES:
                self._abort_peer(peer_id)

    async def _expiry_loop(self) -> None:
        while True:
            await trio.sleep(self.settings.heartbeat_interval / 2)
            now = trio.current_time()
            for peer_id in self.table.expire(now):
                log.info("peer %s expired (no heartbeat for %d intervals)", peer_id, self.settings.miss_limit)
                self._abort_peer(peer_id)
            self.reach.prune(now)

    async def _open_stream(self, peer_id: str, protocol: str, *, timeout: float | None = None):
        host = self._host
        if host is None or not self._host_ready.is_set():
            raise P2PError("libp2p host is not running")
        budget = timeout or self.settings.connect_timeout
        started = trio.current_time()
        if peer_id not in host.connected_peers():  # one deadline for the dial and the stream open
            await self.reach.reach(host, peer_id, timeout=budget)
        if self.admission is not None and await self.admission.wait(peer_id, budget) is None:
            # Never a request (a prompt, a key) to a peer the mesh has not admitted.
            raise P2PError(f"peer {peer_id} is not admitted to this mesh")
        budget = max(0.5, budget - (trio.current_time() - started))
        return await host.open_stream(peer_id, protocol, timeout=budget)


async def _swallow_cancel(fn) -> None:
    try:
        await fn()
    except trio.Cancelled:
        raise
    except Exception as exc:
        log.debug("background task failed: %r", exc)

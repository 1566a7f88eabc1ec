"""What runs on one libp2p host, for as long as that host lives.

The mesh service builds a :class:`HostLoops` for every host it starts and
runs :meth:`HostLoops.run` in the host's nursery, so a failure of any loop
is a failure of the host (``mesh.supervisor`` rebuilds both):

* announce ourselves when there is news (``mesh.cadence``: a catalog change
  or a request at once, a meaningful load change at most every
  ``heartbeat_interval``, otherwise one refresh per ``refresh_interval``);
* apply verified heartbeats from others to the peer table, dropping and
  counting the malformed, the forged, the stale and those of peers a closed
  mesh has not admitted; of the addresses a peer announces only those that
  end in its own ``/p2p/`` id are kept (the rest are counted), and a peer
  heard of but not connected is dialled (``mesh.reach``);
* connection events: a closed connection marks the peer down and releases
  its streams; discovered peers are dialled (``mesh.reach``);
* dial bootstrap peers with backoff (0.25 s doubling to
  ``bootstrap_retry_max``, jittered by 0.5 to 1.5) until they answer, and
  again whenever the connection is lost;
* ask the DHT for peers now and then;
* after a restart, dial the peers the table still holds (:meth:`HostLoops.rejoin`);
* liveness pings (``mesh.liveness`` picks whom: in a large mesh only peers
  with requests of ours in flight or lately); a miss marks the peer down,
  ``STREAM_ABORT_MISSES`` in a row cancel its streams.

State that outlives a host (the peer table, sequence numbers, counters, the
draining flag) is the service's; what dies with the host (ping streams,
liveness misses, which peers we used lately) is kept here. This is the
service's own internals, split out by role, so it reads the service's state
directly.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from .. import pace
from ..errors import P2PError, StreamReset
from ..p2p.events import Event
from ..p2p.ping import Pinger, PingTimeout
from . import announce, bootstrap_url, liveness, sync
from .cadence import MIN_GAP, AnnouncePolicy, Cadence, Reason, refresh_for
from .hearing import Hearing
from .hints import DownHints
from .peertable import Snapshot
from .settings import MeshCounters
from .transport import Transport

if TYPE_CHECKING:
    from .service import MeshService

log = logging.getLogger("meshollama.mesh")

STREAM_ABORT_MISSES = 2  # liveness misses in a row before a peer's streams are cancelled
SUSPECT_MISSES = 2  # misses in a row before an idle, connected peer is marked down (one with our requests: 1)
POLL = 1.0  # seconds (on the shared ticks: 0.5 to 1.5) between looks at our load (our gateway's queue)
BOOTSTRAP_FIRST_RETRY = 0.25


class HostLoops(Hearing):
    def __init__(self, mesh: MeshService, host: Transport) -> None:
        self.mesh = mesh
        self.host = host
        self.settings = mesh.settings
        self.table = mesh.table
        self.pinger = Pinger(host.open_stream, timeout=mesh.settings.liveness_timeout)
        self.misses: dict[str, int] = {}  # peer -> liveness misses in a row
        self.health = liveness.LocalHealth()  # how far to trust our own ping timeouts (Lifeguard)
        self.used: dict[str, float] = {}  # peer -> when a request of ours to it was last seen in flight
        beat = self.settings.heartbeat_interval
        self.legacy_cadence = Cadence(refresh=beat, load_gap=beat, load_silence=beat, min_gap=min(beat, MIN_GAP))
        self._cadence: tuple[tuple[float, bool], Cadence] | None = None  # ((refresh, announce_load), cadence)
        self.policy = AnnouncePolicy(self.cadence_now())
        self.last_pull: float | None = None  # when we last pulled a peer's table (mesh.sync)
        self.hellos: set[str] = set()  # peers a hello of ours is in flight to (mesh.sync)
        self.hints = DownHints()  # peers we and others saw go down (mesh.hints)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run every loop until one fails (or we are cancelled with the host)."""
        self.rejoin()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.publish_loop)
            nursery.start_soon(self.receive_loop)
            nursery.start_soon(self.event_loop)
            nursery.start_soon(self.liveness_loop)
            for addr in self.settings.bootstrap:
                nursery.start_soon(self.bootstrap_loop, addr)
            if self.mesh.host_settings.dht:
                nursery.start_soon(self.dht_loop)
            nursery.start_soon(self.mesh.reach.relay_loop, self.host, min(1.0, self.settings.heartbeat_interval))
            task_status.started()

    def rejoin(self) -> None:
        """Dial the peers the table still holds: after a restart they are down,
        their connections gone with the old host, and a peer that only ever
        dialled us would otherwise wait for its bootstrap loop or gossip to
        find us again (at most ``mesh.reach.MAX_DIALS`` at once; gossip from
        those brings the rest)."""
        for peer in self.table.snapshot(trio.current_time()).peers:
            if not peer.is_self:
                self.mesh.reach.maybe_dial(self.host, peer.peer_id, peer.addrs, wait="now")

    # --- heartbeats ----------------------------------------------------------------

    async def publish_loop(self) -> None:
        """Announce when :class:`~meshollama.mesh.cadence.AnnouncePolicy` says so: a
        catalog change or a forced one at once, a meaningful load change at most
        every heartbeat interval, otherwise one refresh per ``refresh_interval``.
        The loop looks when the backend reports a change (a model, a slot taken:
        only what the policy judges news goes out), when an announcement is
        forced (addresses, draining, a refutation), at the policy's next
        deadline, and about every :data:`POLL` (on the shared ticks) (our gateway's queue has no
        notice). While the table holds a peer of an older version (it expires
        peers after a few of *its* heartbeat intervals), we keep that cadence.
        A first gossip neighbour forces one: an announcement published before
        any peer's subscription reached us went nowhere. A failed publish
        changes nothing the policy knows; it is tried again after a heartbeat
        interval."""
        mesh = self.mesh
        woken = [trio.Event()]  # the backend reported a change since we last looked

        async def watch_backend() -> None:
            while True:
                await mesh._changed().wait()
                woken[0].set()

        def wake() -> None:
            woken[0].set()

        mesh._wake_publisher = wake  # request_heartbeat wakes the same event: one thing to wait on
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_backend)
                await self._announce_when_due(woken)
                nursery.cancel_scope.cancel()
        finally:
            if mesh._wake_publisher is wake:
                mesh._wake_publisher = None

    async def _announce_when_due(self, woken: list[trio.Event]) -> None:
        mesh, policy = self.mesh, self.policy
        had_neighbours = force = False
        while not mesh._leaving:
            woken[0] = trio.Event()  # before looking: a notice from here on wakes the next wait
            now = trio.current_time()
            neighbours = self.host_topic_peers() > 0
            force = force or mesh._publish_now.is_set() or (neighbours and not had_neighbours)
            had_neighbours = neighbours
            policy.cadence = self.cadence_now()
            catalog, load = mesh.catalog(), mesh._load()
            reason = policy.decide(now, catalog, load, forced=force)
            if reason is not None:
                # A fresh event before the announcement is built: a request made while
                # this one is being published (set_draining) gets its own announcement.
                mesh._publish_now = trio.Event()
                refresh = policy.refresh_to_say()
                if await self.publish(mesh.announcement(), reason):
                    force = False
                    policy.sent(now, catalog, load, reason, refresh=refresh)
                else:
                    mesh._publish_now.set()  # still to say
                    await trio.sleep(policy.cadence.load_gap)
                    continue
            # Never a zero wait when nothing went out: a deadline the policy did not act on
            # must not spin the loop (min_gap keeps the floor above zero).
            now = trio.current_time()
            wait = POLL if reason is not None else max(policy.cadence.min_gap / 4, policy.next_check(now))
            # The POLL look falls on the ticks of the other loops (meshollama.pace): one wake-up, not two.
            deadline = now + wait if wait < POLL else min(pace.next_tick(now, POLL), now + wait)
            with trio.move_on_at(deadline):
                if not mesh._publish_now.is_set():
                    await woken[0].wait()
            await trio.sleep(max(0.0, (policy.last_at or 0.0) + policy.cadence.min_gap - trio.current_time()))

    def cadence_now(self) -> Cadence:
        """The configured cadence with the refresh for the mesh's size now
        (:func:`~meshollama.mesh.cadence.refresh_for`), or the old one (a full
        announcement every heartbeat interval) while an older node that would
        expire us otherwise is in the table."""
        if self.table.legacy_peers:
            return self.legacy_cadence
        st = self.settings
        beat = st.heartbeat_interval
        refresh = max(beat, refresh_for(len(self.table), floor=st.refresh_interval, per_peer=st.refresh_per_peer,
                                        ceiling=announce.MAX_REFRESH_MS / 1000))
        cached = self._cadence
        announce_load = self.mesh.announces_load()
        if cached is None or cached[0] != (refresh, announce_load):
            cadence = Cadence(refresh=refresh, load_gap=beat, load_silence=max(beat, st.load_max_silence),
                              min_gap=min(beat, MIN_GAP), announce_load=announce_load, jitter=st.refresh_jitter)
            cached = self._cadence = ((refresh, announce_load), cadence)
        return cached[1]

    def host_topic_peers(self) -> int:
        count = getattr(self.host, "topic_peers", None)
        return count() if count is not None else 1

    async def publish(self, ann: announce.Announcement, reason: Reason) -> bool:
        """Publish ``ann``; False if it did not go out."""
        mesh = self.mesh
        self.table.set_self(ann, trio.current_time())
        try:
            await self.host.publish(announce.encode(ann))
        except P2PError as exc:
            log.debug("heartbeat publish failed: %s", exc)
            return False
        except Exception as exc:
            log.warning("heartbeat publish failed: %r", exc)
            return False
        mesh.counters.heartbeats_sent += 1
        MeshCounters.bump(mesh.counters.announced, reason.value)
        mesh._on_counter("heartbeats_sent", reason.value)
        return True

    # --- connections -------------------------------------------------------------

    async def event_loop(self) -> None:
        async with trio.open_nursery() as nursery:
            async for event in self.host.events:
                self.on_event(event, nursery)

    def on_event(self, event: Event, nursery: trio.Nursery) -> None:
        now = trio.current_time()
        host = self.host
        if event.kind == "disconnected":
            if event.peer_id not in host.connected_peers():
                if self.table.mark_down(event.peer_id, now):
                    log.info("peer %s disconnected", event.peer_id)
                    self.suspect(event.peer_id)
                self.mesh._abort_peer(event.peer_id)
                self.misses.pop(event.peer_id, None)
                self.used.pop(event.peer_id, None)
                nursery.start_soon(self.pinger.forget, event.peer_id)
        elif event.kind == "connected":
            self.mesh.reach.connected(event.peer_id)
            self.hints.ours.pop(event.peer_id, None)  # it is back: no longer say it is down
            if self.table.mark_up(event.peer_id, now):
                log.info("peer %s reachable", event.peer_id)
            # A new connection: learn the mesh from it and tell it about us in one round
            # trip (mesh.sync), instead of an announcement to the whole mesh each time.
            if self.last_pull is None or now - self.last_pull >= sync.PULL_EVERY:
                self.last_pull = now
                nursery.start_soon(self.sync_with, event.peer_id)
            elif self.table.get(event.peer_id) is None:
                # A peer we have not heard of (a node starting now): ask it directly;
                # its announcement may be hops of gossip away.
                nursery.start_soon(self.hello, event.peer_id)
        elif event.kind == "discovered":
            self.mesh.reach.maybe_dial(host, event.peer_id, event.addrs)

    async def bootstrap_loop(self, addr: str) -> None:
        """Dial a bootstrap peer until it answers; re-dial whenever it is lost."""
        host, admission, rng = self.host, self.mesh.admission, self.mesh._rng
        backoff = BOOTSTRAP_FIRST_RETRY
        by_url = bootstrap_url.is_url(addr)
        target = "" if by_url else addr.rsplit("/p2p/", 1)[-1]
        while True:
            if target and target in host.connected_peers():
                backoff = BOOTSTRAP_FIRST_RETRY
                await pace.tick(self.settings.heartbeat_interval)
                continue
            try:
                dial = [addr]
                if by_url:  # asked again at every attempt: a rebuilt pod comes back with a new id
                    target, dial = await bootstrap_url.resolve(addr)
                    if target == self.mesh.self_id:
                        # Every pod of a StatefulSet may name pod 0; a load-balanced name may
                        # lead elsewhere next time: ask again, slowly.
                        if addr not in self.mesh.bootstrap_self:
                            log.info("bootstrap %s is this node; not dialling it", addr)
                        self.mesh.bootstrap_self.add(addr)
                        await trio.sleep(self.settings.bootstrap_retry_max)
                        continue
                    self.mesh.bootstrap_self.discard(addr)
                    if target in host.connected_peers():
                        continue
                await host.connect(dial)
                # In a closed mesh a connection counts once both sides admit each
                # other: one cut right after the handshake must not end the back-off,
                # or a node not yet admitted would redial in a tight loop.
                admitted = admission is None or await admission.wait(target) is not None
                if admitted and target in host.connected_peers():
                    log.info("connected to bootstrap peer %s", target)
                    backoff = BOOTSTRAP_FIRST_RETRY
                    continue
                log.info("bootstrap peer %s closed the connection (not admitted?); retry in %.1fs", target, backoff)
            except P2PError as exc:
                log.debug("bootstrap %s not reachable (%s); retry in %.1fs", addr, exc, backoff)
            except Exception as exc:  # a stranger's answer must never take the host down
                log.warning("bootstrap %s: unexpected %s: %s; retry in %.1fs", addr, type(exc).__name__, exc, backoff)
            await trio.sleep(backoff * (0.5 + rng.random()))
            backoff = min(backoff * 2, self.settings.bootstrap_retry_max)

    async def dht_loop(self) -> None:
        """Walk the DHT towards our own id and dial the peers it names that we are
        not connected to: soon after start, again ``dht_refresh_first`` later, then
        every ``dht_refresh_every``. A walk asks every peer near us (in a mesh of
        25, all 24 others, each a new stream at both ends): when it finds nobody
        new and we lost no connection since the last one, the next waits twice as
        long, up to ``dht_refresh_max``; news (a peer to dial, a lost connection)
        brings the wait back to ``dht_refresh_every``. While we are connected to
        every peer the table holds, walks are skipped (quiet), but one still runs
        at least every ``dht_refresh_max`` (a stale entry in a neighbour's table is
        how a walk heals a split); the first is never skipped."""
        st = self.settings
        await trio.sleep(min(st.dht_refresh_first, 2 * st.heartbeat_interval))
        delay: float | None = None
        connected_before: set[str] = set()
        ceiling = max(st.dht_refresh_max, st.dht_refresh_every)
        last_walk = -ceiling
        while True:
            news = False
            now = trio.current_time()
            # Connected to every peer we know of: a walk would only name them again
            # (it goes through their routing tables). Skip it, as a quiet one, unless
            # the last real walk is a ceiling ago.
            if delay is None or now - last_walk >= ceiling or not self.knows_only_connected():
                last_walk = now
                for peer_id, addrs in await self.host.dht_refresh():
                    if peer_id not in self.host.connected_peers():
                        news = True
                        # One-sided (it has likely not heard of us): no point waiting.
                        self.mesh.reach.maybe_dial(self.host, peer_id, addrs, wait="now")
            connected = set(self.host.connected_peers())
            news = news or bool(connected_before - connected)  # a connection lost (another may have come)
            connected_before = connected
            if delay is None:
                delay = st.dht_refresh_first
            elif news or delay < st.dht_refresh_every:
                delay = st.dht_refresh_every
            else:
                delay = min(delay * 2, ceiling)
            await trio.sleep(min(delay, max(0.01, last_walk + ceiling - trio.current_time())))

    def knows_only_connected(self) -> bool:
        """Whether the table holds another peer, and we are connected to every one it holds."""
        connected = self.host.connected_peers()
        others = [p.peer_id for p in self.table.snapshot(trio.current_time()).peers if not p.is_self]
        return bool(others) and all(p in connected for p in others)

    # --- liveness ----------------------------------------------------------------

    async def liveness_loop(self) -> None:
        """Ping, each interval, the peers :func:`liveness.peers_to_ping` picks:
        those our callers wait on every round, idle ones every few rounds (in
        a mesh above ``liveness_ping_all_up_to`` peers, only those we used
        within ``liveness_recent`` seconds)."""
        round_no = 0
        scopes = self.mesh.scopes
        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                snap = self.table.snapshot(now)
                self.note_used(snap, now)
                for pid in scopes.active():
                    # A request began while its peer's (stretched) idle ping was in flight:
                    # its callers get the plain timeout, counted from that ping's start.
                    self.pinger.hurry(pid, self.settings.liveness_timeout)
                for pid in liveness.peers_to_ping(
                    snap,
                    self.host.connected_peers(),
                    round_no,
                    urgent=lambda p: p in self.misses or scopes.count(p) > 0,
                    busy=self.pinger.busy,
                    recent=self.used.__contains__,
                    ping_all_up_to=self.settings.liveness_ping_all_up_to,
                    focus=[*self.misses, *scopes.active(), *self.used],
                ):
                    nursery.start_soon(self.check, pid)
                round_no += 1
                await pace.tick(self.settings.liveness_interval)

    def note_used(self, snap: Snapshot, now: float) -> None:
        """Remember the peers we had requests with since the last round (in flight
        now, or begun and ended in between: short requests count too), and forget
        those idle for more than ``liveness_recent``."""
        for peer_id in self.mesh.scopes.take_used():
            if snap.get(peer_id) is not None:
                self.used[peer_id] = now
        keep = self.settings.liveness_recent
        self.used = {p: t for p, t in self.used.items() if now - t <= keep}

    async def check(self, peer_id: str) -> None:
        """One liveness ping. A miss stops new requests to the peer at once;
        its in-flight streams are cancelled only after ``STREAM_ABORT_MISSES``
        misses in a row, so a peer that is merely slow to answer (a loaded
        2-core box) does not lose the generations it is streaming. A peer
        nobody waits on gets a timeout that grows while our pings time out all
        around (:class:`liveness.LocalHealth`): it only needs to be judged right,
        while one with our requests in flight must release its callers fast (a
        request that begins during the longer ping cuts it short: ``liveness_loop``)."""
        health = self.health
        base = self.settings.liveness_timeout
        idle = self.mesh.scopes.count(peer_id) == 0
        timeout = health.timeout(base, trio.current_time()) if idle else base
        try:
            try:
                await self.pinger.ping(peer_id, timeout=timeout)
            except StreamReset:
                # The kept stream's connection closed under it while the peer is
                # still connected by another (a relayed connection gone after hole
                # punching moved us to a direct one): one more try on a fresh stream.
                if peer_id not in self.host.connected_peers():
                    raise
                await self.pinger.ping(peer_id, timeout=timeout)
            health.answered(trio.current_time())
            missed = self.misses.pop(peer_id, None)
            if self.table.mark_up(peer_id, trio.current_time()) and missed:
                # Slow, not gone (a CPU-starved box): route to it again now rather
                # than after its next heartbeat; expiry still needs fresh ones.
                log.info("peer %s answers its liveness check again: alive", peer_id)
        except P2PError as exc:
            if isinstance(exc, PingTimeout) and peer_id not in self.misses:
                # Only a streak's first miss: a frozen peer pinged every round until it
                # expires would otherwise keep stretching every other peer's timeout.
                health.missed(trio.current_time())
            misses = self.misses.get(peer_id, 0) + 1
            self.misses[peer_id] = misses
            if misses < SUSPECT_MISSES and self.mesh.scopes.count(peer_id) == 0 \
                    and peer_id in self.host.connected_peers():
                # No request of ours waits on it and its connection is up: suspected, not
                # down yet (SWIM). The miss makes it urgent, so the next round decides.
                # A starting node on a saturated box answers late for a few seconds; each
                # false "down" held convergence at N=25 back by a ping round trip or more.
                log.debug("peer %s missed a liveness ping (%s): suspected, asked again", peer_id, exc)
                return
            if self.table.mark_down(peer_id, trio.current_time()):
                log.warning("peer %s failed its liveness check (%s): marked down", peer_id, exc)
                self.suspect(peer_id)
            if misses >= STREAM_ABORT_MISSES:
                self.mesh._abort_peer(peer_id)

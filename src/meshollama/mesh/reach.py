"""Reaching peers: dialling them by every path we know, backing off from the
ones no path reaches, and holding relay reservations when we are behind NAT.

The mesh service hears of peers (heartbeats, mDNS, the DHT) and asks
:meth:`Reach.maybe_dial`; a request for a peer we are not connected to waits
on :meth:`Reach.reach`. What is dialled, and in which order, is
``p2p.addrs.dial_plan``'s decision; this module owns the state around it:
which dials are in flight (at most :data:`MAX_DIALS`), and when a peer that
no path reached may be tried again (5 s doubling to 60 s, with jitter).
Of two peers that hear of each other, one dials at once and the other waits
:data:`DIAL_DEFER` first (see there for which).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import trio

from .. import pace
from ..errors import P2PError
from ..p2p import addrs as addrs_mod
from .peertable import PeerTable
from .transport import Transport

log = logging.getLogger("meshollama.mesh")

MAX_DIALS = 16  # dials in flight at once: mDNS and gossip can name peers by the thousand
# Two nodes that hear of each other at once (a joiner that pulled a table and the
# peers that hear its first announcement; two mDNS neighbours) both dialled: at N=25
# started together, 1,042 TCP connections instead of 600, every pair's handshake,
# identify and DHT setup done twice, on 2 cores already saturated by 25 starts. Now
# one side dials at once and the other waits DIAL_DEFER (plus up to half again), then
# dials only if no connection came, so a peer that cannot dial us is still reached:
# - a peer named by a table we pulled is dialled at once ("now"): we are the joiner,
#   and the peers that hear of us by gossip wait ("always");
# - of two mDNS neighbours, the lower id dials and the higher waits ("higher");
# - a restart's rejoin and a DHT walk's finds dial at once (nobody is about to dial us).
# Behind NAT we never wait: nobody can dial us directly, and the other side's dial
# would only come through a relay, leaving the pair on a relayed connection where our
# own dial to its public address makes a direct one.
DIAL_DEFER = 2.0
MAX_DEFERRED = 256
MAX_BACKOFF = 60.0
MAX_CANDIDATES = 64  # addresses of one peer we consider (announced, DHT, identify)


class Reach:
    def __init__(self, table: PeerTable, self_id: str, first_retry: float, max_connections: int, *,
                 spawn: Callable[[Callable], None], rng: random.Random) -> None:
        self.table = table
        self.self_id = self_id
        self.first_retry = first_retry
        self.max_connections = max_connections
        self._spawn = spawn
        self._rng = rng
        self.dialing: set[str] = set()
        self.deferred: set[str] = set()  # peers we wait for to dial us
        self._inflight: dict[str, trio.Event] = {}  # peer -> set when the dial in progress ends
        self.retry: dict[str, tuple[float, float]] = {}  # unreachable peer -> (next try, backoff)

    def maybe_dial(self, host: Transport, peer_id: str, addrs: tuple[str, ...], *, wait: str = "higher") -> None:
        """Dial a peer we heard of, in the background, unless that is pointless now.
        ``wait`` says who waits ``DIAL_DEFER`` for the other to dial first: ``"now"``
        nobody, ``"higher"`` the higher peer id, ``"always"`` we do (the module's notes)."""
        if peer_id == self.self_id or peer_id in self.dialing or len(self.dialing) >= MAX_DIALS:
            return
        if len(host.connected_peers()) >= self.max_connections:
            return
        retry = self.retry.get(peer_id)
        if retry is not None and trio.current_time() < retry[0]:
            return  # unreachable a moment ago: wait for the backoff
        waits = wait == "always" or (wait == "higher" and peer_id < self.self_id)
        if waits and not _behind_nat(host) and self._defer(host, peer_id, addrs):
            return
        self.dialing.add(peer_id)

        async def dial() -> None:
            try:
                await self.reach(host, peer_id, addrs)
            except P2PError as exc:
                log.debug("dial %s failed: %s", peer_id, exc)
            finally:
                self.dialing.discard(peer_id)

        self._spawn(dial)

    def _defer(self, host: Transport, peer_id: str, addrs: tuple[str, ...]) -> bool:
        """Wait for the peer to dial us, then dial if it did not. False when no
        wait can be held (at ``MAX_DEFERRED``): then we dial now, as before."""
        if peer_id in self.deferred:
            return True
        if len(self.deferred) >= MAX_DEFERRED:
            return False
        self.deferred.add(peer_id)
        wait = DIAL_DEFER * (1 + 0.5 * self._rng.random())

        async def later() -> None:
            try:
                await trio.sleep(wait)
            finally:
                self.deferred.discard(peer_id)
            if peer_id not in host.connected_peers():
                self.maybe_dial(host, peer_id, addrs, wait="now")

        self._spawn(later)
        return True

    async def reach(self, host: Transport, peer_id: str, addrs: tuple[str, ...] = (), *,
                    timeout: float | None = None) -> None:
        """Connect to a peer by every path we know: the addresses given (its
        announcement, mDNS), then those the DHT and identify stored, relays
        last (``addrs.dial_plan`` orders them). If none works the peer is
        marked unreachable, so routing skips it, and retried with backoff.
        Concurrent calls for one peer (fifty requests for a model on a peer
        that just dropped) share one dial."""
        running = self._inflight.get(peer_id)
        if running is not None:
            started = trio.current_time()
            with trio.move_on_after(timeout if timeout is not None else MAX_BACKOFF):
                await running.wait()
            if peer_id in host.connected_peers():
                return
            left = None if timeout is None else timeout - (trio.current_time() - started)
            if peer_id in self._inflight or (left is not None and left < 0.5):
                raise P2PError(f"cannot reach {peer_id} (another dial to it just failed or is still running)")
            # That dial failed, but it began with the addresses known then: a relay
            # address announced since (a peer behind NAT just got its reservation)
            # may work. One more try with what we know now, in the time left.
            timeout = left
        done = self._inflight[peer_id] = trio.Event()
        try:
            await self._reach(host, peer_id, addrs, timeout=timeout)
        finally:
            del self._inflight[peer_id]
            done.set()

    async def _reach(self, host: Transport, peer_id: str, addrs: tuple[str, ...], *, timeout: float | None) -> None:
        view = self.table.snapshot(trio.current_time()).get(peer_id)
        announced = tuple(addrs) + (view.addrs if view is not None else ())
        candidates = list(dict.fromkeys([*announced, *host.known_addrs(peer_id)]))
        candidates = list(addrs_mod.check_announced(candidates, peer_id, limit=MAX_CANDIDATES).kept)
        try:
            if not candidates:
                raise P2PError(f"no address known for {peer_id}")
            await host.connect(candidates, timeout=timeout)
        except P2PError:
            if peer_id in host.connected_peers():
                return  # it dialled us while we tried: reached after all
            now = trio.current_time()
            backoff = min(self.retry.get(peer_id, (0.0, self.first_retry / 2))[1] * 2, MAX_BACKOFF)
            self.retry[peer_id] = (now + backoff * (0.75 + self._rng.random() / 2), backoff)
            if self.table.mark_unreachable(peer_id, now):
                log.info("peer %s unreachable by any path (%d address(es)); retrying in %.0fs",
                         peer_id, len(candidates), backoff)
            raise
        self.retry.pop(peer_id, None)
        self.table.mark_up(peer_id, trio.current_time())

    def connected(self, peer_id: str) -> None:
        self.retry.pop(peer_id, None)

    def prune(self, now: float) -> None:
        """Forget the backoff of peers the table no longer holds (expired, or only
        ever named by mDNS) once their wait is over: bounded by the table."""
        snap = self.table.snapshot(now)
        for peer_id in [p for p, (due, _) in self.retry.items() if due <= now and snap.get(p) is None]:
            del self.retry[peer_id]

    async def relay_loop(self, host: Transport, every: float) -> None:
        """Behind NAT (or with ``relay_client: on``), hold reservations on
        connected peers that offer relay service, so that others can reach us
        through them (our announcements then carry ``/p2p-circuit`` addresses)."""
        while True:
            await pace.tick(every)
            relay = host.relay
            if relay is None or not relay.wants_reservation():
                continue
            connected = host.connected_peers()
            for peer in self.table.snapshot(trio.current_time()).peers:
                if not peer.relay or peer.is_self or peer.peer_id not in connected:
                    continue
                if peer.peer_id in relay.reserving or not relay.may_try(peer.peer_id) or not relay.wants_reservation():
                    continue
                pid = peer.peer_id
                log.info("behind NAT: reserving a slot on relay %s", pid)
                relay.reserving.add(pid)  # now, not in the task: one pass must not pass max_relays
                self._spawn(lambda pid=pid: relay.keep_reservation(pid, lambda: pid in host.connected_peers()))


def _behind_nat(host: Transport) -> bool:
    return host.relay is not None and host.relay.behind_nat()

"""What a node hears, and what it hands on: the receiving half of the host loops.

:class:`Hearing` is mixed into :class:`~meshollama.mesh.loops.HostLoops` (it
uses its ``mesh``, ``host``, ``table``, ``settings``, ``hints`` and
``last_pull``): heartbeats in from gossip and table syncs, checked and
applied one way (:meth:`Hearing.accept`); down hints heard and said
(``mesh.hints``); the table sync (``mesh.sync``) and load answers
(``mesh.load_server``) this node serves, and the pulls it makes.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from typing import TYPE_CHECKING

import trio

from ..errors import AnnouncementError, P2PError
from ..p2p import addrs as addrs_mod
from ..p2p import signed
from ..p2p.host import Message
from . import announce, sync
from .hints import DELAY as HINT_DELAY
from .hints import DownHints
from .load_server import LoadServer
from .peertable import UP, ApplyResult, PeerTable
from .settings import MeshSettings
from .transport import Transport

if TYPE_CHECKING:
    from .service import MeshService

log = logging.getLogger("meshollama.mesh")

SYNC_TRIES = 3  # peers a failed table sync moves on to
SYNC_RETRY = 2.0  # seconds between them
SYNC_MAX_FRAMES = 16384  # heartbeats a sync answer may carry (entries past our table's room are refused there)


class Hearing:
    mesh: MeshService
    host: Transport
    table: PeerTable
    settings: MeshSettings
    hints: DownHints
    last_pull: float | None
    hellos: set[str]  # peers a hello of ours is in flight to

    async def receive_loop(self) -> None:
        while True:
            self.accept(await self.host.next_message())

    def accept_signed(self, raw: bytes, *, sender: str | None = None, age: float = 0.0,
                      held: frozenset[bytes] | set[bytes] = frozenset(), dial: str = "always") -> None:
        """A signed heartbeat handed on by a table sync (``mesh.sync``), heard ``age``
        seconds ago by whoever hands it on: checked as gossip is. ``sender``: the
        peer that may hand us only its own heartbeat (the caller of our sync or hello
        server, or the peer our hello asked);
        ``held``: heartbeats we hold already (nothing to check); ``dial``: as
        :meth:`accept`."""
        if raw in held:
            return
        msg = signed.verify(raw)
        if msg is None:
            self.mesh._drop("sync_invalid")
        elif sender is not None and msg.from_peer != sender:
            self.mesh._drop("sync_not_own")  # a caller replaying someone else's
        elif self.mesh.signed.get(msg.from_peer) != raw:  # the very message we hold: nothing new
            self.accept(msg, age=min(max(age, 0.0), announce.MAX_REFRESH_MS / 1000 * self.table.miss_limit),
                        dial=dial)

    def accept(self, msg: Message, *, age: float = 0.0, dial: str = "always") -> ApplyResult | None:
        """One heartbeat, its signature checked against ``msg.from_peer``, into the table
        (heard ``age`` seconds ago: a synced one keeps the age it had). ``dial``: how
        we dial its sender if we are not connected (``mesh.reach.Reach.maybe_dial``)."""
        mesh, host = self.mesh, self.host
        try:
            ann = announce.decode(msg.data)
        except AnnouncementError as exc:
            log.debug("dropping heartbeat from %s: %s", msg.from_peer, exc)
            mesh._drop("malformed")
            return None
        if ann.peer_id != msg.from_peer:
            # Signed by one peer, describing another: forged. Drop.
            mesh._drop("signer_mismatch")
            return None
        if mesh.admission is not None:
            role = mesh.admission.known_role(ann.peer_id)
            if role is None:  # not admitted (or revoked): it does not exist for us
                mesh._drop("not_admitted")
                return None
            if role == "gateway" and ann.models:  # sends requests, never serves them
                ann = dataclasses.replace(ann, models=())
        checked = addrs_mod.check_announced(ann.addrs, ann.peer_id)
        if checked.dropped:
            mesh._count_n("addrs_dropped", "foreign_or_invalid", checked.dropped)
        if checked.trimmed:
            mesh._count_n("addrs_dropped", "over_limit", checked.trimmed)
        if checked.kept != ann.addrs:
            ann = dataclasses.replace(ann, addrs=checked.kept)
        now = trio.current_time()
        result = self.table.apply(ann, now - age)
        if result is ApplyResult.STALE:
            mesh._drop("stale")
            return result
        if result is ApplyResult.FULL:  # the table is at p2p.max_peers: a flood of new ids
            mesh._drop("table_full")
            return result
        if result is ApplyResult.SELF:
            return result
        mesh.counters.heartbeats_received += 1
        mesh._on_counter("heartbeats_received", "")
        if result is ApplyResult.LEFT:
            log.info("peer %s left the mesh", ann.peer_id)
            mesh.signed.pop(ann.peer_id, None)
            mesh._abort_peer(ann.peer_id)
            return result
        if msg.raw:
            mesh.signed[ann.peer_id] = msg.raw
        self.hints.alive(ann.peer_id, ann.seq)
        if ann.down:
            self.heard_down(ann.peer_id, ann.down)
        if result is ApplyResult.NEW:
            log.info("peer %s joined with %d model(s)%s", ann.peer_id, len(ann.models),
                     " (draining)" if ann.draining else "")
        if ann.peer_id not in host.connected_peers():
            # Heard new by gossip: it dials us (it pulled a table), so we wait; named by a
            # table we pulled, we dial (dial="now"); a known peer we lost: the lower id.
            wait = "higher" if dial == "always" and result is not ApplyResult.NEW else dial
            mesh.reach.maybe_dial(host, ann.peer_id, ann.addrs, wait=wait)
        return result

    # --- down hints (mesh.hints) ------------------------------------------------------

    def heard_down(self, sender: str, down: tuple[tuple[str, int], ...]) -> None:
        """``sender`` says these peers went down: believe it for peers we cannot see
        ourselves (not connected), hold up and know nothing newer of; refute it
        about us if it names our latest announcement. A sender's hints are acted
        on at most once per ``hints.SENDER_GAP``: a hostile peer announcing fast
        cannot make many peers refute, or keep them down, at its own pace."""
        now = trio.current_time()
        if not self.hints.sender_may(sender, now):
            return
        connected = self.host.connected_peers()
        mine = self.table.self_seq
        for peer_id, seq in down:
            if peer_id == self.mesh.self_id:
                if seq >= mine and self.hints.refute(now):
                    log.info("peer %s says we are down: announcing that we are not", sender)
                    self.mesh.request_heartbeat()
                continue
            self.hints.heard_of(peer_id, seq, now)
            view = self.table.get(peer_id)
            if view is None or view.seq > seq or view.state not in UP or peer_id in connected:
                continue  # newer news, already not routed to (unreachable stays so), or we know better
            if self.table.mark_down(peer_id, now):
                log.info("peer %s is down, says %s", peer_id, sender)

    def suspect(self, peer_id: str) -> None:
        """We saw ``peer_id`` go down: tell the mesh, after a moment (``mesh.hints``)."""
        view = self.table.get(peer_id)
        if view is not None and self.mesh._nursery is not None:
            self.mesh._spawn(partial(self._say_down_later, peer_id, view.seq))

    async def _say_down_later(self, peer_id: str, seq: int) -> None:
        await trio.sleep(self.mesh._rng.uniform(*HINT_DELAY))
        view = self.table.get(peer_id)
        if (view is None or view.seq != seq or view.state in UP or peer_id in self.host.connected_peers()
                or not self.hints.should_say(peer_id, seq)):
            return  # back, newer, gone from the table, or someone said it already
        self.hints.say(peer_id, seq, trio.current_time())
        self.mesh.request_heartbeat()

    def signed_table(self) -> list[tuple[bytes, float]]:
        """What a table sync hands out: the signed heartbeats of every peer we hold, each
        with seconds since we heard it, and ours. Down ones too: down *for us* may be
        our own trouble (a starved 2-core box whose pings time out at start-up), and
        the joiner checks each one itself; the age keeps a dead one from living on."""
        now = trio.current_time()
        snap = self.table.snapshot(now)
        signed_of = self.mesh.signed
        out = [(raw, now - p.last_seen) for p in snap.peers
               if not p.is_self and (raw := signed_of.get(p.peer_id))]
        own = getattr(self.host, "own_message", b"")
        if own:
            out.append((own, 0.0))
        return out

    def member(self, peer_id: str) -> bool:
        """Whom the sync and load protocols serve: anyone in an open mesh; in a closed one a
        peer the mesh's documents admit (its connection's own decision may still be under way)."""
        adm = self.mesh.admission
        return adm is None or adm.known_role(peer_id) is not None

    def load_server(self) -> LoadServer:
        return LoadServer(self.mesh._load, allow=self.member, holds=self.mesh.holds,
                          on_count=lambda what: self.mesh._count("load_queries", f"served_{what}"))

    def sync_server(self) -> sync.SyncServer:
        return sync.SyncServer(
            table=self.signed_table,
            accept=lambda raw, caller: self.accept_signed(raw, sender=caller),
            allow=self.member,
            on_count=lambda what: self.mesh._count("synced", what))

    def hello_server(self) -> sync.SyncServer:
        def ours() -> list[tuple[bytes, float]]:
            own = getattr(self.host, "own_message", b"")
            return [(own, 0.0)] if own else []

        return sync.SyncServer(
            table=ours,
            accept=lambda raw, caller: self.accept_signed(raw, sender=caller),
            allow=self.member,
            on_count=lambda what: self.mesh._count("synced", f"hello_{what}"),
            slots=sync.HELLO_SLOTS, every=sync.HELLO_EVERY)

    async def hello(self, peer_id: str) -> None:
        """``peer_id`` connected and our table does not hold it: trade our heartbeats with
        it (``mesh.sync``'s hello) rather than wait for its announcement to hop here through
        gossip. At most ``sync.HELLO_IN_FLIGHT`` at once; a closed mesh's admission comes
        first (``mesh.open_stream``), so a stranger never gets our heartbeat."""
        if peer_id in self.hellos or self.table.get(peer_id) is not None:
            return  # a second connection to it, or its announcement came meanwhile
        if len(self.hellos) >= sync.HELLO_IN_FLIGHT:
            self.mesh._count("synced", "hello_skipped")
            return
        self.hellos.add(peer_id)
        try:
            # Admission (a closed mesh) and the stream's opening within connect_timeout;
            # then one frame each way within HELLO_DEADLINE: a mute peer holds no slot long.
            stream = await self.mesh.open_stream(peer_id, sync.HELLO_PROTOCOL, timeout=self.settings.connect_timeout)
            got = await sync.pull(stream, getattr(self.host, "own_message", b""),
                                  lambda raw, age: self.accept_signed(raw, sender=peer_id, age=age),
                                  max_frames=1, deadline=sync.HELLO_DEADLINE)
            self.mesh._count("synced", "hello_said" if got else "hello_empty")  # empty: it has not announced yet
        except P2PError as exc:
            log.debug("hello to %s failed: %r", peer_id, exc)
            self.mesh._count("synced", "hello_failed")
        finally:
            self.hellos.discard(peer_id)

    async def sync_with(self, peer_id: str, *, tries: int = SYNC_TRIES) -> None:
        """Pull ``peer_id``'s table, handing it our latest heartbeat (``mesh.sync``). If
        that fails (an older node, a busy one), another connected peer is tried."""
        self.last_pull = trio.current_time()
        mesh = self.mesh
        tried = {peer_id}
        for attempt in range(tries):
            held = set(mesh.signed.values())
            try:
                # Through the service: in a closed mesh it waits for the peer's admission, so
                # our heartbeat (and our table request) never goes to a stranger.
                stream = await mesh.open_stream(peer_id, sync.PROTOCOL, timeout=self.settings.connect_timeout)
                count = await sync.pull(stream, getattr(self.host, "own_message", b""),
                                        lambda raw, age: self.accept_signed(raw, age=age, held=held, dial="now"),
                                        max_frames=max(self.settings.max_peers + 1, SYNC_MAX_FRAMES))
            except P2PError as exc:
                log.debug("table sync with %s failed: %s", peer_id, exc)
                mesh._count("synced", "failed")
                others = sorted(self.host.connected_peers() - tried)
                if not others:
                    break
                peer_id = mesh._rng.choice(others)
                tried.add(peer_id)
                await trio.sleep(SYNC_RETRY)
                continue
            mesh._count("synced", "pulled")
            log.debug("table sync with %s: %d heartbeat(s)", peer_id, count)
            return
        self.last_pull = None  # the next connection tries again

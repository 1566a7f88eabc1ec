"""Announcing and hearing: ``loops.publish_loop`` / ``cadence_now`` driving the
real :class:`~meshollama.mesh.cadence.AnnouncePolicy`, gossip delivery, and
``loops.accept`` / ``heard_down`` / ``suspect`` with the real
:class:`~meshollama.mesh.hints.DownHints` (the loops' few lines of glue are
reproduced here statement for statement: they need a trio host)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from meshollama import __version__
from meshollama.mesh import announce
from meshollama.mesh.announce import Announcement
from meshollama.mesh.cadence import Reason
from meshollama.mesh.peertable import UP, ApplyResult, PeerView

from .params import HINT_DELAY

if TYPE_CHECKING:
    from .network import Network
    from .node import Node


def ann_from_view(v: PeerView) -> Announcement:
    """A peer's last accepted announcement rebuilt from its table entry (table size probes)."""
    return Announcement(peer_id=v.peer_id, seq=v.seq, version=v.version, models=v.models, load=v.load,
                        addrs=v.addrs, api_url=v.api_url, relay=v.relay, draining=v.draining, store=v.store,
                        replicas=v.replicas, refresh_ms=round(v.refresh * 1000))


class Gossip:
    # --- the publish loop ----------------------------------------------------------

    def peer_count(self: Network, node: Node) -> int:
        """len(table) for cadence_now; a node without a table in a sampled run: the mesh."""
        return len(node.table) if node.table is not None else max(0, len(self.live) - 1)

    def _next_poll(self: Network, node: Node) -> float:
        """When the publish loop's next iteration (every loops.POLL) looks."""
        poll, now = self.p.poll, self.sim.now
        k = math.floor((now - node.poll_phase) / poll) + 1
        return node.poll_phase + k * poll

    def poll_soon(self: Network, node: Node) -> None:
        """Load changed: the publish loop sees it at its next iteration (no forced
        announcement: only :meth:`AnnouncePolicy.decide` says whether it is news)."""
        t = self._next_poll(node)
        if node.poll_at is not None and self.sim.now <= node.poll_at <= t:
            return
        node.poll_at = t
        self.sim.at(t, self._polled, node)

    def _polled(self: Network, node: Node) -> None:
        if node.poll_at is not None and node.poll_at <= self.sim.now:
            node.poll_at = None
            self.poll(node)

    def request_heartbeat(self: Network, node: Node) -> None:
        """mesh.request_heartbeat: wakes the loop at once (it then waits out min_gap)."""
        node.force = True
        self.poll(node)

    def poll(self: Network, node: Node) -> None:
        """One publish-loop iteration: the real AnnouncePolicy on the cadence for the
        table's size now; announce if it says so; plan the next deadline it could fire at."""
        if not node.alive or node.leaving:
            return
        now = self.sim.now
        pol = node.policy
        pol.cadence = self.p.cadence(self.peer_count(node))
        load = node.load()
        reason = pol.decide(now, node.catalog, load, forced=node.force)
        if reason is not None:
            node.force = False
            self.publish(node, reason, load)
        c, last = pol.cadence, pol.last_at
        assert last is not None
        t = now + pol.quiet_for(now)
        if node.force:
            t = min(t, last + c.min_gap)
        if pol.load_moved_at is not None and getattr(c, "announce_load", True):
            if now - last < c.load_gap:
                t = min(t, last + c.load_gap)
            else:
                t = min(t, max(last + c.load_gap, pol.load_moved_at + c.load_silence))
        t = max(t, now + 1e-6)
        node.planned_refresh = c.refresh
        if node.wake_at is not None and now < node.wake_at <= t:
            return  # an earlier wake-up is pending: it will re-plan
        node.wake_gen += 1
        node.wake_at = t
        self.sim.at(t, self._wake, node, node.wake_gen)

    def _wake(self: Network, node: Node, gen: int) -> None:
        if gen == node.wake_gen:
            node.wake_at = None
            self.poll(node)

    def _size(self: Network, ann: Announcement) -> int:
        key = (ann.peer_id, ann.load, ann.leaving, ann.down, ann.refresh_ms)
        size = self._sizes.get(key)
        if size is None:
            if len(self._sizes) > 200_000:
                self._sizes.clear()
            size = self._sizes[key] = len(announce.encode(ann))
        return size

    def publish(self: Network, node: Node, reason: Reason | None, load, *, leaving: bool = False) -> None:
        """service.announcement + loops.publish: refresh_ms is what refresh_to_say gave,
        ``down`` the hints current now; the policy learns what was said."""
        now = self.sim.now
        pol = node.policy
        node.seq += 1
        refresh = pol.refresh_to_say()
        refresh_ms = 0 if self.p.mode == "legacy" else min(announce.MAX_REFRESH_MS, max(1, round(refresh * 1000)))
        down = node.hints.current(now) if self.p.hints else ()
        ann = Announcement(peer_id=node.pid, seq=node.seq, version=__version__, models=node.models, load=load,
                           addrs=node.addrs, api_url=node.api_url, leaving=leaving, refresh_ms=refresh_ms,
                           down=down)
        if reason is not None:
            pol.sent(now, node.catalog, load, reason, refresh=refresh)
            node.said_refresh.append(refresh_ms / 1000)
        if node.table is not None and not leaving:
            node.table.set_self(ann, now)
        if not leaving:
            node.last_ann = ann
        if down:
            self.with_hints += 1
            for h in down:
                if (node.pid, h) not in self._hints_seen:
                    self._hints_seen.add((node.pid, h))
                    self.hints_said += 1
        n = len(self.live)
        d = min(self.p.degree, n - 1)
        if not node.conns or d <= 0:
            self.unheard += 1  # no gossip neighbour yet: it reaches nobody
            return
        self.published += 1
        self.reasons[reason.value if reason is not None else "leave"] += 1
        size = self._size(ann)
        self.copies += 2 * d * n
        self.bytes += 2 * d * n * size
        hops = max(1, math.ceil(math.log(n) / math.log(max(2, self.p.degree))))
        self.sim.after(hops * self.p.hop_delay + self.rng.uniform(0, self.p.hop_jitter), self._deliver, ann)

    def _deliver(self: Network, ann: Announcement) -> None:
        loss = self.p.loss
        rnd = self.loss_rng.random
        for obs in list(self.tabled.values()):
            if obs.conns and (loss <= 0 or rnd() >= loss):
                self.accept(obs, ann)

    # --- loops.accept and the down hints ------------------------------------------------

    def accept(self: Network, obs: Node, ann: Announcement, *, age: float = 0.0) -> ApplyResult | None:
        now = self.sim.now
        result = obs.table.apply(ann, now - age)
        if result in (ApplyResult.STALE, ApplyResult.FULL, ApplyResult.SELF):
            return result
        if result is ApplyResult.LEFT:
            obs.signed.pop(ann.peer_id, None)
            return result
        obs.signed[ann.peer_id] = ann
        if self.p.hints:
            obs.hints.alive(ann.peer_id, ann.seq)
            if ann.down:
                self.heard_down(obs, ann.peer_id, ann.down)
        if self.p.dial_announced and ann.peer_id not in obs.conns and ann.peer_id not in obs.dialing:
            src = self.by_pid[ann.peer_id]
            if src is not obs and len(obs.conns) < self.p.max_connections:
                obs.dialing.add(src.pid)
                self.sim.after(self.p.connect_delay, self._dialled_announced, obs, src)
        return result

    def _dialled_announced(self: Network, a: Node, b: Node) -> None:
        a.dialing.discard(b.pid)
        if len(a.conns) < self.p.max_connections and len(b.conns) < self.p.max_connections:
            self._connect_later(a, b)

    def heard_down(self: Network, obs: Node, sender: str, down: tuple[tuple[str, int], ...]) -> None:
        """loops.heard_down: believe a hint for peers we are not connected to and
        know nothing newer of; refute one about us."""
        now = self.sim.now
        for peer_id, seq in down:
            if peer_id == obs.pid:
                if obs.hints.refute(now):
                    self.refutes += 1
                    self.request_heartbeat(obs)
                continue
            obs.hints.heard_of(peer_id, seq, now)
            view = obs.table.get(peer_id)
            if view is None or view.seq > seq or peer_id in obs.conns:
                continue
            if obs.table.mark_down(peer_id, now):
                self.hint_marks += 1

    def suspect(self: Network, node: Node, peer_id: str) -> None:
        """loops.suspect: we saw ``peer_id`` go down; say so after a random delay."""
        if not self.p.hints:
            return
        view = node.table.get(peer_id)
        if view is not None:
            self.sim.after(self.hint_rng.uniform(*HINT_DELAY), self._say_down_later, node, peer_id, view.seq)

    def _say_down_later(self: Network, node: Node, peer_id: str, seq: int) -> None:
        if not node.alive:
            return
        view = node.table.get(peer_id)
        if (view is None or view.seq != seq or view.state in UP or peer_id in node.conns
                or not node.hints.should_say(peer_id, seq)):
            return  # back, newer, gone from the table, or someone said it already
        node.hints.say(peer_id, seq, self.sim.now)
        self.request_heartbeat(node)

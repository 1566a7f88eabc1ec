"""Table sync (``mesh.sync``) as ``loops.sync_with`` / ``signed_table`` /
``accept_signed`` drive it: on a new connection a node pulls that peer's
table at most once per ``pull_every`` (60 s), sending its own latest
heartbeat; a failed pull moves on to another connected peer (up to
``sync_tries``, ``sync_retry`` apart), then lets the next connection try.
The server serves one caller at most once per ``serve_every`` (30 s).
The handed-on heartbeats are the very objects the server accepted (the
simulator's ``mesh.signed``), each applied with the age the server gives it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshollama.mesh import announce
from meshollama.mesh.announce import Announcement
from meshollama.mesh.peertable import UP

if TYPE_CHECKING:
    from .network import Network
    from .node import Node


class Pull:
    def sync_with(self: Network, node: Node, peer_id: str) -> None:
        self._try_pull(node, peer_id, {peer_id}, 0)

    def _try_pull(self: Network, node: Node, peer_id: str, tried: set[str], attempt: int) -> None:
        if not node.alive:
            return
        server = self.by_pid[peer_id]
        now = self.sim.now
        served = server.served_at.get(node.pid)
        ok = server.alive and not server.leaving and (served is None or now - served >= self.p.serve_every)
        if ok:
            server.served_at[node.pid] = now
            self.sim.after(self.p.rtt, self._pulled, node, server)
            return
        # P2PError: a dead peer's dial fails, a busy server refuses
        self.sim.after(self.p.rtt if server.alive else self.p.dial_fail, self._pull_failed, node, tried, attempt)

    def _pull_failed(self: Network, node: Node, tried: set[str], attempt: int) -> None:
        self.pulls_failed += 1
        others = sorted(node.conns - tried)
        if not others or not node.alive:
            node.last_pull = None  # the next connection tries again
            return
        peer_id = self.rng.choice(others)
        tried.add(peer_id)
        if attempt + 1 >= self.p.sync_tries:
            self.sim.after(self.p.sync_retry, self._give_up, node)
        else:
            self.sim.after(self.p.sync_retry, self._try_pull, node, peer_id, tried, attempt + 1)

    def _give_up(self: Network, node: Node) -> None:
        node.last_pull = None

    def signed_table(self: Network, server: Node) -> list[tuple[Announcement, float]]:
        """loops.signed_table: the heartbeats of the peers it holds up, with their
        age, then its own. A server without a table in a sampled run hands out
        what a seed holds (a seed's table lists the whole mesh)."""
        now = self.sim.now
        src = server if server.table is not None else next((x for x in self.nodes[:3] if x.table is not None
                                                            and x.alive), None)
        out: list[tuple[Announcement, float]] = []
        if src is not None:
            signed = src.signed
            out = [(ann, now - p.last_seen) for p in src.table.snapshot(now).peers
                   if not p.is_self and p.state in UP and (ann := signed.get(p.peer_id)) is not None
                   and p.peer_id != server.pid]
        if server.last_ann is not None:
            out.append((server.last_ann, 0.0))
        return out

    def _pulled(self: Network, node: Node, server: Node) -> None:
        if not node.alive or not server.alive:
            self._pull_failed(node, {server.pid}, self.p.sync_tries)
            return
        self.pulls_ok += 1
        node.pulls += 1
        # the server takes the caller's own heartbeat (only its own: sender == caller)
        if node.last_ann is not None and server.table is not None:
            self.sync_events += 1
            if server.signed.get(node.pid) is not node.last_ann:
                self.sync_verified += 1
                self.accept(server, node.last_ann)
        if node.table is None:  # a sampled run's node without a table: count what it would get
            src = server if server.table is not None else self.nodes[0]
            count = len(src.table) + 1  # its peers (up or not: O(1)) and itself
            node.sync_entries += count
            server.sync_entries += count
            self.sync_events += 2 * count
            self.sync_verified += count if node.pulls == 1 else 0  # it heard the rest by gossip already
            return
        entries = self.signed_table(server)
        count = len(entries)
        node.sync_entries += count
        server.sync_entries += count
        self.sync_events += 2 * count
        held = set(map(id, node.signed.values()))
        cap = announce.MAX_REFRESH_MS / 1000 * node.table.miss_limit
        for ann, age in entries:
            if id(ann) in held:
                continue
            if node.signed.get(ann.peer_id) is ann:
                continue
            self.sync_verified += 1
            self.accept(node, ann, age=min(max(age, 0.0), cap))

"""The simulated mesh: membership, connections, crashes, graceful leaves,
liveness rounds and the cost counters, all on one virtual clock. The roles
that follow the real mesh loops live beside it and are mixed in:

* :mod:`.gossip`: the publish loop, gossip delivery, ``accept`` and down hints;
* :mod:`.pull`: table sync on a new connection (``mesh.sync``);
* :mod:`.traffic`: request routing and serving.

Gossip model: an announcement published by a node with at least one
connection reaches every node in the mesh after ``hops * hop_delay`` (+
jitter), hops = ceil(log_D(N)); each live node receives about ``d = min(D,
N-1)`` copies of it (one delivered, the rest duplicates) and sends about
``d`` (forwarding). Copies and bytes are counted mesh-wide (``copies``,
``bytes``); the per-node cost is their mean. Only nodes with a table (all of
them, or a sample of observers in large meshes) apply what they receive: the
cost counters do not depend on it.
"""

from __future__ import annotations

import random
from collections import Counter

from meshollama.mesh.liveness import peers_to_ping

from .events import Sim
from .gossip import Gossip
from .node import Node, Request
from .params import Params
from .pull import Pull
from .traffic import Traffic


class Network(Gossip, Pull, Traffic):
    def __init__(self, params: Params, seed: int, *, tokens_mean: float = 40.0, token_time: float = 0.1,
                 ttfb_work: float = 0.1) -> None:
        self.p = params
        self.sim = Sim()
        self.rng = random.Random(seed)
        self.route_rng = random.Random(seed + 1)
        self.work_rng = random.Random(seed + 2)
        self.loss_rng = random.Random(seed + 3)
        self.hint_rng = random.Random(seed + 4)
        self.tokens_mean, self.token_time, self.ttfb_work = tokens_mean, token_time, ttfb_work
        self.nodes: list[Node] = []
        self.by_pid: dict[str, Node] = {}
        self.live: list[Node] = []  # started and alive (connected or about to be)
        self._pos: dict[str, int] = {}
        self.tabled: dict[str, Node] = {}  # live nodes that keep a table
        self.liveness_all = False  # run liveness rounds on every tabled node (small meshes), else gateways only
        self.oracle = False
        # accounting
        self.published = 0  # announcements that reached the mesh
        self.unheard = 0  # announcements published with no connection (a FIRST before the bootstrap answers)
        self.copies = 0.0  # RPC copies, summed over nodes (received + sent)
        self.bytes = 0.0
        self.ping_events = 0  # pings sent + pings answered, summed over nodes
        self.sync_events = 0  # heartbeats carried by table syncs, summed over both ends
        self.sync_verified = 0  # synced heartbeats the caller did not hold (checked and applied)
        self.pulls_ok = 0
        self.pulls_failed = 0
        self.reasons: Counter[str] = Counter()
        self.hints_said = 0  # (node, peer, seq) hints said, each counted once
        self.with_hints = 0  # announcements carrying at least one down hint
        self._hints_seen: set = set()
        self.hint_marks = 0  # peers marked down by someone else's hint
        self.refutes = 0
        self.expired = 0  # table entries expired, summed over tables
        self.expired_alive = 0  # of those, entries of nodes that had not crashed
        self._ns = 0.0  # node-seconds in the mesh
        self._ns_at = 0.0
        self._sizes: dict[tuple, int] = {}
        # requests
        self.requests: list[Request] = []
        self.crashed_at: dict[str, float] = {}
        self.left_at: dict[str, float] = {}
        self.last_route_to_dead: dict[str, float] = {}
        self.attempts_to_dead = 0
        self.attempts_to_leaver = 0
        self.route_calls = 0
        self.route_wall = 0.0

    # --- membership -------------------------------------------------------------

    def add_node(self, **kw) -> Node:
        node = Node(len(self.nodes), self.p, self.rng, **kw)
        self.nodes.append(node)
        self.by_pid[node.pid] = node
        return node

    def _account(self) -> None:
        now = self.sim.now
        self._ns += len(self.live) * (now - self._ns_at)
        self._ns_at = now

    def _enter(self, node: Node) -> None:
        self._account()
        self._pos[node.pid] = len(self.live)
        self.live.append(node)
        if node.table is not None:
            self.tabled[node.pid] = node

    def _exit(self, node: Node) -> None:
        self._account()
        i = self._pos.pop(node.pid, None)
        if i is not None:
            last = self.live.pop()
            if last is not node:
                self.live[i] = last
                self._pos[last.pid] = i
        self.tabled.pop(node.pid, None)

    def start(self, node: Node, bootstrap: Node | None) -> None:
        """``node`` starts now: its publish loop announces FIRST (to nobody yet: no
        connection), then it dials ``bootstrap`` (none: it is the first node)."""
        node.alive = True
        node.joined_at = self.sim.now
        self._enter(node)
        if node.table is not None:
            self.sim.after(self.rng.uniform(0, self.p.expire_every), self._expire_tick, node)
            if node.gateway or self.liveness_all:
                self.sim.after(self.rng.uniform(0, self.p.liveness_interval), self._liveness_tick, node)
        self.poll(node)
        if bootstrap is not None:
            self.sim.after(self.p.connect_delay, self._joined, node, bootstrap)

    def _joined(self, node: Node, b: Node) -> None:
        if not node.alive:
            return
        if not b.alive:  # the bootstrap died meanwhile: try another live node
            others = [x for x in self.live if x is not node]
            if not others:
                return
            b = others[self.rng.randrange(len(others))]
        self.connect(node, b)
        # gossip neighbours: D - 1 more connections
        others = [n for n in self.rng.sample(self.live, min(len(self.live), self.p.degree + 1))
                  if n is not node and n is not b][: self.p.degree - 1]
        for i, n in enumerate(others):
            self.sim.after(self.p.connect_delay * (i + 1), self._connect_later, node, n)

    def _connect_later(self, a: Node, b: Node) -> None:
        if a.alive and b.alive and not a.leaving and not b.leaving:
            self.connect(a, b)

    def connect(self, a: Node, b: Node) -> None:
        """A new connection: both ends get loops.on_event("connected")."""
        if b.pid in a.conns:
            return
        a.conns.add(b.pid)
        b.conns.add(a.pid)
        self.on_connected(a, b)
        self.on_connected(b, a)

    def on_connected(self, x: Node, y: Node) -> None:
        """loops.on_event("connected") on ``x``, plus publish_loop's first-neighbour rule."""
        now = self.sim.now
        x.hints.ours.pop(y.pid, None)  # it is back: no longer say it is down
        if x.table is not None:
            x.table.mark_up(y.pid, now)
        if self.p.pull and (x.last_pull is None or now - x.last_pull >= self.p.pull_every):
            x.last_pull = now
            self.sync_with(x, y.pid)
        if self.p.forced_on_connect:
            self.request_heartbeat(x)
        elif not x.had_neighbours:
            x.had_neighbours = True  # the publish loop notices at its next iteration
            self.sim.at(self._next_poll(x), self._first_neighbour, x)

    def _first_neighbour(self, x: Node) -> None:
        if x.alive and x.conns:
            x.force = True
            self.poll(x)

    def _disconnect_all(self, node: Node) -> None:
        """Every connection of ``node`` closes: loops.on_event("disconnected") at the other ends."""
        now = self.sim.now
        for pid in sorted(node.conns):
            c = self.by_pid[pid]
            c.conns.discard(node.pid)
            if not c.conns:
                c.had_neighbours = False
            if c.alive and c.table is not None and c.table.mark_down(node.pid, now):
                self.suspect(c, node.pid)
            c.misses.pop(node.pid, None)
            c.used.pop(node.pid, None)
        node.conns.clear()

    def crash(self, node: Node) -> None:
        """Gone without a word: its connections close (peers connected to it mark it
        down at once and, with hints, tell the rest); the others learn from a hint,
        by expiry, a failed dial or a liveness ping."""
        if not node.alive:
            return
        node.alive = False
        node.gone_at = self.sim.now
        self.crashed_at[node.pid] = self.sim.now
        self._exit(node)
        self._disconnect_all(node)
        for a in list(node.active) + list(node.queue):
            self._attempt_failed(a, "broken")
        node.active.clear()
        node.queue.clear()

    def leave(self, node: Node) -> None:
        """Graceful: a ``leaving`` announcement, new requests refused, then (when
        its requests are done) the connections close."""
        if not node.alive or node.leaving:
            return
        node.leaving = True
        self.left_at[node.pid] = self.sim.now
        self.publish(node, None, node.load(), leaving=True)
        if not node.active and not node.queue:
            self._gone(node)

    def _gone(self, node: Node) -> None:
        node.alive = False
        node.gone_at = self.sim.now
        self._exit(node)
        self._disconnect_all(node)

    # --- periodic loops -----------------------------------------------------------

    def _expire_tick(self, node: Node) -> None:
        if not node.alive:
            return
        for pid in node.table.expire(self.sim.now):
            node.signed.pop(pid, None)
            self.expired += 1
            if pid not in self.crashed_at:
                self.expired_alive += 1  # a live node expired: a refresh too long for what was said
        if node.planned_refresh and self.p.cadence(self.peer_count(node)).refresh < node.planned_refresh:
            self.poll(node)  # the table shrank: the real loop, polling every 0.25 s, would re-plan
        self.sim.after(self.p.expire_every, self._expire_tick, node)

    def _liveness_tick(self, node: Node) -> None:
        if not node.alive:
            return
        now = self.sim.now
        for pid, k in node.inflight_to.items():
            if k > 0:
                node.used[pid] = now
        keep = self.p.liveness_recent
        node.used = {p: t for p, t in node.used.items() if now - t <= keep}
        if node.conns:
            snap = node.table.snapshot(now)
            pids = peers_to_ping(snap, node.conns, node.round_no,
                                 urgent=lambda p: p in node.misses or node.inflight_to.get(p, 0) > 0,
                                 busy=node.pinging.__contains__, recent=node.used.__contains__,
                                 ping_all_up_to=self.p.ping_all_up_to)
            for pid in pids:
                self._ping(node, pid)
        node.round_no += 1
        self.sim.after(self.p.liveness_interval, self._liveness_tick, node)

    def _ping(self, node: Node, pid: str) -> None:
        node.pinging.add(pid)
        node.pings_sent += 1
        self.ping_events += 1
        target = self.by_pid[pid]
        if target.alive:
            target.pings_answered += 1
            self.ping_events += 1
            self.sim.after(self.p.rtt, self._pong, node, pid, True)
        else:
            self.sim.after(self.p.liveness_timeout, self._pong, node, pid, False)

    def _pong(self, node: Node, pid: str, ok: bool) -> None:
        node.pinging.discard(pid)
        if not node.alive:
            return
        now = self.sim.now
        if ok:
            if node.misses.pop(pid, None) is not None:
                node.table.mark_up(pid, now)
        else:
            node.misses[pid] = node.misses.get(pid, 0) + 1
            if node.table.mark_down(pid, now):
                self.suspect(node, pid)

    # --- measurement ----------------------------------------------------------------

    def counters(self) -> dict[str, float]:
        self._account()
        return {"t": self.sim.now, "published": self.published, "copies": self.copies, "bytes": self.bytes,
                "pings": self.ping_events, "sync": self.sync_events, "verified": self.sync_verified,
                "node_s": self._ns}

    def converged(self) -> bool:
        n = len(self.live)
        return all(len(obs.table) >= n - 1 for obs in self.tabled.values())

"""Requests: gateways route with the real ``routing.choose`` + ``RouteStats``
(as ``gateway/proxy.py`` and ``gateway/attempt.py`` call them), serving nodes
run a FIFO behind their slots; an oracle variant sees the true queues."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from meshollama import routing

from .node import KEY, Attempt, Request

if TYPE_CHECKING:
    from .network import Network
    from .node import Node


class Traffic:
    def submit(self: Network, g: Node, req: Request) -> None:
        self.requests.append(req)
        if self.oracle:
            pid = self._oracle_pick()
            req.tries = [pid] if pid else []
        else:
            req.tries = self._order(g, frozenset())
        if not req.tries:
            req.failed = True
            return
        self._attempt(g, req)

    def _order(self: Network, g: Node, exclude: frozenset[str]) -> list[str]:
        now = self.sim.now
        t0 = time.perf_counter()
        snap = g.table.snapshot(now)
        g.stats.observe(snap)
        order = routing.choose(snap, KEY, g.stats, now, self.route_rng, exclude=exclude)
        self.route_wall += time.perf_counter() - t0
        self.route_calls += 1
        return order[: 1 + self.p.retries]

    def mean_service(self: Network, node: Node) -> float:
        return (self.ttfb_work + self.tokens_mean * self.token_time) / node.speed

    def _oracle_pick(self: Network) -> str | None:
        best, best_e = [], math.inf
        for n in self.live:
            if n.capacity <= 0 or n.leaving:
                continue
            e = self.mean_service(n) * (1 + max(0, n.busy() + 1 - n.capacity) / n.capacity)
            if e < best_e - 1e-12:
                best, best_e = [n.pid], e
            elif abs(e - best_e) <= 1e-12:
                best.append(n.pid)
        return self.route_rng.choice(best) if best else None

    def _attempt(self: Network, g: Node, req: Request) -> None:
        if req.tried >= len(req.tries):
            req.failed = True  # every try failed: the client gets an error
            return
        pid = req.tries[req.tried]
        req.tried += 1
        now = self.sim.now
        target = self.by_pid[pid]
        if pid in self.crashed_at:
            self.attempts_to_dead += 1
            self.last_route_to_dead[pid] = now
        elif target.leaving or not target.alive:
            self.attempts_to_leaver += 1
        a = Attempt(req, g, pid, now)
        if g.stats is not None and not self.oracle:
            g.stats.started(pid, now)
        g.inflight_to[pid] = g.inflight_to.get(pid, 0) + 1
        g.used[pid] = now
        if not target.alive:
            self.sim.after(self.p.dial_fail, self._attempt_failed, a, "unreachable")
        elif target.leaving:
            self.sim.after(self.p.rtt, self._attempt_failed, a, "refused")
        elif pid in g.conns or pid == g.pid or self.oracle:
            self.sim.after(self.p.rtt / 2, self._arrive, a)
        else:
            self.sim.after(self.p.connect_delay, self._dialled, a)

    def _dialled(self: Network, a: Attempt) -> None:
        g, t = a.gateway, self.by_pid[a.peer]
        if not t.alive or not g.alive:
            self._attempt_failed(a, "unreachable")
            return
        self.connect(g, t)
        self._arrive(a)

    def _arrive(self: Network, a: Attempt) -> None:
        if a.dead:
            return
        t = self.by_pid[a.peer]
        if not t.alive:
            self._attempt_failed(a, "broken")
        elif t.leaving:
            self._attempt_failed(a, "refused")
        else:
            if len(t.active) < t.capacity:
                self._start(t, a)
            else:
                t.queue.append(a)
            self.poll_soon(t)

    def _start(self: Network, t: Node, a: Attempt) -> None:
        t.active.append(a)
        a.chunks = min(8 * round(self.tokens_mean), max(1, round(self.work_rng.expovariate(1 / self.tokens_mean))))
        first = self.ttfb_work / t.speed
        a.service = first + a.chunks * self.token_time / t.speed
        self.sim.after(first, self._first_byte, a)
        self.sim.after(a.service, self._done, a)

    def _first_byte(self: Network, a: Attempt) -> None:
        if a.dead:
            return
        now = self.sim.now
        a.first_byte_at = now
        if a.gateway.stats is not None and not self.oracle:
            a.gateway.stats.first_byte(a.peer, now, now - a.started, model=KEY)

    def _done(self: Network, a: Attempt) -> None:
        if a.dead:
            return
        now = self.sim.now
        t, g = self.by_pid[a.peer], a.gateway
        t.active.remove(a)
        t.served += 1
        if t.queue:
            self._start(t, t.queue.popleft())
        self.poll_soon(t)
        if t.leaving and not t.active and not t.queue:
            self._gone(t)
        a.dead = True
        g.inflight_to[a.peer] -= 1
        if g.stats is not None and not self.oracle:
            ttfb = a.first_byte_at - a.started if a.first_byte_at is not None else None
            g.stats.finished(a.peer, now, ok=True, latency=now - a.started, ttfb=ttfb, model=KEY, chunks=a.chunks,
                             count_ttfb=False)
        a.req.done_at = now
        a.req.served_by = a.peer

    def _attempt_failed(self: Network, a: Attempt, kind: str) -> None:
        if a.dead:
            return
        a.dead = True
        now = self.sim.now
        g, req = a.gateway, a.req
        g.inflight_to[a.peer] = max(0, g.inflight_to.get(a.peer, 0) - 1)
        req.failures += 1
        req.kinds.append(kind)
        if not g.alive:
            return
        if g.stats is not None and not self.oracle:
            g.stats.finished(a.peer, now, ok=False, latency=now - a.started, ttfb=None, model=KEY)
            g.stats.sideline(a.peer, now, self.p.sideline)
        if kind == "unreachable" and g.table is not None:
            g.table.mark_unreachable(a.peer, now)
        if kind == "broken" and not self.oracle:
            # the resume relay: continue on another holder, choosing again without those tried
            tried = frozenset(req.tries[: req.tried])
            req.tries = req.tries[: req.tried] + self._order(g, tried)
        elif self.oracle and req.tried >= len(req.tries):
            pid = self._oracle_pick()
            if pid:
                req.tries.append(pid)
        self._attempt(g, req)

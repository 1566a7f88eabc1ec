"""What the gateway asks the mesh before it routes a request (the proxy's helper).

* In a large mesh, where load is not announced, a few holders' load
  (``mesh.load_client``), and in a smaller one the load of holders that say
  they do not announce it (``quiet_load``): :meth:`Asking.loads`.
* For a model no announcement lists, where the mesh may hide holders, the
  holders the DHT names, by their own word (``mesh.holders``):
  :meth:`Asking.holders`, and when they are all busy, :meth:`Asking.found_free`.
* Whether a holder has a free slot for the queue (:meth:`Asking.free`), and
  the right error for a model nobody alive serves (:meth:`Asking.unservable`).
"""

from __future__ import annotations

from typing import Any

import trio

from .. import routing
from ..errors import ModelNotFound, NoCapacity, Overloaded
from ..mesh import load_client
from .endpoints import Endpoint

# A holder that does not announce load (``quiet_load``: a large mesh) and whose load we learnt
# longer ago than this counts as free for the line (it answers busy if it is not), not full for ever.
LOAD_STALE = 5.0
FOUND_RECHECK = 1.0  # seconds (to twice that) between questions to busy holders found through the DHT
UNANSWERED_RETRY = 5  # Retry-After when holders found through the DHT did not answer (holders.FAILED_TTL)
LOAD_AWARE = frozenset({routing.Strategy.LEAST_LOADED, routing.Strategy.LOCAL_FIRST})  # strategies that use load


class Asking:
    """The proxy's questions to the mesh; reads its mesh, stats, rng, strategy and
    queues as they are now (a policy may change the strategy at run time)."""

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy

    async def loads(self, snapshot: Any, key: str) -> tuple[str, ...]:
        """In a large mesh, where load is not announced, ask a few holders how busy they
        are (at most ``load_client.TIMEOUT``); the decision then includes them. In a
        smaller one, only holders that say they do not announce load (``quiet_load``:
        their tables are past the size where ours is not)."""
        sampling = getattr(self.proxy.mesh, "load_sampling", None)
        if sampling is None or self.proxy.strategy not in LOAD_AWARE:
            return ()
        holders = snapshot.serving(key)
        if not sampling():
            holders = tuple(p for p in holders if p.quiet_load)  # a small mesh: a few peers at most
            if not holders:
                return ()
        now = trio.current_time()
        connected = self.proxy.mesh.connected()  # a dial would not fit in the time a question has

        def skip(pid: str) -> bool:
            return pid == self.proxy.mesh.self_id or pid not in connected or self.proxy.stats.asked_within(pid, now, load_client.FRESH)

        picked = load_client.pick(holders, skip, self.proxy.rng)
        if not picked:
            return ()
        for pid in picked:  # asked, answered or not: not again within FRESH
            self.proxy.stats.asking(pid, now)
        loads = await self.proxy.mesh.ask_loads(picked)
        now = trio.current_time()
        for pid, load in loads.items():
            self.proxy.stats.sampled(pid, load, now)
        return tuple(loads)

    async def holders(self, endpoint: Endpoint, model: str, key: str) -> dict[str, Any]:
        """Holders of a model no announcement lists, from DHT provider records, by their
        own word just now (``mesh.holders``), least busy first; only where the mesh may
        hide some: a large mesh, or a peer that says its announcement leaves models out.
        Nobody: the 404 (or 503) a model nobody alive serves gets; providers that did
        not answer: a 503, not "not found" (that tells a client to pull it)."""
        finds = getattr(self.proxy.mesh, "finds_holders", None)
        if finds is None or not finds(self.proxy.mesh.snapshot()):
            self.unservable(endpoint, model, key)
        holders = await self.proxy.mesh.find_holders(model)
        found = {f.peer_id: f for f in sorted(holders.found, key=lambda f: f.busy())}
        if not found:
            if holders.unanswered or not holders.complete:
                why = (f"{holders.unanswered} peer(s) that may hold it did not answer" if holders.unanswered
                       else "the lookup did not finish in time")
                raise Overloaded(f"model '{model}' may be on peers this node cannot reach now ({why}); retry later",
                                 UNANSWERED_RETRY)
            self.unservable(endpoint, model, key)
        return found

    async def found_free(self, endpoint: Endpoint, model: str, key: str, deadline: float) -> dict[str, Any]:
        """Every holder found through the DHT answered busy: ask them again (their answers
        are fresh for ``holders.FRESH``) until one says a slot is free, or the request's
        queue time is up (503 with Retry-After), instead of sending it again and again."""
        while True:
            with trio.move_on_at(deadline):
                # Not in step with the other requests waiting: they share each answer.
                await trio.sleep(FOUND_RECHECK * (1 + self.proxy.rng.random()))
                try:
                    found = await self.holders(endpoint, model, key)
                except ModelNotFound:  # the holders went quiet (or the mesh stopped hiding any)
                    raise Overloaded(f"the peers serving '{model}' are gone or not answering; retry later",
                                     self.proxy.queues.retry_after(key)) from None
                if any(f.busy() < 1 for f in found.values()):
                    return found
            if trio.current_time() >= deadline:
                raise Overloaded(f"every peer serving '{model}' stayed busy for {self.proxy.queues.timeout:g}s "
                                 "(gateway.queue_timeout); retry later", self.proxy.queues.retry_after(key))

    def unservable(self, endpoint: Endpoint, model: str, key: str) -> None:
        """Raise the right error for a model nobody alive serves: a 503 when it
        exists on peers we cannot reach now (a 404 tells clients to pull it)."""
        held = [f"{p.peer_id} ({p.state.value})" for p in self.proxy.mesh.snapshot().peers
                if p.serves(key) and p.state.value not in ("alive",)]
        if held:
            raise NoCapacity(f"model '{model}' is only on peers this node cannot reach now: {', '.join(held)}; "
                             "see `meshollama peers`")
        raise ModelNotFound(endpoint.not_found_message(model))

    def free(self, key: str) -> bool:
        snapshot = self.proxy.mesh.snapshot()
        self.proxy.stats.observe(snapshot)  # a heartbeat that already counts our finished requests resets the correction
        sampling = getattr(self.proxy.mesh, "load_sampling", None)
        return routing.has_free_slot(snapshot, key, self.proxy.stats, trio.current_time(), stale_after=LOAD_STALE,
                                     all_quiet=sampling is not None and sampling())

"""Holders of a model the peer table does not list, found through DHT provider records.

The gossiped announcements list what every node holds, and in a small mesh
they are the whole truth. They stop being enough in two cases: a node holds
more models than one announcement carries (``announce.fit`` leaves the rest
out and sets ``more``), and a large mesh (past ``p2p.full_view_up_to``
peers), where a gateway should not need everyone's word to find a holder.

**Providing.** Every serving node puts one provider record per model it
holds in the Kademlia DHT, keyed by :func:`name_key` (a client asks by
name; the holder's answer carries the digest). :class:`Provider` says
new models at once and all of them every :data:`REPROVIDE` seconds, and
again when the DHT's routing table has doubled since (a record put while
the table was nearly empty reached nobody). Models an announcement leaves
out go first (they need the DHT; the rest are in every table). It paces
itself (:class:`Pace`, in ``MeshService.provide`` for every caller): py-libp2p 0.8.1 silently drops a sender's
ADD_PROVIDER past 10 in a 10 s window (``kad_dht.py``,
``_check_provider_rate_limit``), so 280 models said at once reached remote
peers as 10 records.

**Finding.** :class:`HolderFinder` asks the DHT for providers (at most
:data:`LOOKUPS` lookups at once, one per key at a time, cached for
:data:`PROVIDERS_TTL`; nobody found: :data:`NOBODY_TTL`, so a flood of
requests for names nobody has costs one lookup per name per 10 s), then
asks up to :data:`SAMPLE` of them directly whether they hold it now
(``/meshollama/holds/1``, ``mesh.load_client.ask_holds``): a provider
record is a claim that was true once (records live 48 h in py-libp2p, a
crashed or emptied node's too). Those that say yes, with their digest and
load, are what the gateway may route to; one that says no leaves the
cached list.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .. import names
from ..catalog import LoadInfo, ModelInfo

log = logging.getLogger("meshollama.mesh")

PROVIDE_FIRST = 5.0  # seconds after the host starts: let the join fill the DHT's table first
PROVIDE_BURST = 9  # records in one window (py-libp2p takes 10 per 10 s window per sender: a margin)
PROVIDE_WINDOW = 10.5  # seconds
REPROVIDE = 1800.0  # seconds between saying every record again (py-libp2p keeps them 48 h)
CHANGE_GAP = 0.5  # seconds: changes closer than this are said in one pass
RECHECK = 30.0  # seconds between looks at the DHT's table size when nothing changes
PROVIDERS_TTL = 60.0  # seconds a provider list is used before the DHT is asked again
NOBODY_TTL = 10.0  # seconds "nobody provides it" stands
MAX_KEYS = 1024  # provider lists kept
LOOKUPS = 4  # DHT lookups at once, all keys together
SAMPLE = 3  # providers asked per request
WAIT = 3.0  # seconds a request waits for the DHT and the answers together
ASK_TIMEOUT = 1.0  # seconds for one provider's answer, a dial included


def name_key(name: str) -> str:
    """The DHT key of a model name: a sha2-256 multihash, in hex."""
    return "1220" + hashlib.sha256(b"meshollama/model/" + names.key(name).encode()).hexdigest()


@dataclass(frozen=True)
class Found:
    """A peer that said, just now, that it holds the model."""

    peer_id: str
    digest: str
    loaded: bool
    load: LoadInfo

    def busy(self) -> float:
        """Its share of slots taken (queued counts as taken): lower first."""
        return (self.load.in_flight + self.load.queued + self.load.waiting) / max(1, self.load.capacity)


class HolderFinder:
    """Providers per model from the DHT, cached, and who among them holds it now."""

    def __init__(self, find_providers: Callable[[str], Awaitable[list[str]]],
                 ask: Callable[[str, str], Awaitable[Found | None]], *, self_id: str,
                 rng: random.Random | None = None,
                 on_count: Callable[[str], None] = lambda what: None) -> None:
        self._find = find_providers
        self._ask = ask
        self.self_id = self_id
        self.rng = rng if rng is not None else random.Random()
        self.on_count = on_count
        self._lists: OrderedDict[str, tuple[float, list[str]]] = OrderedDict()  # key -> (until, providers)
        self._pending: dict[str, trio.Event] = {}
        self._lookups = trio.CapacityLimiter(LOOKUPS)

    async def find(self, name: str) -> list[Found]:
        """Peers that hold ``name`` now, least busy first; [] if none answered within :data:`WAIT`."""
        key = names.key(name)
        found: dict[str, Found] = {}
        with trio.move_on_after(WAIT):
            providers = await self._providers(key)
            picked = self.rng.sample(providers, min(SAMPLE, len(providers)))

            async def one(peer_id: str) -> None:
                with trio.move_on_after(ASK_TIMEOUT):
                    answer = await self._ask(peer_id, name)
                    if answer is not None:
                        found[peer_id] = answer
                        return
                    self._forget(key, peer_id)  # it answered: it does not hold it (any more)

            async with trio.open_nursery() as nursery:
                for peer_id in picked:
                    nursery.start_soon(one, peer_id)
        self.on_count("found" if found else "none")
        return sorted(found.values(), key=Found.busy)

    async def _providers(self, key: str) -> list[str]:
        while True:
            cached = self._lists.get(key)
            if cached is not None and cached[0] > trio.current_time():
                return cached[1]
            pending = self._pending.get(key)
            if pending is None:
                break
            await pending.wait()  # someone is asking the DHT for this key: share the answer
        done = self._pending[key] = trio.Event()
        providers: list[str] = []
        try:
            async with self._lookups:
                self.on_count("lookup")
                providers = [p for p in await self._find(name_key(key)) if p != self.self_id]
        finally:
            ttl = PROVIDERS_TTL if providers else NOBODY_TTL
            self._lists[key] = (trio.current_time() + ttl, providers)
            self._lists.move_to_end(key)
            while len(self._lists) > MAX_KEYS:
                self._lists.popitem(last=False)
            del self._pending[key]
            done.set()
        return providers

    def _forget(self, key: str, peer_id: str) -> None:
        cached = self._lists.get(key)
        if cached is not None and peer_id in cached[1]:
            self._lists[key] = (cached[0], [p for p in cached[1] if p != peer_id])


class Pace:
    """At most :data:`PROVIDE_BURST` records per :data:`PROVIDE_WINDOW` (one fixed window
    after the other, as py-libp2p counts them). Model names go before blobs: a
    ``later`` caller waits while a name waits."""

    def __init__(self) -> None:
        self.start = -PROVIDE_WINDOW
        self.count = 0
        self.names_waiting = 0

    async def wait(self, *, later: bool = False) -> None:
        if not later:
            self.names_waiting += 1
        try:
            while True:
                now = trio.current_time()
                if now - self.start >= PROVIDE_WINDOW:
                    self.start, self.count = now, 0
                if self.count < PROVIDE_BURST and (not later or not self.names_waiting):
                    self.count += 1
                    return
                # Full: the next window; a later caller just after it, so names go first.
                await trio.sleep_until(self.start + PROVIDE_WINDOW + (0.05 if later else 0.0))
        finally:
            if not later:
                self.names_waiting -= 1


class Provider:
    """Provider records for every model we hold, paced, renewed; :meth:`run` runs with the host.
    ``provided`` and ``pending`` say how far it got (``/api/mesh/status``)."""

    def __init__(self, models: Callable[[], tuple[ModelInfo, ...]], provide: Callable[[str], Awaitable[bool]],
                 changed: Callable[[], trio.Event], dht_size: Callable[[], int]) -> None:
        self.models = models
        self.provide = provide
        self.changed = changed
        self.dht_size = dht_size
        self.provided: set[str] = set()
        self.pending = 0

    def status(self) -> dict:
        return {"provided": len(self.provided), "pending": self.pending}

    async def run(self) -> None:
        self.pending = len(self.models())
        await trio.sleep(PROVIDE_FIRST)
        last_full = trio.current_time()
        size_then = 0
        while True:
            wake = self.changed()  # taken before reading the models: a change while we provide is not missed
            # announce.fit keeps loaded models first, then the list's order: the tail is left out.
            held = sorted(self.models(), key=lambda m: not m.loaded)
            keys = list(dict.fromkeys(name_key(m.name) for m in reversed(held)))
            now = trio.current_time()
            size = self.dht_size()
            if now - last_full >= REPROVIDE or (size >= 2 * size_then and size > size_then):
                self.provided, last_full, size_then = set(), now, size
            todo = [k for k in keys if k not in self.provided]
            self.pending = len(todo)
            for key in todo:
                if await self.provide(key):  # paced by the mesh service (Pace): one window for every caller
                    self.provided.add(key)
                self.pending -= 1
            self.provided &= set(keys)
            with trio.move_on_after(RECHECK):
                await wake.wait()
            await trio.sleep(CHANGE_GAP)  # a burst of changes (a pull's layers) is one pass

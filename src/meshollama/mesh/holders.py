"""Holders of a model the peer table does not list, found through DHT provider records.

The gossiped announcements list what every node holds, and in a small mesh
they are the whole truth. They stop being enough in two cases: a node holds
more models than one announcement carries (``announce.fit`` leaves the rest
out and sets ``more``), and a large mesh (past ``p2p.full_view_up_to``
peers), where a gateway should not need everyone's word to find a holder.
Every serving node provides one record per model name (``mesh.providing``).

:class:`HolderFinder` asks the DHT for providers (at most :data:`LOOKUPS`
lookups at once, one per key at a time; the list is kept for
:data:`PROVIDERS_TTL`, "nobody" for :data:`NOBODY_TTL`, so a flood of
requests for names nobody has costs one lookup per name per 10 s; a lookup
cut short, by its request's end or the wait for a lookup slot, is not
kept), then asks providers directly whether they hold the model now
(``/meshollama/holds/1``, ``mesh.load_client.ask_holds``), :data:`SAMPLE`
at a time, best first (connected peers of our table, then other table
peers, then strangers; in a closed mesh only admitted ones), until one says
yes or :data:`WAIT` runs out. A provider record is a claim that was true
once: records live 48 h in py-libp2p, a crashed or emptied node's too. A
provider that says no leaves the list (and our DHT's local store); one that
does not answer (a dead record, an older node, a refusal) is skipped for
:data:`FAILED_TTL`. Answers are kept :data:`FRESH` seconds and shared by
the requests asking at once (a holder answers one question per peer per
0.1 s). :class:`Holders` says who said yes, with digest and load, and how
many did not answer: the gateway answers 503 then, not "model not found".
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from .. import names
from ..catalog import LoadInfo
from ..errors import P2PError
from .providing import name_key

log = logging.getLogger("meshollama.mesh")

PROVIDERS_TTL = 60.0  # seconds a provider list is used before the DHT is asked again
NOBODY_TTL = 10.0  # seconds "nobody provides it" stands
FAILED_TTL = 5.0  # seconds a provider that did not answer is skipped (counted as not answering)
FRESH = 1.0  # seconds a provider's answer is reused
MAX_KEYS = 1024  # provider lists kept (and as many answers)
LOOKUPS = 4  # DHT lookups at once, all keys together
SAMPLE = 3  # providers asked at once
WAIT = 3.0  # seconds a request waits for the DHT and the answers together
ASK_TIMEOUT = 1.0  # seconds for one provider's answer, a dial included
RETRY_AFTER = 0.2  # seconds (to twice that, at random) before asking a provider again whose stream failed
TRIES = 3  # questions to one provider within ASK_TIMEOUT
MORE_MIN = 64  # models an announcement saying "mm" must list to be believed (announce.fit drops
# details before models: fewer than this only with absurdly long names or digests)
NOT_NOW = -1  # rank of a provider our table has down: not asked, counted as not answering


@dataclass(frozen=True)
class Found:
    """A peer that said, just now, that it holds the model."""

    peer_id: str
    digest: str
    loaded: bool
    load: LoadInfo

    def busy(self) -> float:
        """Its share of slots taken (queued counts as taken): lower first; >= 1: no slot free."""
        if self.load.capacity <= 0:
            return float("inf")
        return (self.load.in_flight + self.load.queued + self.load.waiting) / self.load.capacity


@dataclass
class Holders:
    found: list[Found] = field(default_factory=list)  # least busy first
    unanswered: int = 0  # providers asked that did not answer in time, or that cannot be asked now
    complete: bool = True  # False: cut short by WAIT (the DHT or a provider was slow): "retry later"


_UNKNOWN = object()  # a provider that did not answer


class HolderFinder:
    """Providers per model from the DHT, and who among them holds it now."""

    def __init__(self, find_providers: Callable[[str], Awaitable[list[str]]],
                 ask: Callable[[str, str], Awaitable[Found | None]], *, self_id: str,
                 rank: Callable[[str], int | None] = lambda peer_id: 2,
                 forget_provider: Callable[[str, str], None] = lambda key, peer_id: None,
                 rng: random.Random | None = None,
                 on_count: Callable[[str], None] = lambda what: None) -> None:
        self._find = find_providers
        self._ask = ask
        self.self_id = self_id
        self.rank = rank  # 0 connected table peer, 1 table peer, 2 stranger; NOT_NOW: down; None: never
        self.forget_provider = forget_provider  # (DHT key, peer): drop a record that proved wrong
        self.rng = rng if rng is not None else random.Random()
        self.on_count = on_count
        self._lists: OrderedDict[str, tuple[float, list[str]]] = OrderedDict()  # key -> (until, providers)
        self._answers: OrderedDict[tuple[str, str], tuple[float, object]] = OrderedDict()  # (key, peer) -> (until, answer)
        self._pending: dict[object, trio.Event] = {}  # a key (lookup) or (key, peer) (question) under way
        self._lookups = trio.CapacityLimiter(LOOKUPS)

    async def find(self, name: str) -> Holders:
        """Peers that hold ``name`` now, least busy first, within :data:`WAIT`."""
        key = names.key(name)
        out = Holders(complete=False)
        silent: set[str] = set()
        found: dict[str, Found] = {}
        with trio.move_on_after(WAIT):
            providers = await self._providers(key)
            now = trio.current_time()
            order = []
            for pid in providers:
                rank = self.rank(pid)
                failed = self._answers.get((key, pid))
                if rank is None:
                    continue  # never asked (not admitted)
                if rank == NOT_NOW or (failed is not None and failed[1] is _UNKNOWN and failed[0] > now):
                    silent.add(pid)  # a holder we cannot ask now: "retry later", not "not found"
                    continue
                order.append((rank, self.rng.random(), pid))
            order.sort()
            for start in range(0, len(order), SAMPLE):
                wave = [pid for _, _, pid in order[start:start + SAMPLE]]
                async with trio.open_nursery() as nursery:
                    for pid in wave:
                        nursery.start_soon(self._one, key, pid, name, found, silent, nursery.cancel_scope)
                if found:
                    break
            out.complete = True
        out.found = sorted(found.values(), key=Found.busy)
        out.unanswered = len(silent)
        self.on_count("found" if out.found else "none")
        return out

    async def _one(self, key: str, pid: str, name: str, found: dict, silent: set, wave: trio.CancelScope) -> None:
        answer = await self._answer(key, pid, name)
        if isinstance(answer, Found):
            found[pid] = answer
            # A yes is enough: the rest of the wave (a dead record costs a second) has 0.1 s more.
            wave.deadline = min(wave.deadline, trio.current_time() + 0.1)
        elif answer is _UNKNOWN:
            silent.add(pid)

    async def _providers(self, key: str) -> list[str]:
        async def lookup() -> list[str]:
            async with self._lookups:
                self.on_count("lookup")
                return [p for p in await self._find(name_key(key)) if p != self.self_id]

        return await self._shared(key, self._lists, lookup, lambda got: PROVIDERS_TTL if got else NOBODY_TTL)

    async def _answer(self, key: str, pid: str, name: str) -> object:
        async def question() -> object:
            self.on_count("asked")
            answer: object = _UNKNOWN
            with trio.move_on_after(ASK_TIMEOUT):
                for attempt in range(TRIES):
                    try:
                        answer = await self._ask(pid, name)
                        break
                    except P2PError as exc:
                        # Again, shortly after and not in step with other questions: the first
                        # stream on a connection the DHT lookup has just opened to this peer
                        # failed in multistream negotiation in about half the runs of
                        # bench_holders.py, and a holder answers one question per peer per
                        # holds_gate gap (questions about several models at once).
                        log.debug("holds question to %s for %s (try %d): %s", pid, name, attempt + 1, exc)
                        if attempt + 1 < TRIES:
                            await trio.sleep(RETRY_AFTER * (1 + self.rng.random()))
            if answer is _UNKNOWN:
                self.on_count("failed")
                return _UNKNOWN
            if answer is None:  # it does not hold it (any more): its record is wrong
                self._drop(key, pid)
            return answer

        return await self._shared((key, pid), self._answers, question,
                                  lambda got: FAILED_TTL if got is _UNKNOWN else FRESH)

    async def _shared(self, what, cache: OrderedDict, work: Callable[[], Awaitable[object]],
                      ttl: Callable[[object], float]):
        """``work()``'s result for ``what``, cached for ``ttl(result)``; callers at once
        share one run. A run cut short (its caller's cancellation) is not kept: the next
        caller runs it again."""
        while True:
            cached = cache.get(what)
            if cached is not None and cached[0] > trio.current_time():
                return cached[1]
            pending = self._pending.get(what)
            if pending is None:
                break
            await pending.wait()
        done = self._pending[what] = trio.Event()
        try:
            result = await work()
            cache[what] = (trio.current_time() + ttl(result), result)
            cache.move_to_end(what)
            while len(cache) > MAX_KEYS:
                cache.popitem(last=False)
            return result
        finally:
            del self._pending[what]
            done.set()

    def _drop(self, key: str, pid: str) -> None:
        cached = self._lists.get(key)
        if cached is not None and pid in cached[1]:
            left = [p for p in cached[1] if p != pid]
            # Emptied: kept as long as "nobody", so a node that just got the model is found soon.
            until = cached[0] if left else min(cached[0], trio.current_time() + NOBODY_TTL)
            self._lists[key] = (until, left)
        self.forget_provider(name_key(key), pid)

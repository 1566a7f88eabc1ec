"""Saying in the DHT which models we hold: one provider record per model name.

Every serving node puts one provider record per model it holds in the
Kademlia DHT, keyed by :func:`name_key` (a client asks by name; the holder's
answer to a holds question carries the digest, ``mesh.holders``).
:class:`Provider` says new models at once and all of them every
:data:`REPROVIDE` seconds, and again when the DHT's routing table has doubled
since, while it is smaller than :data:`K` (a record put while the table was
nearly empty reached few); a model gone is unprovided; while
the table is empty it says nothing (each record would reach nobody and use
a permit). Models an announcement leaves out go first: they need the DHT,
the rest are in every table.

**Pacing.** py-libp2p 0.8.1 silently drops a sender's ADD_PROVIDER past 10
in a 10 s window (``kad_dht.py``, ``_check_provider_rate_limit``): 280 model
names said at once reached remote peers as 10 records, and ``provide()``
still returned True. Every record this node says (model names here, blobs in
``models.service``) takes a permit from one :class:`Pace` first
(``MeshService.provide``): :data:`PROVIDE_BURST` per :data:`PROVIDE_WINDOW`,
a wide margin because a receiver's window starts when our record reaches it,
after a lookup of varying length. Names go before blobs for a whole pass.
py-libp2p's own republishing (every 600 s it re-provides, unpaced, every key
it thinks is 22 h old, i.e. every key we said) is kept off by
``P2PHost.provide``, which marks each key as just republished.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from contextlib import contextmanager

import trio

from .. import names
from ..catalog import ModelInfo

PROVIDE_FIRST = 5.0  # seconds after the host starts: let the join fill the DHT's table first
PROVIDE_BURST = 8  # records in one window (py-libp2p takes 10 per 10 s window per sender)
PROVIDE_WINDOW = 12.0  # seconds
REPROVIDE = 7200.0  # seconds between saying every record again (py-libp2p keeps them 48 h; at 8 per
# 12 s, 280 names and 1,000 blobs take ~32 min: every 30 min would keep the pace saturated)
K = 20  # the DHT's replication: past this many peers a doubled table changes little where records land
CHANGE_GAP = 0.5  # seconds: changes closer than this are said in one pass
RECHECK = 30.0  # seconds between looks at the DHT's table size when nothing changes


def name_key(name: str) -> str:
    """The DHT key of a model name: a sha2-256 multihash, in hex."""
    return "1220" + hashlib.sha256(b"meshollama/model/" + names.key(name).encode()).hexdigest()


class Pace:
    """At most :data:`PROVIDE_BURST` records per :data:`PROVIDE_WINDOW` (one fixed window
    after the other, as py-libp2p counts them). Model names go first: a ``later``
    caller (a blob) waits while a names pass runs (:meth:`names_pass`) or a name waits."""

    def __init__(self) -> None:
        self.start = -PROVIDE_WINDOW
        self.count = 0
        self.names = 0  # names passes running and names waiting

    @contextmanager
    def names_pass(self):
        self.names += 1
        try:
            yield
        finally:
            self.names -= 1

    async def wait(self, *, later: bool = False) -> None:
        with self.names_pass() if not later else _nothing():
            while True:
                now = trio.current_time()
                if now - self.start >= PROVIDE_WINDOW:
                    self.start, self.count = now, 0
                if self.count < PROVIDE_BURST and (not later or not self.names):
                    self.count += 1
                    return
                if self.count < PROVIDE_BURST:  # a later caller behind names: look again soon
                    await trio.sleep(0.5)
                else:  # full: the next window (a later caller just after it)
                    await trio.sleep_until(self.start + PROVIDE_WINDOW + (0.05 if later else 0.0))


@contextmanager
def _nothing():
    yield


class Provider:
    """Provider records for every model we hold, paced, renewed; :meth:`run` runs with the host.
    ``provided`` and ``pending`` say how far it got (``/api/mesh/status``)."""

    def __init__(self, models: Callable[[], tuple[ModelInfo, ...]], provide: Callable[[str], Awaitable[bool]],
                 changed: Callable[[], trio.Event], dht_size: Callable[[], int], pace: Pace | None = None,
                 unprovide: Callable[[str], None] = lambda key: None) -> None:
        self.models = models
        self.provide = provide
        self.unprovide = unprovide
        self.changed = changed
        self.dht_size = dht_size
        self.pace = pace or Pace()
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
            if now - last_full >= REPROVIDE or (size_then < K and size >= 2 * size_then and size > size_then):
                self.provided, last_full, size_then = set(), now, size
            todo = [k for k in keys if k not in self.provided]
            self.pending = len(todo)
            if size:  # an empty table: every record would reach nobody (and take a permit)
                with self.pace.names_pass():
                    for key in todo:
                        if await self.provide(key):
                            self.provided.add(key)
                        self.pending -= 1
            for key in self.provided - set(keys):  # models gone: py-libp2p would republish them
                self.unprovide(key)
            self.provided &= set(keys)
            with trio.move_on_after(RECHECK):
                await wake.wait()
            await trio.sleep(CHANGE_GAP)  # a burst of changes (a pull's layers) is one pass

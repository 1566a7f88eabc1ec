"""Network events from the libp2p host to the mesh service: never lost, in bounded memory.

libp2p calls its notifee from inside the swarm, where nothing may wait, and
mDNS reports from zeroconf's thread. A bounded channel that drops when full
lost ``disconnected`` events under churn: the peer then stayed "alive" in
the peer table until its heartbeats expired, and requests kept going to it.

So connection events are coalesced per peer instead of queued: for each peer
whose connection changed since the consumer last looked, only the latest
event (``connected`` or ``disconnected``) is kept. Memory is one entry per
such peer, whatever the churn, and the consumer always ends up with each
peer's latest connection event (it checks ``connected_peers()`` before acting
on one anyway, since a peer may hold more than one connection).

``discovered`` events (mDNS) are hints that come again: the latest addresses
of at most ``max_discovered`` peers wait; beyond that they are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

CONNECTION_KINDS = ("connected", "disconnected")


@dataclass(frozen=True)
class Event:
    """Something happened on the network: ``kind`` is connected|disconnected|discovered."""

    kind: str
    peer_id: str
    addrs: tuple[str, ...] = ()


class EventQueue:
    """What :class:`~meshollama.p2p.host.P2PHost` exposes as ``events``.

    :meth:`emit` never blocks and never drops a connection event; read with
    ``async for event in queue`` (ends once :meth:`close` was called and
    everything pending was read) or :meth:`receive`. Connection events come
    out before discoveries, each group oldest change first."""

    def __init__(self, max_discovered: int = 1024) -> None:
        if max_discovered < 1:
            raise ValueError("max_discovered must be >= 1")
        self.max_discovered = max_discovered
        self._links: dict[str, Event] = {}  # peer -> its latest connection event, unread
        self._found: dict[str, Event] = {}  # peer -> its latest discovery, unread
        self._closed = False
        self._lot = trio.lowlevel.ParkingLot()
        self.coalesced = 0  # events replaced by a later one for the same peer before they were read
        self.dropped = 0  # discoveries refused while max_discovered were waiting

    def emit(self, event: Event) -> bool:
        """Queue ``event`` (synchronous; call from the trio thread). False if it
        was dropped: a discovery while the queue is full, anything once closed."""
        if self._closed:
            return False
        if event.kind in CONNECTION_KINDS:
            pending = self._links
        elif event.kind == "discovered":
            pending = self._found
            if event.peer_id not in pending and len(pending) >= self.max_discovered:
                self.dropped += 1
                return False
        else:
            raise ValueError(f"unknown event kind {event.kind!r}")
        if pending.pop(event.peer_id, None) is not None:
            self.coalesced += 1
        pending[event.peer_id] = event  # at the end: the order is that of the latest changes
        self._lot.unpark_all()
        return True

    def close(self) -> None:
        """No more events: readers get what is pending, then the end."""
        self._closed = True
        self._lot.unpark_all()

    def __len__(self) -> int:
        return len(self._links) + len(self._found)

    async def receive(self) -> Event:
        """The next event; raises :class:`trio.EndOfChannel` once closed and drained."""
        await trio.lowlevel.checkpoint()  # a reader that always finds work still lets others run
        while True:
            for pending in (self._links, self._found):
                if pending:
                    return pending.pop(next(iter(pending)))
            if self._closed:
                raise trio.EndOfChannel
            await self._lot.park()

    def __aiter__(self) -> EventQueue:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

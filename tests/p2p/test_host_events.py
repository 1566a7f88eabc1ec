"""Connection events are never lost, in bounded memory (``p2p.events``).

A bounded channel that dropped events when full lost ``disconnected`` ones
under churn, and the peer stayed "alive" until its heartbeats expired. The
queue keeps each peer's latest connection event instead. No libp2p needed,
except to check that ``P2PHost`` uses it.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair

from meshollama.p2p.events import Event, EventQueue
from meshollama.p2p.host import P2PHost
from tests.p2p.helpers import settings


async def read_all(queue: EventQueue) -> list[Event]:
    queue.close()
    return [event async for event in queue]


async def test_a_flood_of_churn_keeps_every_peers_last_event_in_one_entry_per_peer():
    queue = EventQueue()
    peers = [f"peer{i}" for i in range(5000)]
    for _ in range(3):  # nobody reads: far more than a 1024-slot channel held
        for p in peers:
            queue.emit(Event("connected", p))
            queue.emit(Event("disconnected", p))
    assert len(queue) == len(peers)  # memory: one entry per peer, whatever the churn
    assert queue.coalesced == 6 * len(peers) - len(peers)
    got = await read_all(queue)
    assert got == [Event("disconnected", p) for p in peers]


async def test_the_latest_event_of_a_peer_wins_and_comes_in_order_of_the_latest_changes():
    queue = EventQueue()
    queue.emit(Event("connected", "a"))
    queue.emit(Event("connected", "b"))
    queue.emit(Event("disconnected", "a"))  # a's latest: after b's
    queue.emit(Event("disconnected", "c"))
    assert await read_all(queue) == [Event("connected", "b"), Event("disconnected", "a"), Event("disconnected", "c")]


async def test_discoveries_are_bounded_coalesced_and_come_after_connection_events():
    queue = EventQueue(max_discovered=2)
    assert queue.emit(Event("discovered", "a", ("/ip4/10.0.0.1/tcp/1/p2p/a",)))
    assert queue.emit(Event("discovered", "b", ()))
    assert not queue.emit(Event("discovered", "c", ()))  # full: a hint, dropped
    assert queue.emit(Event("discovered", "a", ("/ip4/10.0.0.2/tcp/1/p2p/a",)))  # known peer: updated
    assert queue.emit(Event("disconnected", "z"))  # never refused
    assert queue.dropped == 1
    assert await read_all(queue) == [
        Event("disconnected", "z"),
        Event("discovered", "b", ()),
        Event("discovered", "a", ("/ip4/10.0.0.2/tcp/1/p2p/a",)),
    ]


async def test_a_waiting_reader_wakes_on_emit_and_the_end_comes_after_what_is_pending():
    queue = EventQueue()
    got: list[Event] = []

    async def reader() -> None:
        async for event in queue:
            got.append(event)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            queue.emit(Event("connected", "a"))
            await trio.testing.wait_all_tasks_blocked()
            assert got == [Event("connected", "a")]
            queue.emit(Event("disconnected", "a"))
            queue.close()  # the reader still gets "disconnected", then its loop ends
        assert got == [Event("connected", "a"), Event("disconnected", "a")]
    assert not queue.emit(Event("connected", "b"))  # closed
    with pytest.raises(trio.EndOfChannel):
        await queue.receive()


async def test_receive_is_a_checkpoint_even_when_events_are_waiting():
    queue = EventQueue()
    queue.emit(Event("connected", "a"))
    with trio.CancelScope() as scope:
        scope.cancel()
        await queue.receive()  # cancelled before taking it
    assert len(queue) == 1


def test_an_unknown_kind_is_a_bug():
    with pytest.raises(ValueError):
        EventQueue().emit(Event("exploded", "a"))
    with pytest.raises(ValueError):
        EventQueue(max_discovered=0)


async def test_p2phost_never_drops_a_disconnected_event():
    host = P2PHost(create_new_key_pair(), settings())  # not started: only its event side
    for i in range(3000):
        host._emit(Event("connected", f"peer{i}"))
    for i in range(3000):
        host._emit(Event("disconnected", f"peer{i}"))
    got = await read_all(host.events)
    assert got == [Event("disconnected", f"peer{i}") for i in range(3000)]

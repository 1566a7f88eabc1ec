"""``p2p.safe_pubsub``: our stream to a peer that ran on a closed connection, while
another connection remains, moves to a new stream and keeps the peer's subscriptions
and router state; a retired stream's late failure does not bury its successor.
Scripted state, no hosts (the multihost hole-punch test runs it for real)."""

from __future__ import annotations

from types import SimpleNamespace

from meshollama.p2p import safe_pubsub

PEER = "peer-a"


class Muxed:
    def __init__(self, closed: bool) -> None:
        self.is_closed, self.peer_id = closed, PEER


class Stream:
    def __init__(self, closed: bool) -> None:
        self.muxed_conn = Muxed(closed)
        self.written: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.written.append(data)


class Queue:
    closed = False

    def close(self) -> None:
        self.closed = True


def _pubsub(stream: Stream, *, connected: bool = True):
    cls = safe_pubsub.make_safe_pubsub_class(lambda peer, exc: None)
    p = object.__new__(cls)
    p.peers, p.peer_queues = {PEER: stream}, {PEER: Queue()}
    p.peer_topics, p._replayed_recent_topics = {"t": {PEER}}, {PEER: {"t"}}
    p._peer_is_connected = lambda peer_id: connected
    p.ran, p.buried = [], []
    p._opening, p._moved = {}, set()  # what __init__ sets
    p._manager = SimpleNamespace(is_running=True, run_task=lambda f, *a: p.ran.append((f.__name__, a)))
    return p


def test_a_stream_on_a_closed_connection_moves_and_keeps_the_subscriptions():
    p = _pubsub(Stream(closed=True))
    queue = p.peer_queues[PEER]
    p._handle_dead_peer(PEER)  # a failed write, or the swarm's disconnected
    assert PEER not in p.peers and queue.closed
    assert p.peer_topics == {"t": {PEER}}  # it does not resend them on its own stream
    assert p.ran == [("_reopen_stream", (PEER,))]


def test_a_duplicate_wrapper_of_a_live_connection_moves_nothing():
    p = _pubsub(Stream(closed=False))
    p.connection_closed(SimpleNamespace(muxed_conn=Muxed(closed=False)))
    assert PEER in p.peers and not p.ran


async def test_a_retired_stream_neither_writes_nor_buries_its_successor():
    old, new = Stream(closed=True), Stream(closed=False)
    p = _pubsub(new)
    p._handle_dead_peer = lambda peer_id: p.buried.append(peer_id)
    rpc = SimpleNamespace(SerializeToString=lambda: b"x")
    assert await p.write_msg(old, rpc) is False
    assert old.written == [] and p.buried == []
    assert await p.write_msg(new, rpc) is True and new.written


async def test_an_open_asked_while_another_is_under_way_waits_and_opens_if_needed(monkeypatch):
    """The stream an open registered died before that open ended (its replay): the
    reopen asked meanwhile must not be dropped, or the peer stays unregistered."""
    import trio
    from libp2p.pubsub.pubsub import Pubsub

    opens = []

    async def stock_open(self, peer_id):
        opens.append(peer_id)
        if len(opens) == 1:
            await trio.sleep(1)  # registered, then still flushing and replaying
        else:
            self.peers[peer_id] = Stream(closed=False)

    monkeypatch.setattr(Pubsub, "_handle_new_peer", stock_open)
    p = _pubsub(Stream(closed=True))
    p.router = SimpleNamespace()
    del p.peers[PEER]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p._handle_new_peer, PEER)
        await trio.sleep(0.1)
        await p._reopen_stream(PEER)  # waits for the first, then opens again
    assert opens == [PEER, PEER] and PEER in p.peers


def test_a_moved_peer_gone_before_its_new_stream_leaves_the_router(monkeypatch):
    from libp2p.pubsub.pubsub import Pubsub

    p = _pubsub(Stream(closed=True))
    removed = []
    p.router = SimpleNamespace(remove_peer=removed.append)
    p._handle_dead_peer(PEER)  # moved: a reopen is under way
    p._peer_is_connected = lambda peer_id: False  # and the peer is gone
    monkeypatch.setattr(Pubsub, "_handle_dead_peer", lambda self, peer_id: None)  # stock: unregistered, nothing
    p._handle_dead_peer(PEER)
    assert removed == [PEER]

"""Table sync (``mesh.sync``) and the signed heartbeats it hands on (``p2p.signed``).

Real Ed25519 keys and pubsub's own signing rule, in-memory streams, virtual time."""

from __future__ import annotations

import math

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX

from meshollama.errors import P2PError, StreamReset
from meshollama.mesh import announce, sync
from meshollama.mesh.peertable import PeerState
from meshollama.p2p import signed
from meshollama.p2p.host import TOPIC
from tests.unit.test_mesh_service import run_mesh
from tests.unit.test_mesh_transport import heartbeat


def sign(kp, data: bytes, *, topic: str = TOPIC, seqno: int = 1, as_id: bytes | None = None) -> bytes:
    """A pubsub message signed the way py-libp2p signs one (``as_id``: claim another sender)."""
    sender = as_id or ID.from_pubkey(kp.public_key).to_bytes()
    bare = rpc_pb2.Message(data=data, topicIDs=[topic], from_id=sender, seqno=seqno.to_bytes(8, "big"))
    sig = kp.private_key.sign(PUBSUB_SIGNING_PREFIX.encode() + bare.SerializeToString())
    return rpc_pb2.Message(data=data, topicIDs=[topic], from_id=sender, seqno=bare.seqno, signature=sig).SerializeToString()


def peer_of(kp) -> str:
    return ID.from_pubkey(kp.public_key).to_base58()


def test_verify_takes_what_pubsub_takes_and_nothing_else():
    kp, other = create_new_key_pair(), create_new_key_pair()
    good = sign(kp, b"hello")
    msg = signed.verify(good)
    assert msg is not None and msg.from_peer == peer_of(kp) and msg.data == b"hello" and msg.raw == good
    tampered = rpc_pb2.Message.FromString(good)
    tampered.data = b"hellO"
    assert signed.verify(tampered.SerializeToString()) is None
    # Signed by one key, claiming the other's id: a peer handing on a table cannot forge.
    assert signed.verify(sign(other, b"hello", as_id=ID.from_pubkey(kp.public_key).to_bytes())) is None
    assert signed.verify(sign(kp, b"hello", topic="/other/topic")) is None
    assert signed.verify(b"\x00garbage\xff" * 10) is None
    assert signed.verify(b"") is None
    assert signed.verify(sign(kp, b"x" * (signed.MAX_SIGNED + 1))) is None


class Pipe:
    """One end of an in-memory duplex stream, with the ``p2p.stream.Stream`` surface."""

    def __init__(self, peer_id: str, send, receive) -> None:
        self.peer_id, self._send, self._receive = peer_id, send, receive
        self.buf = b""
        self.reset_called = self.closed = False

    async def write(self, data: bytes, *, timeout: float | None = None) -> None:
        if self.reset_called:
            raise StreamReset("reset")
        await self._send.send(data)

    async def read(self, max_bytes: int = 65536, *, timeout: float | None = None) -> bytes:
        if not self.buf:
            try:
                self.buf = await self._receive.receive()
            except trio.EndOfChannel:
                return b""
            except trio.ClosedResourceError:
                raise StreamReset("reset") from None
        out, self.buf = self.buf[:max_bytes], self.buf[max_bytes:]
        return out

    async def close(self) -> None:
        self.closed = True
        await self._send.aclose()

    async def reset(self) -> None:
        self.reset_called = True
        await self._send.aclose()


def pipe(client_id: str = "client", server_id: str = "server") -> tuple[Pipe, Pipe]:
    a_send, b_recv = trio.open_memory_channel(math.inf)
    b_send, a_recv = trio.open_memory_channel(math.inf)
    return Pipe(server_id, a_send, a_recv), Pipe(client_id, b_send, b_recv)  # (client's end, server's end)


async def test_a_pull_hands_our_heartbeat_over_and_takes_the_table_with_ages(autojump_clock):
    table = [(sign(create_new_key_pair(), b"a%d" % i), i / 10) for i in range(200)]
    mine = sign(create_new_key_pair(), b"mine")
    got_by_server: list[tuple[bytes, str]] = []
    server = sync.SyncServer(table=lambda: table, accept=lambda raw, caller: got_by_server.append((raw, caller)))
    got: list[tuple[bytes, float]] = []
    client, far = pipe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, far)
        assert await sync.pull(client, mine, lambda raw, age: got.append((raw, age)), max_frames=1000) == 200
    assert got == table and got_by_server == [(mine, "client")] and far.closed


async def test_the_server_refuses_strangers_repeat_callers_and_more_than_its_slots(autojump_clock):
    counts: list[str] = []
    server = sync.SyncServer(table=lambda: [], accept=lambda raw, caller: None, allow=lambda p: p != "stranger",
                             on_count=counts.append, slots=1, every=30.0)
    client, far = pipe("stranger")
    await server.handle(far)
    assert far.reset_called and counts == ["refused_not_admitted"]

    async with trio.open_nursery() as nursery:
        slow, slow_far = pipe("slow")
        nursery.start_soon(server.handle, slow_far)  # never sends its frame: holds the only slot...
        await trio.sleep(1)
        _, busy_far = pipe("other")
        await server.handle(busy_far)
        assert busy_far.reset_called and counts[-1] == "refused_busy"
        await trio.sleep(sync.REQUEST_DEADLINE)  # ...for 2 s at most, not the whole deadline
    assert counts[-1] == "served_failed" and slow_far.reset_called

    c, f = pipe("friend")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, f)
        await sync.pull(c, b"", lambda raw, age: None, max_frames=10)
    c, f = pipe("friend")
    await server.handle(f)  # again within 30 s
    assert f.reset_called and counts[-1] == "refused_too_often"


async def test_an_oversized_request_frame_is_refused_before_it_is_read(autojump_clock):
    counts: list[str] = []
    server = sync.SyncServer(table=lambda: [], accept=lambda raw, caller: None, on_count=counts.append)
    client, far = pipe()
    await client.write((10**9).to_bytes(4, "big"))
    await server.handle(far)
    assert far.reset_called and counts == ["served_failed"]


async def test_a_pull_bounds_what_it_takes(autojump_clock):
    kp = create_new_key_pair()
    server = sync.SyncServer(table=lambda: [(sign(kp, b"x"), 0.0)] * 11, accept=lambda raw, caller: None)
    client, far = pipe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, far)
        with pytest.raises(P2PError, match="over 10 heartbeats"):
            await sync.pull(client, b"", lambda raw, age: None, max_frames=10)
    # A server that never answers: the pull gives up at the deadline.
    client, far = pipe()
    started = trio.current_time()
    with pytest.raises(P2PError, match="took over"):
        await sync.pull(client, b"", lambda raw, age: None, max_frames=10)
    assert trio.current_time() - started == pytest.approx(sync.DEADLINE)
    # A frame with an age and no heartbeat.
    client, far = pipe()
    await far.write(sync.frame(b"\0\0\0\1"))
    with pytest.raises(P2PError, match="without a heartbeat"):
        await sync.pull(client, b"", lambda raw, age: None, max_frames=10)


async def test_the_service_applies_synced_heartbeats_like_gossiped_ones_and_drops_forgeries(autojump_clock):
    async with trio.open_nursery() as nursery:
        r = await run_mesh(nursery, heartbeat_interval=2.0)
        loops = r.mesh._loops
        kp = create_new_key_pair()
        pid = peer_of(kp)
        raw = sign(kp, announce.encode(heartbeat(pid, 5, refresh_ms=30_000)))
        loops.accept_signed(raw, age=40.0)  # heard 40 s ago by whoever hands it on
        assert r.state(pid) is PeerState.ALIVE and r.mesh.signed[pid] == raw
        assert loops.signed_table() == [(raw, pytest.approx(40.0))]  # handed on with its age (our own: none on a fake)
        # Another peer's description signed by kp: a forged heartbeat, dropped.
        loops.accept_signed(sign(kp, announce.encode(heartbeat(peer_of(create_new_key_pair()), 1))))
        loops.accept_signed(b"garbage")
        # Our sync server's caller may hand us its own heartbeat only.
        other = create_new_key_pair()
        loops.accept_signed(sign(other, announce.encode(heartbeat(peer_of(other), 1))), sender=pid)
        assert r.mesh.counters.dropped == {"signer_mismatch": 1, "sync_invalid": 1, "sync_not_own": 1}
        assert r.state(peer_of(other)) is None
        loops.accept_signed(sign(kp, announce.encode(heartbeat(pid, 4))))  # older than what we hold
        assert r.mesh.counters.dropped["stale"] == 1
        # It expires 90 s after it was heard (not after we got it), and takes its signed
        # heartbeat with it; a replay of that heartbeat does not bring it back.
        await r.at(51.5)  # 90 s after it was heard, checked every second
        assert r.state(pid) is None and pid not in r.mesh.signed and loops.signed_table() == []
        loops.accept_signed(raw)
        assert r.state(pid) is None and r.mesh.counters.dropped["stale"] == 2
        nursery.cancel_scope.cancel()


async def test_a_new_connection_pulls_a_table_at_most_once_a_minute_and_a_failed_pull_moves_on(autojump_clock):
    async with trio.open_nursery() as nursery:
        r = await run_mesh(nursery, heartbeat_interval=2.0)
        host = r.net.host
        kp = create_new_key_pair()
        r.net.sync_table = [(sign(kp, announce.encode(heartbeat(peer_of(kp), 1, refresh_ms=30_000))), 0)]
        for i, t in enumerate((1.0, 2.0, 30.0, 62.0)):
            await r.at(t)
            host.peer_connects(f"12D3KooWpeer{i}")
        await r.at(63.0)
        pulls = [p for p, proto in host.opened if proto == sync.PROTOCOL]
        assert pulls == ["12D3KooWpeer0", "12D3KooWpeer3"]
        # The two in between, never heard of, were asked for a hello instead (they serve none).
        assert [p for p, proto in host.opened if proto == sync.HELLO_PROTOCOL] == ["12D3KooWpeer1", "12D3KooWpeer2"]
        assert r.mesh.counters.synced == {"pulled": 2, "hello_failed": 2}
        assert r.state(peer_of(kp)) is not None  # learnt from the pull (unreachable: the fake net has no path to it)

        # Peers that serve no sync (older nodes): each failure moves on to another peer.
        r.net.sync_table = None
        host.opened.clear()
        await r.at(130.0)
        host.peer_connects("12D3KooWpeer4")
        await r.at(140.0)
        pulls = [p for p, proto in host.opened if proto == sync.PROTOCOL]
        assert len(pulls) == 3 and pulls[0] == "12D3KooWpeer4" and len(set(pulls)) == 3
        assert r.mesh._loops.last_pull is None  # so the next connection tries again
        nursery.cancel_scope.cancel()


# --- hello: a connected peer we have not heard of ----------------------------------------


async def past_the_first_pull(nursery: trio.Nursery, **kw):
    """A service whose first connection (12D3KooWfirst) pulled an empty table at 0 s: later
    connections from peers it never heard of get a hello instead. Returned at 1 s."""
    r = await run_mesh(nursery, heartbeat_interval=2.0, **kw)
    r.net.sync_table = []
    r.net.host.peer_connects("12D3KooWfirst")
    await r.at(1.0)
    return r


async def test_a_peer_we_never_heard_of_that_connects_is_asked_for_its_heartbeat(autojump_clock):
    async with trio.open_nursery() as nursery:
        r = await past_the_first_pull(nursery)
        host = r.net.host
        kp = create_new_key_pair()
        newcomer = peer_of(kp)
        r.net.hello_of[newcomer] = sign(kp, announce.encode(heartbeat(newcomer, 1, refresh_ms=30_000)))
        host.peer_connects(newcomer)
        await r.at(1.5)
        assert r.state(newcomer) is PeerState.ALIVE  # one round trip, not hops of gossip
        assert r.mesh.counters.synced == {"pulled": 1, "hello_said": 1}
        # A peer we know already is not asked.
        host.peer_disconnects(newcomer)
        host.peer_connects(newcomer)
        await r.at(2.0)
        assert [p for p, proto in host.opened if proto == sync.HELLO_PROTOCOL] == [newcomer]
        nursery.cancel_scope.cancel()


async def test_a_hello_answered_with_another_peers_heartbeat_is_dropped(autojump_clock):
    async with trio.open_nursery() as nursery:
        r = await past_the_first_pull(nursery)
        host = r.net.host
        other = create_new_key_pair()
        r.net.hello_of["12D3KooWliar"] = sign(other, announce.encode(heartbeat(peer_of(other), 1)))
        host.peer_connects("12D3KooWliar")
        await r.at(1.5)
        assert r.state(peer_of(other)) is None
        assert r.mesh.counters.dropped.get("sync_not_own") == 1
        nursery.cancel_scope.cancel()


async def test_hellos_in_flight_are_bounded_when_strangers_connect_by_the_dozen(autojump_clock):
    async with trio.open_nursery() as nursery:
        r = await past_the_first_pull(nursery)
        host = r.net.host
        strangers = [f"12D3KooWmute{i:02d}" for i in range(3 * sync.HELLO_IN_FLIGHT)]
        for peer in strangers:  # each accepts the stream and never answers
            r.net.hello_of[peer] = b""
            r.net.frozen.add(peer)
            host.peer_connects(peer)
        await r.at(1.5)
        assert len([p for p, proto in host.opened if proto == sync.HELLO_PROTOCOL]) == sync.HELLO_IN_FLIGHT
        assert r.mesh.counters.synced["hello_skipped"] == 2 * sync.HELLO_IN_FLIGHT
        await r.at(1.0 + sync.HELLO_DEADLINE + 0.5)  # each ends at the hello's deadline
        assert r.mesh._loops.hellos == set()
        assert r.mesh.counters.synced["hello_failed"] == sync.HELLO_IN_FLIGHT
        nursery.cancel_scope.cancel()


async def test_the_hello_server_hands_our_own_heartbeat_alone_and_takes_the_callers(autojump_clock):
    async with trio.open_nursery() as nursery:
        r = await run_mesh(nursery, heartbeat_interval=2.0)
        kp = create_new_key_pair()
        other = create_new_key_pair()
        r.net.host.hear(heartbeat(peer_of(other), 1))  # in our table: a hello never hands it on
        await r.at(0.5)
        caller = peer_of(kp)
        ours = sign(create_new_key_pair(), b"our own heartbeat")
        r.net.host.own_message = ours
        server = r.mesh._loops.hello_server()
        got: list[bytes] = []
        client, far = pipe(client_id=caller)
        nursery.start_soon(server.handle, far)
        theirs = sign(kp, announce.encode(heartbeat(caller, 1, refresh_ms=30_000)))
        assert await sync.pull(client, theirs, lambda raw, age: got.append(raw), max_frames=1) == 1
        assert got == [ours]
        assert r.state(caller) is not None  # learnt (unreachable: the fake net has no path to it)
        # Asked again within HELLO_EVERY: refused.
        client, far = pipe(client_id=caller)
        nursery.start_soon(server.handle, far)
        with pytest.raises(P2PError):
            await sync.pull(client, theirs, lambda raw, age: None, max_frames=1)
        assert r.mesh.counters.synced == {"hello_served": 1, "hello_refused_too_often": 1}
        nursery.cancel_scope.cancel()


class MembersOnly:
    """A closed mesh's gate: only ``members`` are admitted."""

    def __init__(self, *members: str) -> None:
        self.members = set(members)
        self.generation = 0
        self.on_refused = self.on_admitted = None

    def role(self, peer: str) -> str | None:
        return "node" if peer in self.members else None

    known_role = role

    async def wait(self, peer: str, timeout: float | None = None) -> str | None:
        return self.role(peer)


async def test_in_a_closed_mesh_a_stranger_gets_no_hello_and_is_sent_none(autojump_clock):
    async with trio.open_nursery() as nursery:
        r = await past_the_first_pull(nursery, admission=MembersOnly("12D3KooWfirst"))
        host = r.net.host
        host.own_message = sign(create_new_key_pair(), b"our own heartbeat")
        # It connects (Noise works for anyone): we never open a stream to it, so it gets
        # neither our heartbeat nor our question.
        r.net.hello_of["12D3KooWstranger"] = b""
        host.peer_connects("12D3KooWstranger")
        await r.at(2.0)
        assert ("12D3KooWstranger", sync.HELLO_PROTOCOL) not in host.opened
        assert r.mesh.counters.synced.get("hello_failed") == 1
        # It asks us: the stream is reset before its frame is read, not a byte answered.
        client, far = pipe(client_id="12D3KooWstranger")
        await client.write(sync.frame(b""))
        await r.mesh._loops.hello_server().handle(far)
        assert far.reset_called and not far.closed
        assert await client.read() == b""
        assert r.mesh.counters.synced.get("hello_refused_not_admitted") == 1
        nursery.cancel_scope.cancel()


async def test_a_hello_from_a_peer_with_nothing_to_say_yet_is_counted_empty(autojump_clock):
    async with trio.open_nursery() as nursery:
        r = await past_the_first_pull(nursery)
        host = r.net.host
        r.net.hello_of["12D3KooWquiet"] = b""  # it answers the end frame alone: no announcement yet
        host.peer_connects("12D3KooWquiet")
        await r.at(1.5)
        assert r.state("12D3KooWquiet") is None
        assert r.mesh.counters.synced == {"pulled": 1, "hello_empty": 1}
        nursery.cancel_scope.cancel()


async def test_a_second_connection_to_a_peer_being_asked_asks_nothing_more(autojump_clock):
    async with trio.open_nursery() as nursery:
        r = await past_the_first_pull(nursery)
        host = r.net.host
        r.net.hello_of["12D3KooWslow"] = b""
        r.net.frozen.add("12D3KooWslow")  # its answer does not come
        host.peer_connects("12D3KooWslow")
        await r.at(1.2)
        host.peer_connects("12D3KooWslow")  # a second connection (relayed, then direct)
        await r.at(1.4)
        assert [p for p, proto in host.opened if proto == sync.HELLO_PROTOCOL] == ["12D3KooWslow"]
        nursery.cancel_scope.cancel()

"""Real py-libp2p hosts on loopback: our wrapper and the library's sharp edges."""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from meshollama.errors import P2PError, UpstreamBroken, UpstreamBusy, UpstreamUnavailable
from meshollama.httpmsg import ProxyRequest, ProxyResponse
from meshollama.limits import InboundLimiter
from meshollama.p2p import patches, safe_pubsub
from meshollama.p2p.host import P2PHost
from meshollama.p2p.httpstream import PROTOCOL, HttpStreamServer, PeerScopes, PeerUpstream, StreamPool
from meshollama.p2p.ping import Pinger

from .helpers import running_hosts, settings

PSK_A = "11" * 32
PSK_B = "22" * 32


async def wait_for(predicate, step: float = 0.02):
    while not predicate():
        await trio.sleep(step)


async def test_two_hosts_gossip_signed_heartbeats():
    with trio.fail_after(20):
        async with running_hosts(settings(), settings()) as (a, b):
            await b.connect(a.addrs())
            got = []

            async def recv():
                got.append(await a.next_message())

            async with trio.open_nursery() as n:
                n.start_soon(recv)
                while not got:  # gossip mesh forms asynchronously: publish until delivered
                    await b.publish(b"hello")
                    with trio.move_on_after(0.3):
                        while not got:
                            await trio.sleep(0.02)
            assert got[0].from_peer == b.peer_id
            assert got[0].data == b"hello"


async def test_addrs_are_dialable_with_peer_id():
    with trio.fail_after(10):
        async with running_hosts(settings()) as (a,):
            (addr,) = a.addrs()
            assert addr.startswith("/ip4/127.0.0.1/tcp/")
            assert addr.endswith(f"/p2p/{a.peer_id}")
            assert not addr.endswith("/tcp/0/p2p/" + a.peer_id)


async def test_junk_on_pubsub_does_not_kill_our_host():
    """py-libp2p's Pubsub.stream_handler lets protobuf's DecodeError escape; ours drops the stream."""
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11

    junk_seen = []
    with trio.fail_after(20):
        async with running_hosts(settings(), settings(), on_junk=lambda p, w: junk_seen.append(w)) as (a, b):
            await b.connect(a.addrs())
            for payload in (b"\x08" + b"\xff" * 8, os.urandom(8), b"\x05\x0a\x03\xff\xff\xff"):
                stream = await b.open_stream(a.peer_id, str(PROTOCOL_ID_V11))
                await stream.write(payload)
                await stream.close()
            # a still works: it answers a ping and still gets messages
            pinger = Pinger(b.open_stream, timeout=2.0)
            await pinger.ping(a.peer_id)
            assert b.peer_id in a.connected_peers()
            await wait_for(lambda: junk_seen)


async def test_stock_pubsub_handler_is_killed_by_decode_error():
    """Shows the upstream bug our SafePubsub works around: DecodeError escapes the handler."""
    from google.protobuf.message import DecodeError
    from libp2p.pubsub.pubsub import Pubsub

    class FakeStream:
        class muxed_conn:
            peer_id = "peer"

        async def read(self, n=None):
            return b""

        async def reset(self):
            pass

    async def boom(self, stream):
        raise DecodeError("Error parsing message")

    stock = Pubsub.__new__(Pubsub)
    stock.continuously_read_stream = boom.__get__(stock)
    with pytest.raises(DecodeError):
        await Pubsub.stream_handler(stock, FakeStream())

    reported = []
    Safe = safe_pubsub.make_safe_pubsub_class(lambda peer, exc: reported.append(type(exc).__name__))
    safe = Safe.__new__(Safe)
    safe.continuously_read_stream = boom.__get__(safe)
    await safe.stream_handler(FakeStream())  # does not raise
    assert reported == ["DecodeError"]


async def test_dht_speaks_private_protocol_id():
    with trio.fail_after(20):
        async with running_hosts(settings(dht=True), settings(dht=True)) as (a, b):
            await b.connect(a.addrs())
            from libp2p.kad_dht import common

            assert str(common.PROTOCOL_ID) == patches.DHT_PROTOCOL_ID
            # a answers our private kad protocol and refuses the IPFS one
            s = await b.open_stream(a.peer_id, patches.DHT_PROTOCOL_ID)
            await s.reset()
            with pytest.raises(P2PError):
                await b.open_stream(a.peer_id, "/ipfs/kad/1.0.0", timeout=3)


async def test_plaintext_peer_is_refused():
    """py-libp2p's default security options accept plaintext; our host must not."""
    import multiaddr
    from libp2p import new_host
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

    with trio.fail_after(20):
        async with running_hosts(settings()) as (a,):
            kp = create_new_key_pair()
            plain = new_host(key_pair=kp, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(kp)},
                             listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")])
            async with plain.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                try:
                    with pytest.raises(Exception):
                        with trio.fail_after(8):
                            await plain.connect(info_from_p2p_addr(multiaddr.Multiaddr(a.addrs()[0])))
                    assert plain.get_id().to_base58() not in a.connected_peers()
                finally:
                    with trio.move_on_after(3) as cs:
                        cs.shield = True
                        await plain.close()


async def test_psk_mismatch_never_connects_and_match_does():
    with trio.fail_after(30):
        async with running_hosts(settings(psk=PSK_A), settings(psk=PSK_B), settings(psk=PSK_A)) as (a, b, c):
            with pytest.raises(P2PError):
                await b.connect(a.addrs(), timeout=4)
            assert b.peer_id not in a.connected_peers()
            await c.connect(a.addrs())
            assert c.peer_id in a.connected_peers()


async def test_no_psk_node_cannot_join_psk_mesh():
    with trio.fail_after(20):
        async with running_hosts(settings(psk=PSK_A), settings()) as (a, b):
            with pytest.raises(P2PError):
                await b.connect(a.addrs(), timeout=4)
            assert b.peer_id not in a.connected_peers()


async def test_disconnect_event_when_peer_closes():
    with trio.fail_after(20):
        async with trio.open_nursery() as outer:
            a = P2PHost(create_new_key_pair(), settings())
            await outer.start(a.serve)
            async with running_hosts(settings()) as (b,):
                await b.connect(a.addrs())
                events = []

                async def collect():
                    async for ev in a.events:
                        events.append(ev)

                outer.start_soon(collect)
                await wait_for(lambda: any(e.kind == "connected" for e in events))
            # b's host closed (explicit close in serve's finally): a must notice
            await wait_for(lambda: any(e.kind == "disconnected" and e.peer_id == b.peer_id for e in events))
            outer.cancel_scope.cancel()


async def test_dial_unreachable_address_fails_fast():
    with trio.fail_after(15):
        async with running_hosts(settings()) as (a,):
            other = P2PHost(create_new_key_pair(), settings())
            with pytest.raises(P2PError):
                await a.connect([f"/ip4/127.0.0.1/tcp/1/p2p/{other.peer_id}"], timeout=5)


async def test_stock_swarm_dials_only_a_peers_first_tcp_address_and_ours_tries_them_all():
    """py-libp2p's swarm keeps one address per transport class (``MAX_ADDRS_PER_PEER``):
    a peer whose first address is dead (a docker bridge, a stale LAN IP) is never
    reached by ``host.connect``. ``P2PHost.connect`` dials each address in turn."""
    import multiaddr
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo

    with trio.fail_after(30):
        async with running_hosts(settings(), settings(), settings()) as (a, b, target):
            good = target.addrs()[0]
            dead = f"/ip4/127.0.0.1/tcp/1/p2p/{target.peer_id}"  # nothing listens on port 1
            info = PeerInfo(ID.from_base58(target.peer_id),
                            [multiaddr.Multiaddr(x.rsplit("/p2p/", 1)[0]) for x in (dead, good)])
            with pytest.raises(Exception):
                with trio.fail_after(10):
                    await a._host.connect(info)  # the stock path: only the dead address is tried
            assert target.peer_id not in a.connected_peers()
            assert await b.connect([dead, good], timeout=10) == target.peer_id
            assert target.peer_id in b.connected_peers()


# --- HTTP over streams -----------------------------------------------------------


class ScriptedBackend:
    """Streams ``chunks`` then either ends, hangs, or fails."""

    def __init__(self, chunks=(b"a\n", b"b\n"), *, then="end", busy=False):
        self.chunks = chunks
        self.then = then
        self.busy = busy
        self.cancelled = trio.Event()
        self.requests = []

    @asynccontextmanager
    async def open(self, request):
        from meshollama.errors import UpstreamBusy as Busy

        self.requests.append(request)
        if self.busy:
            raise Busy("no slots")

        async def body():
            try:
                for c in self.chunks:
                    yield c
                    await trio.sleep(0)
                if self.then == "hang":
                    await trio.sleep_forever()
                if self.then == "fail":
                    raise UpstreamBroken("backend died")
            except trio.Cancelled:
                self.cancelled.set()
                raise

        try:
            yield ProxyResponse(200, (("content-type", "application/x-ndjson"),), body())
        except BaseException:
            self.cancelled.set()
            raise


@asynccontextmanager
async def http_pair(backend, *, limiter=None, max_body=4 << 20, pool=None, idle_timeout=30.0, stream_timeout=5.0,
                    allow=None):
    server = HttpStreamServer(backend, limiter or InboundLimiter(8, 4), max_request_bytes=max_body,
                              idle_timeout=idle_timeout, allow=allow)
    hosts = (settings(stream_timeout=stream_timeout), settings(stream_timeout=stream_timeout))
    async with running_hosts(*hosts, handlers={PROTOCOL: server.handle}) as (a, b):
        await b.connect(a.addrs())
        scopes = PeerScopes()
        pool = pool or StreamPool(b.open_stream)
        pool._open_stream = b.open_stream
        yield a, b, PeerUpstream(pool, a.peer_id, scopes), scopes


async def fetch(up, request=None) -> bytes:
    async with up.open(request or ProxyRequest("POST", "/api/chat")) as r:
        return b"".join([c async for c in r.body])


async def test_sequential_requests_reuse_one_stream():
    backend = ScriptedBackend()
    pool = StreamPool(None)
    with trio.fail_after(20):
        async with http_pair(backend, pool=pool) as (a, b, up, _):
            for _ in range(5):
                assert await fetch(up) == b"a\nb\n"
            assert (pool.opened, pool.reused) == (1, 4)
            assert pool.idle_count(a.peer_id) == 1


async def test_concurrent_requests_use_separate_streams_then_pool_them():
    backend = ScriptedBackend()
    pool = StreamPool(None)
    with trio.fail_after(20):
        async with http_pair(backend, pool=pool) as (a, b, up, _):
            results = []

            async def one():
                results.append(await fetch(up))

            async with trio.open_nursery() as n:
                for _ in range(4):
                    n.start_soon(one)
            assert results == [b"a\nb\n"] * 4
            assert pool.opened == 4 and pool.idle_count(a.peer_id) == 4


async def test_a_stream_the_caller_left_is_not_reused():
    backend = ScriptedBackend(then="hang")
    pool = StreamPool(None)
    with trio.fail_after(20):
        async with http_pair(backend, pool=pool) as (a, b, up, _):
            async with up.open(ProxyRequest("POST", "/api/generate")) as r:
                async for _chunk in r.body:
                    break
            await backend.cancelled.wait()
            assert pool.idle_count(a.peer_id) == 0


async def test_stream_closed_by_server_idle_timeout_is_retried_on_a_fresh_one():
    """The server retires idle streams; a client that still holds one (its own
    TTL is longer here on purpose) retries once on a new stream, unseen by the caller."""
    backend = ScriptedBackend()
    pool = StreamPool(None, idle_ttl=60.0)
    with trio.fail_after(20):
        async with http_pair(backend, pool=pool, idle_timeout=0.2) as (a, b, up, _):
            assert await fetch(up) == b"a\nb\n"
            await trio.sleep(0.6)  # let the server's idle timer fire (the condition itself)
            assert await fetch(up) == b"a\nb\n"
            assert (pool.opened, pool.reused) == (2, 1)
            assert len(backend.requests) == 2


async def test_forgotten_idle_streams_are_returned_for_reset():
    """A peer marked down on a blip keeps its connection: idle streams dropped
    from the pool must be reset, or they keep Yamux slots and the peer's
    open-stream allowance (here 8: a third round would be refused) until its idle timeout."""
    pool = StreamPool(None)
    with trio.fail_after(20):
        async with http_pair(ScriptedBackend(), pool=pool, limiter=InboundLimiter(16, 4)) as (a, b, up, _):
            for _round in range(3):
                async with trio.open_nursery() as n:
                    for _ in range(4):
                        n.start_soon(fetch, up)
                assert pool.idle_count(a.peer_id) == 4
                dropped = pool.forget(a.peer_id)
                assert len(dropped) == 4 and pool.idle_count(a.peer_id) == 0
                for stream in dropped:
                    await stream.reset()
                while b._host.get_network().get_connections()[0].muxed_conn.stream_backlog_semaphore.value < 255:
                    await trio.sleep(0.01)  # slots come back as the resets land


async def test_big_answers_are_written_in_slices_each_with_its_own_deadline():
    """Stream.write's deadline covers one call: a 4 MiB piece written at once must
    drain within stream_timeout (10 s by default), so a reader slower than
    ~400 KB/s would lose the answer. Slices keep each write to 64 KiB."""
    from meshollama.p2p import httpstream

    sizes = []

    class Recording:
        async def write(self, data: bytes, *, timeout=None) -> None:
            sizes.append(len(data))

    await httpstream._write(Recording(), b"x" * (4 << 20) + b"tail")
    assert sum(sizes) == (4 << 20) + 4 and max(sizes) <= httpstream.WRITE_SLICE


class _CleanupFails:
    """The answer completes, then leaving the backend's context raises."""

    def __init__(self) -> None:
        self.n = 0

    @asynccontextmanager
    async def open(self, request):
        self.n += 1
        n = self.n

        async def body():
            yield b"answer %d\n" % n

        yield ProxyResponse(200, (("content-type", "application/json"),), body())
        if n == 1:
            raise RuntimeError("close failed")


async def test_a_failure_after_end_never_reaches_the_next_request_on_the_stream():
    pool = StreamPool(None)
    with trio.fail_after(20):
        async with http_pair(_CleanupFails(), pool=pool) as (a, b, up, _):
            assert await fetch(up) == b"answer 1\n"
            assert await fetch(up) == b"answer 2\n"  # not the first answer's late Error frame


async def test_pool_opens_streams_within_the_connect_timeout():
    seen = []

    async def open_stream(peer_id, protocol, *, timeout=None):
        seen.append((peer_id, protocol, timeout))
        raise P2PError("unreachable")

    pool = StreamPool(open_stream, connect_timeout=1.5)
    with pytest.raises(P2PError):
        await pool.acquire("peer")
    assert seen == [("peer", PROTOCOL, 1.5)]


async def test_idle_streams_past_their_ttl_are_not_used():
    backend = ScriptedBackend()
    pool = StreamPool(None, idle_ttl=0.0)
    with trio.fail_after(20):
        async with http_pair(backend, pool=pool) as (a, b, up, _):
            await fetch(up)
            await fetch(up)
            assert (pool.opened, pool.reused) == (2, 0)


async def test_large_bodies_both_ways_on_a_reused_stream():
    """Several windows' worth each way on one stream: Yamux credit (batched by our
    patch) must keep flowing, and the stream must stay usable afterwards."""
    big = os.urandom(1 << 20)
    backend = ScriptedBackend(chunks=[big[i:i + 65536] for i in range(0, len(big), 65536)])
    pool = StreamPool(None)
    with trio.fail_after(30):
        async with http_pair(backend, pool=pool) as (a, b, up, _):
            for _ in range(3):
                assert await fetch(up, ProxyRequest("POST", "/api/x", (), big)) == big
            assert backend.requests[-1].body == big
            assert (pool.opened, pool.reused) == (1, 2)


async def test_request_and_streamed_response_roundtrip():
    backend = ScriptedBackend(chunks=[b'{"n":%d}\n' % i for i in range(20)])
    with trio.fail_after(20):
        async with http_pair(backend) as (a, b, up, _):
            body = os.urandom(3 * 1024 * 1024 // 2)  # > one frame: split into several DATA frames
            async with up.open(ProxyRequest("POST", "/api/chat?x=1", (("content-type", "x/y"), ("host", "h")), body)) as r:
                assert r.status == 200
                assert ("content-type", "application/x-ndjson") in r.headers
                got = [c async for c in r.body]
            assert b"".join(got) == b"".join(backend.chunks)
            req = backend.requests[0]
            assert (req.method, req.path, req.body) == ("POST", "/api/chat?x=1", body)
            assert ("host", "h") not in req.headers  # hop-by-hop headers are not carried


async def test_caller_leaving_aborts_remote_work():
    backend = ScriptedBackend(then="hang")
    with trio.fail_after(20):
        async with http_pair(backend) as (a, b, up, _):
            async with up.open(ProxyRequest("POST", "/api/generate")) as r:
                async for _chunk in r.body:
                    break
            await backend.cancelled.wait()


async def test_backend_failure_mid_stream_is_broken_not_hang():
    backend = ScriptedBackend(then="fail")
    with trio.fail_after(20):
        async with http_pair(backend) as (a, b, up, _):
            async with up.open(ProxyRequest("POST", "/api/generate")) as r:
                with pytest.raises(UpstreamBroken, match="backend died"):
                    async for _ in r.body:
                        pass


async def test_backend_failure_before_the_first_byte_is_retryable():
    """Nothing reached the caller yet (the head travels with the first bytes), so
    the gateway may still try another peer: UpstreamUnavailable, not Broken."""
    backend = ScriptedBackend(chunks=(), then="fail")
    with trio.fail_after(20):
        async with http_pair(backend) as (a, b, up, _):
            with pytest.raises(UpstreamUnavailable, match="backend died"):
                async with up.open(ProxyRequest("POST", "/api/generate")):
                    pass


async def test_busy_backend_and_inbound_limit_answer_busy():
    with trio.fail_after(20):
        async with http_pair(ScriptedBackend(busy=True)) as (a, b, up, _):
            with pytest.raises(UpstreamBusy):
                async with up.open(ProxyRequest("POST", "/api/chat")):
                    pass
        backend = ScriptedBackend(then="hang")
        async with http_pair(backend, limiter=InboundLimiter(1, 1)) as (a, b, up, _):
            async with up.open(ProxyRequest("POST", "/api/chat")) as first:
                async for _ in first.body:
                    break
                with pytest.raises(UpstreamBusy):
                    async with up.open(ProxyRequest("POST", "/api/chat")):
                        pass


async def test_open_streams_per_peer_are_bounded_idle_ones_included():
    """Limits 8 total / 1 per peer: at most 2 open streams from one peer."""
    with trio.fail_after(20):
        async with http_pair(ScriptedBackend(), limiter=InboundLimiter(8, 1)) as (a, b, up, _):
            parked = [await b.open_stream(a.peer_id, PROTOCOL) for _ in range(2)]
            extra = await b.open_stream(a.peer_id, PROTOCOL)
            answer = await extra.read(4096)
            assert answer[:1] == b"\x05" and b"too many open streams" in answer  # an Error frame
            for s in parked:
                await s.close()
            await extra.close()
            # once they are gone, requests are served again
            while True:
                try:
                    assert await fetch(up) == b"a\nb\n"
                    break
                except UpstreamBusy:
                    await trio.sleep(0.05)


async def test_peer_marked_down_releases_waiting_caller():
    backend = ScriptedBackend(chunks=(b'{"n":0}\n',), then="hang")
    with trio.fail_after(20):
        async with http_pair(backend) as (a, b, up, scopes):
            async with up.open(ProxyRequest("POST", "/api/chat")) as r:
                async with trio.open_nursery() as n:
                    n.start_soon(lambda: wait_and_cancel(scopes, a.peer_id, backend))
                    with pytest.raises(UpstreamBroken, match="went down"):
                        async for _ in r.body:
                            pass


async def test_peer_marked_down_before_the_answer_is_retryable():
    """The server sends the head with the first body bytes; a peer that goes down
    before then leaves nothing sent to the caller, so it is UpstreamUnavailable."""
    backend = ScriptedBackend(chunks=(), then="hang")
    with trio.fail_after(20):
        async with http_pair(backend) as (a, b, up, scopes):
            async with trio.open_nursery() as n:
                n.start_soon(lambda: wait_and_cancel(scopes, a.peer_id, backend))
                with pytest.raises(UpstreamUnavailable, match="went down"):
                    async with up.open(ProxyRequest("POST", "/api/chat")):
                        pass
            await backend.cancelled.wait()  # and the remote work was aborted


async def wait_and_cancel(scopes, peer_id, backend):
    """Mark the peer down once the request is in flight *and* has reached its
    backend (a condition, not a delay: on a loaded box a fixed 50 ms could
    fire before the request arrived, leaving no remote work to abort)."""
    while scopes.count(peer_id) == 0 or not backend.requests:
        await trio.sleep(0.01)
    scopes.cancel_peer(peer_id)


async def test_garbage_frames_get_an_error_not_a_crash():
    backend = ScriptedBackend()
    with trio.fail_after(20):
        async with http_pair(backend) as (a, b, up, _):
            for junk in (b"\x09\x00\x00\x00\x01x", b"\x01\xff\xff\xff\xff", b"\x01\x00\x00\x00\x02{]"):
                s = await b.open_stream(a.peer_id, PROTOCOL)
                await s.write(junk)
                answer = await s.read(4096)
                assert answer[:1] == b"\x05"  # an Error frame
                await s.reset()
            # and the server still serves real requests
            async with up.open(ProxyRequest("GET", "/api/tags")) as r:
                assert r.status == 200


async def test_a_peer_cannot_manage_our_models():
    """Attack: a peer (anyone on port 4001 while the mesh is open) speaks the
    protocol directly and asks for model management, which on the embedded
    backend writes and deletes files. It is refused from the request head, before
    any body is read, and the backend never sees it; inference still works."""
    from meshollama.gateway.endpoints import peer_may_call

    backend = ScriptedBackend()
    with trio.fail_after(20):
        async with http_pair(backend, allow=lambda peer, method, path: peer_may_call(method, path)) as (a, b, up, _):
            for method, path in [("DELETE", "/api/delete"), ("POST", "/api/create"), ("POST", "/api/copy"),
                                 ("POST", "/api/pull"), ("POST", "/api/push"),
                                 ("POST", "/api/blobs/sha256:" + "0" * 64), ("HEAD", "/api/blobs/sha256:00"),
                                 ("GET", "/api/chat"), ("POST", "/api/../api/delete"), ("GET", "/metrics")]:
                with pytest.raises(UpstreamUnavailable, match="not served to peers"):
                    await fetch(up, ProxyRequest(method, path, (), b"x" * 1000))
            assert backend.requests == []
            for path in ("/api/chat", "/v1/messages", "/v1/responses?x=1", "/api/show"):
                assert await fetch(up, ProxyRequest("POST", path)) == b"a\nb\n"
            assert [r.path for r in backend.requests] == ["/api/chat", "/v1/messages", "/v1/responses?x=1",
                                                           "/api/show"]


async def test_ping_detects_frozen_peer():
    """A peer that never echoes (as a SIGSTOPped process) fails the ping within the timeout."""

    async def black_hole(stream):
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with running_hosts(settings(), settings(), handlers={"/test/blackhole/1": black_hole}) as (a, b):
            await b.connect(a.addrs())
            pinger = Pinger(b.open_stream, timeout=1.0)
            assert await pinger.ping(a.peer_id) >= 0
            frozen = Pinger(lambda p, proto, timeout: b.open_stream(p, "/test/blackhole/1", timeout=timeout),
                            timeout=0.5)
            with pytest.raises(P2PError, match="timed out"):
                await frozen.ping(a.peer_id)

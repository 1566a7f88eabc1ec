"""Attacks on a node through the peer protocol (issue 9, "Peer surface"), over real
py-libp2p hosts on loopback: raw streams send whatever frames an attacker would.

Each test checks one limit of ``p2p.httpserver``: the request size, the request
slot taken at the head (before any body), one deadline for the whole request,
the byte budget across all streams, and the headers that never cross a peer hop.
The last one runs a real node process and measures its memory under attack.

A peer refused while it pushes a body may not get to read the Error frame
before the reset lands (py-libp2p then drops it unread), so those refusals
are checked on the server's side (``on_reject``), not by the frame. Pushers
stop by themselves when the node resets their stream: cancelling a
py-libp2p write midway would break the whole connection (Noise nonces).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

import psutil
import pytest
import trio

from meshollama.errors import P2PError
from meshollama.httpmsg import ProxyRequest, ProxyResponse
from meshollama.limits import InboundLimiter
from meshollama.p2p.httpstream import PROTOCOL, HttpStreamServer, PeerScopes, PeerUpstream, StreamPool
from meshollama.p2p.intake import head_size
from meshollama.wire import frames

from .helpers import running_hosts, settings

KiB = 1 << 10
MiB = 1 << 20

SECRETS = (
    ("Authorization", "Bearer sk-node-key"),
    ("Proxy-Authorization", "Basic c2VjcmV0"),
    ("Cookie", "session=secret"),
    ("X-Api-Key", "sk-ant-real-key"),
    ("x-meshollama-peer", "12D3KooWforged"),
    ("X-Meshollama-Admin", "yes"),
)


class Recording:
    """A backend that records what reaches it and answers ``ok``; with ``hold``,
    each answer waits for that event (so bodies stay reserved while answered)."""

    def __init__(self, hold: trio.Event | None = None) -> None:
        self.requests: list[ProxyRequest] = []
        self.hold = hold

    @asynccontextmanager
    async def open(self, request: ProxyRequest):
        self.requests.append(request)
        if self.hold is not None:
            await self.hold.wait()

        async def body():
            yield b"ok"

        yield ProxyResponse(200, (("content-type", "text/plain"),), body())


@dataclass
class Env:
    server: HttpStreamServer
    backend: Recording
    limiter: InboundLimiter
    a: object  # the node's host
    b: object  # the attacker's host
    rejected: list[str]  # on_reject reasons, in order

    async def open(self):
        return await self.b.open_stream(self.a.peer_id, PROTOCOL)

    async def settled(self) -> None:
        """Every request slot and budget byte given back."""
        await wait_for(lambda: self.server.budget.in_use == 0 and self.limiter.in_use == 0)


@asynccontextmanager
async def serving(backend=None, *, limiter=None, max_request_bytes=4 * MiB, max_buffered_bytes=64 * MiB,
                  request_timeout=30.0):
    """A node host ``a`` serving with a recording backend, and an attacker host ``b``, connected."""
    backend = backend or Recording()
    limiter = limiter or InboundLimiter(64, 64)
    rejected: list[str] = []
    server = HttpStreamServer(backend, limiter, max_request_bytes=max_request_bytes,
                              max_buffered_bytes=max_buffered_bytes, request_timeout=request_timeout,
                              on_reject=rejected.append)
    async with running_hosts(settings(), settings(), handlers={PROTOCOL: server.handle}) as (a, b):
        await b.connect(a.addrs())
        yield Env(server, backend, limiter, a, b, rejected)


def head(path: str = "/api/chat", headers=()) -> bytes:
    return frames.encode(frames.Request("POST", path, tuple(headers)))


async def push(stream, total: int, *, chunk: int = 64 * KiB, pace: float = 0.0) -> int:
    """Send ``total`` body bytes in Data frames of ``chunk`` bytes, as fast as the
    stream takes them or one every ``pace`` seconds, then End; stop at the first
    failure (the server reset the stream). Returns the body bytes sent."""
    frame = frames.encode(frames.Data(b"\0" * chunk))
    sent = 0
    try:
        while sent < total:
            await stream.write(frame)
            sent += chunk
            if pace:
                await trio.sleep(pace)
        await stream.write(frames.encode(frames.End()))
    except P2PError:
        pass
    return sent


async def answer(stream, timeout: float = 20.0):
    """The first frame the server answers with; ``None`` if the stream ended without one."""
    decoder = frames.FrameDecoder()
    try:
        while True:
            data = await stream.read(64 * KiB, timeout=timeout)
            if not data:
                return None
            got = decoder.feed(data)
            if got:
                return got[0]
    except P2PError:
        return None


async def wait_for(predicate, step: float = 0.01):
    while not predicate():
        await trio.sleep(step)


def error(frame) -> tuple[str, int]:
    assert isinstance(frame, frames.Error), frame
    return frame.code, frame.status


# --- request size -------------------------------------------------------------


async def test_a_body_over_max_request_bytes_is_refused_without_reading_the_rest():
    with trio.fail_after(30):
        async with serving(max_request_bytes=1 * MiB) as env:
            s = await env.open()
            await s.write(head())
            sent = await push(s, 256 * MiB)  # ends when the node resets the stream
            # the reset stopped the attacker long before it sent its 256 MiB ...
            assert sent < 32 * MiB, sent
            assert env.rejected == ["too_large"]
            # ... and the node never held more than the limit (plus the head and a frame header)
            assert env.server.budget.peak <= 1 * MiB + head_size(frames.Request("POST", "/api/chat")) + frames.HEADER_SIZE
            assert env.backend.requests == []
            await env.settled()


async def test_a_declared_content_length_over_the_limit_is_refused_at_the_head():
    with trio.fail_after(30):
        async with serving(max_request_bytes=1 * MiB) as env:
            s = await env.open()
            await s.write(head(headers=[("content-length", str(1 << 30))]))
            assert error(await answer(s)) == ("bad_request", 413)
            assert env.rejected == ["too_large"] and env.backend.requests == []
            await env.settled()


# --- the request slot is taken at the head ----------------------------------------


async def test_the_request_slot_is_taken_before_the_body():
    """Per-peer limit 2: two heads with no body hold both slots, and the third
    head is told "busy" at once, although none of them sent a body byte."""
    with trio.fail_after(30):
        async with serving(limiter=InboundLimiter(8, 2)) as env:
            parked = []
            for _ in range(2):
                s = await env.open()
                await s.write(head())
                parked.append(s)
            await wait_for(lambda: env.limiter.of(env.b.peer_id) == 2)
            third = await env.open()
            await third.write(head())
            with trio.fail_after(2):
                assert error(await answer(third)) == ("busy", 503)
            assert env.limiter.of(env.b.peer_id) == 2 and env.backend.requests == []
            # the parked requests are still being read: they finish and are answered
            for s in parked:
                await push(s, 10, chunk=10)
                assert isinstance(await answer(s), frames.Response)
            await env.settled()


# --- one deadline for the whole request -------------------------------------------


async def test_a_trickled_body_is_cut_at_the_request_timeout():
    """A byte every 0.1 s never trips a per-read timeout (5 s here); the request
    as a whole has 1 s."""
    with trio.fail_after(30):
        async with serving(request_timeout=1.0) as env:
            s = await env.open()
            started = trio.current_time()
            await s.write(head())
            await push(s, 1 << 30, chunk=1, pace=0.1)  # ends when the node resets the stream
            took = trio.current_time() - started
            assert env.rejected == ["timeout"]
            assert 0.9 <= took < 3.0, took
            assert env.backend.requests == []
            await env.settled()


# --- the byte budget across all streams -------------------------------------------


async def test_many_large_bodies_at_once_stay_within_the_byte_budget():
    """16 bodies of 2 MiB at once against a 5 MiB budget, while the backend holds
    each admitted request: some are admitted, the others are refused as busy,
    and the node never holds more than its budget."""
    hold = trio.Event()
    backend = Recording(hold)
    answers: list = []
    with trio.fail_after(60):
        async with serving(backend, max_request_bytes=2 * MiB, max_buffered_bytes=5 * MiB) as env:

            async def one():
                s = await env.open()
                await s.write(head(headers=[("content-length", str(2 * MiB))]))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(push, s, 2 * MiB)
                    answers.append(await answer(s))

            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(one)
                await wait_for(lambda: len(env.rejected) + len(backend.requests) == 16)
                assert env.rejected and set(env.rejected) == {"budget"}, env.rejected
                assert 1 <= len(backend.requests) <= 2  # 2 MiB each: no third fits in 5 MiB
                hold.set()
            responses = [f for f in answers if isinstance(f, frames.Response)]
            assert len(responses) == len(backend.requests)
            assert all(f is None or error(f) == ("busy", 503) for f in answers if f not in responses)
            assert all(len(r.body) == 2 * MiB for r in backend.requests)
            assert env.server.budget.peak <= 5 * MiB
            await env.settled()


# --- credentials and our own headers never cross a peer hop ------------------------


async def test_credentials_sent_by_a_peer_never_reach_the_backend():
    with trio.fail_after(30):
        async with serving() as env:
            s = await env.open()
            await s.write(head(headers=[*SECRETS, ("content-type", "application/json")]))
            await push(s, 2, chunk=1)
            assert isinstance(await answer(s), frames.Response)
            (request,) = env.backend.requests
            assert request.headers == (("content-type", "application/json"),)


async def test_peer_upstream_never_sends_credentials():
    seen: list[frames.Request] = []

    async def recorder(stream):  # a peer that records what it is sent, raw
        decoder = frames.FrameDecoder()
        got: list = []
        while not any(isinstance(f, frames.End) for f in got):
            got += decoder.feed(await stream.read(64 * KiB))
        seen.append(got[0])
        await stream.write(frames.encode(frames.Response(200)) + frames.encode(frames.End()))
        await stream.close()

    with trio.fail_after(30):
        async with running_hosts(settings(), settings(), handlers={PROTOCOL: recorder}) as (a, b):
            await b.connect(a.addrs())
            up = PeerUpstream(StreamPool(b.open_stream), a.peer_id, PeerScopes())
            request = ProxyRequest("POST", "/api/chat", (*SECRETS, ("Content-Type", "application/json")), b"{}")
            async with up.open(request) as resp:
                assert resp.status == 200
    (sent,) = seen
    # only what the backend may use, and the body's length (so a peer can refuse at the head)
    assert sent.headers == (("content-type", "application/json"), ("content-length", "2"))


# --- a real node process under attack -----------------------------------------------

NODE_BUDGET = 64 * MiB  # p2p.max_buffered_bytes for the node under attack (default 256 MiB)
NODE_TIMEOUT = 3.0  # p2p.request_timeout (default 60 s)
# What RSS may grow by, over its baseline: the budget, plus 64 MiB for what lies
# outside it (py-libp2p's Yamux and Noise buffers for 128 streams, each stream's
# read in hand, the allocator's slack); see the bound in p2p/httpserver.py.
RSS_SLACK = 64 * MiB


@pytest.mark.slow
async def test_a_node_process_under_attack_stays_within_its_memory_bound(tmp_path):
    """(a) 128 requests at once, each declaring 32 MiB and pushing as fast as it
    can, and (b) a 1 GiB body trickled: the node's RSS stays under baseline +
    budget + slack, and its gateway still answers afterwards."""
    from tests.integration.cluster import Cluster

    env = {"MESHOLLAMA_P2P_MAX_BUFFERED_BYTES": str(NODE_BUDGET),
           "MESHOLLAMA_P2P_REQUEST_TIMEOUT": str(NODE_TIMEOUT)}
    outcomes: list = []
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            cluster = Cluster(tmp_path, nursery)
            try:
                node = await cluster.start("victim", "--backend", "none", env=env)
                proc = psutil.Process(node.proc.pid)
                async with running_hosts(settings(stream_timeout=10.0)) as (attacker,):
                    await attacker.connect([node.addr])
                    # warm up: one ordinary request (refused: no backend) takes the code paths once
                    s = await attacker.open_stream(node.peer_id, PROTOCOL)
                    await s.write(head())
                    await push(s, 100, chunk=100)
                    assert isinstance(await answer(s), frames.Error)
                    await trio.sleep(0.5)
                    baseline = proc.memory_info().rss
                    peak = baseline

                    async def sample():
                        nonlocal peak
                        while True:
                            peak = max(peak, proc.memory_info().rss)
                            await trio.sleep(0.005)

                    async def flood_one():
                        s = await attacker.open_stream(node.peer_id, PROTOCOL)
                        await s.write(head(headers=[("content-length", str(32 * MiB))]))
                        async with trio.open_nursery() as inner:
                            inner.start_soon(lambda: push(s, 33 * MiB, chunk=MiB))  # more than declared
                            outcomes.append(await answer(s, timeout=60))
                        await s.reset()

                    async with trio.open_nursery() as attack:
                        attack.start_soon(sample)
                        started = trio.current_time()
                        async with trio.open_nursery() as flood:  # (a)
                            for _ in range(128):
                                flood.start_soon(flood_one)
                        flooded = trio.current_time() - started
                        s = await attacker.open_stream(node.peer_id, PROTOCOL)  # (b)
                        started = trio.current_time()
                        await s.write(head())
                        trickled = await push(s, 1 << 30, pace=0.02)  # about 3 MB/s, until reset
                        cut_after = trio.current_time() - started
                        await trio.sleep(0.2)
                        attack.cancel_scope.cancel()
                grown = peak - baseline
                print(f"node RSS: baseline {baseline / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB, grown "
                      f"{grown / MiB:.0f} MiB (bound {(NODE_BUDGET + RSS_SLACK) / MiB:.0f} MiB); flood refused "
                      f"in {flooded:.1f} s; trickle cut after {trickled / MiB:.1f} MiB, {cut_after:.1f} s")
                assert len(outcomes) == 128
                assert not any(isinstance(f, frames.Response) for f in outcomes)  # every one refused
                assert any(f is not None and error(f) == ("busy", 503) for f in outcomes)
                assert trickled < 1 << 30 and NODE_TIMEOUT - 0.5 < cut_after < NODE_TIMEOUT + 3
                assert "(timeout)" in node.log()
                assert grown <= NODE_BUDGET + RSS_SLACK, (baseline, peak)
                r = await cluster.client.get(node.api + "/api/version")
                assert r.status_code == 200 and r.json()["version"]
            finally:
                await cluster.close()
            nursery.cancel_scope.cancel()

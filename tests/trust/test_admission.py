"""Admission over real libp2p hosts on loopback: the exchange, the gate, revocation.

Attacks: a stranger (no certificate, a certificate of another peer, another
mesh's certificate) connects, opens streams and is served nothing; a revoked
peer is cut off by every node, also by one that learns of it only through
the policy a peer pushes.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from meshollama.errors import P2PError
from meshollama.p2p.host import P2PHost
from meshollama.p2p.keys import peer_id_of
from meshollama.trust import documents as d
from meshollama.trust.admission import Admission
from meshollama.trust.state import TrustState
from tests.p2p.helpers import settings

ECHO = "/test/echo/1"


class Member:
    def __init__(self, authority, *, policy=None, own=None, timeout=3.0):
        self.kp = create_new_key_pair()
        self.id = peer_id_of(self.kp)
        self.served: list[str] = []
        self.handlers: dict = {}  # more protocols to serve, set before mesh_of starts the host
        self.admission = None
        if authority is not None:
            state = TrustState(authority, self.id)
            self.admission = Admission(state, timeout=timeout)
        self.host: P2PHost | None = None

    async def echo(self, stream):
        self.served.append(stream.peer_id)
        data = await stream.read(100)
        await stream.write(data)
        await stream.close()


@asynccontextmanager
async def mesh_of(*members: Member, psk: str | None = None):
    """Each member's host on loopback, serving ECHO and its ``handlers``; a refused
    peer is disconnected, as the mesh service does."""
    async with trio.open_nursery() as nursery:
        for m in members:
            m.host = P2PHost(m.kp, settings(psk=psk), admission=m.admission)
            for protocol, handler in {ECHO: m.echo, **m.handlers}.items():
                m.host.set_handler(protocol, handler)
            if m.admission is not None:
                def cut(peer, why, host=m.host):
                    nursery.start_soon(host.disconnect, peer)
                m.admission.on_refused = cut
            await nursery.start(m.host.serve)
        try:
            yield members
        finally:
            nursery.cancel_scope.cancel()


def policy_for(key, *admitted: tuple[str, str], base=None, now=None):
    now = now or int(time.time())
    p = base or d.Policy()
    for peer, role in admitted:
        p = d.admit(p, d.issue_certificate(key, peer, role, now=now, serial="00"), now=now)
    return d.sign_policy(key, p)


def give(member: Member, policy):
    member.admission.state.offer_policy(policy.token, time.time(), persist=False)


async def echo(a: Member, b: Member) -> bytes:
    stream = await a.host.open_stream(b.id, ECHO, timeout=3)
    await stream.write(b"hi")
    return await stream.read(100, timeout=3)


async def until(predicate, step=0.05):
    while not predicate():
        await trio.sleep(step)


async def test_admitted_peers_talk_and_a_stranger_is_served_nothing():
    key = d.SigningAuthority.generate()
    a, b = Member(key.authority), Member(key.authority)
    stranger = Member(None)  # speaks plain libp2p, no admission protocol
    pol = policy_for(key, (a.id, "admin"), (b.id, "serve"))
    give(a, pol)
    give(b, pol)
    with trio.fail_after(30):
        async with mesh_of(a, b, stranger):
            await b.host.connect(a.host.addrs())
            await until(lambda: a.admission.role(b.id) == "serve" and b.admission.role(a.id) == "admin")
            assert await echo(b, a) == b"hi"
            # The stranger connects (Noise works: it has a key) and asks for a stream.
            await stranger.host.connect(a.host.addrs())
            try:
                got = await echo(stranger, a)
            except P2PError:
                got = None
            assert not got, "a stranger must get no stream served"
            await until(lambda: stranger.id not in a.host.connected_peers())
            assert stranger.id not in a.served and a.admission.role(stranger.id) is None


async def test_a_replayed_or_foreign_certificate_admits_nobody():
    key, other = d.SigningAuthority.generate(), d.SigningAuthority.generate()
    a, thief, foreign = Member(key.authority), Member(key.authority), Member(key.authority)
    honest = Member(key.authority)
    give(a, policy_for(key, (a.id, "admin")))
    # thief presents honest's certificate; foreign presents one from another mesh's authority.
    thief.admission.state.own = d.issue_certificate(key, honest.id, "admin", now=int(time.time()), serial="1")
    foreign.admission.state.own = d.issue_certificate(other, foreign.id, "admin", now=int(time.time()), serial="2")
    with trio.fail_after(30):
        async with mesh_of(a, thief, foreign):
            for m in (thief, foreign):
                await m.host.connect(a.host.addrs())
                try:  # and asks for a stream at once, before it is cut
                    got = await echo(m, a)
                except P2PError:
                    got = None
                assert not got
            await until(lambda: not ({thief.id, foreign.id} & a.host.connected_peers()))
            assert a.served == [] and a.admission.role(thief.id) is None and a.admission.role(foreign.id) is None


async def test_a_revoked_peer_is_cut_off_by_every_node_within_seconds():
    key = d.SigningAuthority.generate()
    a, b, c = Member(key.authority), Member(key.authority), Member(key.authority)
    pol = policy_for(key, (a.id, "admin"), (b.id, "serve"), (c.id, "serve"))
    for m in (a, b, c):
        give(m, pol)
    with trio.fail_after(40):
        async with mesh_of(a, b, c):
            await b.host.connect(a.host.addrs())
            await c.host.connect(a.host.addrs())
            await c.host.connect(b.host.addrs())
            await until(lambda: c.admission.role(b.id) == "serve" and a.admission.role(b.id) == "serve"
                        and c.admission.role(a.id) == "admin")
            # The operator posts the revocation to a only; c learns it from a's push.
            revoked = d.sign_policy(key, d.revoke(pol, b.id, now=int(time.time()) + 1))
            start = trio.current_time()
            assert a.admission.offer_policy(revoked.token)
            await until(lambda: b.id not in a.host.connected_peers() and b.id not in c.host.connected_peers())
            assert trio.current_time() - start < 5
            assert c.admission.state.policy.version == revoked.version
            # b cannot come back: it is refused by both.
            try:
                await b.host.connect(c.host.addrs())
            except P2PError:
                pass
            await until(lambda: b.id not in c.host.connected_peers())
            assert c.admission.role(b.id) is None


async def test_a_node_that_missed_the_revocation_learns_it_on_next_contact():
    key = d.SigningAuthority.generate()
    a, b, late = Member(key.authority), Member(key.authority), Member(key.authority)
    pol = policy_for(key, (a.id, "admin"), (b.id, "serve"), (late.id, "serve"))
    for m in (a, b, late):
        give(m, pol)
    give(a, d.sign_policy(key, d.revoke(pol, b.id, now=int(time.time()) + 1)))  # issued while `late` was away
    with trio.fail_after(30):
        async with mesh_of(a, b, late):
            await b.host.connect(late.host.addrs())  # b reaches late first: late still admits it
            await until(lambda: late.admission.role(b.id) == "serve")
            await late.host.connect(a.host.addrs())  # late's next contact carries the newer policy
            await until(lambda: b.id not in late.host.connected_peers())
            assert late.admission.role(b.id) is None
            assert late.admission.state.policy.version == a.admission.state.policy.version


async def test_model_management_over_the_mesh_needs_an_admin_grant():
    """A peer admitted to serve may ask inference of us, not delete our models;
    one the authority admitted as admin may. (An open mesh grants it to nobody:
    tests/p2p/test_host.py::test_a_peer_cannot_manage_our_models.)"""
    import pytest

    from meshollama.errors import UpstreamUnavailable
    from meshollama.gateway.endpoints import peer_policy
    from meshollama.httpmsg import ProxyRequest
    from meshollama.limits import InboundLimiter
    from meshollama.p2p.httpstream import PROTOCOL, HttpStreamServer, PeerScopes, PeerUpstream, StreamPool
    from tests.p2p.test_host import ScriptedBackend, fetch

    key = d.SigningAuthority.generate()
    node, server_peer, admin = Member(key.authority), Member(key.authority), Member(key.authority)
    pol = policy_for(key, (node.id, "serve"), (server_peer.id, "serve"), (admin.id, "admin"))
    for m in (node, server_peer, admin):
        give(m, pol)
    backend = ScriptedBackend()
    server = HttpStreamServer(backend, InboundLimiter(8, 4), max_request_bytes=1 << 20,
                              allow=peer_policy(node.admission))
    node.handlers[PROTOCOL] = server.handle
    with trio.fail_after(30):
        async with mesh_of(node, server_peer, admin):
            for m in (server_peer, admin):
                await m.host.connect(node.host.addrs())
            await until(lambda: node.admission.role(admin.id) == "admin" and node.admission.role(server_peer.id))
            delete = ProxyRequest("DELETE", "/api/delete", (), b'{"model":"x"}')
            up = PeerUpstream(StreamPool(server_peer.host.open_stream), node.id, PeerScopes())
            with pytest.raises(UpstreamUnavailable, match="not served to peers"):
                await fetch(up, delete)
            assert await fetch(up, ProxyRequest("POST", "/api/chat")) == b"a\nb\n"
            up = PeerUpstream(StreamPool(admin.host.open_stream), node.id, PeerScopes())
            assert await fetch(up, delete) == b"a\nb\n"
            assert [r.method for r in backend.requests] == ["POST", "DELETE"]


async def test_a_stranger_with_the_right_psk_is_still_refused():
    """The PSK is a network-level gate only: holding it does not admit a peer."""
    psk = "ab" * 32
    key = d.SigningAuthority.generate()
    a, stranger = Member(key.authority), Member(None)
    give(a, policy_for(key, (a.id, "admin")))
    with trio.fail_after(30):
        async with mesh_of(a, stranger, psk=psk):
            await stranger.host.connect(a.host.addrs())
            try:
                got = await echo(stranger, a)
            except P2PError:
                got = None
            assert not got and a.served == []
            await until(lambda: stranger.id not in a.host.connected_peers())


async def test_a_stranger_speaking_the_admission_protocol_badly_harms_nothing():
    """Attack: a stranger answers our exchange with a JSON bomb (deep nesting), opens
    many exchange streams at once, and sends an oversized opening message. The node
    keeps running and serving its members; the stranger is cut off."""
    import struct

    from meshollama.trust.admission import MAX_FIRST, PROTOCOL

    key = d.SigningAuthority.generate()
    a, b = Member(key.authority), Member(key.authority)
    pol = policy_for(key, (a.id, "admin"), (b.id, "serve"))
    give(a, pol)
    give(b, pol)
    bomb = b"[" * 200_000

    async def evil_answer(stream):  # the stranger's side of OUR exchange
        await stream.read(65536)
        await stream.write(struct.pack(">I", len(bomb)) + bomb)
        await trio.sleep(1)

    stranger = Member(None)
    stranger.handlers[PROTOCOL] = evil_answer
    with trio.fail_after(40):
        async with mesh_of(a, b, stranger):
            await stranger.host.connect(a.host.addrs())
            # Its own streams: many at once, one oversized.
            results = []

            async def opener(big: bool):
                try:
                    s = await stranger.host.open_stream(a.id, PROTOCOL, timeout=3)
                    size = MAX_FIRST * 64 if big else 10
                    await s.write(struct.pack(">I", size) + b"x" * min(size, 1 << 20))
                    results.append(await s.read(100, timeout=3))
                except P2PError:
                    results.append(None)

            async with trio.open_nursery() as flood:
                for i in range(20):
                    flood.start_soon(opener, i == 0)
            assert not any(results), results  # nothing answered to any of them
            await until(lambda: stranger.id not in a.host.connected_peers())
            # The node is fine: a member connects and is served.
            await b.host.connect(a.host.addrs())
            await until(lambda: a.admission.role(b.id) == "serve")
            assert await echo(b, a) == b"hi"

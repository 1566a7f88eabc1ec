"""Down hints (``mesh.hints``): one announcement tells the mesh a peer is gone;
hearsay is bounded (seq, connection, refutation). Pure state, then the mesh
service on the in-memory transport in virtual time."""

from __future__ import annotations

import dataclasses

import trio

from meshollama.mesh import hints
from meshollama.mesh.hints import DownHints
from meshollama.mesh.peertable import PeerState
from tests.unit.test_mesh_service import EPS, run_mesh
from tests.unit.test_mesh_transport import heartbeat

P, Q, R = "12D3KooWpeerP", "12D3KooWpeerQ", "12D3KooWpeerR"


def test_down_hints_state():
    h = DownHints()
    assert h.should_say(P, 5)
    h.heard_of(P, 5, 0.0)
    assert not h.should_say(P, 5)  # someone said it
    assert h.should_say(P, 6)
    h.say(Q, 3, 1.0)
    assert not h.should_say(Q, 3) and h.current(1.0) == ((Q, 3),)
    h.alive(Q, 3)  # the same seq: no news
    assert h.current(2.0) == ((Q, 3),)
    h.alive(Q, 4)  # it announced again: it is back
    assert h.current(2.0) == ()
    for i in range(hints.MAX + 4):
        h.say(f"p{i}", 1, 10.0 + i)
    said = h.current(40.0)
    assert len(said) == hints.MAX and said[0] == (f"p{hints.MAX + 3}", 1)  # newest first
    assert h.current(10.0 + hints.MAX + 3 + hints.TTL) == ()  # repeated for TTL seconds only
    assert h.refute(0.0) and not h.refute(1.0) and h.refute(0.0 + hints.REFUTE_EVERY)
    for i in range(hints.MAX_HEARD + 100):  # a liar naming made-up peers
        h.heard_of(f"x{i}", 1, 100.0)
    assert len(h.heard) <= hints.MAX_HEARD


async def test_a_peer_that_goes_down_is_named_in_one_announcement(autojump_clock):
    async with trio.open_nursery() as nursery:
        r = await run_mesh(nursery, heartbeat_interval=2.0, refresh_interval=30.0, seed=1)
        host = r.net.host
        host.peer_connects(P)
        host.hear(heartbeat(P, 7, refresh_ms=30_000))
        await r.at(5.0)
        before = len(host.published)
        host.peer_disconnects(P)  # it crashed: the connection closed
        await r.at(5.0 + hints.DELAY[1] + 0.25 + EPS)
        new = host.published[before:]
        assert [a.down for _, a in new] == [((P, 7),)]
        # Repeated in later announcements for a while (a peer may miss one), then dropped.
        await r.at(60.0)
        assert all(a.down == ((P, 7),) for t, a in host.published[before:] if t - r.t0 < 5.0 + hints.TTL)
        assert host.published[-1][1].down == ()
        nursery.cancel_scope.cancel()


async def test_someone_elses_hint_first_means_we_stay_quiet(autojump_clock):
    async with trio.open_nursery() as nursery:
        r = await run_mesh(nursery, heartbeat_interval=2.0, refresh_interval=30.0, seed=1)
        host = r.net.host
        for pid in (P, Q):
            host.peer_connects(pid)
            host.hear(heartbeat(pid, 7, refresh_ms=30_000))
        await r.at(5.0)
        before = len(host.published)
        host.peer_disconnects(P)
        await r.at(5.0 + hints.DELAY[0] / 2)  # before our delay ends, Q says it
        host.hear(dataclasses.replace(heartbeat(Q, 8, refresh_ms=30_000), down=((P, 7),)))
        await r.at(10.0)
        assert all(not a.down for _, a in host.published[before:])
        nursery.cancel_scope.cancel()


async def test_a_hint_marks_down_only_what_we_cannot_see_ourselves_and_we_refute_one_about_us(autojump_clock):
    async with trio.open_nursery() as nursery:
        # One connection at most: P and R are heard of by gossip only (a large mesh).
        r = await run_mesh(nursery, heartbeat_interval=2.0, refresh_interval=30.0, seed=1, max_connections=1)
        host = r.net.host
        host.peer_connects(Q)
        for pid in (P, Q, R):
            host.hear(heartbeat(pid, 7, refresh_ms=30_000))
        await r.at(3.0)
        host.hear(heartbeat(R, 8, refresh_ms=30_000))  # R announced since: newer than a hint at 7
        host.hear(heartbeat(P, 8, refresh_ms=30_000))
        await r.at(4.0)
        assert {pid: r.state(pid) for pid in (P, Q, R)} == {P: PeerState.ALIVE, Q: PeerState.ALIVE, R: PeerState.ALIVE}
        assert host.connected == {Q}
        before = len(r.net.host.published)
        me, mine = r.mesh.self_id, r.mesh.table.self_seq
        host.hear(dataclasses.replace(heartbeat("12D3KooWold", 1, refresh_ms=30_000), down=((me, mine - 1),)))
        await r.at(4.1)
        assert len(host.published) == before  # a hint about an older announcement of ours: no refutation
        host.hear(dataclasses.replace(heartbeat("12D3KooWliar", 1, refresh_ms=30_000),
                                      down=((P, 8), (Q, 7), (R, 7), (me, mine))))
        await r.at(4.25 + EPS)
        assert r.state(P) is PeerState.DOWN  # not connected, nothing newer than 8: believed
        assert r.state(Q) is PeerState.ALIVE  # connected: we know better
        assert r.state(R) is PeerState.ALIVE  # we heard 8 from it, the hint says 7
        r.mesh.table.mark_unreachable(R, 4.25)
        host.hear(dataclasses.replace(heartbeat("12D3KooWthird", 1, refresh_ms=30_000), down=((R, 8),)))
        await r.at(4.3)
        assert r.state(R) is PeerState.UNREACHABLE  # a hint never turns unreachable into down (and so routable later)
        assert len(host.published) == before + 1  # we refuted the hint about us at once
        host.hear(dataclasses.replace(heartbeat("12D3KooWliar", 2, refresh_ms=30_000), down=((me, mine),)))
        await r.at(4.5)
        assert len(host.published) == before + 1  # ...a sender's hints at most once a second
        host.hear(dataclasses.replace(heartbeat("12D3KooWother", 1, refresh_ms=30_000), down=((me, mine + 1),)))
        await r.at(5.0)
        assert len(host.published) == before + 1  # ...and our refutations at most every 2 s
        host.hear(heartbeat(P, 9, refresh_ms=30_000))  # P's own news undoes the hint
        await r.at(5.5)
        assert r.state(P) is PeerState.ALIVE
        nursery.cancel_scope.cancel()


def test_hints_on_the_wire_are_bounded():
    import pytest

    from meshollama.errors import AnnouncementError
    from meshollama.mesh import announce

    ann = dataclasses.replace(heartbeat(P, 1), down=((Q, 3), (R, 2**40)))
    assert announce.decode(announce.encode(ann)).down == ((Q, 3), (R, 2**40))
    base = announce.encode(heartbeat(P, 1))[:-1]
    for bad in (b',"dn":[["x"]]}', b',"dn":[["x",-1]]}', b',"dn":[[1,2]]}', b',"dn":[["",2]]}', b',"dn":{"x":1}}',
                b',"dn":[' + b",".join([b'["x",1]'] * (announce.MAX_DOWN + 1)) + b"]}"):
        with pytest.raises(AnnouncementError):
            announce.decode(base + bad)

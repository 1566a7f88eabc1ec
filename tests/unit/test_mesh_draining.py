"""Draining, the mesh half: on the wire, in the peer table, in liveness (pure).

A node about to restart announces ``draining``; peers keep it in the table,
keep pinging it (it still finishes requests), show it as "draining", and
route nothing new to it. The service side is in ``test_mesh_service``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from meshollama import names
from meshollama.catalog import LoadInfo, ModelInfo
from meshollama.errors import AnnouncementError
from meshollama.mesh.announce import Announcement, decode, encode
from meshollama.mesh.liveness import IDLE_PING_EVERY, peers_to_ping
from meshollama.mesh.peertable import ApplyResult, PeerState, PeerTable

KEY = names.key("llama3:latest")


def ann(peer_id: str = "p", seq: int = 1, **kw) -> Announcement:
    base = Announcement(peer_id=peer_id, seq=seq, version="0.1.0", models=(ModelInfo(name="llama3:latest"),),
                        load=LoadInfo(in_flight=0, capacity=2, queued=0))
    return replace(base, **kw)


# --- wire --------------------------------------------------------------------


def test_draining_is_dr_true_on_the_wire_and_left_out_when_false():
    data = encode(ann(draining=True))
    assert b'"dr":true' in data and decode(data).draining is True
    assert b'"dr"' not in encode(ann())


def test_an_older_nodes_heartbeat_reads_as_not_draining():
    data = b'{"v":1,"id":"p","seq":8,"ver":"0.1.0","m":[],"ld":{"f":0,"c":1,"q":0}}'
    assert decode(data).draining is False


def test_literal_draining_heartbeat():
    data = b'{"v":1,"id":"p","seq":9,"ver":"","m":[],"ld":{"f":0,"c":1,"q":0},"r":true,"dr":true}'
    a = decode(data)
    assert a.draining and a.relay and not a.leaving


@pytest.mark.parametrize("value", [b"1", b'"yes"', b"null"])
def test_draining_must_be_a_boolean(value):
    with pytest.raises(AnnouncementError, match="dr"):
        decode(b'{"v":1,"id":"p","seq":9,"m":[],"dr":' + value + b"}")


# --- peer table --------------------------------------------------------------


def test_a_draining_peer_is_up_listed_as_draining_and_never_served():
    table = PeerTable("me", interval=2.0)
    table.set_self(ann("me"), 0.0)
    assert table.apply(ann("p", draining=True), 0.0) is ApplyResult.NEW
    snap = table.snapshot(0.0)
    view = snap.get("p")
    assert view.state is PeerState.DRAINING and view.state.value == "draining" and view.draining
    assert [p.peer_id for p in snap.serving(KEY)] == ["me"]
    assert [p.peer_id for p in snap.alive()] == ["me", "p"]


def test_draining_survives_down_and_up_and_ends_with_a_heartbeat_that_says_so():
    table = PeerTable("me", interval=2.0)
    table.apply(ann("p", draining=True), 0.0)
    assert table.mark_down("p", 1.0) is True
    assert table.snapshot(1.0).get("p").state is PeerState.DOWN
    assert table.mark_up("p", 1.5) is True
    assert table.snapshot(1.5).get("p").state is PeerState.DRAINING
    assert table.mark_up("p", 1.6) is False  # already up
    assert table.mark_unreachable("p", 1.7) is False  # was not routable anyway
    table.apply(ann("p", seq=2), 2.0)  # back to work (or restarted): routed to again
    assert table.snapshot(2.0).get("p").state is PeerState.UNREACHABLE  # only a connection proves a path
    table.mark_up("p", 2.1)
    assert [p.peer_id for p in table.snapshot(2.1).serving(KEY)] == ["p"]


def test_our_own_entry_shows_draining_too():
    table = PeerTable("me", interval=2.0)
    table.set_self(ann("me", draining=True), 0.0)
    me = table.snapshot(0.0).get("me")
    assert me.state is PeerState.DRAINING and me.is_self
    assert table.snapshot(0.0).serving(KEY) == ()


def test_a_draining_peer_expires_like_any_other():
    table = PeerTable("me", interval=2.0, miss_limit=3)
    table.apply(ann("p", draining=True), 0.0)
    assert table.expire(6.0) == [] and table.expire(6.5) == ["p"]


# --- liveness ----------------------------------------------------------------


def test_an_idle_draining_peer_is_still_pinged_every_few_rounds():
    table = PeerTable("me", interval=2.0)
    table.apply(ann("p", draining=True), 0.0)
    snap = table.snapshot(0.0)
    pinged = [n for n in range(IDLE_PING_EVERY * 2)
              if peers_to_ping(snap, {"p"}, n, urgent=lambda p: False, busy=lambda p: False)]
    assert len(pinged) == 2 and pinged[1] - pinged[0] == IDLE_PING_EVERY

"""What a peer can make this node hold or do, the pure parts (issue 9, "Peer surface"):
the byte budget, the headers that never cross a peer hop, clamped announcements
(a liar gets no more than its fair share of routed requests), the capped peer
table, and the server's intake (bytes to admitted frames). The same limits over
real libp2p, and a node process under attack: tests/p2p/test_peer_limits.py."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from meshollama import names
from meshollama.catalog import LoadInfo, ModelInfo
from meshollama.errors import FrameError
from meshollama.httpmsg import peer_safe
from meshollama.limits import ByteBudget
from meshollama.mesh import announce
from meshollama.mesh.announce import MAX_CAPACITY, MAX_LOAD, Announcement
from meshollama.mesh.peertable import ApplyResult, PeerTable, Snapshot
from meshollama.p2p.intake import Gone, Intake, Refusal, declared_length, head_size
from meshollama.routing import RouteStats, choose
from meshollama.wire import frames

MODEL = names.key("llama3")


# --- the byte budget -----------------------------------------------------------


def test_budget_refuses_what_does_not_fit_and_remembers_its_peak() -> None:
    b = ByteBudget(100)
    assert b.try_reserve(60) and b.try_reserve(40)
    assert not b.try_reserve(1)
    assert (b.in_use, b.peak) == (100, 100)
    b.release(70)
    assert b.try_reserve(50) and (b.in_use, b.peak) == (80, 100)
    with pytest.raises(RuntimeError):
        b.release(81)
    with pytest.raises(ValueError):
        ByteBudget(0)


def test_a_reservation_gives_back_everything_it_holds_and_never_more() -> None:
    b = ByteBudget(100)
    other = b.reservation()
    assert other.try_reserve(30)
    r = b.reservation()
    assert r.try_reserve(50) and not r.try_reserve(21)
    assert (r.held, b.in_use) == (50, 80)
    r.release(80)  # a miscount: only its own 50 go back, never the other holder's
    assert (r.held, b.in_use) == (0, 30)
    assert r.try_reserve(10)
    r.close()
    other.close()
    assert b.in_use == 0 and b.peak == 80


# --- headers that never cross a peer hop ---------------------------------------


def test_peer_safe_drops_credentials_our_headers_and_hop_by_hop_ones() -> None:
    headers = (
        ("Authorization", "Bearer secret"),
        ("proxy-authorization", "Basic x"),
        ("Cookie", "session=1"),
        ("X-Api-Key", "sk-ant-real"),
        ("api-key", "azure"),
        ("x-meshollama-peer", "12D3"),
        ("X-MeshOllama-Whatever", "1"),
        ("Content-Length", "12"),
        ("Host", "h"),
        ("Content-Type", "application/json"),
        ("User-Agent", "ollama-python"),
        ("x-meshollamaish", "kept: not our prefix"),
    )
    assert peer_safe(headers) == (
        ("content-type", "application/json"),
        ("user-agent", "ollama-python"),
        ("x-meshollamaish", "kept: not our prefix"),
    )


# --- clamped announcements ------------------------------------------------------


def _ann(peer_id: str, *, capacity: int, in_flight: int = 0, queued: int = 0, seq: int = 1) -> Announcement:
    return Announcement(peer_id=peer_id, seq=seq, version="0.1.0", models=(ModelInfo(name="llama3:latest"),),
                        load=LoadInfo(in_flight=in_flight, capacity=capacity, queued=queued))


def _received(ann: Announcement) -> Announcement:
    """As another node sees it: the bytes on the wire, decoded."""
    return announce.decode(announce.encode(ann))


def test_announced_load_is_clamped_not_rejected() -> None:
    got = _received(_ann("liar", capacity=2**40, in_flight=2**62, queued=2**63 - 1))
    assert got.load == LoadInfo(in_flight=MAX_LOAD, capacity=MAX_CAPACITY, queued=MAX_LOAD)
    honest = _ann("honest", capacity=MAX_CAPACITY, in_flight=3, queued=1)
    assert _received(honest).load == honest.load  # an honest node is never clamped
    assert _received(_ann("gateway", capacity=0)).load.capacity == 0  # a pure gateway stays one


def _table(*anns: Announcement) -> Snapshot:
    table = PeerTable("self", interval=1.0)
    for ann in anns:
        assert table.apply(ann, 0.0) is ApplyResult.NEW
    return table.snapshot(0.0)


def _shares(snapshot: Snapshot, *, keep_in_flight: int, rounds: int = 4000, seed: int = 7) -> Counter:
    """Route ``rounds`` requests the way a gateway does: each pick is counted as
    in flight on that peer, and once ``keep_in_flight`` are running a random
    one finishes, so the peers are loaded as a busy mesh would load them."""
    rng = random.Random(seed)
    stats = RouteStats()
    stats.observe(snapshot)
    running: list[str] = []
    picks: Counter = Counter()
    for _ in range(rounds):
        pick = choose(snapshot, MODEL, stats, 0.0, rng)[0]
        picks[pick] += 1
        stats.started(pick, 0.0)
        running.append(pick)
        while len(running) > keep_in_flight:
            done = running.pop(rng.randrange(len(running)))
            stats.finished(done, 0.0, ok=True, latency=None, ttfb=None)
    return picks


@pytest.mark.parametrize("keep_in_flight", [0, 40, 128, 400])
@pytest.mark.parametrize("announced_in_flight", [0, 64])
def test_a_peer_lying_about_its_capacity_gets_no_more_than_an_honest_peer(keep_in_flight, announced_in_flight):
    snapshot = _table(
        _received(_ann("honest", capacity=MAX_CAPACITY, in_flight=announced_in_flight)),
        _received(_ann("liar", capacity=2**40, in_flight=announced_in_flight)),
    )
    picks = _shares(snapshot, keep_in_flight=keep_in_flight)
    share = picks["liar"] / sum(picks.values())
    assert share <= 0.5 + 0.04, picks  # its fair half, within statistical tolerance
    assert share >= 0.5 - 0.04, picks  # (and the honest peer is not starved either)


def test_without_the_clamp_the_liar_would_take_nearly_everything_under_load() -> None:
    """The same routing over a table built from unclamped numbers: the test
    above would catch a decode that stopped clamping."""
    snapshot = _table(_ann("honest", capacity=MAX_CAPACITY), _ann("liar", capacity=2**40))
    picks = _shares(snapshot, keep_in_flight=128)
    assert picks["liar"] / sum(picks.values()) > 0.9, picks


# --- the capped peer table ------------------------------------------------------


def test_a_full_table_refuses_new_peers_and_keeps_updating_known_ones() -> None:
    table = PeerTable("self", interval=1.0, max_peers=3)
    for pid in "abc":
        assert table.apply(_ann(pid, capacity=1), 0.0) is ApplyResult.NEW
    assert table.apply(_ann("d", capacity=1), 0.0) is ApplyResult.FULL
    assert table.snapshot(0.0).get("d") is None and len(table) == 3
    assert table.apply(_ann("a", capacity=4, seq=2), 0.5) is ApplyResult.UPDATED
    assert table.snapshot(0.5).get("a").load.capacity == 4
    assert table.apply(_ann("self", capacity=1), 0.5) is ApplyResult.SELF  # our echo is not a peer
    # a peer leaving makes room
    assert table.apply(Announcement("b", 2, "0.1.0", (), LoadInfo(), leaving=True), 0.6) is ApplyResult.LEFT
    assert table.apply(_ann("d", capacity=1), 0.6) is ApplyResult.NEW
    assert table.apply(_ann("e", capacity=1), 0.6) is ApplyResult.FULL
    # so does expiry (ttl 3 s): "a" was heard at 0.5, "c" at 0.0
    assert table.expire(3.2) == ["c"]
    assert table.apply(_ann("e", capacity=1), 3.2) is ApplyResult.NEW


def test_goodbyes_from_strangers_are_remembered_only_while_there_is_room() -> None:
    table = PeerTable("self", interval=1.0, max_peers=2)
    bye = lambda pid, seq=5: Announcement(pid, seq, "0.1.0", (), LoadInfo(), leaving=True)  # noqa: E731
    assert table.apply(bye("x"), 0.0) is ApplyResult.LEFT
    assert table.apply(bye("y"), 0.0) is ApplyResult.LEFT
    assert table.apply(bye("z"), 0.0) is ApplyResult.FULL
    assert table.apply(bye("x", 6), 0.0) is ApplyResult.LEFT  # already remembered: updated
    # a known peer's goodbye is always remembered (a late heartbeat must not resurrect it)
    assert table.apply(_ann("a", capacity=1, seq=1), 0.0) is ApplyResult.NEW
    assert table.apply(bye("a", 2), 0.0) is ApplyResult.LEFT
    assert table.apply(_ann("a", capacity=1, seq=1), 0.1) is ApplyResult.STALE


def test_max_peers_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PeerTable("self", interval=1.0, max_peers=0)


# --- the server's intake: bytes to admitted frames ------------------------------

HEAD = frames.Request("POST", "/api/chat", (("content-type", "application/json"),))


def _intake(max_request: int = 100, budget: int = 10_000):
    b = ByteBudget(budget)
    held = b.reservation()
    return Intake(held, max_request), held, b


def test_intake_keeps_heads_and_bodies_and_gives_back_the_framing_at_once() -> None:
    intake, held, _ = _intake()
    wire = frames.encode(HEAD) + frames.encode_data(b"x" * 60) + frames.encode(frames.End())
    got = intake.feed(wire[:7]) + intake.feed(wire[7:])  # the head split across two reads
    assert got == [HEAD, frames.Data(b"x" * 60), frames.End()]
    assert held.held == head_size(HEAD) + 60  # what the loop gives back once it answered


def test_intake_passes_a_body_on_as_it_arrives_and_refuses_it_at_the_first_byte_over() -> None:
    intake, held, budget = _intake(max_request=100)
    assert intake.feed(frames.encode(HEAD)) == [HEAD]
    data = frames.encode(frames.Data(b"y" * 1000))  # one frame, far over the limit
    assert intake.feed(data[:5 + 60]) == [frames.Data(b"y" * 60)]  # no partial frame is held back
    assert intake.feed(data[65:105]) == [frames.Data(b"y" * 40)]
    assert (intake.pending, held.held) == (0, head_size(HEAD) + 100)
    (refusal,) = intake.feed(data[105:106])
    assert isinstance(refusal, Refusal) and (refusal.code, refusal.status, refusal.reason) == (
        "bad_request", 413, "too_large")
    assert budget.peak == head_size(HEAD) + 100  # never a byte past the limit


def test_intake_holds_one_read_of_a_big_frame_not_the_frame() -> None:
    intake, held, _ = _intake(max_request=4 * 1024 * 1024, budget=8 * 1024 * 1024)
    wire = frames.encode(HEAD) + frames.encode(frames.Data(b"d" * frames.MAX_PAYLOAD)) + frames.encode(frames.End())
    pieces = [intake.feed(wire[i : i + 65536]) for i in range(0, len(wire), 65536)]
    got = [f for piece in pieces for f in piece]
    assert got[0] == HEAD and got[-1] == frames.End()
    assert b"".join(f.data for f in got[1:-1]) == b"d" * frames.MAX_PAYLOAD
    assert all(len(f.data) <= 65536 for f in got[1:-1]) and intake.pending == 0


def test_intake_refuses_whole_frames_over_the_limit_too() -> None:
    intake, held, _ = _intake(max_request=100)
    wire = frames.encode(HEAD) + frames.encode_data(b"z" * 101, max_payload=50)
    (refusal,) = intake.feed(wire)
    assert isinstance(refusal, Refusal) and refusal.status == 413
    assert held.held == 0  # nothing of a refused read is kept


def test_intake_counts_bodies_per_request_not_per_stream() -> None:
    intake, held, _ = _intake(max_request=100)
    one = frames.encode(HEAD) + frames.encode_data(b"a" * 100) + frames.encode(frames.End())
    assert len(intake.feed(one)) == 3
    held.release(head_size(HEAD) + 100)  # answered
    next_head = frames.encode(frames.Request("POST", "/api/chat", (("x-long", "h" * 500),)))
    assert intake.feed(one + next_head[:300]) == [HEAD, frames.Data(b"a" * 100), frames.End()]  # a partial head is no body


def test_intake_answers_busy_when_the_budget_is_full() -> None:
    intake, held, budget = _intake(max_request=1000, budget=300)
    assert intake.feed(frames.encode(HEAD)) == [HEAD]
    assert intake.feed(frames.encode(frames.Data(b"b" * 200))) == [frames.Data(b"b" * 200)]
    (refusal,) = intake.feed(frames.encode(frames.Data(b"c" * 200))[:150])  # even a partial frame must fit
    assert isinstance(refusal, Refusal) and (refusal.code, refusal.status, refusal.reason) == ("busy", 503, "budget")
    assert budget.peak <= 300


def test_intake_end_of_stream_and_garbage() -> None:
    intake, _, _ = _intake()
    assert isinstance(intake.feed(b"")[0], Gone)
    intake, _, _ = _intake()
    assert intake.feed(frames.encode(HEAD)[:3]) == []
    assert isinstance(intake.feed(b"")[0], FrameError)  # ended inside a frame
    intake, _, _ = _intake()
    assert isinstance(intake.feed(b"\x09\x00\x00\x00\x00")[0], FrameError)


@pytest.mark.parametrize("headers, declared", [
    ((), 0),
    ((("Content-Length", " 42 "),), 42),
    ((("content-length", "1"), ("content-length", "99")), 99),  # the largest counts
    ((("content-length", "-5"),), 0),
    ((("content-length", "\uff11\uff12"),), 0),  # fullwidth digits: not a length
    ((("content-length", "\u00b2"),), 0),  # isdigit() but int() would raise
    ((("content-length", "9" * 5000),), 10**19),  # int() would refuse 5000 digits
])
def test_declared_length(headers, declared) -> None:
    assert declared_length(headers) == declared

"""The piece scheduler driven by scripted events (no I/O, no clock)."""

from __future__ import annotations

import hashlib

from meshollama.models.plan import MAX_FAILURES, BlobPlan

PIECE = 4


def blob(data: bytes) -> tuple[str, list[bytes]]:
    pieces = [hashlib.sha256(data[i:i + PIECE]).digest() for i in range(0, len(data), PIECE)]
    return "sha256:" + hashlib.sha256(data).hexdigest(), pieces


DATA = b"abcdefghijklmnopqrstuvwxyz"  # 7 pieces of 4 (last 2)


def h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def piece_of(data: bytes, index: int) -> bytes:
    return data[index * PIECE:(index + 1) * PIECE]


def fetch_all(plan: BlobPlan, serve: dict[str, bytes], now: float = 0.0) -> None:
    """Round-robin over peers until done or nothing can be assigned."""
    progress = True
    while progress and not plan.finished:
        progress = False
        for peer, data in serve.items():
            req = plan.next_request(peer, now)
            if req is not None:
                progress = True
                plan.received(peer, req.index, h(piece_of(data, req.index)))


def test_pieces_are_spread_over_peers_and_all_arrive():
    digest, pieces = blob(DATA)
    plan = BlobPlan(digest, len(DATA), piece_size=PIECE, depth=2)
    assert plan.count == 7
    for peer in ("a", "b", "c"):
        plan.add_peer(peer, pieces)
    first = [plan.next_request(p, 0).index for p in ("a", "b", "c")]
    assert first == [0, 1, 2]  # lowest missing first, no piece twice
    assert plan.next_request("a", 0).index == 3  # depth 2
    assert plan.next_request("a", 0) is None  # a is at its depth
    fetch_all(plan, {"a": DATA, "b": DATA, "c": DATA})
    # the pieces handed out above were never answered: answer them
    for peer in ("a", "b", "c"):
        for index in list(plan.peers[peer].in_flight):
            assert plan.received(peer, index, pieces[index])
    fetch_all(plan, {"a": DATA, "b": DATA, "c": DATA})
    assert plan.finished and plan.completed_bytes == len(DATA)
    assert sum(s.received for s in plan.peers.values()) == len(DATA)


def test_a_bad_piece_drops_the_peer_and_the_piece_is_fetched_elsewhere():
    digest, pieces = blob(DATA)
    bad = DATA[:5] + b"X" + DATA[6:]
    plan = BlobPlan(digest, len(DATA), piece_size=PIECE)
    plan.add_peer("honest", pieces)
    plan.add_peer("liar", pieces)  # honest list, corrupt bytes in transit
    req = plan.next_request("liar", 0)
    req = plan.next_request("liar", 0)  # piece 1, which the corruption hits
    assert req.index == 1
    assert plan.received("liar", 1, h(piece_of(bad, 1))) is False
    assert "liar" not in plan.usable() and "does not match" in plan.peers["liar"].dropped
    assert plan.next_request("liar", 0) is None
    fetch_all(plan, {"honest": DATA})
    assert plan.finished


def test_the_list_most_holders_claim_wins_and_a_lone_liar_is_never_used_for_its_piece():
    digest, pieces = blob(DATA)
    corrupt = DATA[:9] + b"#" + DATA[10:]  # piece 2 differs on the liar's disk
    _, liar_list = blob(corrupt)
    plan = BlobPlan(digest, len(DATA), piece_size=PIECE)
    plan.add_peer("liar", liar_list)
    plan.add_peer("a", pieces)
    plan.add_peer("b", pieces)
    assert plan.hashes == tuple(pieces)
    served = []
    while (req := plan.next_request("liar", 0)) is not None:
        served.append(req.index)
        plan.received("liar", req.index, h(piece_of(corrupt, req.index)))
    assert 2 not in served  # it claimed another hash for piece 2: never asked for it
    fetch_all(plan, {"a": DATA})
    assert plan.finished


def test_a_wrong_list_is_found_by_the_whole_digest_and_its_pieces_refetched():
    digest, pieces = blob(DATA)
    corrupt = DATA[:9] + b"#" + DATA[10:]
    _, liar_list = blob(corrupt)
    plan = BlobPlan(digest, len(DATA), piece_size=PIECE)
    plan.add_peer("liar", liar_list)  # asked first; the honest one could not list
    plan.add_peer("honest", None)
    fetch_all(plan, {"liar": corrupt})
    assert plan.finished  # every piece matched the (wrong) list
    assert plan.reject_hashes() is False  # no other list: the caller must fail...
    plan2 = BlobPlan(digest, len(DATA), piece_size=PIECE)
    plan2.add_peer("liar", liar_list)
    plan2.add_peer("honest", pieces)  # ...unless another holder claimed another list
    plan2.add_peer("x", liar_list)
    fetch_all(plan2, {"liar": corrupt, "x": corrupt})
    assert plan2.finished and plan2.hashes == tuple(liar_list)
    assert plan2.reject_hashes() is True
    assert plan2.hashes == tuple(pieces)
    assert plan2.done == set(range(7)) - {2}  # only the disputed piece is fetched again
    assert set(plan2.usable()) == {"honest"}
    fetch_all(plan2, {"honest": DATA})
    assert plan2.finished


def test_failures_drop_a_peer_after_max_failures_busy_only_pauses_it():
    digest, pieces = blob(DATA)
    plan = BlobPlan(digest, len(DATA), piece_size=PIECE, depth=1)
    plan.add_peer("gone", pieces)
    plan.add_peer("busy", pieces)
    for _ in range(MAX_FAILURES):
        req = plan.next_request("gone", 0)
        plan.failed("gone", req.index, busy=False, now=0)
    assert "gone" not in plan.usable()
    req = plan.next_request("busy", 0)
    plan.failed("busy", req.index, busy=True, now=10)
    assert plan.next_request("busy", 10.5) is None  # paused
    assert plan.next_request("busy", 11.0).index == req.index  # back, same piece
    assert plan.stuck() is None


def test_end_game_duplicates_the_oldest_piece_and_the_second_copy_is_discarded():
    digest, pieces = blob(DATA)
    plan = BlobPlan(digest, len(DATA), piece_size=PIECE, depth=8)
    plan.add_peer("frozen", pieces)
    plan.add_peer("fast", pieces)
    frozen = [plan.next_request("frozen", t) for t in range(7)]  # takes every piece
    assert [r.index for r in frozen] == list(range(7))
    dup = plan.next_request("fast", 10)
    assert dup.index == 0  # the oldest in flight
    assert plan.received("fast", 0, pieces[0]) is True
    assert plan.received("frozen", 0, pieces[0]) is False  # late copy: not written twice
    assert plan.completed_bytes == PIECE


def test_wrong_shaped_claims_and_a_single_piece_blob():
    digest, pieces = blob(DATA)
    plan = BlobPlan(digest, len(DATA), piece_size=PIECE)
    plan.add_peer("short", pieces[:-1])
    plan.add_peer("junk", [b"x"] * 7)
    assert plan.usable() == [] and plan.stuck().startswith("no holder could list")
    small, _ = blob(b"abc")
    one = BlobPlan(small, 3, piece_size=PIECE)
    one.add_peer("p")  # one piece: its hash is the blob digest, no list needed
    req = one.next_request("p", 0)
    assert (req.offset, req.length) == (0, 3)
    assert one.received("p", 0, h(b"abd")) is False and one.stuck().startswith("no holder left")
    empty = BlobPlan(small, 0)
    assert empty.finished and empty.count == 0


def test_resumed_pieces_are_not_fetched_again():
    digest, pieces = blob(DATA)
    plan = BlobPlan(digest, len(DATA), piece_size=PIECE, done={0, 1, 2, 99})
    assert plan.done == {0, 1, 2}
    plan.add_peer("a", pieces)
    assert plan.next_request("a", 0).index == 3

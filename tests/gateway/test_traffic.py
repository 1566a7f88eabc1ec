"""Traffic: per-second buckets, per peer and model, with a fake wall clock."""

from __future__ import annotations

import pytest

from meshollama.gateway.traffic import NONE, OTHER, Traffic


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rec(t: Traffic, *, model="m", peer="p1", status=200, ttfb=0.1, duration=1.0, endpoint="chat"):
    t.record(endpoint=endpoint, model=model, peer=peer, status=status, ttfb=ttfb, duration=duration)


def test_counts_errors_and_ttfb_by_peer_and_model():
    clock = Clock(1_000_000.5)
    t = Traffic(clock=clock, window=60)
    rec(t, peer="p1", model="a", ttfb=0.1)
    rec(t, peer="p1", model="b", ttfb=0.3, status=502)
    rec(t, peer="p2", model="a", ttfb=None, status=0)
    rec(t, peer="", model="", ttfb=None, status=503)
    rec(t, peer="p2", model="a", ttfb=0.2, status=499)  # the client left: not an error
    rec(t, peer="p2", model="a", ttfb=0.2, status=404)  # the client's mistake: not an error
    snap = t.snapshot(step=10)
    total = snap["total"]
    assert total["requests"] == 6 and total["errors"] == 3
    assert total["ttfb_mean"] == pytest.approx(0.2) and total["ttfb_max"] == 0.3
    assert snap["peers"]["p1"] | {"series": None} == {"requests": 2, "errors": 1, "ttfb_mean": 0.2, "ttfb_max": 0.3,
                                                    "series": None}
    assert snap["peers"][NONE]["requests"] == 1 and snap["models"][NONE]["errors"] == 1
    assert snap["models"]["a"]["requests"] == 4 and snap["models"]["a"]["errors"] == 1
    assert snap["peers"]["p2"]["ttfb_mean"] == pytest.approx(0.2)
    assert snap["step"] == 10 and snap["points"] == 6 and snap["now"] == 1_000_000.5
    assert snap["start"] == 1_000_000 + 10 - 60  # the last point is the current step
    assert total["series"]["requests"] == [0, 0, 0, 0, 0, 6]
    assert total["series"]["ttfb_mean"][:5] == [None] * 5


def test_series_place_each_second_in_its_step_and_the_window_forgets():
    clock = Clock(1000.0)
    t = Traffic(clock=clock, window=30)
    rec(t, ttfb=0.1)
    clock.now = 1012.9
    rec(t, ttfb=0.3)
    rec(t, ttfb=0.5, status=500)
    snap = t.snapshot(step=10)
    assert snap["start"] == 990 and snap["points"] == 3
    assert snap["total"]["series"]["requests"] == [0, 1, 2]
    assert snap["total"]["series"]["errors"] == [0, 0, 1]
    assert snap["total"]["series"]["ttfb_mean"] == [None, 0.1, 0.4]
    assert snap["total"]["series"]["ttfb_max"] == [None, 0.1, 0.5]
    clock.now = 1031.0  # second 1000 is now out of the window; 1012 is not
    snap = t.snapshot(step=10)
    assert snap["total"]["requests"] == 2 and snap["total"]["series"]["requests"] == [2, 0, 0]
    clock.now = 5000.0
    assert t.snapshot()["total"]["requests"] == 0 and t.snapshot()["peers"] == {}
    assert len(t.snapshot()["recent"]) == 3  # the list of last requests is by count, not time


def test_a_clock_set_back_leaves_no_bucket_behind():
    clock = Clock(10_000.0)
    t = Traffic(clock=clock, window=60)
    rec(t)
    clock.now = 5_000.0
    rec(t)
    assert len(t._seconds) == 1 and t.snapshot()["total"]["requests"] == 1


def test_distinct_keys_are_capped_and_stale_ones_make_room():
    clock = Clock(100.0)
    t = Traffic(clock=clock, window=60, max_keys=3)
    for i in range(5):
        rec(t, peer=f"p{i}", model="m")
    snap = t.snapshot()
    assert sorted(snap["peers"]) == [OTHER, "p0", "p1", "p2"] and snap["peers"][OTHER]["requests"] == 2
    clock.now = 200.0  # p0..p2 are older than the window: a new peer takes a freed place
    rec(t, peer="p9")
    assert sorted(t.snapshot()["peers"]) == ["p9"]


def test_recent_is_a_ring_newest_first():
    clock = Clock(50.25)
    t = Traffic(clock=clock, recent=3)
    for i in range(5):
        clock.now += 1
        rec(t, model=f"m{i}", duration=0.123456, ttfb=0.0101)
    recent = t.snapshot()["recent"]
    assert [r["model"] for r in recent] == ["m4", "m3", "m2"]
    assert recent[0] == {"at": 55.25, "endpoint": "chat", "model": "m4", "peer": "p1", "status": 200,
                         "ttfb": 0.0101, "duration": 0.1235}
    assert t.version == 5


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        Traffic(window=0)

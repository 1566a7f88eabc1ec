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


def test_a_clock_set_back_does_not_count_new_keys_as_other():
    clock = Clock(10_000.0)
    t = Traffic(clock=clock, window=60, max_keys=3)
    for i in range(3):
        rec(t, peer=f"p{i}", model=f"m{i}")
    clock.now = 9_990.0  # set back 10 s: the keys "seen at 10000" are in the future now, and have no bucket
    rec(t, peer="new", model="fresh")
    snap = t.snapshot()
    assert sorted(snap["peers"]) == ["new"] and sorted(snap["models"]) == ["fresh"]
    assert OTHER not in snap["peers"]


def naive(t: Traffic, step: int = 10) -> dict:
    """The snapshot merged from every per-second bucket, as it was before it was cached."""
    from meshollama.gateway.traffic import Stats

    second = int(t.clock())
    points = max(1, t.window // step)
    end = (second // step + 1) * step
    start = end - points * step

    def series() -> list[Stats]:
        return [Stats() for _ in range(points)]

    total, by = series(), {"peers": {}, "models": {}}
    for s, bucket in t._seconds.items():
        if not start <= s < end:
            continue
        i = (s - start) // step
        total[i].merge(bucket.total)
        for dim in by:
            for key, st in getattr(bucket, dim).items():
                by[dim].setdefault(key, series())[i].merge(st)

    def json(steps: list[Stats]) -> dict:
        whole = Stats()
        for st in steps:
            whole.merge(st)
        return {**whole.summary(), "series": {
            "requests": [s.requests for s in steps], "errors": [s.errors for s in steps],
            "ttfb_mean": [None if s.ttfb_mean is None else round(s.ttfb_mean, 4) for s in steps],
            "ttfb_max": [round(s.ttfb_max, 4) if s.ttfb_count else None for s in steps]}}

    return {"start": start, "points": points, "total": json(total),
            **{dim: {k: json(v) for k, v in sorted(by[dim].items())} for dim in by}}


def close(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(a - b) < 2e-4
    return a == b


def test_the_cached_snapshot_equals_one_merged_from_scratch():
    import random

    rnd = random.Random(7)
    clock = Clock(1_000_000.0)
    t = Traffic(clock=clock, window=120, max_keys=6)
    for n in range(3000):
        r = rnd.random()
        if r < 0.01:
            clock.now -= rnd.choice([3, 25, 200])  # the wall clock set back
        elif r < 0.3:
            clock.now += rnd.choice([0.3, 1, 7, 11, 40, 130])
        if rnd.random() < 0.8:
            rec(t, peer=f"p{rnd.randrange(9)}", model=f"m{rnd.randrange(9)}",
                ttfb=rnd.choice([None, rnd.random()]), status=rnd.choice([200, 200, 500, 0]))
        if rnd.random() < 0.4:
            snap = t.snapshot()
            want = naive(t)
            got = {k: snap[k] for k in want}
            assert close(got, want), (n, got, want)
            assert snap["now"] == round(clock.now, 3) and len(snap["recent"]) == min(100, t.version)


def test_a_snapshot_is_reused_until_a_request_or_a_new_step():
    clock = Clock(1_000.0)
    t = Traffic(clock=clock, window=60)
    rec(t)
    first = t.snapshot()
    clock.now = 1_003.5
    again = t.snapshot()
    assert again["now"] == 1_003.5 and again["total"] is first["total"]  # not built again
    rec(t)
    assert t.snapshot()["total"]["requests"] == 2
    clock.now = 1_010.0
    moved = t.snapshot()
    assert moved["start"] == first["start"] + 10 and moved["total"]["series"]["requests"][-2:] == [2, 0]

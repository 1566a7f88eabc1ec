"""When a node announces (``mesh.cadence``), with scripted times and loads."""

from __future__ import annotations

import pytest

from meshollama.catalog import LoadInfo
from meshollama.mesh.cadence import AnnouncePolicy, Cadence, Reason, meaningful, refresh_for

IDLE = LoadInfo(in_flight=0, capacity=4)


def _policy(load: LoadInfo = IDLE, **kw) -> AnnouncePolicy:
    p = AnnouncePolicy(Cadence(**kw))
    assert p.decide(0.0, "cat", load) is Reason.FIRST
    p.sent(0.0, "cat", load, Reason.FIRST)
    return p


def test_an_idle_node_says_nothing_until_the_refresh():
    p = _policy(refresh=30.0)
    assert [p.decide(t, "cat", IDLE) for t in (0.1, 1, 10, 29.99)] == [None] * 4
    assert p.decide(30.0, "cat", IDLE) is Reason.REFRESH
    assert p.quiet_for(12.0) == 18.0


def test_a_catalog_change_or_a_forced_one_goes_out_at_once_but_not_twice_in_min_gap():
    p = _policy(min_gap=0.25)
    assert p.decide(0.1, "new", IDLE) is None  # inside the gap: asked again later
    assert p.decide(0.25, "new", IDLE) is Reason.CATALOG
    p.sent(0.25, "new", IDLE, Reason.CATALOG)
    assert p.decide(0.3, "new", IDLE, forced=True) is None
    assert p.decide(0.5, "new", IDLE, forced=True) is Reason.FORCED


@pytest.mark.parametrize("old,new,yes", [
    (LoadInfo(0, 1), LoadInfo(1, 1), True),  # the only slot taken
    (LoadInfo(1, 4), LoadInfo(2, 4), True),  # up to 4 slots, every step counts
    (LoadInfo(3, 4), LoadInfo(4, 4), True),  # the last free slot gone
    (LoadInfo(4, 16), LoadInfo(7, 16), False),  # under a quarter of 16 slots
    (LoadInfo(4, 16), LoadInfo(8, 16), True),
    (LoadInfo(16, 16, queued=2), LoadInfo(16, 16, queued=3), False),
    (LoadInfo(16, 16, queued=0), LoadInfo(16, 16, queued=1), True),  # a queue starts
    (LoadInfo(2, 16), LoadInfo(2, 16, waiting=1), True),  # our gateway's line starts
    (LoadInfo(2, 16), LoadInfo(2, 8), True),  # slot count
    (LoadInfo(0, 0), LoadInfo(0, 0), False),  # a pure gateway
])
def test_meaningful(old, new, yes):
    assert meaningful(old, new) is yes


def test_a_meaningful_load_change_waits_for_the_load_gap_a_small_one_for_the_silence():
    p = _policy(load_gap=2.0, load_silence=10.0, refresh=30.0)
    busy = LoadInfo(in_flight=1, capacity=4)
    assert p.decide(1.0, "cat", busy) is None  # meaningful, but 1 s after the last
    assert p.decide(2.0, "cat", busy) is Reason.LOAD
    p.sent(2.0, "cat", busy, Reason.LOAD)
    p2 = _policy(LoadInfo(0, 16), load_gap=2.0, load_silence=10.0, refresh=30.0)
    small = LoadInfo(in_flight=3, capacity=16)
    assert p2.decide(5.0, "cat", small) is None  # not meaningful: the silence starts now
    assert p2.decide(14.9, "cat", small) is None
    assert p2.decide(15.0, "cat", small) is Reason.LOAD_SILENCE
    p2.sent(15.0, "cat", small, Reason.LOAD_SILENCE)
    # back to what was said: nothing to say
    assert p2.decide(20.0, "cat", small) is None
    assert p2.sent_by_reason == {Reason.FIRST: 1, Reason.LOAD_SILENCE: 1}


def test_a_load_that_comes_back_before_it_was_said_is_no_news():
    p = _policy(LoadInfo(0, 16), load_gap=2.0, load_silence=10.0)
    assert p.decide(1.0, "cat", LoadInfo(3, 16)) is None
    assert p.decide(5.0, "cat", LoadInfo(0, 16)) is None  # back to what we said
    assert p.decide(12.0, "cat", LoadInfo(3, 16)) is None  # a new silence from 12
    assert p.decide(22.0, "cat", LoadInfo(3, 16)) is Reason.LOAD_SILENCE


def test_a_busy_node_speaks_at_most_once_per_load_gap():
    p = _policy(LoadInfo(0, 1), load_gap=2.0, refresh=30.0)
    sent = []
    for i in range(1, 101):  # a load that changes meaningfully every 0.1 s for 10 s
        t = i / 10
        load = LoadInfo(in_flight=i % 2, capacity=1)
        if (why := p.decide(t, "cat", load)) is not None:
            p.sent(t, "cat", load, why)
            sent.append(t)
    assert 4 <= len(sent) <= 5 and all(b - a >= 2.0 for a, b in zip(sent, sent[1:])), sent


def test_an_inconsistent_cadence_is_refused():
    with pytest.raises(ValueError):
        Cadence(refresh=1.0, load_gap=2.0)
    with pytest.raises(ValueError):
        Cadence(min_gap=0.0)


def test_the_refresh_grows_with_the_mesh_so_each_node_hears_the_same_number():
    sizes = [0, 1, 3, 10, 25, 100, 1000]
    got = [refresh_for(n, floor=30.0, per_peer=10.0, ceiling=600.0) for n in sizes]
    assert got == [30.0, 30.0, 30.0, 100.0, 250.0, 600.0, 600.0]
    heard = [n / r for n, r in zip(sizes, got)]  # refreshes a node hears per second
    assert max(heard[:5]) == 0.1  # flat up to the ceiling
    assert refresh_for(1000, floor=30.0, per_peer=0.0, ceiling=600.0) == 30.0  # per_peer 0: fixed


def test_a_longer_refresh_waits_until_said_and_grows_by_half_at_most_per_announcement():
    """Peers expire us by the interval we last announced, and one of them may miss the
    announcement that lengthens it: with miss_limit 3 the next one must come within
    twice the old interval of the one it missed."""
    p = _policy(refresh=30.0)
    p.cadence = Cadence(refresh=250.0)  # the mesh grew
    assert p.decide(29.9, "cat", IDLE) is None  # the interval said still holds
    said, t = [30.0], 0.0
    while said[-1] < 250.0:
        t += said[-1]
        assert p.decide(t - 0.01, "cat", IDLE) is None
        assert p.decide(t, "cat", IDLE) is Reason.REFRESH
        said.append(p.refresh_to_say())
        p.sent(t, "cat", IDLE, Reason.REFRESH, refresh=said[-1])
    assert said == [30.0, 45.0, 67.5, 101.25, 151.875, 227.8125, 250.0]
    assert all(new < 2 * old for old, new in zip(said, said[1:]))
    p.cadence = Cadence(refresh=30.0)  # shrank: at once
    assert p.refresh_to_say() == 30.0 and p.quiet_for(t + 10) == 20.0


def test_refreshes_come_up_to_the_jitter_early_never_late():
    import random

    p = AnnouncePolicy(Cadence(refresh=100.0, jitter=0.1), random.Random(3))
    p.sent(0.0, "cat", IDLE, Reason.FIRST)
    t, gaps = 0.0, []
    for _ in range(200):
        gap = p.quiet_for(t) + 1e-9
        assert p.decide(t + gap, "cat", IDLE) is Reason.REFRESH and p.decide(t + gap - 0.01, "cat", IDLE) is None
        t += gap
        p.sent(t, "cat", IDLE, Reason.REFRESH)
        gaps.append(gap)
    assert 90.0 <= min(gaps) < 91.0 and 99.0 < max(gaps) <= 100.0  # spread over [0.9, 1] x the interval

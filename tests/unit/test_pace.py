import itertools

import trio

from meshollama import pace


def test_next_tick_is_a_multiple_of_the_period_at_least_half_a_period_away():
    assert pace.next_tick(10.0, 1.0) == 11.0
    assert pace.next_tick(10.4, 1.0) == 11.0
    assert pace.next_tick(10.6, 1.0) == 12.0
    assert pace.next_tick(10.0, 2.0) == 12.0
    assert pace.next_tick(11.2, 2.0) == 14.0
    assert pace.next_tick(5.0, 0.0) == 5.0


async def test_loops_of_dividing_periods_wake_together(autojump_clock):
    woke: dict[float, list[float]] = {1.0: [], 2.0: []}

    async def loop(period: float, phase: float) -> None:
        await trio.sleep(phase)
        while True:
            await pace.tick(period)
            woke[period].append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop, 1.0, 0.13)
        nursery.start_soon(loop, 2.0, 0.71)
        # stop between ticks: at a whole second both loops are due at once and
        # trio runs ready tasks in random order, so a cancel at t=20 could come
        # after the 2 s loop's wake-up and before the 1 s loop's
        await trio.sleep(20.5)
        nursery.cancel_scope.cancel()
    ones, twos = woke[1.0], woke[2.0]
    assert all(b - a == 1.0 for a, b in itertools.pairwise(ones))  # the period is kept
    assert all(b - a == 2.0 for a, b in itertools.pairwise(twos))
    assert set(twos) <= set(ones)  # every wake-up of the 2 s loop is one of the 1 s loop's

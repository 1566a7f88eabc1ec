"""The gateway's per-model wait line, on trio's virtual clock."""

from __future__ import annotations

from functools import partial

import pytest
import trio
import trio.testing

from meshollama.errors import Overloaded
from meshollama.gateway.queueing import RECHECK, ModelQueues


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_free_slot_and_an_empty_line_pass_at_once():
    q = ModelQueues(4, 10.0)
    with trio.fail_after(1):
        await q.wait("m", lambda: True)
    assert q.total() == 0


async def test_requests_leave_in_arrival_order_as_slots_free(autojump_clock):
    q = ModelQueues(8, 60.0)
    slots = 0
    order: list[int] = []

    def free() -> bool:
        return slots > 0

    async def one(i: int) -> None:
        nonlocal slots
        await q.wait("m", free)
        slots -= 1  # dispatched: takes the slot before anyone else looks (no checkpoint in between)
        order.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(one, i)
            await trio.sleep(0.01)  # arrive in order
        assert q.depth("m") == 5 and q.depths() == {"m": 5}
        for n in range(5):
            await trio.sleep(1.0)
            slots += 1
            q.poke()  # a request of ours ended
            await trio.sleep(0.01)
            assert order == list(range(n + 1))
    assert q.total() == 0


async def test_a_newcomer_does_not_jump_the_line():
    q = ModelQueues(8, 60.0)
    free = False
    got: list[str] = []

    async def one(name: str) -> None:
        await q.wait("m", lambda: free)
        got.append(name)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "first")
            await trio.testing.wait_all_tasks_blocked()
            free = True
            nursery.start_soon(one, "second")  # sees a free slot, but someone waits
            await trio.testing.wait_all_tasks_blocked()
            q.poke()
    assert got[0] == "first"


async def test_a_full_line_is_refused_with_retry_after(autojump_clock):
    q = ModelQueues(2, 50.0)
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(q.wait, "m", lambda: False)
        await trio.sleep(0.1)
        with pytest.raises(Overloaded) as info:
            await q.wait("m", lambda: False, label="llama3")
        assert "llama3" in info.value.message and "gateway.queue_size" in info.value.message
        assert info.value.status == 503 and info.value.retry_after == 5
        nursery.cancel_scope.cancel()


async def test_a_wait_times_out_after_queue_timeout(autojump_clock):
    q = ModelQueues(2, 30.0)
    start = trio.current_time()
    with pytest.raises(Overloaded, match="gateway.queue_timeout"):
        await q.wait("m", lambda: False)
    assert trio.current_time() - start == pytest.approx(30.0)
    assert q.total() == 0


async def test_the_head_sees_a_slot_freed_by_a_heartbeat_without_a_poke(autojump_clock):
    q = ModelQueues(2, 30.0)
    free_at = trio.current_time() + 3.0
    start = trio.current_time()
    await q.wait("m", lambda: trio.current_time() >= free_at)
    assert 3.0 <= trio.current_time() - start <= 3.0 + RECHECK


async def test_after_busy_waits_for_a_change_even_when_a_slot_looks_free(autojump_clock):
    q = ModelQueues(2, 30.0)
    start = trio.current_time()
    await q.wait("m", lambda: True, after_busy=True)
    assert trio.current_time() - start == pytest.approx(RECHECK)


async def test_a_deadline_bounds_every_return_to_the_line(autojump_clock):
    q = ModelQueues(2, 30.0)
    deadline = trio.current_time() + 5.0
    with pytest.raises(Overloaded):
        await q.wait("m", lambda: False, deadline=deadline)
    assert trio.current_time() == pytest.approx(deadline)


async def test_zero_size_means_no_queue_every_request_goes_at_once():
    q = ModelQueues(0, 30.0)
    with trio.fail_after(1):
        await q.wait("m", lambda: True)
        await q.wait("m", lambda: False)  # the peers' own queues take it, as before the line existed
    assert q.total() == 0


async def test_a_waiter_leaves_at_once_when_nobody_holds_the_model_any_more(autojump_clock):
    outcomes: list[str] = []
    q = ModelQueues(4, 60.0, on_outcome=outcomes.append)
    held = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(q.wait, "m", lambda: False, servable=lambda: held))
        await trio.sleep(1.0)
        held = False
        await trio.sleep(2 * RECHECK)
        assert q.total() == 0
    assert outcomes == ["unservable"]


async def test_a_cancelled_waiter_leaves_and_the_next_one_moves_up(autojump_clock):
    depths: list[int] = []
    outcomes: list[str] = []
    q = ModelQueues(4, 60.0, on_depth=lambda key, d: depths.append(d), on_outcome=outcomes.append)
    free = False
    done: list[str] = []

    async def one(name: str, scope: trio.CancelScope | None = None) -> None:
        await q.wait("m", lambda: free)
        done.append(name)

    async with trio.open_nursery() as nursery:
        first = trio.CancelScope()

        async def cancellable() -> None:
            with first:
                await one("a")

        nursery.start_soon(cancellable)
        await trio.sleep(0.01)
        nursery.start_soon(one, "b")
        await trio.sleep(0.01)
        first.cancel()
        await trio.sleep(0.01)
        free = True
        q.poke()
    assert done == ["b"] and outcomes == ["gone", "dispatched"] and depths[-1] == 0

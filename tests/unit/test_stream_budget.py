"""The server-wide bound on stream items in flight, and how it splits between streams."""

from __future__ import annotations

import asyncio

import pytest

from service.api.grpc.stream_budget import StreamBudget


async def spin(times: int = 20) -> None:
    for _ in range(times):
        await asyncio.sleep(0)


async def test_each_stream_and_all_together_stay_within_their_bounds() -> None:
    budget = StreamBudget(total=10, per_stream=4)
    a, b, c = budget.share(), budget.share(), budget.share()
    await a.acquire(4)
    await b.acquire(4)
    blocked_a = asyncio.create_task(a.acquire())  # at its own cap
    blocked_c = asyncio.create_task(c.acquire(3))  # two fit under the total
    await spin()
    assert (a.held, b.held, c.held, budget.held) == (4, 4, 2, 10)
    assert not blocked_a.done() and not blocked_c.done()
    b.release(2)
    await spin()
    # c gets the room it waited for; a stays at its own cap though room is free.
    assert blocked_c.done() and not blocked_a.done()
    assert (a.held, b.held, c.held, budget.held) == (4, 2, 3, 9)
    a.release()
    await spin()
    assert blocked_a.done() and (a.held, budget.held) == (4, 9)


async def test_freed_room_goes_to_the_waiting_stream_holding_the_fewest() -> None:
    budget = StreamBudget(total=6, per_stream=6)
    big, small = budget.share(), budget.share()
    await big.acquire(6)
    more_big = asyncio.create_task(big.acquire(2))
    await spin()
    new_small = asyncio.create_task(small.acquire(3))
    await spin()
    for _ in range(3):  # the big stream's results go out one by one
        big.release()
        await spin()
    assert small.held == 3 and new_small.done()
    assert big.held == 3 and not more_big.done()
    small.close()
    await spin()
    assert more_big.done() and big.held == 5
    more_big.cancel()


async def test_a_cancelled_wait_and_a_closed_stream_give_everything_back() -> None:
    idle: list[int] = []
    budget = StreamBudget(total=3, per_stream=3, on_idle=lambda: idle.append(budget.held))
    a, b = budget.share(), budget.share()
    await a.acquire(3)
    waiting = asyncio.create_task(b.acquire(2))
    await spin()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert (b.held, budget.held) == (0, 3)
    a.close()
    assert (a.held, budget.held) == (0, 0)
    assert idle == [0], "told once no stream holds anything"
    await b.acquire(3)  # all of it is free again
    assert budget.held == 3


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        StreamBudget(total=0, per_stream=4)
    assert StreamBudget(total=5, per_stream=100).per_stream == 5

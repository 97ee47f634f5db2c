"""Unit tests of the dynamic batcher against a deterministic fake engine.

No assertion depends on how fast this machine is: ordering is driven by an asyncio.Event gate
in the fake engine, by an injectable clock, or by yielding to the loop a bounded number of times.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.batching import Batcher, BatcherLimits, ItemResult, Priority
from service.batching.pacing import EngineSpeed
from service.engines.base import EngineInfo
from service.errors import BatcherClosedError, DeadlineExpiredError, QueueFullError

DIM = 3
LIMITS = BatcherLimits(
    max_batch_tokens=100,
    max_batch_items=8,
    max_wait_s=0.0,
    max_queue_tokens=1000,
    max_queue_items=100,
)
GUARD_S = 120.0  # only a hang guard: a passing run never gets near it, however loaded


def row_for(ids: Sequence[int]) -> list[float]:
    """The fake engine's vector: identifies the item (first id) and its length."""
    return [float(ids[0]), float(len(ids)), float(sum(ids))]


class FakeEngine:
    """Deterministic engine: records every batch, can be gated, made slow, or made to fail."""

    def __init__(self, yields: Sequence[int] = (0,)) -> None:
        self.batches: list[list[list[int]]] = []
        self.completed: list[list[list[int]]] = []  # batches that returned vectors
        self.gate = asyncio.Event()
        self.gate.set()
        self.errors: list[Exception] = []
        self.yields = list(yields)  # loop yields per call, cycled: varies interleavings
        self.active = 0
        self.max_active = 0
        self.cancelled = 0
        self.priorities: list[int] = []
        self.max_active_at_bulk_start = 0  # batches running when a BULK-only batch started

    @property
    def info(self) -> EngineInfo:
        return EngineInfo("fake", DIM, 10_000, "float32", "last")

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    async def embed(
        self, batch: Sequence[Sequence[int]], priority: int = 0
    ) -> npt.NDArray[np.float32]:
        call = len(self.batches)
        self.batches.append([list(ids) for ids in batch])
        self.priorities.append(priority)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        if priority == Priority.BULK:
            self.max_active_at_bulk_start = max(self.max_active_at_bulk_start, self.active)
        try:
            for _ in range(self.yields[call % len(self.yields)]):
                await asyncio.sleep(0)
            await self.gate.wait()
            if self.errors:
                raise self.errors.pop(0)
            self.completed.append([list(ids) for ids in batch])
            return np.array([row_for(ids) for ids in batch], dtype=np.float32)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    @property
    def alive(self) -> bool:
        return True

    async def close(self) -> None:
        pass


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def spin(times: int = 50) -> None:
    """Let every runnable task make progress (bounded, so 'nothing happened' is checkable)."""
    for _ in range(times):
        await asyncio.sleep(0)


async def wait_until(cond: Callable[[], bool], spins: int = 2000) -> None:
    for _ in range(spins):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


def active_is(engine: FakeEngine, n: int) -> Callable[[], bool]:
    return lambda: engine.active == n


def ids(tag: int, n: int) -> list[int]:
    return [tag] * n


def firsts(engine: FakeEngine) -> list[list[int]]:
    """Each engine batch as the tags of its items."""
    return [[item[0] for item in batch] for batch in engine.batches]


@contextlib.asynccontextmanager
async def running(
    engine: FakeEngine,
    limits: BatcherLimits = LIMITS,
    clock: Callable[[], float] | None = None,
    start: bool = True,
) -> AsyncIterator[Batcher]:
    batcher = Batcher(engine, limits) if clock is None else Batcher(engine, limits, clock)
    if start:
        await batcher.start()
    try:
        yield batcher
    finally:
        engine.release()
        await asyncio.wait_for(batcher.close(), GUARD_S)


async def results(futures: Sequence[asyncio.Future[ItemResult]]) -> list[ItemResult]:
    return await asyncio.wait_for(asyncio.gather(*futures), GUARD_S)


# ----------------------------------------------------------------------------- property


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[BatcherLimits, list[tuple[int, Priority]], list[int]]:
    max_batch_tokens = draw(st.integers(1, 40))
    share = draw(st.sampled_from([0.5, 0.75, 1.0]))
    limits = BatcherLimits(
        max_batch_tokens=max_batch_tokens,
        max_batch_items=draw(st.integers(1, 6)),
        max_wait_s=draw(st.sampled_from([0.0, 0.001])),
        # Room for at least one largest item at the BULK share, so every item can be admitted.
        max_queue_tokens=draw(st.integers(2 * max_batch_tokens, 6 * max_batch_tokens)),
        max_queue_items=draw(st.integers(2, 20)),
        bulk_queue_share=share,
        max_inflight_batches=draw(st.integers(1, 3)),
    )
    items = draw(
        st.lists(
            st.tuples(st.integers(1, max_batch_tokens), st.sampled_from(list(Priority))),
            min_size=1,
            max_size=40,
        )
    )
    yields = draw(st.lists(st.integers(0, 3), min_size=1, max_size=5))
    return limits, items, yields


async def run_scenario(
    limits: BatcherLimits, items: list[tuple[int, Priority]], yields: list[int]
) -> None:
    engine = FakeEngine(yields)
    futures: list[asyncio.Future[ItemResult]] = []
    async with running(engine, limits) as batcher:
        for tag, (n, priority) in enumerate(items, start=1):
            futures.append(await batcher.submit_when_ready(ids(tag, n), priority))
            assert batcher.queued_tokens <= limits.max_queue_tokens
            assert batcher.queued_items <= limits.max_queue_items
        got = await results(futures)
        assert batcher.queued_items == 0
        assert batcher.queued_tokens == 0

    # Every caller got exactly its own vector.
    for tag, ((n, _), result) in enumerate(zip(items, got, strict=True), start=1):
        assert result.vector.tolist() == row_for(ids(tag, n))
    # Every batch within budget; nothing lost, nothing embedded twice (a bulk batch
    # recalled from the engine for a unary one is sent again, but never completes twice).
    for batch in engine.batches:
        assert 1 <= len(batch) <= limits.max_batch_items
        assert sum(len(i) for i in batch) <= limits.max_batch_tokens
    dispatched = [ids[0] for batch in engine.completed for ids in batch]
    assert Counter(dispatched) == Counter(range(1, len(items) + 1))
    # FIFO within a priority, by each item's first dispatch (a recalled bulk batch is sent
    # again after whatever went in meanwhile); INTERACTIVE ahead of BULK inside a batch.
    priority_of = {tag: p for tag, (_, p) in enumerate(items, start=1)}
    first_sent = list(dict.fromkeys(t for batch in firsts(engine) for t in batch))
    for priority in Priority:
        order = [t for t in first_sent if priority_of[t] is priority]
        assert order == sorted(order)
    for batch in engine.completed:
        prios = [priority_of[ids[0]] for ids in batch]
        assert prios == sorted(prios)
    # Stream work never exceeds the in-flight limit; unary batches may, up to a bound.
    assert engine.max_active_at_bulk_start <= limits.max_inflight_batches
    assert engine.max_active <= 8 * limits.max_inflight_batches


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_batches_respect_budget_and_every_item_gets_its_own_vector(
    scenario: tuple[BatcherLimits, list[tuple[int, Priority]], list[int]],
) -> None:
    # A fresh loop per example: no state can leak between examples.
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        runner.run(asyncio.wait_for(run_scenario(*scenario), GUARD_S))


# ----------------------------------------------------------------------------- ordering


async def test_interactive_goes_before_earlier_bulk_when_engine_busy() -> None:
    engine = FakeEngine()
    limits = replace(LIMITS, max_batch_items=3, max_inflight_batches=1)
    async with running(engine, limits) as batcher:
        engine.hold()
        # A full batch's worth of tokens in flight: no room even for unary items.
        first = batcher.submit([ids(1, 100)], Priority.BULK)
        await wait_until(lambda: engine.active == 1)
        bulk = batcher.submit([ids(2, 1), ids(3, 1), ids(4, 1)], Priority.BULK)
        interactive = batcher.submit([ids(5, 1), ids(6, 1)], Priority.INTERACTIVE)
        await spin()
        assert firsts(engine) == [[1]]
        engine.release()
        await results(first + bulk + interactive)
    assert firsts(engine) == [[1], [5, 6, 2], [3, 4]]


async def test_big_item_is_not_overtaken_within_its_priority() -> None:
    engine = FakeEngine()
    limits = replace(LIMITS, max_batch_tokens=10, max_inflight_batches=1)
    async with running(engine, limits) as batcher:
        engine.hold()
        first = batcher.submit([ids(1, 1)], Priority.BULK)
        await wait_until(lambda: engine.active == 1)
        rest = batcher.submit([ids(2, 6), ids(3, 6), ids(4, 1)], Priority.BULK)
        engine.release()
        await results(first + rest)
    # 3 does not fit after 2, and 4 may not jump ahead of 3.
    assert firsts(engine) == [[1], [2], [3, 4]]


@pytest.mark.parametrize("priority", list(Priority))
async def test_an_item_over_the_batch_budget_but_within_the_window_runs_alone(
    priority: Priority,
) -> None:
    """--max-batch-tokens sizes batches; it does not cap inputs (issue 19: a 32k window)."""
    engine = FakeEngine()
    limits = replace(LIMITS, max_batch_tokens=10, max_item_tokens=40, max_inflight_batches=1)
    async with running(engine, limits) as batcher:
        engine.hold()
        first = batcher.submit([ids(1, 1)], priority)
        await wait_until(lambda: engine.active == 1)
        rest = batcher.submit([ids(2, 4), ids(3, 40), ids(4, 4), ids(5, 4)], priority)
        engine.release()
        done = await results(first + rest)
        with pytest.raises(ValueError, match="max_item_tokens=40"):
            batcher.submit([ids(6, 41)], priority)
    assert firsts(engine) == [[1], [2], [3], [4, 5]]
    assert [len(r.vector) for r in done] == [DIM] * 5


# ----------------------------------------------------------------------------- max_wait


async def test_lone_item_is_held_until_max_wait() -> None:
    engine = FakeEngine()
    limits = replace(LIMITS, max_wait_s=0.05)
    loop = asyncio.get_running_loop()
    async with running(engine, limits) as batcher:
        submitted = loop.time()
        [future] = batcher.submit([ids(1, 2)], Priority.INTERACTIVE)
        await spin()
        # Not sent yet, unless this machine was slow enough for max_wait to pass meanwhile.
        assert engine.batches == [] or loop.time() - submitted >= limits.max_wait_s
        [result] = await results([future])
    assert firsts(engine) == [[1]]
    assert result.queue_s >= limits.max_wait_s


async def test_wait_counts_from_the_oldest_item() -> None:
    clock = FakeClock()
    engine = FakeEngine()
    limits = replace(LIMITS, max_wait_s=30.0)  # the real timer never fires in this test
    async with running(engine, limits, clock) as batcher:
        # The oldest item is BULK: it still sets the clock for a batch led by INTERACTIVE.
        futures = batcher.submit([ids(1, 1)], Priority.BULK)
        await spin()
        clock.now = 29.9
        futures += batcher.submit([ids(2, 1)], Priority.INTERACTIVE)
        await spin()
        assert engine.batches == []
        clock.now = 30.0
        futures += batcher.submit([ids(3, 1)], Priority.INTERACTIVE)
        got = await results(futures)
    assert firsts(engine) == [[2, 3, 1]]
    assert [r.queue_s for r in got] == [30.0, pytest.approx(0.1), 0.0]


async def test_full_batch_goes_at_once() -> None:
    engine = FakeEngine()
    limits = replace(LIMITS, max_batch_items=3, max_wait_s=3600.0)
    async with running(engine, limits) as batcher:
        await results(batcher.submit([ids(1, 1), ids(2, 1), ids(3, 1)], Priority.BULK))
    assert firsts(engine) == [[1, 2, 3]]


async def test_batch_full_by_tokens_goes_at_once() -> None:
    engine = FakeEngine()
    limits = replace(LIMITS, max_batch_tokens=10, max_wait_s=3600.0)
    async with running(engine, limits) as batcher:
        first, second = batcher.submit([ids(1, 6), ids(2, 6)], Priority.BULK)
        await results([first])
        await spin()
    assert firsts(engine) == [[1]]  # 2 is alone and still within its wait when closed
    assert isinstance(second.exception(), BatcherClosedError)


async def test_items_that_waited_behind_a_busy_engine_go_immediately() -> None:
    clock = FakeClock()
    engine = FakeEngine()
    limits = replace(LIMITS, max_batch_items=2, max_wait_s=10.0, max_inflight_batches=1)
    async with running(engine, limits, clock) as batcher:
        engine.hold()
        futures = batcher.submit([ids(1, 1), ids(2, 1)], Priority.BULK)  # full: goes now
        await wait_until(lambda: engine.active == 1)
        futures += batcher.submit([ids(3, 1)], Priority.BULK)
        clock.now = 11.0
        engine.release()  # no further submit: the freed slot alone must trigger dispatch
        await results(futures)
    assert firsts(engine) == [[1, 2], [3]]


# --------------------------------------------------------- interactive latency under bulk


async def test_engine_is_told_which_batches_carry_unary_calls() -> None:
    engine = FakeEngine()
    limits = replace(LIMITS, max_batch_items=2, max_inflight_batches=1)
    async with running(engine, limits) as batcher:
        engine.hold()
        futures = batcher.submit([ids(1, 50), ids(2, 50)], Priority.BULK)  # a full budget
        await wait_until(lambda: engine.active == 1)
        futures += batcher.submit([ids(3, 1)], Priority.BULK)
        futures += batcher.submit([ids(4, 1)], Priority.INTERACTIVE)
        engine.release()
        await results(futures)
    assert firsts(engine) == [[1, 2], [4, 3]]
    assert engine.priorities == [Priority.BULK, Priority.INTERACTIVE]


async def _teach_40_tokens_per_s(batcher: Batcher, engine: FakeEngine, clock: FakeClock) -> None:
    """One full bulk batch of 80 tokens (items 1-8) that takes 2 s on the clock."""
    engine.hold()
    first = batcher.submit([ids(t, 10) for t in range(1, 9)], Priority.BULK)
    await wait_until(lambda: engine.active == 1)
    clock.now = 2.0
    engine.release()
    await results(first)


async def test_bulk_batches_are_always_sized_to_the_step_budget() -> None:
    clock = FakeClock()
    engine = FakeEngine()
    limits = replace(LIMITS, max_inflight_batches=1, interactive_step_s=0.25)
    async with running(engine, limits, clock) as batcher:
        # 40 tokens/s: a 0.25 s step holds 10 tokens.
        await _teach_40_tokens_per_s(batcher, engine, clock)
        assert batcher.engine_tokens_per_s == pytest.approx(40.0)

        engine.hold()
        blocker = batcher.submit([ids(10, 100)], Priority.BULK)  # no room for unary items
        await wait_until(lambda: engine.active == 1)
        unary = batcher.submit([ids(20, 4)], Priority.INTERACTIVE)
        bulk = batcher.submit([ids(t, 4) for t in range(30, 36)], Priority.BULK)
        engine.release()
        await results([*blocker, *unary, *bulk])

        # With no unary call for a long while, bulk batches still keep to the step: a call
        # that comes after a quiet spell must not find full-size batches in the engine.
        clock.now = 60.0
        await results(batcher.submit([ids(t, 5) for t in range(40, 45)], Priority.BULK))
    assert firsts(engine)[1:] == [
        [10],
        [20, 30],  # the unary item, then bulk up to 10 tokens in all
        [31, 32],
        [33, 34],
        [35],
        [40, 41],
        [42, 43],
        [44],
    ]


async def test_full_bulk_batches_without_a_step_budget_or_a_measured_speed() -> None:
    clock = FakeClock()
    engine = FakeEngine()
    limits = replace(LIMITS, max_inflight_batches=1, interactive_step_s=0.0)
    async with running(engine, limits, clock) as batcher:
        await _teach_40_tokens_per_s(batcher, engine, clock)
        await results(batcher.submit([ids(t, 10) for t in range(10, 18)], Priority.BULK))
    assert firsts(engine) == [list(range(1, 9)), list(range(10, 18))]
    # Before the first batch the speed is unknown: the first batch is full-size.
    assert firsts(engine)[0] == list(range(1, 9))


async def test_small_unary_batches_do_not_use_up_the_engine_slots() -> None:
    engine = FakeEngine()
    limits = replace(LIMITS, max_inflight_batches=2)  # room for 2 x 100 tokens in flight
    async with running(engine, limits) as batcher:
        engine.hold()
        futures = []
        for tag in range(1, 6):  # single-item calls, one after the other
            futures += batcher.submit([ids(tag, 10)], Priority.INTERACTIVE)
            await wait_until(active_is(engine, tag))
        bulk = batcher.submit([ids(9, 10)], Priority.BULK)
        await spin()
        assert engine.active == 5  # the stream item waits for one of two slots
        engine.release()
        await results([*futures, *bulk])
    assert firsts(engine) == [[1], [2], [3], [4], [5], [9]]


async def test_unary_batches_stop_at_the_in_flight_token_budget() -> None:
    engine = FakeEngine()
    limits = replace(LIMITS, max_inflight_batches=1)  # 100 tokens in flight
    async with running(engine, limits) as batcher:
        engine.hold()
        futures = batcher.submit([ids(1, 60)], Priority.INTERACTIVE)
        await wait_until(lambda: engine.active == 1)
        futures += batcher.submit([ids(2, 40)], Priority.INTERACTIVE)
        await wait_until(lambda: engine.active == 2)  # 60 in flight < 100: goes
        futures += batcher.submit([ids(3, 30)], Priority.INTERACTIVE)
        await spin()
        assert engine.active == 2  # 100 in flight: it waits
        engine.release()
        await results(futures)
    assert firsts(engine) == [[1], [2], [3]]


# ----------------------------------------------------------------------------- pipelining


async def test_two_batches_in_flight_never_three() -> None:
    engine = FakeEngine()
    limits = replace(LIMITS, max_batch_items=1, max_inflight_batches=2)
    async with running(engine, limits) as batcher:
        engine.hold()
        futures = batcher.submit([ids(t, 1) for t in range(1, 6)], Priority.BULK)
        await wait_until(lambda: engine.active == 2)
        await spin()
        assert engine.active == 2
        assert batcher.inflight_batches == 2
        assert batcher.queued_items == 3
        engine.release()
        await results(futures)
    assert engine.max_active == 2
    assert firsts(engine) == [[1], [2], [3], [4], [5]]


# ----------------------------------------------------------------------------- callers gone


async def test_cancelled_queued_item_is_released_and_never_sent() -> None:
    engine = FakeEngine()
    limits = replace(LIMITS, max_batch_items=1, max_inflight_batches=1)
    async with running(engine, limits) as batcher:
        engine.hold()
        first = batcher.submit([ids(1, 1)], Priority.BULK)
        await wait_until(lambda: engine.active == 1)
        gone, kept = batcher.submit([ids(2, 5), ids(3, 7)], Priority.BULK)
        assert (batcher.queued_items, batcher.queued_tokens) == (2, 12)
        gone.cancel()
        await asyncio.sleep(0)  # done-callbacks run on the next loop iteration
        assert (batcher.queued_items, batcher.queued_tokens) == (1, 7)
        engine.release()
        await results([*first, kept])
    assert firsts(engine) == [[1], [3]]


async def test_many_cancellations_keep_counters_and_order_right() -> None:
    engine = FakeEngine()
    limits = replace(LIMITS, max_batch_items=7, max_queue_items=1000)
    async with running(engine, limits, start=False) as batcher:
        futures = batcher.submit([ids(t, 1) for t in range(1, 301)], Priority.INTERACTIVE)
        for tag, future in enumerate(futures, start=1):
            if tag % 3:
                future.cancel()  # enough dead entries to force the deques to be compacted
        await spin(5)
        assert (batcher.queued_items, batcher.queued_tokens) == (100, 100)
        # Memory stays bounded: cancelled entries do not pile up in the queue (white-box).
        assert len(batcher._queues._interactive) < 200
        await batcher.start()
        await results(futures[2::3])
    assert [t for batch in firsts(engine) for t in batch] == list(range(3, 301, 3))


async def test_cancelling_every_item_of_a_running_batch_cancels_the_engine_call() -> None:
    engine = FakeEngine()
    async with running(engine) as batcher:
        engine.hold()
        futures = batcher.submit([ids(1, 1), ids(2, 1)], Priority.INTERACTIVE)
        await wait_until(lambda: engine.active == 1)
        futures[0].cancel()
        await spin()
        assert engine.cancelled == 0  # one caller is still waiting
        futures[1].cancel()
        await wait_until(lambda: engine.cancelled == 1)
        await wait_until(lambda: batcher.inflight_batches == 0)
        # The batcher keeps serving after an aborted batch.
        engine.release()
        [result] = await results(batcher.submit([ids(3, 1)], Priority.INTERACTIVE))
    assert result.vector.tolist() == row_for(ids(3, 1))


async def test_partly_cancelled_batch_still_serves_the_rest() -> None:
    engine = FakeEngine()
    async with running(engine) as batcher:
        engine.hold()
        gone, kept = batcher.submit([ids(1, 1), ids(2, 1)], Priority.INTERACTIVE)
        await wait_until(lambda: engine.active == 1)
        gone.cancel()
        await spin()
        engine.release()
        [result] = await results([kept])
    assert engine.cancelled == 0
    assert gone.cancelled()
    assert result.vector.tolist() == row_for(ids(2, 1))


async def test_expired_items_fail_and_are_not_sent() -> None:
    clock = FakeClock()
    engine = FakeEngine()
    limits = replace(LIMITS, max_batch_items=1, max_inflight_batches=1)
    async with running(engine, limits, clock) as batcher:
        engine.hold()
        first = batcher.submit([ids(1, 1)], Priority.BULK)
        await wait_until(lambda: engine.active == 1)
        [late] = batcher.submit([ids(2, 1)], Priority.BULK, deadline=5.0)
        [in_time] = batcher.submit([ids(3, 1)], Priority.BULK, deadline=100.0)
        [no_deadline] = batcher.submit([ids(4, 1)], Priority.BULK)
        clock.now = 6.0
        engine.release()
        with pytest.raises(DeadlineExpiredError):
            await asyncio.wait_for(late, GUARD_S)
        await results([*first, in_time, no_deadline])
        assert batcher.queued_items == 0
    assert firsts(engine) == [[1], [3], [4]]


# ----------------------------------------------------------------------------- backpressure

# Queue: 20 tokens / 4 items; BULK may take 10 tokens / 2 items of it.
SMALL_QUEUE = replace(
    LIMITS, max_batch_tokens=10, max_queue_tokens=20, max_queue_items=4, bulk_queue_share=0.5
)


async def test_bulk_refused_at_its_token_share_while_interactive_admitted() -> None:
    async with running(FakeEngine(), SMALL_QUEUE, start=False) as batcher:
        batcher.submit([ids(1, 10)], Priority.BULK)
        with pytest.raises(QueueFullError) as refused:
            batcher.submit([ids(2, 1)], Priority.BULK)
        assert refused.value.retry_after_s > 0
        assert "tokens" in refused.value.reason
        assert "BULK share" in refused.value.reason
        batcher.submit([ids(3, 5), ids(4, 5)], Priority.INTERACTIVE)
        assert batcher.queued_tokens == 20
        with pytest.raises(QueueFullError) as full:
            batcher.submit([ids(5, 1)], Priority.INTERACTIVE)
        assert full.value.retry_after_s > 0
        assert "max_queue_tokens" in full.value.reason
        assert "BULK" not in full.value.reason


async def test_item_bound_and_all_or_nothing_admission() -> None:
    async with running(FakeEngine(), SMALL_QUEUE, start=False) as batcher:
        batcher.submit([ids(1, 1), ids(2, 1)], Priority.BULK)
        with pytest.raises(QueueFullError) as refused:
            batcher.submit([ids(3, 1)], Priority.BULK)
        assert "items" in refused.value.reason
        # Three interactive items would fit the tokens but not the items: none is admitted.
        with pytest.raises(QueueFullError):
            batcher.submit([ids(4, 1), ids(5, 1), ids(6, 1)], Priority.INTERACTIVE)
        assert (batcher.queued_items, batcher.queued_tokens) == (2, 2)
        batcher.submit([ids(7, 1), ids(8, 1)], Priority.INTERACTIVE)
        assert batcher.queued_items == 4


async def test_invalid_items_are_rejected() -> None:
    async with running(FakeEngine(), SMALL_QUEUE, start=False) as batcher:
        with pytest.raises(ValueError, match="at least one token"):
            batcher.submit([ids(1, 1), []], Priority.INTERACTIVE)
        with pytest.raises(ValueError, match="max_item_tokens"):
            await batcher.submit_when_ready(ids(2, 11))
        with pytest.raises(QueueFullError, match="never"):
            batcher.submit([ids(3, 5)] * 5, Priority.INTERACTIVE)  # 5 items > 4: never fits
        assert batcher.queued_items == 0


async def test_submit_when_ready_waits_then_proceeds_when_space_frees() -> None:
    async with running(FakeEngine(), SMALL_QUEUE, start=False) as batcher:
        [blocker] = batcher.submit([ids(1, 10)], Priority.BULK)
        waiter = asyncio.create_task(batcher.submit_when_ready(ids(2, 4)))
        await spin()
        assert not waiter.done()
        assert batcher.queued_tokens == 10
        blocker.cancel()
        future = await asyncio.wait_for(waiter, GUARD_S)
        assert not future.done()
        assert (batcher.queued_items, batcher.queued_tokens) == (1, 4)


async def test_waiters_are_admitted_in_fifo_order() -> None:
    limits = replace(SMALL_QUEUE, max_queue_items=100)  # only the token bound matters here
    async with running(FakeEngine(), limits, start=False) as batcher:
        a, b = batcher.submit([ids(1, 4), ids(2, 5)], Priority.BULK)  # 9 of 10 BULK tokens
        big = asyncio.create_task(batcher.submit_when_ready(ids(3, 5)))
        await spin()
        small = asyncio.create_task(batcher.submit_when_ready(ids(4, 1)))
        await spin()
        # 1 token is free, but the small item may not overtake the big one.
        assert not big.done()
        assert not small.done()
        with pytest.raises(QueueFullError, match="waiting"):
            batcher.submit([ids(5, 1)], Priority.BULK)
        a.cancel()
        await spin()
        assert big.done()
        assert not small.done()
        b.cancel()
        await spin()
        assert small.done()
        assert batcher.queued_tokens == 6


async def test_cancelled_waiter_leaves_no_trace() -> None:
    async with running(FakeEngine(), SMALL_QUEUE, start=False) as batcher:
        [blocker] = batcher.submit([ids(1, 10)], Priority.BULK)
        waiter = asyncio.create_task(batcher.submit_when_ready(ids(2, 4)))
        await spin()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert (batcher.queued_items, batcher.queued_tokens) == (1, 10)
        blocker.cancel()
        await spin()
        assert (batcher.queued_items, batcher.queued_tokens) == (0, 0)


async def test_waiter_cancelled_right_after_admission_gives_its_space_back() -> None:
    async with running(FakeEngine(), SMALL_QUEUE, start=False) as batcher:
        [blocker] = batcher.submit([ids(1, 10)], Priority.BULK)
        waiter = asyncio.create_task(batcher.submit_when_ready(ids(2, 4)))
        await spin()
        blocker.cancel()
        await asyncio.sleep(0)  # the blocker's done-callback admits the waiter ...
        assert batcher.queued_tokens == 4
        assert not waiter.done()
        waiter.cancel()  # ... which is cancelled before it can resume
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert (batcher.queued_items, batcher.queued_tokens) == (0, 0)


async def test_interactive_waiter_is_not_blocked_by_a_bulk_waiter() -> None:
    async with running(FakeEngine(), SMALL_QUEUE, start=False) as batcher:
        [bulk] = batcher.submit([ids(1, 10)], Priority.BULK)
        [interactive] = batcher.submit([ids(2, 10)], Priority.INTERACTIVE)
        bulk_waiter = asyncio.create_task(batcher.submit_when_ready(ids(3, 1)))
        urgent = asyncio.create_task(batcher.submit_when_ready(ids(4, 1), Priority.INTERACTIVE))
        await spin()
        assert not bulk_waiter.done()
        assert not urgent.done()
        interactive.cancel()  # frees total space but not BULK share
        await spin()
        assert urgent.done()
        assert not bulk_waiter.done()
        bulk.cancel()
        await spin()
        assert bulk_waiter.done()


# ----------------------------------------------------------------------------- failures


async def test_engine_error_reaches_every_item_of_the_batch_only() -> None:
    engine = FakeEngine()
    boom = RuntimeError("boom")
    engine.errors.append(boom)
    async with running(engine) as batcher:
        futures = batcher.submit([ids(1, 1), ids(2, 1)], Priority.INTERACTIVE)
        for future in futures:
            with pytest.raises(RuntimeError) as raised:
                await asyncio.wait_for(future, GUARD_S)
            assert raised.value is boom
        [result] = await results(batcher.submit([ids(3, 1)], Priority.INTERACTIVE))
    assert result.vector.tolist() == row_for(ids(3, 1))
    assert firsts(engine) == [[1, 2], [3]]


async def test_close_fails_queued_drains_inflight_and_refuses_new_work() -> None:
    engine = FakeEngine()
    limits = replace(SMALL_QUEUE, max_batch_items=1, max_inflight_batches=1)
    batcher = Batcher(engine, limits)
    await batcher.start()
    engine.hold()
    [running_item] = batcher.submit([ids(1, 1)], Priority.BULK)
    await wait_until(lambda: engine.active == 1)
    [queued] = batcher.submit([ids(2, 10)], Priority.BULK)
    waiter = asyncio.create_task(batcher.submit_when_ready(ids(3, 1)))
    await spin()
    closing = asyncio.create_task(batcher.close())
    with pytest.raises(BatcherClosedError):
        await asyncio.wait_for(queued, GUARD_S)
    with pytest.raises(BatcherClosedError):
        await asyncio.wait_for(waiter, GUARD_S)
    await spin()
    assert not closing.done()  # still draining the in-flight batch
    with pytest.raises(BatcherClosedError):
        batcher.submit([ids(4, 1)], Priority.INTERACTIVE)
    with pytest.raises(BatcherClosedError):
        await batcher.submit_when_ready(ids(5, 1))
    engine.release()
    await asyncio.wait_for(closing, GUARD_S)
    assert running_item.result().vector.tolist() == row_for(ids(1, 1))
    assert (batcher.queued_items, batcher.inflight_batches) == (0, 0)
    await asyncio.wait_for(batcher.close(), GUARD_S)  # idempotent
    assert firsts(engine) == [[1]]


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        replace(LIMITS, max_batch_tokens=0)
    with pytest.raises(ValueError):
        replace(LIMITS, bulk_queue_share=0.0)
    with pytest.raises(ValueError):
        replace(LIMITS, max_wait_s=-1.0)


# ----------------------------------------------------------------- fair shares, pacing


def flows_of(engine: FakeEngine, flow_of: dict[int, str]) -> list[list[str]]:
    return [[flow_of[tag] for tag in batch] for batch in firsts(engine)]


async def test_a_small_stream_behind_a_big_one_gets_half_of_every_batch() -> None:
    engine = FakeEngine()
    limits = replace(LIMITS, max_batch_items=4, max_inflight_batches=1, max_queue_items=1000)
    async with running(engine, limits, start=False) as batcher:
        big = [await batcher.submit_when_ready(ids(t, 5), flow="big") for t in range(1, 41)]
        small = [await batcher.submit_when_ready(ids(t, 5), flow="small") for t in range(41, 47)]
        await batcher.start()
        await results([*big, *small])
    flow_of = {t: "big" if t <= 40 else "small" for t in range(1, 47)}
    batches = flows_of(engine, flow_of)
    # The small stream's six items go in the first three batches, two in each, instead of
    # after the big one's forty.
    assert [b.count("small") for b in batches[:3]] == [2, 2, 2]
    assert sum(b.count("small") for b in batches[3:]) == 0
    # FIFO within each stream.
    for name in ("big", "small"):
        order = [t for batch in firsts(engine) for t in batch if flow_of[t] == name]
        assert order == sorted(order)


async def test_a_returning_stream_earns_no_credit_for_its_idle_time() -> None:
    engine = FakeEngine()
    limits = replace(LIMITS, max_batch_items=2, max_inflight_batches=1, max_queue_items=1000)
    async with running(engine, limits, start=False) as batcher:
        first = [await batcher.submit_when_ready(ids(t, 5), flow="a") for t in range(1, 5)]
        await batcher.start()
        await results(first)  # "a" was served 20 tokens while alone
        engine.hold()
        blocker = await batcher.submit_when_ready(ids(9, 5), flow="a")
        await wait_until(lambda: engine.active == 1)
        a = [await batcher.submit_when_ready(ids(t, 5), flow="a") for t in range(10, 14)]
        b = [await batcher.submit_when_ready(ids(t, 5), flow="b") for t in range(20, 24)]
        engine.release()
        await results([blocker, *a, *b])
    # "b" starts level with "a": the two alternate rather than "b" catching up 25 tokens.
    assert firsts(engine)[-4:] == [[10, 20], [11, 21], [12, 22], [13, 23]]


@st.composite
def two_streams(draw: st.DrawFn) -> tuple[list[int], list[int], int]:
    big = draw(st.lists(st.integers(1, 20), min_size=5, max_size=60))
    small = draw(st.lists(st.integers(1, 20), min_size=1, max_size=15))
    start_after = draw(st.integers(0, len(big)))  # big items queued before small arrives
    return big, small, start_after


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(two_streams(), st.integers(1, 3), st.lists(st.integers(0, 2), min_size=1, max_size=4))
def test_two_streams_share_dispatches_within_one_item(
    streams: tuple[list[int], list[int], int], inflight: int, yields: list[int]
) -> None:
    big, small, start_after = streams

    async def scenario() -> None:
        engine = FakeEngine(yields)
        limits = replace(
            LIMITS, max_batch_tokens=40, max_inflight_batches=inflight, max_queue_items=1000,
            max_queue_tokens=10_000,
        )  # fmt: skip
        tags = iter(range(1, 10_000))
        flow_of: dict[int, str] = {}
        sent: list[tuple[int, int]] = []  # (tag, tokens), in submission order
        futures = []
        async with running(engine, limits, start=False) as batcher:

            async def add(n: int, flow: str) -> None:
                tag = next(tags)
                flow_of[tag] = flow
                sent.append((tag, n))
                futures.append(await batcher.submit_when_ready(ids(tag, n), flow=flow))

            for n in big[:start_after]:
                await add(n, "big")
            await batcher.start()
            for n in big[start_after:]:
                await add(n, "big")
            for n in small:
                await add(n, "small")
            got = await results(futures)
        # Nothing lost, nothing duplicated, every vector its own.
        dispatched = [t for batch in firsts(engine) for t in batch]
        assert Counter(dispatched) == Counter(flow_of.keys())
        for (tag, n), result in zip(sent, got, strict=True):
            assert result.vector.tolist() == row_for(ids(tag, n))
        # From the moment both had items queued until the small one ran out, the tokens
        # served to each differ by at most one item (plus what was already in the engine).
        served = {"big": 0, "small": 0}
        small_left = len(small)
        size = dict(sent)
        began = False
        for tag in dispatched:
            if flow_of[tag] == "small":
                began = True
            if began and small_left:
                served[flow_of[tag]] += size[tag]
                assert served["big"] - served["small"] <= 20 + 40 * inflight, served
                small_left -= flow_of[tag] == "small"

    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        runner.run(scenario())


class ScriptedEngine:
    """One batch at a time, taking its tokens / `rate` seconds on the test's clock; among the
    batches waiting, the lowest priority value goes first (as with vLLM's priority policy)."""

    def __init__(self, clock: FakeClock, rate: float) -> None:
        self.clock = clock
        self.rate = rate
        self.waiting: list[tuple[int, int, int, asyncio.Future[npt.NDArray[np.float32]]]] = []
        self.bulk_tokens_in_engine: list[int] = []  # seen at each dispatch
        self._seq = 0
        self._kick = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    @property
    def info(self) -> EngineInfo:
        return EngineInfo("scripted", DIM, 10_000, "float32", "last")

    @property
    def alive(self) -> bool:
        return True

    async def embed(
        self, batch: Sequence[Sequence[int]], priority: int = 0
    ) -> npt.NDArray[np.float32]:
        if self._runner is None:
            self._runner = asyncio.create_task(self._run())
        tokens = sum(len(ids) for ids in batch)
        future: asyncio.Future[npt.NDArray[np.float32]] = asyncio.get_running_loop().create_future()
        self._seq += 1
        self.waiting.append((priority, self._seq, tokens, future))
        self.bulk_tokens_in_engine.append(sum(t for p, _, t, _ in self.waiting if p == 1))
        self._kick.set()
        await future  # cancelled: aborted, and dropped from `waiting` when its turn comes
        return np.array([row_for(ids) for ids in batch], dtype=np.float32)

    async def _run(self) -> None:
        while True:
            while not self.waiting:
                self._kick.clear()
                await self._kick.wait()
            await spin(5)  # the batcher refills the engine as it would while a step runs
            self.waiting = [w for w in self.waiting if not w[3].done()]  # aborted ones
            if not self.waiting:
                continue
            self.waiting.sort()
            _, _, tokens, future = self.waiting.pop(0)
            self.clock.now += tokens / self.rate
            future.set_result(np.zeros(0, np.float32))

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(1, 60), min_size=20, max_size=120),
    st.lists(st.integers(0, 100), min_size=1, max_size=5),
)
def test_a_sporadic_unary_call_waits_at_most_a_step_whatever_the_bulk_load(
    bulk: list[int], arrivals: list[int]
) -> None:
    rate, step_s = 1000.0, 0.05  # 50 tokens a step; bulk items up to 60 tokens

    async def scenario() -> None:
        clock = FakeClock()
        engine = ScriptedEngine(clock, rate)
        limits = replace(
            LIMITS, max_batch_tokens=500, max_batch_items=64, max_queue_items=1000,
            max_queue_tokens=20_000, interactive_step_s=step_s,
        )  # fmt: skip
        batcher = Batcher(engine, limits, clock)
        await batcher.start()
        try:
            await results(batcher.submit([ids(0, 5)], Priority.INTERACTIVE))  # learns the speed
            stream = [await batcher.submit_when_ready(ids(t, n), flow="s") for t, n in
                      enumerate(bulk, start=1)]  # fmt: skip
            waits = []
            for after in sorted(a % len(bulk) for a in arrivals):

                def answered(after: int = after) -> bool:
                    return sum(f.done() for f in stream) >= after

                await wait_until(answered)
                began = clock.now
                await results(batcher.submit([ids(9999, 5)], Priority.INTERACTIVE))
                waits.append(clock.now - began)
            await results(stream)
        finally:
            await batcher.close()
            await engine.close()
        # In the engine it finds at most the bulk batch running (about a step, or one item
        # bigger than a step), then it goes first; bulk in the engine never exceeds the
        # in-flight batches' steps.
        longest = max(step_s, max(bulk) / rate)
        assert max(waits) <= longest + 5 / rate + 1e-9, (waits, longest)
        cap = limits.max_inflight_batches * max(step_s * rate, *bulk)
        assert max(engine.bulk_tokens_in_engine) <= cap

    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        runner.run(scenario())


def test_engine_speed_counts_service_time_not_time_behind_another_batch() -> None:
    speed = EngineSpeed(prior_latency_s=0.01)
    speed.dispatched(0.0)  # a: 100 tokens
    speed.dispatched(0.0)  # b: 100 tokens, waits behind a
    speed.finished(100, 0.0, 1.0, delivered=True)
    speed.finished(100, 0.0, 2.0, delivered=True)
    assert speed.tokens_per_s == pytest.approx(100.0)  # not 100 / 2 s for b
    # Two batches the engine ran in one step finish together: pooled, not infinitely fast.
    speed.dispatched(5.0)
    speed.dispatched(5.0)
    speed.finished(100, 5.0, 6.0, delivered=True)
    speed.finished(100, 5.0, 6.0, delivered=True)
    assert speed.tokens_per_s == pytest.approx(100.0)
    speed.dispatched(10.0)  # a cancelled batch teaches nothing
    speed.finished(100, 10.0, 10.1, delivered=False)
    assert speed.tokens_per_s == pytest.approx(100.0)
    assert speed.tokens_in(0.5) == 50 and EngineSpeed(0.01).tokens_in(0.5) is None

"""The vLLM adapter's bookkeeping, against a scripted engine-core client.

The real engine core is driven by the integration tests (vectors against references, engine
death); here a stand-in for vLLM's AsyncMPClient replays outputs in chosen orders, so the
row filing, the aborts on cancellation and the failure paths are checked exactly.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import numpy as np
import pytest
import torch
from vllm import PoolingParams
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, FinishReason
from vllm.v1.engine.exceptions import EngineDeadError

from service.engines.base import EngineInfo
from service.engines.vllm_engine import VllmEngine
from service.errors import EngineUnavailableError

DIM = 4


class _Resources:
    engine_dead = False


class ScriptedCore:
    """Records what the engine sends; outputs come only when a test pushes them."""

    def __init__(self) -> None:
        self.resources = _Resources()
        self.added: list[EngineCoreRequest] = []
        self.aborted: list[str] = []
        self.outputs: asyncio.Queue[EngineCoreOutputs | Exception] = asyncio.Queue()
        self.shut_down = False

    async def add_request_async(self, request: EngineCoreRequest) -> None:
        if self.resources.engine_dead:
            raise EngineDeadError()
        self.added.append(request)

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        self.aborted.extend(request_ids)

    async def get_output_async(self) -> EngineCoreOutputs:
        item = await self.outputs.get()
        if isinstance(item, Exception):
            raise item
        return item

    def shutdown(self) -> None:
        self.shut_down = True

    def finish(self, *requests: EngineCoreRequest, dtype: torch.dtype = torch.float32) -> None:
        """One engine step that finishes `requests`; each vector is its first token id."""
        self.outputs.put_nowait(
            EngineCoreOutputs(
                outputs=[
                    EngineCoreOutput(
                        request_id=r.request_id,
                        new_token_ids=[],
                        pooling_output=torch.full((DIM,), float(_ids(r)[0]), dtype=dtype),
                        finish_reason=FinishReason.STOP,
                    )
                    for r in requests
                ]
            )
        )


def _ids(request: EngineCoreRequest) -> list[int]:
    assert request.prompt_token_ids is not None
    return request.prompt_token_ids


def _engine() -> tuple[VllmEngine, ScriptedCore]:
    core = ScriptedCore()
    info = EngineInfo("scripted", DIM, 512, "float32", "MEAN")
    return VllmEngine(cast(Any, core), info, PoolingParams(task="embed")), core


async def _sent(core: ScriptedCore, n: int) -> None:
    for _ in range(100):
        if len(core.added) >= n:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{len(core.added)} of {n} sequences reached the engine")


async def test_rows_follow_the_batch_whatever_order_vllm_finishes_in() -> None:
    engine, core = _engine()
    call = asyncio.ensure_future(engine.embed([[7, 1], [8], [9, 2, 3]], priority=-1))
    await _sent(core, 3)
    first, second, third = core.added
    assert [_ids(r) for r in core.added] == [[7, 1], [8], [9, 2, 3]]
    assert {r.priority for r in core.added} == {-1}
    assert len({r.request_id for r in core.added}) == 3
    core.finish(third)
    core.finish(first, second, dtype=torch.bfloat16)  # bfloat16 on GPUs
    rows = await call
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows[:, 0], [7.0, 8.0, 9.0])
    await engine.close()
    assert core.shut_down


async def test_concurrent_calls_get_their_own_vectors() -> None:
    engine, core = _engine()
    calls = [asyncio.ensure_future(engine.embed([[10 * c + i] for i in range(3)])) for c in (1, 2)]
    await _sent(core, 6)
    core.finish(*reversed(core.added))
    one, two = await asyncio.gather(*calls)
    np.testing.assert_array_equal(one[:, 0], [10, 11, 12])
    np.testing.assert_array_equal(two[:, 0], [20, 21, 22])
    await engine.close()


async def test_cancelling_a_call_aborts_only_its_unfinished_sequences() -> None:
    engine, core = _engine()
    other = asyncio.ensure_future(engine.embed([[5]]))
    call = asyncio.ensure_future(engine.embed([[1], [2], [3]]))
    await _sent(core, 4)
    done_early = core.added[1]
    core.finish(done_early)
    for _ in range(20):  # loop turns, not seconds: the engine files the early vector
        await asyncio.sleep(0)
    assert core.outputs.empty()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.sleep(0)
    assert sorted(core.aborted) == sorted(r.request_id for r in core.added[2:])
    # A late output for an aborted sequence is dropped; the other call is untouched.
    core.finish(*core.added[2:], core.added[0])
    np.testing.assert_array_equal((await other)[:, 0], [5])
    await engine.close()


async def test_a_sequence_ended_without_a_vector_fails_its_call_and_aborts_the_rest() -> None:
    engine, core = _engine()
    call = asyncio.ensure_future(engine.embed([[1], [2]]))
    await _sent(core, 2)
    core.outputs.put_nowait(
        EngineCoreOutputs(
            outputs=[
                EngineCoreOutput(
                    request_id=core.added[0].request_id,
                    new_token_ids=[],
                    finish_reason=FinishReason.ERROR,
                )
            ]
        )
    )
    with pytest.raises(EngineUnavailableError, match=r"sequence 0 .* without a vector"):
        await call
    assert core.aborted == [core.added[1].request_id]
    assert engine.alive
    await engine.close()


async def test_a_dead_engine_fails_waiting_calls_and_refuses_new_ones() -> None:
    engine, core = _engine()
    call = asyncio.ensure_future(engine.embed([[1], [2]]))
    await _sent(core, 2)
    core.resources.engine_dead = True
    core.outputs.put_nowait(EngineDeadError())
    with pytest.raises(EngineUnavailableError, match="failed"):
        await call
    assert not engine.alive
    with pytest.raises(EngineUnavailableError, match="dead"):
        await engine.embed([[3]])
    await engine.close()


async def test_closing_fails_calls_still_waiting() -> None:
    engine, core = _engine()
    call = asyncio.ensure_future(engine.embed([[1]]))
    await _sent(core, 1)
    await engine.close()
    with pytest.raises(EngineUnavailableError, match="shutting down"):
        await call
    assert core.shut_down


async def test_an_empty_batch_needs_no_engine() -> None:
    engine, core = _engine()
    assert (await engine.embed([])).shape == (0, DIM)
    assert core.added == []

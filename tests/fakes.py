"""A deterministic in-process engine for servicer tests: no vLLM, controllable faults."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.config import ServiceConfig
from service.engines.base import EngineInfo
from service.errors import EngineUnavailableError

DIM = 384


def fake_vector(ids: Sequence[int]) -> npt.NDArray[np.float32]:
    """A vector that depends only on the token ids, so each caller's result is checkable."""
    seed = int.from_bytes(
        hashlib.sha256(np.asarray(ids, np.int64).tobytes()).digest()[:8], "little"
    )
    return np.random.default_rng(seed).normal(size=DIM).astype(np.float32)


class FakeEngine:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[list[list[int]]] = []
        self.cancelled = 0
        self.dead = False
        self.hang = False
        # When set, batches wait until it is set: a test decides when the engine may answer.
        self.gate: asyncio.Event | None = None

    @property
    def info(self) -> EngineInfo:
        return EngineInfo("fake", DIM, 256, "float32", "MEAN")

    @property
    def alive(self) -> bool:
        return not self.dead

    async def embed(
        self, batch: Sequence[Sequence[int]], priority: int = 0
    ) -> npt.NDArray[np.float32]:
        if self.dead:
            raise EngineUnavailableError("fake engine is dead")
        self.batches.append([list(ids) for ids in batch])
        try:
            if self.hang:
                await asyncio.Event().wait()
            if self.gate is not None:
                await self.gate.wait()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.dead:
            raise EngineUnavailableError("fake engine died mid-batch")
        return np.stack([fake_vector(ids) for ids in batch])

    async def close(self) -> None:
        self.dead = True


def factory(engine: FakeEngine) -> object:
    def make(config: ServiceConfig, path: Path, name: str) -> FakeEngine:
        return engine

    return make

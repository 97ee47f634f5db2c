"""The one small interface every engine implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class EngineInfo:
    """What the engine learned about the model once it was loaded."""

    model_name: str
    dimension: int
    max_input_tokens: int
    dtype: str
    pooling: str


class EngineUnavailableError(RuntimeError):
    """The engine cannot serve (dead, shut down, or failed on a batch); a retry may work."""


class Engine(Protocol):
    """Token ids in, raw pooled (not normalized) float32 vectors out, one row per sequence."""

    @property
    def info(self) -> EngineInfo: ...

    @property
    def alive(self) -> bool:
        """False once the engine can never serve again (its process died)."""
        ...

    async def embed(
        self, batch: Sequence[Sequence[int]], priority: int = 0
    ) -> npt.NDArray[np.float32]:
        """Return an array of shape (len(batch), info.dimension).

        Lower `priority` runs first among batches waiting in the engine (engines without a
        queue of their own ignore it).

        Cancelling the awaiting task must abort the work in the engine.
        Failures are raised as EngineUnavailableError.
        """
        ...

    async def close(self) -> None: ...

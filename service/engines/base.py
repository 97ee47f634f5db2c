"""The one small interface every engine implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

# Model kinds: what an engine's rows are.
EMBED = "embed"  # pooled vectors
SCORE = "score"  # one raw cross-encoder logit per (query, document) pair
MODEL_KINDS = (EMBED, SCORE)


@dataclass(frozen=True)
class EngineInfo:
    """What the engine learned about the model once it was loaded."""

    model_name: str
    dimension: int
    max_input_tokens: int
    dtype: str
    pooling: str
    # "embed": rows are pooled vectors; "score": rows are one raw cross-encoder logit each
    # (dimension 1, no activation: the service applies the sigmoid).
    kind: str = EMBED


class Engine(Protocol):
    """Token ids in, raw pooled (not normalized) float32 vectors out, one row per sequence.

    A score engine (info.kind SCORE) takes the ids of whole (query, document) pairs and
    gives each a row of dimension 1: the cross-encoder's raw logit.
    """

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

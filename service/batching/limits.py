"""The batcher's vocabulary: priorities, limits, the errors callers see, and ItemResult."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


class Priority(enum.IntEnum):
    """Lower value is served first."""

    INTERACTIVE = 0  # unary calls (gRPC and HTTP): always taken before BULK
    BULK = 1  # stream items


# Iterating an Enum class is a Python-level generator: the per-item paths use these instead.
PRIORITIES = tuple(Priority)
UP_TO = {p: tuple(q for q in PRIORITIES if q <= p) for p in PRIORITIES}


@dataclass(frozen=True)
class BatcherLimits:
    max_batch_tokens: int  # token budget of one batch (sum of len(token_ids))
    max_batch_items: int  # item cap of one batch
    max_wait_s: float  # how long a non-full batch may wait, from its oldest item's enqueue
    max_queue_tokens: int  # bound on queued (not yet dispatched) tokens
    max_queue_items: int  # bound on queued items
    # BULK may fill at most this fraction of the queue bounds; the rest is kept for
    # INTERACTIVE, so a stream that keeps the queue full cannot lock unary callers out.
    bulk_queue_share: float = 0.75
    max_inflight_batches: int = 2  # one batch runs while the next forms/waits
    # BULK batches are sized from the engine's measured speed to take about this long, so
    # an INTERACTIVE item arriving at any moment waits for at most about two of them (the
    # one running and the one queued in the engine). 0: full-size BULK batches.
    interactive_step_s: float = 0.0
    # The longest item admitted (the model's window); 0: max_batch_tokens. An item longer
    # than max_batch_tokens runs as a batch of its own: the budget sizes batches, it does
    # not cap inputs.
    max_item_tokens: int = 0

    @property
    def item_tokens(self) -> int:
        return max(self.max_item_tokens, self.max_batch_tokens)

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_batch_items", "max_queue_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_queue_tokens < self.item_tokens:
            raise ValueError("max_queue_tokens must hold the longest item (max_item_tokens)")
        if self.max_queue_items < 1 or self.max_inflight_batches < 1:
            raise ValueError("max_queue_items and max_inflight_batches must be >= 1")
        if self.max_wait_s < 0 or self.interactive_step_s < 0:
            raise ValueError("max_wait_s and interactive_step_s must be >= 0")
        if not 0.0 < self.bulk_queue_share <= 1.0:
            raise ValueError("bulk_queue_share must be in (0, 1]")


@dataclass(frozen=True)
class ItemResult:
    vector: npt.NDArray[np.float32]  # 1-D row from the engine
    queue_s: float  # enqueue -> dispatch
    inference_s: float  # dispatch -> engine returned
    batch: object | None = None  # what BatchObserver.dispatched returned (telemetry's span)
    cached: bool = False  # from the vector cache (service.vector_cache), not the engine

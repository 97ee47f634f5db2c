"""The dynamic batcher: admission and fair queues (queues), the engine's measured speed
(pacing), and the batching task that forms batches and feeds the engine (batcher).

Pure asyncio: it knows nothing of vLLM, gRPC or HTTP, only the Engine protocol.
"""

from service.batching.batcher import Batcher, BatchObserver, QueuedItem
from service.batching.limits import (
    BatcherClosedError,
    BatcherLimits,
    DeadlineExpiredError,
    ItemResult,
    Priority,
    QueueFullError,
)

__all__ = [
    "BatchObserver",
    "Batcher",
    "BatcherClosedError",
    "BatcherLimits",
    "DeadlineExpiredError",
    "ItemResult",
    "Priority",
    "QueueFullError",
    "QueuedItem",
]

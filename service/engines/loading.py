"""Which engine a configuration asks for, built with that model's sizing flags.

The embedding model and the rerank model each have their own window, memory share and batch
budgets (--max-model-len, --rerank-max-model-len, ...); both engines are otherwise built the
same way. vllm is imported here lazily, after its start-up chatter has been turned down.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from service.config import ServiceConfig
from service.engines.base import EMBED, SCORE, Engine
from service.errors import ModelLoadError

if TYPE_CHECKING:
    from service.engines.vllm_engine import EngineAttachment, VllmSettings

# vLLM's start-up chatter: some 60 lines of notes and library warnings from this process
# and the engine's, none of which a user can act on. Hidden unless the service logs at
# DEBUG; vLLM's errors still show. The variables are read by the engine's processes.
_QUIET_ENGINE_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TORCH_CPP_LOG_LEVEL": "ERROR",  # torch's C++ notes (NUMA binding)
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
}


def quiet_vllm(config: ServiceConfig) -> bool:
    """Hide vLLM's start-up chatter unless logging at DEBUG; before vllm is imported."""
    quiet: bool = logging.getLevelName(config.log_level.upper()) != logging.DEBUG
    if quiet:
        for variable, value in _QUIET_ENGINE_ENV.items():
            os.environ.setdefault(variable, value)
        # vLLM logs while it is imported, before it configures its own logger.
        logging.getLogger("vllm").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
    return quiet


def check_vllm_args(config: ServiceConfig) -> None:
    """Parse --vllm-args with vLLM's own definitions (seconds, not the minutes of a model
    load); raises ValueError ("--vllm-args: ...") naming what is wrong."""
    if config.engine != "vllm" or not config.vllm_args:
        return
    quiet_vllm(config)
    from service.engines.vllm_engine import parse_vllm_args

    parse_vllm_args(config.vllm_args)


@dataclass(frozen=True)
class EngineSizing:
    """One model's share of the machine and its batch budgets, from its own flags."""

    kind: str  # EMBED or SCORE
    max_model_len: int  # 0: the model's own window
    gpu_memory_utilization: float
    max_batch_tokens: int
    max_batch_items: int
    vllm_args: str  # more engine arguments (--vllm-args applies to the embedding model)

    @classmethod
    def of(cls, config: ServiceConfig, kind: str) -> EngineSizing:
        if kind == SCORE:
            return cls(
                SCORE,
                config.rerank_max_model_len,
                config.rerank_gpu_memory_utilization,
                config.rerank_max_batch_tokens,
                config.rerank_max_batch_items,
                "",
            )
        return cls(
            EMBED,
            config.max_model_len,
            config.gpu_memory_utilization,
            config.max_batch_tokens,
            config.max_batch_items,
            config.vllm_args,
        )


def vllm_settings(config: ServiceConfig, model_path: Path, name: str, kind: str) -> VllmSettings:
    """One model's engine settings, from the service flags of its kind."""
    quiet = quiet_vllm(config)
    from service.engines.vllm_engine import VllmSettings

    sizing = EngineSizing.of(config, kind)
    return VllmSettings(
        model_path=model_path,
        served_name=name,
        dtype=config.dtype,
        max_model_len=sizing.max_model_len,
        gpu_memory_utilization=sizing.gpu_memory_utilization,
        # The batcher sizes batches; the engine's step must still hold a whole window.
        max_num_batched_tokens=max(sizing.max_batch_tokens, sizing.max_model_len),
        max_num_seqs=sizing.max_batch_items,
        enforce_eager=config.enforce_eager,
        prefix_caching=config.prefix_caching,
        progress_bars=not quiet,
        vllm_args=sizing.vllm_args,
        kind=kind,
    )


def load_vllm(
    config: ServiceConfig,
    model_path: Path,
    name: str,
    kind: str = EMBED,
    attachment: EngineAttachment | None = None,
) -> Engine:
    """The vLLM engine for one model, as the service runs it (benchmarks build it here too);
    with an attachment, a client of an engine core that a supervisor started."""
    settings = vllm_settings(config, model_path, name, kind)
    from service.engines.vllm_engine import VllmEngine

    return VllmEngine.load(settings, attachment)


def load_engine(config: ServiceConfig, model_path: Path, name: str) -> Engine:
    """The embedding model's engine: vllm, or null (measures the front end alone)."""
    if config.engine == "null":
        from service.engines.null_engine import NullEngine

        return NullEngine.for_model(model_path, name, config.max_model_len)
    return load_vllm(config, model_path, name, EMBED)


def load_scorer(config: ServiceConfig, model_path: Path, name: str) -> Engine:
    """The rerank model's engine: a cross-encoder giving one logit per pair."""
    if config.engine == "null":
        raise ModelLoadError("the null engine has no rerank mode; leave --rerank-model unset")
    return load_vllm(config, model_path, name, SCORE)

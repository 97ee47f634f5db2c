"""One front-end process: the single-process server, attached to the supervisor's engine
cores and sharing its ports. The target of a spawned process."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import uvloop
from setproctitle import setproctitle

from service.config import ServiceConfig
from service.engines.base import EMBED, SCORE, Engine
from service.engines.loading import load_engine, load_scorer, load_vllm
from service.front_ends.slot import FrontEndSlot
from service.server import EmbeddingServer, EngineFactory, serve
from service.telemetry import Telemetry
from service.telemetry.logs import configure_logging

PROCESS_TITLE = "embedding-service::front-end-"


def _attached(slot: FrontEndSlot, kind: str, fallback: EngineFactory) -> EngineFactory:
    """The model's engine: a client of the shared core, or its own (the null engine)."""
    attachment = slot.engines.get(kind)
    if attachment is None:
        return fallback

    def load(config: ServiceConfig, path: Path, name: str) -> Engine:
        return load_vllm(config, path, name, kind, attachment)

    return load


def run_front_end(config: ServiceConfig, slot: FrontEndSlot) -> None:
    # What ps, top and the benchmarks see: which process of the pod this is.
    setproctitle(f"{PROCESS_TITLE}{slot.index}")
    configure_logging(config.log_level, config.log_format)

    def make_server() -> EmbeddingServer:
        return EmbeddingServer(
            config,
            _attached(slot, EMBED, load_engine),
            Telemetry.from_config(config, front_end=slot.index),
            _attached(slot, SCORE, load_scorer),
            slot,
        )

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        sys.exit(runner.run(serve(config, make_server=make_server)))

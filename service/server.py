"""Wiring: model files, engine, tokenizer, batcher and servicer behind one grpc.aio server,
with standard health, reflection and a drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from service.api.servicer import EmbeddingServicer, Runtime
from service.api.validation import RequestLimits, RequestValidator
from service.batching import Batcher, BatcherLimits
from service.config import ServiceConfig
from service.engines.base import Engine
from service.model_card import ModelCard, load_model_card, resolve_model_path
from service.pipeline import Embedder
from service.tokenization import TextTokenizer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
# Health is reported for the whole server ("") and for the embedding service by name.
HEALTH_SERVICES = ("", SERVICE_NAME)

EngineFactory = Callable[[ServiceConfig, Path, str], Engine]


def load_vllm_engine(config: ServiceConfig, model_path: Path, name: str) -> Engine:
    from service.engines.vllm_engine import VllmEngine, VllmSettings

    return VllmEngine.load(
        VllmSettings(
            model_path=model_path,
            served_name=name,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_num_batched_tokens=max(config.max_batch_tokens, config.max_model_len),
            max_num_seqs=config.max_batch_items,
            enforce_eager=config.enforce_eager,
        )
    )


def served_name(config: ServiceConfig) -> str:
    if config.served_model_name:
        return config.served_model_name
    local = Path(config.model).expanduser()
    return local.name if local.is_dir() else config.model


@dataclass
class Components:
    engine: Engine
    tokenizer: TextTokenizer
    batcher: Batcher
    runtime: Runtime

    async def close(self) -> None:
        await self.batcher.close()
        self.tokenizer.close()
        await self.engine.close()


def _model_info(
    config: ServiceConfig, card: ModelCard, engine: Engine, budget: int
) -> pb.GetModelInfoResponse:
    info = engine.info
    return pb.GetModelInfoResponse(
        model=info.model_name,
        dimension=info.dimension,
        min_dimensions=min(config.min_dimensions, info.dimension),
        max_dimensions=info.dimension,
        max_input_tokens=info.max_input_tokens,
        default_instruction=card.default_instruction,
        instruction_template=card.instruction_template,
        prompts=card.prompts,
        dtype=info.dtype,
        pooling=card.pooling or info.pooling,
        limits=pb.ServerLimits(
            max_inputs_per_request=config.max_inputs_per_request,
            max_input_chars=config.max_input_chars,
            max_batch_tokens=budget,
            max_batch_items=config.max_batch_items,
            max_queue_tokens=config.max_queue_tokens,
            max_queue_items=config.max_queue_items,
            max_request_bytes=config.max_request_bytes,
        ),
    )


async def build_components(config: ServiceConfig, engine_factory: EngineFactory) -> Components:
    path = resolve_model_path(config.model)
    name = served_name(config)
    card = load_model_card(path, name, config.instruction_template)
    # Loading takes from seconds (CPU, small model) to minutes; the event loop keeps
    # answering health checks meanwhile.
    engine = await asyncio.to_thread(engine_factory, config, path, name)
    info = engine.info
    # A single input may be as long as the model allows, so the budget is at least that.
    budget = max(config.max_batch_tokens, info.max_input_tokens)
    tokenizer = TextTokenizer(
        path / "tokenizer.json", info.max_input_tokens, config.tokenizer_threads
    )
    batcher = Batcher(
        engine,
        BatcherLimits(
            max_batch_tokens=budget,
            max_batch_items=config.max_batch_items,
            max_wait_s=config.max_wait_ms / 1000,
            max_queue_tokens=max(config.max_queue_tokens, budget),
            max_queue_items=config.max_queue_items,
            bulk_queue_share=config.bulk_queue_share,
            max_inflight_batches=config.max_inflight_batches,
        ),
    )
    await batcher.start()
    validator = RequestValidator(
        card,
        RequestLimits(
            max_inputs=config.max_inputs_per_request,
            max_input_chars=config.max_input_chars,
            min_dimensions=min(config.min_dimensions, info.dimension),
            dimension=info.dimension,
        ),
    )
    runtime = Runtime(
        embedder=Embedder(tokenizer, batcher),
        validator=validator,
        card=card,
        info=info,
        model_info=_model_info(config, card, engine, budget),
        stream_max_inflight=config.stream_max_inflight,
    )
    return Components(engine, tokenizer, batcher, runtime)


async def warm_up(runtime: Runtime) -> None:
    """One real call through the whole path, so the first caller pays no start-up cost."""
    spec = runtime.validator.options(pb.EmbedOptions())
    await runtime.embedder.embed(["warm up"], spec, "inputs", deadline=None)


def grpc_options(config: ServiceConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_request_bytes),
        # A second server on the same port must fail to bind, not share it silently.
        ("grpc.so_reuseport", 0),
        # Long embedding calls send no data frames; let clients keep connections alive.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ]


class EmbeddingServer:
    """The process's server: listens at once, reports SERVING once the engine is warm."""

    def __init__(self, config: ServiceConfig, engine_factory: EngineFactory = load_vllm_engine):
        self.config = config
        self._engine_factory = engine_factory
        self.grpc = grpc.aio.server(options=grpc_options(config))
        self.servicer = EmbeddingServicer()
        self.health = health.aio.HealthServicer()
        pb_grpc.add_EmbeddingServiceServicer_to_server(self.servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        self.port = self.grpc.add_insecure_port(f"{config.host}:{config.port}")
        self._components: Components | None = None

    async def start(self) -> None:
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.start()
        log.info("listening on %s:%d; loading %s", self.config.host, self.port, self.config.model)
        self._components = await build_components(self.config, self._engine_factory)
        await warm_up(self._components.runtime)
        self.servicer.attach(self._components.runtime)
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s", self._components.runtime.info.model_name)

    async def stop(self) -> None:
        """Drain: NOT_SERVING at once, refuse new calls, let calls in flight finish."""
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(self.config.grace_s)
        if self._components is not None:
            await self._components.close()


async def serve(config: ServiceConfig, engine_factory: EngineFactory = load_vllm_engine) -> None:
    server = EmbeddingServer(config, engine_factory)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting in done:
        starting.result()  # a failed start ends the process with its error
        await stopping
    else:
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
    log.info("draining for up to %.0fs", config.grace_s)
    await server.stop()

"""Wiring: model files, engine, tokenizer, batcher and servicer behind one grpc.aio server,
with standard health, reflection and a drain on SIGTERM."""

from __future__ import annotations

import asyncio
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
from service.api.auth import ApiKeyInterceptor, load_keys
from service.api.servicer import EmbeddingServicer, Runtime, add_servicer
from service.api.validation import RequestLimits, RequestValidator
from service.batching import Batcher, BatcherLimits
from service.config import ServiceConfig
from service.engines.base import Engine, EngineUnavailableError
from service.model_card import ModelCard, load_model_card, resolve_model_path
from service.pipeline import Embedder
from service.telemetry import Telemetry
from service.tokenization import TextTokenizer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
# Readiness: the whole server ("") and the embedding service by name are SERVING only while
# the engine is loaded and healthy and the server is not draining.
HEALTH_SERVICES = ("", SERVICE_NAME)
# Liveness: SERVING as soon as the process answers, whatever the engine is doing, so a
# busy or loading GPU never gets the pod restarted.
LIVENESS_SERVICE = "liveness"

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
            prefix_caching=config.prefix_caching,
        )
    )


def load_engine(config: ServiceConfig, model_path: Path, name: str) -> Engine:
    """The engine `config.engine` names: vllm, or null (measures the front end alone)."""
    if config.engine == "null":
        from service.engines.null_engine import NullEngine

        return NullEngine.for_model(model_path, name, config.max_model_len)
    return load_vllm_engine(config, model_path, name)


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


def request_tokens_limit(config: ServiceConfig, budget: int) -> int:
    """A request larger than the whole queue could never be admitted."""
    return min(config.max_request_tokens, max(config.max_queue_tokens, budget))


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
            max_request_tokens=request_tokens_limit(config, budget),
        ),
    )


async def build_components(
    config: ServiceConfig, engine_factory: EngineFactory, telemetry: Telemetry | None = None
) -> Components:
    telemetry = telemetry or Telemetry.disabled()
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
        path / "tokenizer.json",
        info.max_input_tokens,
        config.tokenizer_threads,
        config.tokenize_inline_chars,
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
            interactive_step_s=config.interactive_step_ms / 1000,
        ),
        observer=telemetry.batch_observer,
    )
    telemetry.watch(batcher, engine)
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
        embedder=Embedder(
            tokenizer, batcher, request_tokens_limit(config, budget), telemetry.stages
        ),
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
    age: list[tuple[str, int]] = []
    if config.max_connection_age_s > 0:
        # Clients reconnect periodically, re-resolve DNS and spread onto new pods; the grace
        # lets calls on the old connection finish.
        age = [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.grace_s * 1000)),
        ]
    return [
        *age,
        ("grpc.max_receive_message_length", config.max_request_bytes),
        # A second server on the same port must fail to bind, not share it silently.
        ("grpc.so_reuseport", 0),
        # Long embedding calls send no data frames; let clients keep connections alive.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ]


def _server_credentials(config: ServiceConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert_file:
        return None
    key = Path(config.tls_key_file).read_bytes()
    cert = Path(config.tls_cert_file).read_bytes()
    client_ca = Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _interceptors(config: ServiceConfig) -> list[grpc.aio.ServerInterceptor]:
    keys = load_keys(config.api_keys, config.api_keys_file)
    if keys:
        log.info("API keys required on %s (%d configured)", SERVICE_NAME, len(keys))
    return [ApiKeyInterceptor(keys)] if keys else []


class EmbeddingServer:
    """The process's server: listens at once, reports SERVING once the engine is warm."""

    def __init__(
        self,
        config: ServiceConfig,
        engine_factory: EngineFactory = load_engine,
        telemetry: Telemetry | None = None,
    ):
        self.config = config
        self._engine_factory = engine_factory
        self.telemetry = telemetry or Telemetry.from_config(config)
        auth = _interceptors(config)
        hooks = self.telemetry.interceptors
        # With API keys, telemetry intercepts first, so it also sees the calls they refuse.
        # Without, it wraps the handlers at registration: an interceptor costs grpc.aio
        # about 5% of a single-text call (benchmarks/null_engine.py).
        self.grpc = grpc.aio.server(
            options=grpc_options(config), interceptors=[*hooks, *auth] if auth else []
        )
        self.servicer = EmbeddingServicer(config.timing_metadata)
        self.health = health.aio.HealthServicer()
        add_servicer(self.servicer, self.grpc, hooks[0].wrap if hooks and not auth else None)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        address = f"{config.host}:{config.port}"
        credentials = _server_credentials(config)
        self.port = (
            self.grpc.add_secure_port(address, credentials)
            if credentials is not None
            else self.grpc.add_insecure_port(address)
        )
        # Kubelet gRPC probes speak plaintext only; with TLS on, health gets its own port.
        self._health_server: grpc.aio.Server | None = None
        self.health_port = 0
        if config.health_port:
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(
                f"{config.host}:{config.health_port}"
            )
        self._components: Components | None = None

    async def start(self) -> None:
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.start()
        if self._health_server is not None:
            await self._health_server.start()
        self.telemetry.start()  # /metrics answers while the engine loads (engine_up 0)
        log.info("listening on %s:%d; loading %s", self.config.host, self.port, self.config.model)
        self._components = await build_components(self.config, self._engine_factory, self.telemetry)
        await warm_up(self._components.runtime)
        self.servicer.attach(self._components.runtime)
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s", self._components.runtime.info.model_name)

    async def watch_engine(self, interval_s: float = 1.0) -> str:
        """Return why, once the engine has died or a batch has hung past engine_timeout_s."""
        timeout = self.config.engine_timeout_s
        while True:
            await asyncio.sleep(interval_s)
            c = self._components
            if c is None:
                continue
            if not c.engine.alive:
                return "the engine process died"
            if c.batcher.oldest_inflight_age_s() > timeout:
                return f"an engine batch has run for over {timeout:.0f}s"

    async def fail(self, reason: str) -> None:
        """The engine is gone: stop advertising, answer everyone waiting with UNAVAILABLE."""
        log.error("engine failure: %s; exiting so the orchestrator restarts the process", reason)
        for name in (*HEALTH_SERVICES, LIVENESS_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._components is not None:
            self._components.batcher.fail_all(EngineUnavailableError(reason))

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING at once, refuse new calls, let calls in flight finish."""
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(self.config.grace_s if grace_s is None else grace_s)
        if self._components is not None:
            await self._components.close()
        if self._health_server is not None:
            await self._health_server.stop(0)
        await asyncio.to_thread(self.telemetry.shutdown)  # flushes exporters: may block


async def serve(config: ServiceConfig, engine_factory: EngineFactory = load_engine) -> int:
    """Run until SIGTERM/SIGINT (exit 0 after draining) or an engine failure (exit 1)."""
    server = EmbeddingServer(config, engine_factory)
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.set)
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(signalled.wait())
    watching = asyncio.create_task(server.watch_engine())
    done, _ = await asyncio.wait(
        {starting, stopping, watching}, return_when=asyncio.FIRST_COMPLETED
    )
    if starting in done:
        starting.result()  # a failed start ends the process with its error
        done, _ = await asyncio.wait({stopping, watching}, return_when=asyncio.FIRST_COMPLETED)
    for task in (starting, stopping, watching):
        task.cancel()
    await asyncio.gather(starting, stopping, watching, return_exceptions=True)
    if watching in done:
        await server.fail(watching.result())
        await server.stop(grace_s=1.0)
        return 1
    log.info("draining for up to %.0fs", config.grace_s)
    await server.stop()
    return 0

"""Wiring: model files, engine, tokenizer, batcher, and the two faces in one event loop (the
gRPC servicer on grpc.aio, the HTTP face on uvicorn), with standard health, reflection and
a drain on SIGTERM."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from embedding.v1 import embedding_pb2 as pb
from service import version
from service.api.grpc.auth import ApiKeyInterceptor
from service.api.grpc.servicer import EmbeddingServicer, add_servicer
from service.api.grpc.stream_budget import StreamBudget
from service.api.http.app import HttpApi
from service.api.http.server import HttpServer, TlsFiles
from service.api.keys import ApiKeys, load_keys
from service.api.runtime import EmbeddingModel, Gate, Runtime, Scorer, ServerLimits
from service.api.validation import RequestLimits, RequestOptions, RequestValidator
from service.batching import Batcher, BatcherLimits
from service.config import ServiceConfig
from service.engines.base import Engine
from service.engines.loading import check_vllm_args, load_engine, load_scorer
from service.errors import EngineConfigError, EngineUnavailableError, ModelLoadError
from service.front_ends.slot import FrontEndSlot
from service.memory import HeapTrimmer
from service.model_card import ModelCard, load_model_card, resolve_model_path
from service.pair_tokenization import PairTokenizer, detect_pair_format
from service.pipeline import Embedder, EngineQueue
from service.scoring import Reranker
from service.telemetry import Telemetry
from service.tokenization import TextTokenizer
from service.vector_cache import CachingBatcher, VectorCache

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
# Readiness: the whole server ("") and the embedding service by name are SERVING only while
# the engine is loaded and healthy and the server is not draining.
HEALTH_SERVICES = ("", SERVICE_NAME)
# Liveness: SERVING as soon as the process answers, whatever the engine is doing, so a
# busy or loading GPU never gets the pod restarted.
LIVENESS_SERVICE = "liveness"

EngineFactory = Callable[[ServiceConfig, Path, str], Engine]
T = TypeVar("T")
# grpc.reflection.v1 is v1alpha under a new package name, with the same messages; tools
# that speak only v1 (newer grpcurl, Postman) ask for it.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
# Sent by a supervisor of several front ends to each of them when an engine core dies.
ENGINE_LOST_SIGNAL = signal.SIGUSR1


def served_names(config: ServiceConfig) -> tuple[str, ...]:
    """Every name clients may ask for the embedding model by; the first is the one reported."""
    return model_names(config.model, config.served_model_name)


def model_names(model: str, given: str) -> tuple[str, ...]:
    """The comma-separated `given` names, or by default: a local folder by its last part,
    and a Hub id by itself and by its last part (`all-MiniLM-L6-v2`), which is still the same
    model, so a name never reaches a different one."""
    listed = tuple(dict.fromkeys(n.strip() for n in given.split(",")))
    if any(listed):
        return tuple(n for n in listed if n)
    local = Path(model).expanduser()
    if local.is_dir():
        return (local.name,)
    short = model.rsplit("/", 1)[-1]
    return (model, short) if short != model else (model,)


@dataclass
class EmbeddingParts:
    """The embedding model's own engine, tokenizer, batcher and vector cache."""

    engine: Engine
    tokenizer: TextTokenizer
    batcher: Batcher
    cache: VectorCache | None

    def close_tokenizer(self) -> None:
        self.tokenizer.close()


@dataclass
class ScoringParts:
    """The rerank model's own engine, pair tokenizer and batcher."""

    engine: Engine
    pairs: PairTokenizer
    batcher: Batcher

    def close_tokenizer(self) -> None:
        self.pairs.close()


@dataclass
class Components:
    """What the server runs: the embedding model, the rerank model, or both."""

    runtime: Runtime
    embedding: EmbeddingParts | None = None
    scoring: ScoringParts | None = None

    @property
    def _parts(self) -> list[EmbeddingParts | ScoringParts]:
        return [p for p in (self.embedding, self.scoring) if p is not None]

    @property
    def engines(self) -> list[Engine]:
        return [p.engine for p in self._parts]

    @property
    def batchers(self) -> list[Batcher]:
        return [p.batcher for p in self._parts]

    def alive(self) -> bool:
        """Serving only while every configured engine is."""
        return all(e.alive for e in self.engines)

    async def close(self) -> None:
        for batcher in self.batchers:
            await batcher.close()
        for part in self._parts:
            part.close_tokenizer()
        for engine in self.engines:
            await engine.close()


def request_tokens_limit(config: ServiceConfig, queue_tokens: int) -> int:
    """A request larger than the whole queue could never be admitted."""
    return min(config.max_request_tokens, queue_tokens)


def _batcher_limits(
    config: ServiceConfig, batch_tokens: int, batch_items: int, window: int
) -> BatcherLimits:
    """One model's batcher: its own batch budgets, the shared queue bounds, and room in the
    queue for one whole window."""
    return BatcherLimits(
        max_batch_tokens=batch_tokens,
        max_batch_items=batch_items,
        max_wait_s=config.max_wait_ms / 1000,
        max_queue_tokens=max(config.max_queue_tokens, window),
        max_queue_items=config.max_queue_items,
        bulk_queue_share=config.bulk_queue_share,
        max_inflight_batches=config.max_inflight_batches,
        interactive_step_s=config.interactive_step_ms / 1000,
        max_item_tokens=window,
    )


async def _load(factory: EngineFactory, config: ServiceConfig, path: Path, name: str) -> Engine:
    """The engine, loaded off the event loop (health keeps answering meanwhile); a refusal
    of its settings or a failed load becomes one line naming the model and the cause."""
    try:
        return await in_daemon_thread(factory, config, path, name)
    except (EngineConfigError, ModelLoadError) as exc:
        raise ModelLoadError(f"{name}: the engine refused its settings: {exc}") from exc
    except Exception as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Engine core initialization failed" in cause:
            cause += (
                " (the engine's own error is logged above; if it is about memory, raise"
                " the --*gpu-memory-utilization flag or lower the --*max-model-len flag)"
            )
        raise ModelLoadError(f"model {str(path)!r} could not be loaded: {cause}") from exc


async def build_scoring(
    config: ServiceConfig,
    factory: EngineFactory,
    telemetry: Telemetry,
) -> tuple[ScoringParts, Scorer]:
    """The rerank model beside the embedding model: engine, pair tokenizer, batcher."""
    path = resolve_model_path(config.rerank_model)
    names = model_names(config.rerank_model, config.rerank_served_model_name)
    engine = await _load(factory, config, path, names[0])
    info = dataclasses.replace(engine.info, model_name=names[0])
    window = info.max_input_tokens
    pairs = PairTokenizer(
        path / "tokenizer.json",
        window,
        detect_pair_format(path),
        config.tokenizer_threads,
        config.tokenize_inline_chars,
    )
    batcher = Batcher(
        engine,
        _batcher_limits(
            config, config.rerank_max_batch_tokens, config.rerank_max_batch_items, window
        ),
    )
    await batcher.start()
    limit = request_tokens_limit(config, max(config.max_queue_tokens, window))
    reranker = Reranker(pairs, EngineQueue(batcher, limit, telemetry.stages))
    return ScoringParts(engine, pairs, batcher), Scorer(reranker, info, names)


async def build_embedding(
    config: ServiceConfig, factory: EngineFactory, telemetry: Telemetry
) -> tuple[EmbeddingParts, EmbeddingModel]:
    """The embedding model: engine, tokenizer, batcher (behind the vector cache)."""
    path = resolve_model_path(config.model)
    names = served_names(config)
    card = load_model_card(path, names[0], config.instruction_template)
    engine = await _load(factory, config, path, names[0])
    # Answers report the served name, whatever the engine calls its model.
    info = dataclasses.replace(engine.info, model_name=names[0])
    window = info.max_input_tokens
    tokenizer = TextTokenizer(
        path / "tokenizer.json", window, config.tokenizer_threads, config.tokenize_inline_chars
    )
    batcher = Batcher(
        engine,
        _batcher_limits(config, config.max_batch_tokens, config.max_batch_items, window),
        observer=telemetry.batch_observer,
    )
    cache = VectorCache(config.vector_cache_mb * 2**20) if config.vector_cache_mb else None
    telemetry.watch(batcher, engine, cache)
    await batcher.start()
    queue = EngineQueue(
        batcher if cache is None else CachingBatcher(batcher, cache),
        request_tokens_limit(config, max(config.max_queue_tokens, window)),
        telemetry.stages,
    )
    embedder = Embedder(tokenizer, queue)
    parts = EmbeddingParts(engine, tokenizer, batcher, cache)
    return parts, EmbeddingModel(embedder, card, info, names)


async def build_components(
    config: ServiceConfig,
    engine_factory: EngineFactory,
    telemetry: Telemetry | None = None,
    scorer_factory: EngineFactory | None = None,
) -> Components:
    telemetry = telemetry or Telemetry.disabled()
    embedding = scoring = None
    model = scorer = None
    if config.model:
        embedding, model = await build_embedding(config, engine_factory, telemetry)
    if config.rerank_model:
        scoring, scorer = await build_scoring(config, scorer_factory or load_scorer, telemetry)
    runtime = Runtime(*_checks_and_limits(config, model, scorer), model, scorer)
    return Components(runtime, embedding, scoring)


def _checks_and_limits(
    config: ServiceConfig, model: EmbeddingModel | None, scorer: Scorer | None
) -> tuple[RequestValidator, ServerLimits]:
    """The request checks and the limits reported, which are the ones the batcher of the
    embedding model enforces (of the rerank model, on a rerank-only server)."""
    if model is not None:
        card, window, dimension = model.card, model.info.max_input_tokens, model.info.dimension
        batch_tokens, batch_items = config.max_batch_tokens, config.max_batch_items
    else:
        assert scorer is not None  # the configuration asks for one model at least
        card, window, dimension = ModelCard(Path(), scorer.name), scorer.info.max_input_tokens, 0
        batch_tokens, batch_items = config.rerank_max_batch_tokens, config.rerank_max_batch_items
    # The queue must hold one whole window; the batch budget need not (a longer input runs
    # as a batch of its own, and the engine's step budget holds the window).
    queue_tokens = max(config.max_queue_tokens, window)
    min_dimensions = min(config.min_dimensions, dimension)
    validator = RequestValidator(
        card,
        RequestLimits(
            max_inputs=config.max_inputs_per_request,
            max_input_chars=config.max_input_chars,
            min_dimensions=min_dimensions,
            dimension=dimension,
            max_input_tokens=window,
        ),
    )
    limits = ServerLimits(
        max_inputs_per_request=config.max_inputs_per_request,
        max_input_chars=config.max_input_chars,
        max_batch_tokens=batch_tokens,
        max_batch_items=batch_items,
        max_queue_tokens=queue_tokens,
        max_queue_items=config.max_queue_items,
        max_request_bytes=config.max_request_bytes,
        max_request_tokens=request_tokens_limit(config, queue_tokens),
        min_dimensions=min_dimensions,
    )
    return validator, limits


async def in_daemon_thread(fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` on a daemon thread of its own.

    asyncio.to_thread would use the default executor, whose threads the interpreter joins
    at exit: a SIGTERM during a model load would then wait for the load to finish.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:
            failure = exc
            loop.call_soon_threadsafe(settle, lambda: future.set_exception(failure))
        else:
            loop.call_soon_threadsafe(settle, lambda: future.set_result(result))

    threading.Thread(target=run, name="engine-load", daemon=True).start()
    return await future


def end_engine_processes() -> None:
    """End the engine processes a load in progress started (a SIGTERM during loading):
    the load itself cannot be cancelled, and without them it fails at once."""
    for child in multiprocessing.active_children():
        child.terminate()


async def warm_up(runtime: Runtime) -> None:
    """One real call through each path, so the first caller pays no start-up cost."""
    if runtime.embedding is not None:
        spec = runtime.validator.options(RequestOptions())
        await runtime.embedding.embedder.embed(["warm up"], spec, "inputs", deadline=None)
    if runtime.scorer is not None:
        await runtime.scorer.reranker.score(
            "warm up",
            ["warm up"],
            instruction="",
            max_tokens_per_doc=0,
            refuse_long_documents=False,
            field="documents",
            deadline=None,
        )


def grpc_options(config: ServiceConfig, shared_port: bool = False) -> list[tuple[str, int]]:
    """`shared_port`: several front-end processes listen on the port (SO_REUSEPORT; the
    supervisor checked that no other server holds it)."""
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
        ("grpc.so_reuseport", int(shared_port)),
        # Long embedding calls send no data frames; let clients keep connections alive.
        ("grpc.keepalive_permit_without_calls", 1),
        # No window growth from bandwidth probes: a stream the server stops reading (it has
        # no room for more items) would otherwise keep megabytes of its client's messages
        # buffered in grpc, out of reach of the stream budget.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ]


def _enable_reflection(server: grpc.aio.Server) -> None:
    """Reflection under both names, v1alpha and v1, from one servicer."""
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = reflection.aio.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        tuple(
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
            for name in (reflection.SERVICE_NAME, REFLECTION_V1)
        )
    )


def _server_credentials(config: ServiceConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert_file:
        return None
    key = Path(config.tls_key_file).read_bytes()
    cert = Path(config.tls_cert_file).read_bytes()
    client_ca = Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _api_keys(config: ServiceConfig) -> ApiKeys | None:
    keys = load_keys(config.api_keys, config.api_keys_file)
    if not keys:
        return None
    log.info("API keys required on both faces (%d configured)", len(keys))
    return ApiKeys(keys)


class EmbeddingServer:
    """The process's server: listens at once, reports SERVING once the engine is warm."""

    def __init__(
        self,
        config: ServiceConfig,
        engine_factory: EngineFactory = load_engine,
        telemetry: Telemetry | None = None,
        scorer_factory: EngineFactory = load_scorer,
        slot: FrontEndSlot | None = None,
    ):
        """`slot`: this process is one of several front ends (service.front_ends), which
        share the ports and reach the engine cores the supervisor started."""
        self.config = config
        self._engine_factory = engine_factory
        self._scorer_factory = scorer_factory
        self.telemetry = telemetry or Telemetry.from_config(config)
        # Both faces ask the gate before each call, so they agree on whether we serve.
        self.gate = Gate()
        keys = _api_keys(config)
        auth = [ApiKeyInterceptor(keys)] if keys else []
        hooks = self.telemetry.interceptors
        # With API keys, telemetry intercepts first, so it also sees the calls they refuse.
        # Without, it wraps the handlers at registration: an interceptor costs grpc.aio
        # about 5% of a single-text call (benchmarks/null_engine.py).
        shared = slot is not None
        self.grpc = grpc.aio.server(
            options=grpc_options(config, shared), interceptors=[*hooks, *auth] if auth else []
        )
        self.heap = HeapTrimmer()
        streams = StreamBudget(config.streams_total, config.stream_max_inflight, self.heap.request)
        self.servicer = EmbeddingServicer(
            self.gate, streams, config.timing_metadata, config.grpc_truncate
        )
        self.health = health.aio.HealthServicer()
        add_servicer(self.servicer, self.grpc, hooks[0].wrap if hooks and not auth else None)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        _enable_reflection(self.grpc)
        address = f"{config.host}:{config.port}"
        credentials = _server_credentials(config)
        try:
            self.port = (
                self.grpc.add_secure_port(address, credentials)
                if credentials is not None
                else self.grpc.add_insecure_port(address)
            )
        except RuntimeError as exc:
            raise OSError(f"cannot serve gRPC on {address}: {exc}") from exc
        # Kubelet gRPC probes speak plaintext only; with TLS on, health gets its own port.
        self._health_server: grpc.aio.Server | None = None
        self.health_port = 0
        if config.health_port:
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", int(shared))])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(
                f"{config.host}:{config.health_port}"
            )
        self.http_api = HttpApi(
            self.gate,
            keys=keys,
            max_request_bytes=config.max_request_bytes,
            timing_headers=config.timing_metadata,
            version=version(),
            default_truncate=config.http_truncate,
            body_timeout_s=config.http_body_timeout_s,
        )
        self.http: HttpServer | None = None
        if config.http_port:
            tls = (
                TlsFiles(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
                if config.tls_cert_file
                else None
            )
            app = self.telemetry.http_app(self.http_api.app(), HttpApi.ROUTES)
            self.http = HttpServer(
                app,
                config.host,
                config.http_port,
                tls,
                header_timeout_s=config.http_header_timeout_s,
                body_timeout_s=config.http_body_timeout_s,
                max_connections=config.http_max_connections,
                sock=slot.http_socket if slot is not None else None,
            )
        self._components: Components | None = None
        self._slot = slot
        self._engine_lost = ""  # why, once a supervisor said an engine core died

    @property
    def http_port(self) -> int:
        return self.http.port if self.http is not None else 0

    async def start(self) -> None:
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.start()
        if self._health_server is not None:
            await self._health_server.start()
        if self.http is not None:
            await self.http.start()
        self.telemetry.start()  # /metrics answers while the engine loads (engine_up 0)
        models = (self.config.model, self.config.rerank_model)
        first = self._slot is None or self._slot.index == 0  # one line for all front ends
        log.log(
            logging.INFO if first else logging.DEBUG,
            "loading %s",
            " and ".join(m for m in models if m),
        )
        # A misspelt engine argument fails here, before the model loads.
        await asyncio.to_thread(check_vllm_args, self.config)
        self._components = await build_components(
            self.config, self._engine_factory, self.telemetry, self._scorer_factory
        )
        await warm_up(self._components.runtime)
        self.gate.open(self._components.runtime, self._components.alive)
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        # With several front ends, the supervisor says it once for all of them.
        line = self._ready_line(self._components.runtime)
        if self._slot is None:
            log.info("%s", line)
        else:
            self._slot.report_ready(self.telemetry.metrics_port, line)

    def _ready_line(self, rt: Runtime) -> str:
        """Once ready, one line that names every model with its kind, and every endpoint."""
        model = " and ".join(f"{m.name} ({kind})" for kind, m in rt.served)
        host = self.config.host
        parts = [f"gRPC {host}:{self.port}"]
        if self.http is not None:
            parts.append(f"HTTP {self.http.scheme}://{host}:{self.http.port}/v1")
        # A front end of several serves its own on a private port; the supervisor, the merge.
        metrics_port = self.config.metrics_port if self._slot else self.telemetry.metrics_port
        if metrics_port:
            metrics_host = self.config.metrics_host or host
            parts.append(f"metrics http://{metrics_host}:{metrics_port}/metrics")
        if self.health_port:
            parts.append(f"health {host}:{self.health_port}")
        return f"serving {model}: " + ", ".join(parts)

    async def watch_engine(self, interval_s: float = 1.0) -> str:
        """Return why, once the engine has died or a batch has hung past engine_timeout_s."""
        timeout = self.config.engine_timeout_s
        while True:
            await asyncio.sleep(interval_s)
            if self._engine_lost:
                return self._engine_lost
            if self._slot is not None and not self._slot.supervised():
                return "the supervisor of the front ends exited"
            c = self._components
            if c is None:
                continue
            if not c.alive():
                return "an engine process died"
            if max(b.oldest_inflight_age_s() for b in c.batchers) > timeout:
                return f"an engine batch has run for over {timeout:.0f}s"

    def engine_lost(self, reason: str) -> None:
        """A supervisor saw an engine core die (this process cannot: it did not start it)."""
        self._engine_lost = reason

    async def fail(self, reason: str) -> None:
        """The engine is gone: stop advertising, answer everyone waiting with UNAVAILABLE."""
        log.error("engine failure: %s; exiting so the orchestrator restarts the process", reason)
        self.gate.close(f"the engine failed ({reason})")
        for name in (*HEALTH_SERVICES, LIVENESS_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._components is not None:
            for batcher in self._components.batchers:
                batcher.fail_all(EngineUnavailableError(reason))

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING at once, refuse new calls, let calls in flight finish.

        The HTTP port stays open to the end, answering /health and new calls with 503.
        """
        grace = self.config.grace_s if grace_s is None else grace_s
        self.gate.close("the server is draining")
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(self.grpc.stop(grace), self.http_api.drain(grace))
        if self._components is not None:
            await self._components.close()
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self.http is not None:
            await self.http.stop()
        await asyncio.to_thread(self.telemetry.shutdown)  # flushes exporters: may block


async def serve(
    config: ServiceConfig,
    engine_factory: EngineFactory = load_engine,
    make_server: Callable[[], EmbeddingServer] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (exit 0 after draining), an engine failure or a failed start
    (exit 1). `make_server` builds the server instead (a front end of several)."""
    try:
        server = make_server() if make_server else EmbeddingServer(config, engine_factory)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.set)
    # A supervisor's word that an engine core died (service.front_ends).
    loop.add_signal_handler(ENGINE_LOST_SIGNAL, server.engine_lost, "an engine process died")
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(signalled.wait())
    watching = asyncio.create_task(server.watch_engine())
    done, _ = await asyncio.wait(
        {starting, stopping, watching}, return_when=asyncio.FIRST_COMPLETED
    )
    failed_start: BaseException | None = None
    if starting in done:
        failed_start = starting.exception()
        if failed_start is None:
            done, _ = await asyncio.wait({stopping, watching}, return_when=asyncio.FIRST_COMPLETED)
    if stopping in done and not starting.done():
        log.info("stopping while the model loads")
        end_engine_processes()
    for task in (starting, stopping, watching):
        task.cancel()
    await asyncio.gather(starting, stopping, watching, return_exceptions=True)
    if failed_start is not None:
        # One line that names the model and the cause; the traceback only at DEBUG.
        log.error("cannot start: %s", failed_start)
        log.debug("start-up failure", exc_info=failed_start)
        await server.stop(grace_s=0)
        return 1
    if watching in done:
        await server.fail(watching.result())
        await server.stop(grace_s=1.0)
        return 1
    log.info("draining for up to %.0fs", config.grace_s)
    await server.stop()
    return 0

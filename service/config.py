"""The one configuration object, filled from CLI flags and EMBED_* environment variables.

Each setting is declared once, with its default and help text; the flag is the field name
in kebab case (--max-batch-tokens) and the variable is EMBED_ plus the name in upper case
(EMBED_MAX_BATCH_TOKENS). A flag beats a variable, which beats the default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

ENV_PREFIX = "EMBED_"
BUNDLED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _opt(default: Any, help: str, secret: bool = False) -> Any:
    # Secrets stay out of repr(), hence out of logs.
    return field(default=default, metadata={"help": help}, repr=not secret)


@dataclass(frozen=True)
class ServiceConfig:
    # Network
    host: str = _opt("127.0.0.1", "address to listen on (0.0.0.0 in containers)")
    port: int = _opt(50051, "gRPC port")
    http_port: int = _opt(
        8000, "HTTP port of the OpenAI-compatible face (/v1/embeddings, ...); 0 turns it off"
    )
    max_request_bytes: int = _opt(
        32 * 1024 * 1024, "largest request accepted: gRPC message or HTTP body, in bytes"
    )
    grace_s: float = _opt(20.0, "drain time for in-flight calls on SIGTERM")
    max_connection_age_s: float = _opt(
        300.0,
        "close client connections after this long so clients re-resolve and spread (0: never)",
    )

    # Model and engine
    model: str = _opt(
        BUNDLED_MODEL,
        "local model folder or Hub id of the embedding model; the default is served from the"
        " bundled package; empty: none (a rerank-only server, with --rerank-model)",
    )
    served_model_name: str = _opt(
        "",
        "comma-separated names clients may ask for; the first is reported (default: --model,"
        " and for a Hub id also its last part: all-MiniLM-L6-v2)",
    )
    dtype: str = _opt(
        "auto", "engine dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16"
    )
    max_model_len: int = _opt(0, "maximum input tokens (0: the model's own limit)")
    gpu_memory_utilization: float = _opt(
        0.1, "fraction of GPU memory (of RAM on CPU) vLLM may use; 0.9 suits a dedicated GPU"
    )
    enforce_eager: bool = _opt(
        False,
        "disable torch.compile and CUDA graphs: starts faster, runs slower (compile is safe"
        " here: the service turns chunked prefill off, which vLLM #48901 needs)",
    )
    prefix_caching: bool = _opt(
        True,
        "let vLLM reuse the KV cache of shared prefixes (instructions) where the model"
        " allows it; false turns it off",
    )
    vllm_args: str = _opt(
        "",
        "more vLLM engine arguments, in vLLM's own syntax (\"--quantization awq"
        ' --kv-cache-dtype fp8"; write --vllm-args=--flag for a single flag); checked at'
        " start against vLLM's definitions; the settings the flags here set are refused",
    )
    vector_cache_mb: int = _opt(
        256,
        "exact-match cache of raw vectors keyed by the input's token ids, in MiB; identical"
        " inputs in flight share one engine request (0: off)",
    )
    # A cross-encoder reranker beside the embedding model: a second engine with its own
    # memory share, batch budgets and queues (the queue bounds below apply to each model).
    rerank_model: str = _opt(
        "",
        "local folder or Hub id of a cross-encoder reranker (Qwen3-Reranker, bge-reranker,"
        " ms-marco-MiniLM) served beside --model; empty: none (rerank uses the embedding"
        " model's cosines)",
    )
    rerank_served_model_name: str = _opt(
        "", "comma-separated names of the rerank model, as --served-model-name"
    )
    rerank_gpu_memory_utilization: float = _opt(
        0.1, "the rerank engine's share of GPU memory (of RAM on CPU), beside the embedder's"
    )
    rerank_max_model_len: int = _opt(
        0, "longest query+document pair in tokens (0: the rerank model's own limit)"
    )
    rerank_max_batch_tokens: int = _opt(4096, "token budget of one rerank engine batch")
    rerank_max_batch_items: int = _opt(64, "pairs in one rerank engine batch")
    min_dimensions: int = _opt(32, "smallest Matryoshka dimension accepted")
    instruction_template: str = _opt(
        "", "prefix with {instruction} for queries (default: read from the model's prompts)"
    )
    tokenizer_threads: int = _opt(2, "threads that tokenize off the event loop")
    tokenize_inline_chars: int = _opt(
        512, "calls with at most this many characters are tokenized on the event loop"
    )

    # Batching and admission
    max_batch_tokens: int = _opt(4096, "token budget of one engine batch")
    max_batch_items: int = _opt(64, "items in one engine batch")
    max_wait_ms: float = _opt(
        0.0,
        "how long a partial batch waits for more items while the engine has room; 0: none"
        " (items that arrive while the engine is full batch up on their own)",
    )
    max_inflight_batches: int = _opt(2, "batches handed to the engine at once")
    max_queue_tokens: int = _opt(262144, "bound on queued tokens")
    max_queue_items: int = _opt(8192, "bound on queued items")
    bulk_queue_share: float = _opt(0.75, "share of the queue stream items may hold")
    interactive_step_ms: float = _opt(
        150.0,
        "stream batches are sized from the measured engine speed to take about this long,"
        " which bounds a unary call's wait behind bulk work (0: full-size stream batches)",
    )

    # Inputs over the model's window, when a request does not say (refuse, end or start).
    # HTTP cuts the end, as TEI (auto-truncate since 1.9) and Ollama do: Open WebUI, Chroma
    # and LanceDB cannot ask, and their default chunks overflow small windows. gRPC
    # refuses, as OpenAI and vLLM do: its callers are services that can ask.
    http_truncate: str = _opt(
        "end", "HTTP face: what an input over the window gets when the request does not say"
    )
    grpc_truncate: str = _opt(
        "refuse", "gRPC face: what an input over the window gets when the request does not say"
    )

    # Slow or idle HTTP clients: each bound closes what would otherwise hold a connection
    # (and a file descriptor) for as long as the client trickles.
    http_header_timeout_s: float = _opt(
        10.0, "HTTP: close a connection whose request headers take longer than this"
    )
    http_body_timeout_s: float = _opt(
        60.0, "HTTP: answer 408 to a request whose body takes longer than this to arrive"
    )
    http_max_connections: int = _opt(
        2048, "HTTP: open connections at most; more are closed at once (0: no limit)"
    )

    # Request limits
    max_inputs_per_request: int = _opt(
        2048, "texts per Embed call, queries+documents per Similarity"
    )
    max_input_chars: int = _opt(262144, "characters per input, checked before tokenizing")
    stream_max_inflight: int = _opt(1024, "items of one stream read but not yet answered")
    streams_max_inflight: int = _opt(
        0,
        "items read but not yet answered across all streams together (0: the BULK share of"
        " --max-queue-items); a stream past its share stops being read",
    )

    max_request_tokens: int = _opt(
        131072, "tokens per Embed call (and per side of a Similarity call)"
    )
    engine_timeout_s: float = _opt(
        120.0, "a batch running longer than this means the engine hung: the process exits 1"
    )

    # Security
    api_keys: str = _opt(
        "", "comma-separated API keys for the embedding RPCs (empty: no keys)", secret=True
    )
    api_keys_file: str = _opt("", "file with one API key per line")
    tls_cert_file: str = _opt("", "PEM server certificate (chain); enables TLS with tls-key-file")
    tls_key_file: str = _opt("", "PEM private key of the server certificate")
    tls_client_ca_file: str = _opt("", "PEM CA bundle; when set, clients must present a cert")
    health_port: int = _opt(
        0, "extra plaintext port with only health (kubelet probes send no TLS); 0: none"
    )

    # Observability (OTLP export and sampling: the standard OTEL_* variables)
    metrics_port: int = _opt(9464, "Prometheus /metrics port, its own HTTP server (0: off)")
    metrics_host: str = _opt(
        "", "address the /metrics endpoint binds to (default: --host; 0.0.0.0 in containers)"
    )
    timing_metadata: bool = _opt(
        True, "send x-total-time, x-queue-time, ... as trailing metadata of unary calls"
    )
    log_format: str = _opt("text", "log lines: text, or json (one object a line, with trace_id)")
    engine: str = _opt(
        "vllm", "engine: vllm, or null (zero vectors at once; measures the front end alone)"
    )
    api_processes: int = _opt(
        1,
        "front-end processes sharing the ports and one engine core per model; the queue"
        " bounds, the stream budget and the vector cache are split between them (0: one"
        " per two usable CPUs, a pod's CPU limit included, up to 8 on a GPU host; 1 on a CPU"
        " host, where the engine needs the cores)",
    )

    log_level: str = _opt(
        "INFO", "logging level; DEBUG also shows vLLM's own start-up lines (else warnings only)"
    )

    @property
    def streams_total(self) -> int:
        """The server-wide bound on stream items in flight."""
        derived = max(1, int(self.max_queue_items * self.bulk_queue_share))
        return self.streams_max_inflight or derived

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_batch_items < 1:
            raise ValueError("max_batch_tokens and max_batch_items must be positive")
        if self.rerank_max_batch_tokens < 1 or self.rerank_max_batch_items < 1:
            raise ValueError("rerank_max_batch_tokens and rerank_max_batch_items must be positive")
        if not self.model and not self.rerank_model:
            raise ValueError(
                "model is required: an embedding model (--model), a rerank model"
                " (--rerank-model, with --model '' for a rerank-only server), or both"
            )
        if self.max_queue_tokens < self.max_batch_tokens:
            raise ValueError("max_queue_tokens must be at least max_batch_tokens")
        if not 0 < self.bulk_queue_share <= 1:
            raise ValueError("bulk_queue_share must be in (0, 1]")
        if self.log_format not in ("text", "json"):
            raise ValueError("log_format must be text or json")
        if self.engine not in ("vllm", "null"):
            raise ValueError("engine must be vllm or null")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.vector_cache_mb < 0:
            raise ValueError("vector_cache_mb must be >= 0")
        if self.stream_max_inflight < 1 or self.streams_max_inflight < 0:
            raise ValueError("stream_max_inflight must be >= 1, streams_max_inflight >= 0")
        for name in ("http_truncate", "grpc_truncate"):
            if getattr(self, name) not in ("refuse", "end", "start"):
                raise ValueError(f"{name} must be refuse, end or start")
        if min(self.http_header_timeout_s, self.http_body_timeout_s) <= 0:
            raise ValueError("http_header_timeout_s and http_body_timeout_s must be positive")
        if self.http_max_connections < 0:
            raise ValueError("http_max_connections must be >= 0")
        if self.api_processes < 0:
            raise ValueError("api_processes must be >= 0")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file")


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _converter(kind: Any) -> Any:
    return {"bool": _parse_bool, "int": int, "float": float, "str": str}[str(kind)]


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServiceConfig:
    """Defaults, overridden by EMBED_* variables, overridden by flags."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="embedding-service",
        description="gRPC embedding service in front of vLLM",
    )
    values: dict[str, Any] = {}
    for f in fields(ServiceConfig):
        convert = _converter(f.type)
        env_name = ENV_PREFIX + f.name.upper()
        if env_name in env:
            try:
                values[f.name] = convert(env[env_name])
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise SystemExit(f"{env_name}: {exc}") from exc
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=convert,
            default=argparse.SUPPRESS,
            help=f"{f.metadata['help']} [env {env_name}, default {f.default!r}]",
        )
    values.update(vars(parser.parse_args(argv)))
    try:
        return ServiceConfig(**values)
    except ValueError as exc:
        parser.error(str(exc))

"""Names of everything the service exports: metric instruments, their Prometheus names, spans.

Instrument names follow OpenTelemetry's dotted style; the Prometheus exporter turns dots into
underscores and appends the unit (``_seconds``) and, for counters, ``_total``. Units written
as annotations (``{item}``) add no suffix, which is how the queue gauges keep exactly the
names below: a Kubernetes HPA targets them, so they must not change.
"""

from __future__ import annotations

from typing import Final

# --- Prometheus names an autoscaler depends on (tested by scraping a running server) ---
QUEUE_ITEMS_METRIC = "embedding_queue_items"
QUEUE_TOKENS_METRIC = "embedding_queue_tokens"

# --- Metric instruments: (OpenTelemetry name, unit) --------------------------------------
# OpenTelemetry semantic conventions: the current RPC server duration, in seconds.
RPC_DURATION: Final = ("rpc.server.call.duration", "s")
# And the HTTP server request duration, in seconds.
HTTP_DURATION: Final = ("http.server.request.duration", "s")
QUEUE_ITEMS: Final = ("embedding.queue.items", "{item}")
QUEUE_TOKENS: Final = ("embedding.queue.tokens", "{token}")
BATCHES_INFLIGHT: Final = ("embedding.batches.inflight", "{batch}")
BATCH_ITEMS: Final = ("embedding.batch.items", "{item}")
BATCH_TOKENS: Final = ("embedding.batch.tokens", "{token}")
QUEUE_WAIT: Final = ("embedding.queue.wait.duration", "s")
ENGINE_DURATION: Final = ("embedding.engine.duration", "s")
INPUTS: Final = ("embedding.inputs", "{input}")
TOKENS: Final = ("embedding.tokens", "{token}")
TRUNCATIONS: Final = ("embedding.truncations", "{input}")
REJECTIONS: Final = ("embedding.rejections", "{input}")
ENGINE_UP: Final = ("embedding.engine.up", "1")
ENGINE_OLDEST_BATCH: Final = ("embedding.engine.oldest_batch_age", "s")
# The vector cache (service.vector_cache); exported only while it is on.
CACHE_HITS: Final = ("embedding.cache.hits", "{input}")
CACHE_MISSES: Final = ("embedding.cache.misses", "{input}")
CACHE_COALESCED: Final = ("embedding.cache.coalesced", "{input}")
CACHE_EVICTIONS: Final = ("embedding.cache.evictions", "{entry}")
CACHE_SIZE: Final = ("embedding.cache.size", "By")
CACHE_ENTRIES: Final = ("embedding.cache.entries", "{entry}")

# --- Attribute keys ------------------------------------------------------------------------
RPC_SYSTEM = "rpc.system"
RPC_SERVICE = "rpc.service"
RPC_METHOD = "rpc.method"
RPC_STATUS_CODE = "rpc.grpc.status_code"
ERROR_TYPE = "error.type"
HTTP_METHOD = "http.request.method"
HTTP_ROUTE = "http.route"
HTTP_STATUS_CODE = "http.response.status_code"
URL_PATH = "url.path"
URL_SCHEME = "url.scheme"
NETWORK_PROTOCOL_VERSION = "network.protocol.version"
PRIORITY = "embedding.priority"
INPUT_COUNT = "embedding.input_count"
TOKEN_COUNT = "embedding.token_count"
TRUNCATED_COUNT = "embedding.truncated_count"
BATCH_SIZE = "embedding.batch.items"
BATCH_SIZE_TOKENS = "embedding.batch.tokens"
# A resource attribute: which of several front-end processes (--api-processes) this is.
FRONT_END = "embedding.front_end"

# --- Span names ----------------------------------------------------------------------------
SPAN_TOKENIZE = "embedding.tokenize"
SPAN_QUEUE = "embedding.queue"
SPAN_ENGINE = "embedding.engine"
SPAN_POSTPROCESS = "embedding.postprocess"
SPAN_BATCH = "embedding.batch"

# --- Response metadata with per-call timing, in milliseconds -------------------------------
TOTAL_TIME_HEADER = "x-total-time"
QUEUE_TIME_HEADER = "x-queue-time"
INFERENCE_TIME_HEADER = "x-inference-time"
TOKENIZE_TIME_HEADER = "x-tokenize-time"
# HTTP only: how many of the inputs' vectors came from the vector cache.
CACHED_INPUTS_HEADER = "x-cached-inputs"

# The scope every instrument and tracer of the service is created under.
INSTRUMENTATION_SCOPE = "embedding-service"

"""What both faces serve calls with, and the gate that says whether they may.

The server builds one Runtime once the engine is loaded and warm, and opens the Gate with
it; both faces ask the gate for the runtime on every call. The gate closes for good when
the server drains or the engine fails, so the two faces always agree on whether the
process is serving.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from service.api.validation import RequestValidator
from service.engines.base import EMBED, SCORE, EngineInfo
from service.errors import InvalidInputError, NotReadyError, UnknownModelError
from service.model_card import ModelCard
from service.pipeline import Embedder
from service.scoring import Reranker


@dataclass(frozen=True)
class ServerLimits:
    """The limits the server enforces, as GetModelInfo and /v1/models report them."""

    max_inputs_per_request: int
    max_input_chars: int
    max_batch_tokens: int
    max_batch_items: int
    max_queue_tokens: int
    max_queue_items: int
    max_request_bytes: int
    max_request_tokens: int
    min_dimensions: int


@dataclass(frozen=True)
class Scorer:
    """A rerank model: a cross-encoder behind its own engine, batcher and queues."""

    reranker: Reranker
    info: EngineInfo
    names: tuple[str, ...]  # the first is the one reported

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass(frozen=True)
class EmbeddingModel:
    """The embedding model: its pipeline, what its files say, and what its engine reported."""

    embedder: Embedder
    card: ModelCard
    info: EngineInfo
    names: tuple[str, ...]  # every name a client may ask for; the first is the one reported

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass(frozen=True)
class Runtime:
    """Everything a call needs once the engines are loaded: the embedding model, the rerank
    model, or both (never neither)."""

    validator: RequestValidator
    limits: ServerLimits
    embedding: EmbeddingModel | None = None
    scorer: Scorer | None = None  # the rerank model, when one is served

    def embedding_for(self, asked: str | None) -> EmbeddingModel:
        """The embedding model, which a call naming a model must name: never serve another
        silently."""
        model = self.embedding
        if model is not None and (asked is None or asked in model.names):
            return model
        scorer = self.scorer
        if scorer is not None and (asked is None or asked in scorer.names):
            if model is None:
                raise InvalidInputError(
                    "model",
                    f"this server serves no embedding model, only the rerank model"
                    f" {scorer.name!r}; this task needs one (start the server with --model)",
                )
            raise InvalidInputError(
                "model", f"{asked!r} is the rerank model; this task needs {model.name!r}"
            )
        raise UnknownModelError(asked or "", self.names)

    def scorer_for(self, asked: str | None) -> Scorer | None:
        """The rerank model a rerank call names (or the one served, when it names none);
        None for the embedding model, which ranks by cosine."""
        scorer = self.scorer
        if scorer is not None and (asked is None or asked in scorer.names):
            return scorer
        self.embedding_for(asked)
        return None

    @property
    def served(self) -> list[tuple[str, EmbeddingModel | Scorer]]:
        """Every model served with its kind ("embed", "score"), the embedding model first."""
        models = ((EMBED, self.embedding), (SCORE, self.scorer))
        return [(kind, model) for kind, model in models if model is not None]

    @property
    def names(self) -> tuple[str, ...]:
        """Every model name served, the embedding model's first."""
        return tuple(n for _, model in self.served for n in model.names)


class Gate:
    def __init__(self) -> None:
        self._runtime: Runtime | None = None
        self._closed_because = ""
        self._alive: Callable[[], bool] = lambda: True

    def open(self, runtime: Runtime, alive: Callable[[], bool]) -> None:
        """The engine is loaded and warm; `alive` says whether it still is (health asks it
        directly, so it never reports serving in the moment before the watchdog notices)."""
        if not self._closed_because:
            self._runtime = runtime
            self._alive = alive

    def close(self, because: str) -> None:
        """Draining, or the engine failed: no new calls from now on."""
        self._closed_because = self._closed_because or because

    @property
    def serving(self) -> bool:
        return self._runtime is not None and not self._closed_because and self._alive()

    def runtime(self) -> Runtime:
        """The runtime, or NotReadyError saying why there is none to serve with."""
        if self._closed_because:
            raise NotReadyError(self._closed_because)
        if self._runtime is None:
            raise NotReadyError("the model is still loading")
        return self._runtime

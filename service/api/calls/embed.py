"""Embed: vectors for texts or token ids, with their views and chunks, encoded.

Also the encoding of outcomes for EmbedStream, which runs the pipeline's bulk form itself
(its flow control is the stream's) but answers with the same embeddings as a unary call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service import postprocess
from service.api.calls.metadata import Metadata
from service.api.runtime import Runtime
from service.api.validation import RequestOptions
from service.errors import InvalidInputError
from service.pipeline import EmbedOutcome, EmbedSpec, Inputs, TokenInputs, view_vectors


@dataclass(frozen=True)
class EmbedCall:
    inputs: Inputs
    options: RequestOptions
    field: str = "inputs"  # the caller's name for the inputs, in errors
    options_field: str = "options"  # where the options sit ("": top-level fields)
    model: str | None = None  # None: the embedding model
    deadline: float | None = None


@dataclass(frozen=True)
class Vector:
    """One encoded vector: little-endian bytes of `dimensions` values in `encoding`."""

    data: bytes
    dimensions: int
    encoding: postprocess.Encoding
    scale: float  # int8's dequantization factor; 0 otherwise


@dataclass(frozen=True)
class Chunk:
    char_start: int
    char_end: int
    embedding: Embedding


@dataclass(frozen=True)
class Embedding:
    """One input's answer: its vector, each asked view of it, and its chunks when chunked
    (the vector is then the token-weighted mean of theirs)."""

    vector: Vector
    views: list[Vector]
    chunks: list[Chunk]
    token_count: int
    truncated: bool


@dataclass(frozen=True)
class EmbedAnswer:
    embeddings: list[Embedding]
    meta: Metadata


def choose_inputs(
    texts: Sequence[str], token_ids: Sequence[Sequence[int]], tokens_field: str = "tokens"
) -> Inputs:
    """Texts or token ids, from a face whose request has a field for each."""
    if texts and token_ids:
        raise InvalidInputError(tokens_field, "set either inputs or tokens, not both")
    return TokenInputs(token_ids) if token_ids else texts


async def embed(rt: Runtime, call: EmbedCall) -> EmbedAnswer:
    model = rt.embedding_for(call.model)
    tokens = isinstance(call.inputs, TokenInputs)
    if isinstance(call.inputs, TokenInputs):
        rt.validator.count(len(call.inputs), call.field, "token-id inputs")
    else:
        rt.validator.texts(call.inputs, call.field)
    spec = rt.validator.options(call.options, prefix=call.options_field, token_inputs=tokens)
    outcome = await model.embedder.embed(call.inputs, spec, call.field, call.deadline)
    embeddings = encode_outcome(outcome, spec)
    truncated = sum(e.truncated for e in embeddings)
    meta = Metadata(model.name, outcome.prompt_tokens, outcome.timing, truncated)
    return EmbedAnswer(embeddings, meta)


def encode_outcome(outcome: EmbedOutcome, spec: EmbedSpec) -> list[Embedding]:
    """Each input's vector in the asked encoding, with its views and chunks."""
    main = _vectors(outcome.vectors, spec.dimensions, spec.encoding)
    views = [_vectors(v, view.dimensions, view.encoding) for view, v in view_vectors(outcome, spec)]
    chunks: Sequence[list[Chunk]] = [
        [
            Chunk(start, end, part)
            for (start, end), part in zip(c.spans, encode_outcome(c.outcome, spec), strict=True)
        ]
        for c in outcome.chunks or ()
    ] or [[] for _ in main]
    return [
        Embedding(vector, [v[i] for v in views], parts, len(tokens.ids), tokens.truncated)
        for i, (vector, tokens, parts) in enumerate(zip(main, outcome.inputs, chunks, strict=True))
    ]


def _vectors(
    vectors: postprocess.FloatMatrix, dimensions: int, encoding: postprocess.Encoding
) -> list[Vector]:
    return [
        Vector(e.data, dimensions, encoding, e.scale) for e in postprocess.encode(vectors, encoding)
    ]

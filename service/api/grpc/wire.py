"""embedding.v1 messages to and from the pipeline's plain values: options in, results out."""

from __future__ import annotations

import time
from typing import Any

from embedding.v1 import embedding_pb2 as pb
from service import postprocess
from service.api.calls.embed import Embedding
from service.api.calls.metadata import Metadata
from service.api.calls.rerank import RerankAnswer, RerankCall, ScoreKind
from service.api.validation import RequestOptions, ViewOptions
from service.pipeline import Timing
from service.telemetry import names
from service.tokenization import TokenSpans, Truncation

# Enum values by the names the validator knows, derived from the names both sides share
# (TRUNCATE_END <-> Truncation.END, ENCODING_INT8 <-> Encoding.INT8); an unknown number is
# passed on as its digits, so the validator refuses it naming the field.
_TRUNCATE_NAMES = {pb.TRUNCATE_UNSPECIFIED: ""} | {
    pb.Truncate.Value(f"TRUNCATE_{t.name}"): t.value for t in Truncation
}
_ENCODING_NAMES = {pb.ENCODING_UNSPECIFIED: ""} | {
    pb.Encoding.Value(f"ENCODING_{e.name}"): e.value for e in postprocess.Encoding
}
_WIRE_ENCODING = {e: pb.Encoding.Value(f"ENCODING_{e.name}") for e in postprocess.Encoding}
_SCORE_KINDS = {k: pb.ScoreKind.Value(f"SCORE_KIND_{k.name}") for k in ScoreKind}


def request_options(opts: pb.EmbedOptions, default_truncate: str) -> RequestOptions:
    """The options as plain values; TRUNCATE_UNSPECIFIED becomes the server's default."""
    return RequestOptions(
        instruction=opts.instruction,
        prompt_name=opts.prompt_name,
        dimensions=opts.dimensions or None,  # proto3: 0 is unset, the native size
        normalize=opts.normalize if opts.HasField("normalize") else None,
        truncate=_TRUNCATE_NAMES.get(opts.truncate, str(opts.truncate)) or default_truncate,
        encoding=_encoding_name(opts.encoding),
        chunk_max_tokens=opts.chunking.max_tokens,
        chunk_overlap_tokens=opts.chunking.overlap_tokens,
        views=tuple(
            ViewOptions(v.dimensions or None, _encoding_name(v.encoding)) for v in opts.views
        ),
    )


def _encoding_name(value: pb.Encoding.ValueType) -> str:
    return _ENCODING_NAMES.get(value, str(value))


def _us(seconds: float) -> int:
    return max(int(seconds * 1e6), 0)


def timing(t: Timing | None, started: float) -> pb.Timing:
    """The stages' times, and the total since `started` (a perf_counter reading)."""
    total = _us(time.perf_counter() - started)
    if t is None:
        return pb.Timing(total_us=total)
    return pb.Timing(
        tokenize_us=_us(t.tokenize_s),
        queue_us=_us(t.queue_s),
        inference_us=_us(t.inference_s),
        total_us=total,
        cached=t.cached,
    )


def _ms(us: int) -> str:
    return f"{us / 1000:.3f}"


def timing_metadata(t: pb.Timing) -> tuple[tuple[str, str], ...]:
    """The response body's timing, in milliseconds, for callers that read only metadata."""
    return (
        (names.TOTAL_TIME_HEADER, _ms(t.total_us)),
        (names.QUEUE_TIME_HEADER, _ms(t.queue_us)),
        (names.INFERENCE_TIME_HEADER, _ms(t.inference_us)),
        (names.TOKENIZE_TIME_HEADER, _ms(t.tokenize_us)),
    )


def embedding(e: Embedding) -> pb.Embedding:
    v = e.vector
    return pb.Embedding(
        data=v.data,
        dimensions=v.dimensions,
        encoding=_WIRE_ENCODING[v.encoding],
        scale=v.scale,
        token_count=e.token_count,
        truncated=e.truncated,
        views=[
            pb.ViewData(
                data=w.data,
                dimensions=w.dimensions,
                encoding=_WIRE_ENCODING[w.encoding],
                scale=w.scale,
            )
            for w in e.views
        ],
        chunks=[
            pb.Chunk(char_start=c.char_start, char_end=c.char_end, embedding=embedding(c.embedding))
            for c in e.chunks
        ],
    )


def metadata(meta: Metadata, started: float) -> dict[str, Any]:
    """A response's `model`, `usage` and `timing` fields, which every unary answer has."""
    return {
        "model": meta.model,
        "usage": pb.Usage(prompt_tokens=meta.prompt_tokens, total_tokens=meta.prompt_tokens),
        "timing": timing(meta.timing, started),
    }


def tokenized(t: TokenSpans) -> pb.TokenizedInput:
    return pb.TokenizedInput(
        ids=t.ids,
        offsets=[pb.TokenSpan(char_start=a, char_end=b) for a, b in t.offsets],
        text_start=t.text_start,
        truncated=t.truncated,
    )


def rerank_call(
    request: pb.RerankRequest, deadline: float | None, flow: object | None = None
) -> RerankCall:
    """A Rerank request (unary, or one RerankStream item's, with its stream as `flow`)."""
    return RerankCall(
        query=request.query,
        documents=request.documents,
        deadline=deadline,
        flow=flow,
        top_k=request.top_k,
        instruction=request.instruction,
        max_tokens_per_doc=request.max_tokens_per_doc,
        model=request.model or None,
    )


def rerank_response(
    request: pb.RerankRequest, answer: RerankAnswer, started: float
) -> pb.RerankResponse:
    with_text = request.return_documents
    results = [
        pb.RankedDocument(
            index=r.index,
            relevance_score=r.relevance,
            raw_score=r.raw,
            truncated=r.truncated,
            document=request.documents[r.index] if with_text else "",
        )
        for r in answer.results
    ]
    return pb.RerankResponse(
        results=results, score_kind=_SCORE_KINDS[answer.kind], **metadata(answer.meta, started)
    )

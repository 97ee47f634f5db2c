"""embedding.v1 messages to and from the pipeline's plain values: options in, results out."""

from __future__ import annotations

import time

from embedding.v1 import embedding_pb2 as pb
from service import postprocess
from service.api.validation import RequestOptions, ViewOptions
from service.pipeline import EmbedOutcome, EmbedSpec, Timing, view_vectors
from service.telemetry import names
from service.tokenization import TokenSpans

# Enum values by the names the validator knows; an unknown number is passed on as its
# digits, so the validator refuses it naming the field.
_TRUNCATE_NAMES = {
    pb.TRUNCATE_UNSPECIFIED: "",
    pb.TRUNCATE_REFUSE: "refuse",
    pb.TRUNCATE_END: "end",
    pb.TRUNCATE_START: "start",
}
_ENCODING_NAMES = {
    pb.ENCODING_UNSPECIFIED: "",
    pb.ENCODING_FLOAT32: "float32",
    pb.ENCODING_FLOAT16: "float16",
    pb.ENCODING_INT8: "int8",
    pb.ENCODING_BINARY: "binary",
}
WIRE_ENCODING = {
    postprocess.Encoding.FLOAT32: pb.ENCODING_FLOAT32,
    postprocess.Encoding.FLOAT16: pb.ENCODING_FLOAT16,
    postprocess.Encoding.INT8: pb.ENCODING_INT8,
    postprocess.Encoding.BINARY: pb.ENCODING_BINARY,
}


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


def embeddings(outcome: EmbedOutcome, spec: EmbedSpec) -> list[pb.Embedding]:
    encoded = postprocess.encode(outcome.vectors, spec.encoding)
    wire = WIRE_ENCODING[spec.encoding]
    out = [
        pb.Embedding(
            data=e.data,
            dimensions=spec.dimensions,
            encoding=wire,
            scale=e.scale,
            token_count=len(inp.ids),
            truncated=inp.truncated,
        )
        for e, inp in zip(encoded, outcome.inputs, strict=True)
    ]
    for view, vectors in view_vectors(outcome, spec):
        view_wire = WIRE_ENCODING[view.encoding]
        for embedding, e in zip(out, postprocess.encode(vectors, view.encoding), strict=True):
            embedding.views.append(
                pb.ViewData(
                    data=e.data, dimensions=view.dimensions, encoding=view_wire, scale=e.scale
                )
            )
    for embedding, chunks in zip(out, outcome.chunks or (), strict=False):
        for (start, end), part in zip(chunks.spans, embeddings(chunks.outcome, spec), strict=True):
            embedding.chunks.append(pb.Chunk(char_start=start, char_end=end, embedding=part))
    return out


def tokenized(t: TokenSpans) -> pb.TokenizedInput:
    return pb.TokenizedInput(
        ids=t.ids,
        offsets=[pb.TokenSpan(char_start=a, char_end=b) for a, b in t.offsets],
        text_start=t.text_start,
        truncated=t.truncated,
    )

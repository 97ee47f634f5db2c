"""The embedding options of a run: flags resolved against the served model, checked once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from embedding.v1 import embedding_pb2 as pb

ENCODINGS: dict[str, pb.Encoding.ValueType] = {
    "float32": pb.ENCODING_FLOAT32,
    "float16": pb.ENCODING_FLOAT16,
    "int8": pb.ENCODING_INT8,
    "binary": pb.ENCODING_BINARY,
}

# Default overlap between chunks: an eighth of the chunk, at most this many tokens.
MAX_DEFAULT_OVERLAP = 128


class UsageError(Exception):
    """A flag that cannot work with this server or these inputs (exit status 2)."""


@dataclass(frozen=True)
class Requested:
    """The embedding flags as given; None means the default for the served model."""

    dimensions: int = 0
    encoding: str = "float32"
    instruction: str = ""
    prompt_name: str = ""
    chunk_tokens: int | None = None
    chunk_overlap: int | None = None
    views: tuple[tuple[int, str], ...] = ()
    document_vectors: bool = False


@dataclass(frozen=True)
class EmbedSettings:
    """What every item of the run is embedded with; stored in each part to guard resumes."""

    model: str
    dimensions: int  # resolved: the model's native size when not asked for
    encoding: str
    instruction: str
    prompt_name: str
    chunk_tokens: int  # 0: chunking off
    chunk_overlap: int
    views: tuple[tuple[int, str], ...]  # resolved dimensions
    native_dimensions: int
    document_vectors: bool = False  # a row per document beside its chunks' rows

    def options(self) -> pb.EmbedOptions:
        msg = pb.EmbedOptions(
            instruction=self.instruction,
            prompt_name=self.prompt_name,
            # 0 for the native size: no slice-and-renormalize pass at all.
            dimensions=0 if self.dimensions == self.native_dimensions else self.dimensions,
            encoding=ENCODINGS[self.encoding],
            views=[pb.View(dimensions=d, encoding=ENCODINGS[e]) for d, e in self.views],
        )
        if self.chunk_tokens:
            msg.chunking.max_tokens = self.chunk_tokens
            msg.chunking.overlap_tokens = self.chunk_overlap
        return msg

    def to_json(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "model": self.model,
            "dimensions": self.dimensions,
            "encoding": self.encoding,
            "instruction": self.instruction,
            "prompt_name": self.prompt_name,
            "chunk_tokens": self.chunk_tokens,
            "chunk_overlap": self.chunk_overlap,
            "views": [list(v) for v in self.views],
        }
        if self.document_vectors:  # absent otherwise: datasets made before it still match
            settings["document_vectors"] = True
        return settings


def parse_view(text: str) -> tuple[int, str]:
    """`DIMS:ENCODING`, as --view takes it (DIMS 0: the run's dimensions)."""
    dims, sep, encoding = text.partition(":")
    if not sep or not dims.strip().isdigit() or encoding.strip() not in ENCODINGS:
        raise ValueError(f"expected DIMS:ENCODING with ENCODING one of {', '.join(ENCODINGS)}")
    return int(dims), encoding.strip()


def resolve(req: Requested, info: pb.GetModelInfoResponse) -> EmbedSettings:
    """Fill the defaults from the model and refuse what the server would refuse per item."""
    if req.instruction and req.prompt_name:
        raise UsageError("--instruction and --prompt-name exclude each other")
    if req.prompt_name and info.prompts and req.prompt_name not in info.prompts:
        known = ", ".join(sorted(info.prompts))
        raise UsageError(f"--prompt-name {req.prompt_name!r}: the model's prompts are {known}")
    if req.prompt_name and not info.prompts:
        raise UsageError(f"--prompt-name {req.prompt_name!r}: the model has no named prompts")

    dimensions = req.dimensions or info.dimension
    _check_dimensions("--dimensions", dimensions, info)
    views = []
    for dims, encoding in req.views:
        resolved = (dims or dimensions, encoding)
        _check_dimensions("--view", resolved[0], info)
        if resolved == (dimensions, req.encoding) or resolved in views:
            raise UsageError(f"--view {dims}:{encoding} repeats a vector already written")
        views.append(resolved)

    window = info.max_input_tokens
    chunk_tokens = window if req.chunk_tokens is None else req.chunk_tokens
    if chunk_tokens < 0 or (window and chunk_tokens > window):
        raise UsageError(f"--chunk-tokens must lie in 0..{window}, the model's window")
    overlap = 0
    if chunk_tokens:
        default = min(chunk_tokens // 8, MAX_DEFAULT_OVERLAP)
        overlap = default if req.chunk_overlap is None else req.chunk_overlap
        if not 0 <= overlap < chunk_tokens:
            raise UsageError(f"--chunk-overlap must lie in 0..{chunk_tokens - 1}")
    return EmbedSettings(
        model=info.model,
        dimensions=dimensions,
        encoding=req.encoding,
        instruction=req.instruction,
        prompt_name=req.prompt_name,
        chunk_tokens=chunk_tokens,
        chunk_overlap=overlap,
        views=tuple(views),
        native_dimensions=info.dimension,
        document_vectors=req.document_vectors,
    )


def _check_dimensions(flag: str, dims: int, info: pb.GetModelInfoResponse) -> None:
    low, high = info.min_dimensions or info.dimension, info.max_dimensions or info.dimension
    if dims != info.dimension and not low <= dims <= high:
        raise UsageError(f"{flag} {dims}: the model takes {low} to {high} dimensions")

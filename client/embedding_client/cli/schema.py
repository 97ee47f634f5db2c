"""The output table: its columns and types, and the buffer that turns results into rows.

One row per chunk: id, chunk, char_start, char_end, text, token_count, vector (plus scale
for int8), one vector column per view, source, then the metadata fields of the inputs. The
schema is fixed before the first part is written, from the pre-scan of the inputs, so every
part of a dataset has the same columns.

With document vectors, each document also gets one row of chunk DOCUMENT_CHUNK (-1): the
whole text, the sum of its chunks' tokens, and the vector the service computed for the
input as a whole (the token-weighted mean of its chunks' vectors, in the same dimensions,
encoding and views). Chunks count from 0, so `chunk >= 0` selects the chunk rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]

from embedding.v1 import embedding_pb2 as pb
from embedding_client.cli.documents import Document
from embedding_client.cli.settings import ENCODINGS, EmbedSettings

SETTINGS_KEY = b"embed_files"  # Parquet key-value metadata: the settings, as JSON
FIXED_COLUMNS = ("id", "chunk", "char_start", "char_end", "text", "token_count")
SOURCE_COLUMN = "source"
DOCUMENT_CHUNK = -1  # the chunk number of a document's own row
_INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class VectorSpec:
    """One vector column: the main vector or a view."""

    column: str
    dimensions: int
    encoding: str

    @property
    def scale_column(self) -> str | None:
        if self.encoding != "int8":
            return None
        return "scale" if self.column == "vector" else self.column.replace("vector", "scale", 1)

    @property
    def byte_length(self) -> int:
        d = self.dimensions
        return {"float32": 4 * d, "float16": 2 * d, "int8": d, "binary": (d + 7) // 8}[
            self.encoding
        ]

    def arrow_type(self) -> pa.DataType:
        if self.encoding == "float32":
            return pa.list_(pa.float32(), self.dimensions)
        return pa.binary()

    def accepts(self, dimensions: int, encoding: int, data: bytes) -> bool:
        wanted = ENCODINGS[self.encoding]
        same_encoding = encoding == wanted or (
            encoding == pb.ENCODING_UNSPECIFIED and wanted == pb.ENCODING_FLOAT32
        )
        return dimensions == self.dimensions and same_encoding and len(data) == self.byte_length


def vector_specs(settings: EmbedSettings) -> tuple[VectorSpec, ...]:
    main = VectorSpec("vector", settings.dimensions, settings.encoding)
    views = (VectorSpec(f"vector_{d}_{e}", d, e) for d, e in settings.views)
    return (main, *views)


class MetadataTypes:
    """Arrow types of the metadata fields, merged over every document of the pre-scan.

    JSON scalars keep their type (bool, int64, float64, string); ints and floats mix into
    float64; lists, objects and fields whose type varies become JSON text. Parquet inputs
    keep their column types when every input agrees on them.
    """

    def __init__(self) -> None:
        self._types: dict[str, pa.DataType | None] = {}  # None: only nulls seen so far
        self._seen: set[tuple[str, object]] = set()  # (field, kind of value) merged already

    def observe(self, metadata: Mapping[str, Any]) -> None:
        seen = self._seen
        for name, value in metadata.items():
            kind: object = type(value)
            if kind is int and not _INT64[0] <= value <= _INT64[1]:
                kind = "big int"
            if (name, kind) not in seen:
                seen.add((name, kind))
                self._merge(name, _python_type(value))

    def observe_arrow(self, name: str, arrow_type: pa.DataType) -> None:
        if pa.types.is_dictionary(arrow_type):
            arrow_type = arrow_type.value_type
        if pa.types.is_integer(arrow_type):
            arrow_type = pa.int64()
        elif pa.types.is_floating(arrow_type):
            arrow_type = pa.float64()
        elif pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type):
            arrow_type = pa.string()
        elif pa.types.is_null(arrow_type):
            arrow_type = None
        self._merge(name, arrow_type)

    def _merge(self, name: str, new: pa.DataType | None) -> None:
        old = self._types.get(name)
        if name not in self._types or old is None:
            self._types[name] = new
        elif new is None or new == old:
            return
        elif {old, new} <= {pa.int64(), pa.float64()}:
            self._types[name] = pa.float64()
        else:
            self._types[name] = pa.string()

    def fields(self) -> dict[str, pa.DataType]:
        return {name: t if t is not None else pa.string() for name, t in self._types.items()}


def _python_type(value: Any) -> pa.DataType | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64() if _INT64[0] <= value <= _INT64[1] else pa.string()
    if isinstance(value, float):
        return pa.float64()
    return pa.string()


@dataclass(frozen=True)
class MetaColumn:
    field: str  # the name in the input
    column: str  # the name in the output: `meta_` before it when it collides
    type: pa.DataType


@dataclass(frozen=True)
class OutputSchema:
    vectors: tuple[VectorSpec, ...]
    metadata: tuple[MetaColumn, ...]
    with_text: bool
    settings: EmbedSettings

    @classmethod
    def build(
        cls, settings: EmbedSettings, metadata: Mapping[str, pa.DataType], with_text: bool
    ) -> OutputSchema:
        vectors = vector_specs(settings)
        taken = {*FIXED_COLUMNS, SOURCE_COLUMN}
        for spec in vectors:
            taken |= {spec.column, spec.scale_column or spec.column}
        columns = []
        for field, arrow_type in metadata.items():
            column = field
            while column in taken:
                column = f"meta_{column}"
            taken.add(column)
            columns.append(MetaColumn(field, column, arrow_type))
        return cls(vectors, tuple(columns), with_text, settings)

    def arrow(self) -> pa.Schema:
        fields = [
            pa.field("id", pa.string(), nullable=False),
            pa.field("chunk", pa.int32(), nullable=False),
            pa.field("char_start", pa.int64(), nullable=False),
            pa.field("char_end", pa.int64(), nullable=False),
        ]
        if self.with_text:
            fields.append(pa.field("text", pa.string(), nullable=False))
        fields.append(pa.field("token_count", pa.int32(), nullable=False))
        for spec in self.vectors:
            fields.append(pa.field(spec.column, spec.arrow_type(), nullable=False))
            if spec.scale_column:
                fields.append(pa.field(spec.scale_column, pa.float32(), nullable=False))
        fields.append(pa.field(SOURCE_COLUMN, pa.string(), nullable=False))
        fields += [pa.field(m.column, m.type) for m in self.metadata]
        settings = json.dumps(self.settings.to_json(), sort_keys=True)
        return pa.schema(fields, metadata={SETTINGS_KEY: settings.encode()})

    def vector_columns(self) -> list[str]:
        names = [spec.column for spec in self.vectors]
        return names + [spec.scale_column for spec in self.vectors if spec.scale_column]

    def renamed(self) -> list[tuple[str, str]]:
        """Metadata fields whose column got a `meta_` prefix: (field, column)."""
        return [(m.field, m.column) for m in self.metadata if m.field != m.column]


class BadResult(Exception):
    """A result that does not match what was asked (dimensions, encoding, views, spans)."""


class ViewsIgnored(BadResult):
    """No views in a result that asked for some: the server predates them, so every
    document would fail alike."""


class RowBuffer:
    """Rows of whole documents waiting for the next part, kept column by column."""

    def __init__(self, schema: OutputSchema) -> None:
        self.schema = schema
        self._arrow = schema.arrow()
        self.clear()

    def clear(self) -> None:
        self.rows = 0
        self.documents = 0
        self.nbytes = 0
        self._ids: list[str] = []
        self._chunks: list[int] = []
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._texts: list[str] = []
        self._tokens: list[int] = []
        self._sources: list[str] = []
        self._data: list[list[bytes]] = [[] for _ in self.schema.vectors]
        self._scales: list[list[float]] = [[] for _ in self.schema.vectors]
        self._meta: list[list[Any]] = [[] for _ in self.schema.metadata]

    def add(self, doc: Document, embedding: pb.Embedding) -> tuple[int, int]:
        """Adds a document's rows, all or none; returns (chunks, tokens). Raises BadResult."""
        chunks = _chunks(embedding, len(doc.text))
        rows = [(n, start, end, emb) for n, (start, end, emb) in enumerate(chunks)]
        if self.schema.settings.document_vectors:
            rows.append((DOCUMENT_CHUNK, 0, len(doc.text), embedding))
        vectors = [self._vectors_of(emb) for _, _, _, emb in rows]  # checked before any row
        for (n, start, end, emb), row in zip(rows, vectors, strict=True):
            self._row(doc, chunk=n, start=start, end=end, tokens=emb.token_count, vectors=row)
        self.rows += len(rows)
        self.documents += 1
        return len(chunks), sum(emb.token_count for _, _, emb in chunks)

    def _row(
        self,
        doc: Document,
        *,
        chunk: int,
        start: int,
        end: int,
        tokens: int,
        vectors: list[tuple[bytes, float]],
    ) -> None:
        self._ids.append(doc.id)
        self._chunks.append(chunk)
        self._starts.append(start)
        self._ends.append(end)
        self._tokens.append(tokens)
        self._sources.append(doc.source)
        if self.schema.with_text:
            self._texts.append(doc.text[start:end])
            self.nbytes += end - start
        for i, (data, scale) in enumerate(vectors):
            self._data[i].append(data)
            self._scales[i].append(scale)
            self.nbytes += len(data)
        for i, column in enumerate(self.schema.metadata):
            self._meta[i].append(doc.metadata.get(column.field))

    def _vectors_of(self, emb: pb.Embedding) -> list[tuple[bytes, float]]:
        """(data, scale) of the main vector and each view, as asked, or BadResult."""
        main, *views = self.schema.vectors
        data = emb.data
        if not main.accepts(emb.dimensions, emb.encoding, data):
            raise BadResult(
                f"the server sent {emb.dimensions} dimensions in encoding {emb.encoding} "
                f"({len(data)} bytes); asked for {main.dimensions} {main.encoding}"
            )
        row = [(data, emb.scale)]
        if len(emb.views) != len(views):
            problem = ViewsIgnored if not emb.views else BadResult
            raise problem(
                f"the server sent {len(emb.views)} views for the {len(views)} of --view "
                "(a server without views support ignores them)"
            )
        for spec, view in zip(views, emb.views, strict=True):
            view_data = view.data
            if not spec.accepts(view.dimensions, view.encoding, view_data):
                raise BadResult(f"view {spec.column}: the server sent {view.dimensions} dimensions")
            row.append((view_data, view.scale))
        return row

    def table(self) -> pa.Table:
        arrays: list[pa.Array] = [
            pa.array(self._ids, pa.string()),
            pa.array(self._chunks, pa.int32()),
            pa.array(self._starts, pa.int64()),
            pa.array(self._ends, pa.int64()),
        ]
        if self.schema.with_text:
            arrays.append(pa.array(self._texts, pa.string()))
        arrays.append(pa.array(self._tokens, pa.int32()))
        for spec, data, scales in zip(self.schema.vectors, self._data, self._scales, strict=True):
            arrays.append(_vectors(spec, data))
            if spec.scale_column:
                arrays.append(pa.array(scales, pa.float32()))
        arrays.append(pa.array(self._sources, pa.string()))
        for column, values in zip(self.schema.metadata, self._meta, strict=True):
            arrays.append(_metadata_array(column, values))
        return pa.Table.from_arrays(arrays, schema=self._arrow)


def _chunks(embedding: pb.Embedding, length: int) -> list[tuple[int, int, pb.Embedding]]:
    """(char_start, char_end, vector) per chunk; without chunks the input is chunk 0."""
    if not embedding.chunks:
        return [(0, length, embedding)]
    spans = [(c.char_start, c.char_end, c.embedding) for c in embedding.chunks]
    for start, end, _ in spans:
        if not 0 <= start <= end <= length:
            raise BadResult(f"chunk span {start}:{end} lies outside the text of {length} chars")
    return spans


def _vectors(spec: VectorSpec, data: Sequence[bytes]) -> pa.Array:
    if spec.encoding != "float32":
        return pa.array(data, pa.binary())
    flat = np.frombuffer(b"".join(data), dtype="<f4")
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), spec.dimensions)


def _metadata_array(column: MetaColumn, values: Iterable[Any]) -> pa.Array:
    if column.type == pa.string():
        values = [
            v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
            for v in values
        ]
    try:
        return pa.array(values, column.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as err:
        raise ValueError(
            f"metadata field {column.field!r} no longer fits {column.type} (inputs changed "
            f"since the pre-scan?): {err}"
        ) from err

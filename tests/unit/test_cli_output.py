"""embed-files output without a server: settings, rows, parts, resume scan, errors file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from embedding.v1 import embedding_pb2 as pb
from embedding_client.cli.connection import FatalError
from embedding_client.cli.documents import Document, Failure
from embedding_client.cli.output import Dataset, ErrorLog, PartWriter, errors_path
from embedding_client.cli.progress import Stats, summary_line
from embedding_client.cli.schema import BadResult, OutputSchema, RowBuffer, ViewsIgnored
from embedding_client.cli.settings import EmbedSettings, Requested, UsageError, parse_view, resolve

INFO = pb.GetModelInfoResponse(
    model="m", dimension=8, min_dimensions=4, max_dimensions=8, max_input_tokens=512
)


def _settings(**overrides: object) -> EmbedSettings:
    return resolve(Requested(**overrides), INFO)  # type: ignore[arg-type]


def _float32(values: list[float], tokens: int = 3) -> pb.Embedding:
    data = np.asarray(values, "<f4").tobytes()
    return pb.Embedding(
        data=data, dimensions=len(values), encoding=pb.ENCODING_FLOAT32, token_count=tokens
    )


def test_settings_defaults_come_from_the_model() -> None:
    s = _settings()
    assert (s.dimensions, s.chunk_tokens, s.chunk_overlap) == (8, 512, 64)
    options = s.options()
    assert options.dimensions == 0  # native: no slice and renormalize
    assert (options.chunking.max_tokens, options.chunking.overlap_tokens) == (512, 64)
    off = _settings(chunk_tokens=0, dimensions=4, views=((0, "int8"), (8, "binary")))
    assert not off.options().HasField("chunking")
    assert off.views == ((4, "int8"), (8, "binary"))
    assert [(v.dimensions, v.encoding) for v in off.options().views] == [
        (4, pb.ENCODING_INT8),
        (8, pb.ENCODING_BINARY),
    ]
    assert _settings(chunk_tokens=4096 // 8).chunk_overlap == 64
    assert (
        resolve(
            Requested(), pb.GetModelInfoResponse(dimension=8, max_input_tokens=32768)
        ).chunk_overlap
        == 128
    )


@pytest.mark.parametrize(
    ("requested", "message"),
    [
        ({"dimensions": 2}, "takes 4 to 8"),
        ({"chunk_tokens": 1024}, "0..512"),
        ({"chunk_tokens": 100, "chunk_overlap": 100}, "0..99"),
        ({"instruction": "x", "prompt_name": "query"}, "exclude"),
        ({"prompt_name": "query"}, "no named prompts"),
        ({"views": ((8, "float32"),)}, "repeats"),
    ],
)
def test_settings_refuse_what_every_item_would_fail(
    requested: dict[str, object], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        _settings(**requested)


def test_view_flag_parsing() -> None:
    assert parse_view("128:int8") == (128, "int8")
    for bad in ("128", "x:int8", "128:int4"):
        with pytest.raises(ValueError, match="DIMS:ENCODING"):
            parse_view(bad)


def test_rows_per_chunk_with_spans_text_and_metadata() -> None:
    schema = OutputSchema.build(
        _settings(), {"lang": pa.string(), "n": pa.int64(), "text": pa.string()}, True
    )
    assert schema.renamed() == [("text", "meta_text")]
    buffer = RowBuffer(schema)
    text = "first part. second part."
    chunked = pb.Embedding(data=b"", dimensions=8, encoding=pb.ENCODING_FLOAT32)
    for start, end in ((0, 11), (9, 24)):
        chunk = chunked.chunks.add(char_start=start, char_end=end)
        chunk.embedding.CopyFrom(_float32([float(start)] * 8, tokens=end - start))
    doc = Document("d1", text, "a.jsonl", 3, {"lang": "en", "n": 5, "text": "meta"})
    assert buffer.add(doc, chunked) == (2, 11 + 15)
    plain = Document("d2", "whole", "b.txt", None, {})
    assert buffer.add(plain, _float32([1.0] * 8, tokens=4)) == (1, 4)
    table = buffer.table()
    assert table.schema.names == [
        "id",
        "chunk",
        "char_start",
        "char_end",
        "text",
        "token_count",
        "vector",
        "source",
        "lang",
        "n",
        "meta_text",
    ]
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 8)
    rows = table.drop_columns(["vector"]).to_pylist()
    assert rows == [
        {
            "id": "d1",
            "chunk": 0,
            "char_start": 0,
            "char_end": 11,
            "text": "first part.",
            "token_count": 11,
            "source": "a.jsonl",
            "lang": "en",
            "n": 5,
            "meta_text": "meta",
        },
        {
            "id": "d1",
            "chunk": 1,
            "char_start": 9,
            "char_end": 24,
            "text": "t. second part.",
            "token_count": 15,
            "source": "a.jsonl",
            "lang": "en",
            "n": 5,
            "meta_text": "meta",
        },
        {
            "id": "d2",
            "chunk": 0,
            "char_start": 0,
            "char_end": 5,
            "text": "whole",
            "token_count": 4,
            "source": "b.txt",
            "lang": None,
            "n": None,
            "meta_text": None,
        },
    ]
    vectors = np.array(table.column("vector").to_pylist(), np.float32)
    np.testing.assert_array_equal(vectors[:, 0], [0.0, 9.0, 1.0])
    settings = json.loads(table.schema.metadata[b"embed_files"])
    assert settings["model"] == "m" and settings["chunk_tokens"] == 512


def test_int8_and_views_get_bytes_and_scale_columns_and_no_text() -> None:
    settings = _settings(encoding="int8", views=((4, "binary"), (4, "float32")))
    buffer = RowBuffer(OutputSchema.build(settings, {}, with_text=False))
    embedding = pb.Embedding(
        data=bytes(range(8)), dimensions=8, encoding=pb.ENCODING_INT8, scale=0.5, token_count=2
    )
    embedding.views.add(data=b"\xf0", dimensions=4, encoding=pb.ENCODING_BINARY)
    embedding.views.add(
        data=np.ones(4, "<f4").tobytes(), dimensions=4, encoding=pb.ENCODING_FLOAT32
    )
    buffer.add(Document("x", "text", "s", None), embedding)
    table = buffer.table()
    assert table.schema.names == [
        "id",
        "chunk",
        "char_start",
        "char_end",
        "token_count",
        "vector",
        "scale",
        "vector_4_binary",
        "vector_4_float32",
        "source",
    ]
    row = table.to_pylist()[0]
    assert (row["vector"], row["scale"], row["vector_4_binary"]) == (bytes(range(8)), 0.5, b"\xf0")
    assert row["vector_4_float32"] == [1.0] * 4


def test_a_result_unlike_the_request_adds_no_rows() -> None:
    buffer = RowBuffer(OutputSchema.build(_settings(views=((4, "int8"),)), {}, True))
    doc = Document("x", "text", "s", None)
    with pytest.raises(ViewsIgnored, match="views"):  # a server that ignored --view
        buffer.add(doc, _float32([0.0] * 8))
    with pytest.raises(BadResult, match="asked for 8 float32"):
        buffer.add(doc, _float32([0.0] * 4))
    outside = _float32([0.0] * 8)
    outside.chunks.add(char_start=0, char_end=99).embedding.CopyFrom(_float32([0.0] * 8))
    with pytest.raises(BadResult, match="outside"):
        buffer.add(doc, outside)
    assert buffer.rows == 0 and buffer.table().num_rows == 0


def test_errors_path_sits_beside_the_dataset(tmp_path: Path) -> None:
    assert errors_path(tmp_path / "vecs.parquet") == tmp_path / "vecs.errors.jsonl"
    assert errors_path(tmp_path / "vecs") == tmp_path / "vecs.errors.jsonl"


def test_parts_commit_atomically_and_a_rerun_finds_their_ids(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    first = Dataset(out)
    first.open()
    with pytest.raises(FatalError, match="another embed-files run"):
        Dataset(out).open()
    schema = OutputSchema.build(_settings(), {}, True)
    buffer = RowBuffer(schema)
    buffer.add(Document("a", "x", "s", None), _float32([0.5] * 8))
    part = first.commit(buffer.table())
    assert part.parent == out and part.name.startswith("part-")
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == [part.name]
    first.close()

    (out / ".tmp-part-killed.parquet").write_bytes(b"half a file")  # a kill -9 mid-write
    second = Dataset(out)
    second.open()
    assert not (out / ".tmp-part-killed.parquet").exists()
    ids, stored = second.scan()
    assert ids == {"a"} and stored == _settings().to_json()
    second.close()
    assert pq.read_table(out).num_rows == 1  # readers see committed parts only

    (tmp_path / "file.parquet").write_bytes(b"")
    with pytest.raises(FatalError, match="not a dataset directory"):
        Dataset(tmp_path / "file.parquet").open()


def test_writer_thread_fills_parts_by_rows_and_time_and_lists_failures(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    dataset = Dataset(out)
    dataset.open()
    errors = ErrorLog(errors_path(out))
    stats = Stats()
    reported: list[str] = []
    writer = PartWriter(
        dataset,
        RowBuffer(OutputSchema.build(_settings(), {}, True)),
        errors,
        stats,
        reported.append,
        part_rows=3,
        part_seconds=0.2,
    )
    writer.start()
    docs = [Document(f"d{i}", f"text {i}", "in.jsonl", i + 1) for i in range(7)]
    writer.embedded([(d, _float32([0.0] * 8, tokens=2)) for d in docs[:6]])
    # A bound on the polls, not a speed assertion: a passing run is done in milliseconds.
    deadline = time.monotonic() + 120
    while len(dataset.parts()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(dataset.parts()) == 2  # 3 rows each, committed as soon as full
    writer.embedded([(docs[6], _float32([0.0] * 8))])
    while len(dataset.parts()) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(dataset.parts()) == 3  # the last row waited part_seconds, not for more rows
    writer.embedded([(docs[0], _float32([0.0] * 8))])  # a second answer is dropped
    writer.embedded([(Document("bad", "t", "in.jsonl", 9), _float32([0.0] * 4))])
    writer.failed(Failure("in.jsonl", 8, "e", "INVALID_ARGUMENT", "input: text is empty", "embed"))
    writer.close()
    errors.close()
    dataset.close()

    table = pq.read_table(out)
    assert sorted(table.column("id").to_pylist()) == [f"d{i}" for i in range(7)]
    lines = [json.loads(x) for x in errors_path(out).read_text().splitlines()]
    assert [(x["id"], x["code"], x["line"]) for x in lines] == [
        ("bad", "BAD_RESULT", 9),
        ("e", "INVALID_ARGUMENT", 8),
    ]
    assert lines[1] == {
        "id": "e",
        "source": "in.jsonl",
        "line": 8,
        "stage": "embed",
        "code": "INVALID_ARGUMENT",
        "message": "input: text is empty",
    }
    assert (stats.documents, stats.chunks, stats.tokens, stats.errors) == (7, 7, 12 + 3, 2)
    assert reported[-1] == "in.jsonl:8 (id 'e'): INVALID_ARGUMENT: input: text is empty"
    line = summary_line(stats, "out.parquet", "out.errors.jsonl")
    assert line.startswith("done: 7 documents embedded, 7 chunks, 15 tokens, 2 errors")
    assert "(listed in out.errors.jsonl)" in line

"""embed-files inputs without a server: walking, each reader, duplicates, the pre-scan."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from embedding_client.cli.documents import Document, Failure
from embedding_client.cli.sources import Fields, InputFile, Reader, discover, prescan, read_file

QUOTES = "Expecting property name enclosed in double quotes"


def minimal_pdf(pages: list[str]) -> bytes:
    """A PDF with one line of Helvetica text per page, enough for pypdf's extractor."""
    font = 3 + 2 * len(pages)
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(len(pages)))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode(),
    ]
    for i, text in enumerate(pages):
        content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources "
            f"<< /Font << /F1 {font} 0 R >> >> /Contents {4 + 2 * i} 0 R >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content))
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (n, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    trailer = b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n"
    out.write(trailer % (len(objects) + 1, xref))
    return out.getvalue()


def _items(path: Path, kind: str, root: Path | None = None) -> list[Document | Failure]:
    return list(read_file(InputFile(path, root or path.parent, kind), Fields()))


def test_discover_walks_sorted_skips_hidden_unknown_and_the_output(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "b").mkdir(parents=True)
    (data / ".git").mkdir()
    (data / "out.parquet").mkdir()
    for name in (
        "b/z.md",
        "b/a.txt",
        "c.jsonl",
        "a.csv",
        ".hidden.txt",
        ".git/x.txt",
        "out.parquet/part-1.parquet",
        "image.png",
        "x.PDF",
    ):
        (data / name).write_text("x")
    (data / "out.errors.jsonl").write_text("{}")
    output = [data / "out.parquet", data / "out.errors.jsonl"]
    files, skipped = discover([data, data / "c.jsonl"], exclude=output)
    assert [f.path.relative_to(data).as_posix() for f in files] == [
        "a.csv",
        "c.jsonl",
        "x.PDF",
        "b/a.txt",
        "b/z.md",
    ]
    assert [f.kind for f in files] == ["csv", "jsonl", "pdf", "text", "text"]
    assert skipped == [str(data / "image.png")]
    assert files[-1].whole_file_id() == "b/z.md"
    with pytest.raises(FileNotFoundError, match="missing"):
        discover([tmp_path / "missing"])


def test_a_file_given_directly_is_its_own_root(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    files, _ = discover([tmp_path / "notes.txt"])
    assert [d.id for d in Reader(files, Fields(), set(), lambda f: None)] == ["notes.txt"]


def test_jsonl_records_and_every_kind_of_bad_line(tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": "a", "text": "first", "lang": "en", "n": 1}),
        "",
        "{not json",
        json.dumps(["a list"]),
        json.dumps({"text": "no id"}),
        json.dumps({"id": "b"}),
        json.dumps({"id": "c", "text": None}),
        json.dumps({"id": 7, "text": "int ids become strings", "tags": ["x", "y"]}),
        json.dumps({"id": True, "text": "a boolean id is refused"}),
        '{"id": "d", "text": "lone \\ud800 surrogate"}',
    ]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())
    items = _items(path, "jsonl")
    docs = [i for i in items if isinstance(i, Document)]
    assert [(d.id, d.text, d.line, d.metadata) for d in docs] == [
        ("a", "first", 1, {"lang": "en", "n": 1}),
        ("7", "int ids become strings", 8, {"tags": ["x", "y"]}),
    ]
    assert docs[0].size == 5 and docs[0].source == str(path)
    bad = [(i.line, i.id, i.code, i.message) for i in items if isinstance(i, Failure)]
    assert bad == [
        (3, None, "MALFORMED", f"invalid JSON: {QUOTES} (column 2)"),
        (4, None, "MALFORMED", "expected a JSON object, not list"),
        (5, None, "MALFORMED", "no 'id' field"),
        (6, "b", "MALFORMED", "no 'text' field"),
        (7, "c", "MALFORMED", "field 'text' must be a string, not null"),
        (9, None, "MALFORMED", "field 'id' must be a string or an integer, not bool"),
        (10, "d", "MALFORMED", "not valid Unicode: surrogates not allowed"),
    ]
    assert all(isinstance(i, Failure) and i.stage == "read" for i in items if i not in docs)


def test_field_names_are_configurable(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"doc": "x1", "body": "hello", "id": "kept as metadata"}))
    items = list(read_file(InputFile(path, tmp_path, "jsonl"), Fields("doc", "body")))
    assert items == [Document("x1", "hello", str(path), 1, {"id": "kept as metadata"}, 5)]


def test_csv_rows_with_quoted_newlines_keep_their_first_line(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text('id,text,author\nr1,"two\nlines",ann\n\nr2,short\nr3,third,bob\n')
    items = _items(path, "csv")
    assert [(i.line, getattr(i, "id", None)) for i in items] == [(2, "r1"), (5, None), (6, "r3")]
    first, wrong, third = items
    assert isinstance(first, Document) and first.text == "two\nlines"
    assert first.metadata == {"author": "ann"}
    assert isinstance(wrong, Failure) and wrong.message == "2 fields where the header has 3"
    assert isinstance(third, Document) and third.text == "third"


def test_csv_without_the_text_column_is_one_failure(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,body\n1,x\n")
    [failure] = _items(path, "csv")
    assert isinstance(failure, Failure) and failure.line == 1
    assert failure.message == "the header has no 'text' column"


def test_parquet_rows_numbered_from_one(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    table = pa.table({"id": [10, 11, 12], "text": ["a", None, "c"], "score": [0.5, 1.0, 2.0]})
    pq.write_table(table, path)
    items = _items(path, "parquet")
    assert [(i.line, type(i).__name__) for i in items] == [
        (1, "Document"),
        (2, "Failure"),
        (3, "Document"),
    ]
    assert isinstance(items[2], Document)
    assert (items[2].id, items[2].metadata) == ("12", {"score": 2.0})


def test_whole_files_text_markdown_pdf_and_undecodable(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("# Title\n\nbody\n")
    (tmp_path / "b.txt").write_bytes(b"caf\xc3\xa9")
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe not utf-8")
    (tmp_path / "d.pdf").write_bytes(minimal_pdf(["Hello page one", "Second page"]))
    (tmp_path / "e.pdf").write_bytes(b"%PDF-1.4 truncated")
    files, _ = discover([tmp_path])
    failures: list[Failure] = []
    docs = list(Reader(files, Fields(), set(), failures.append))
    assert [(d.id, d.text, d.size) for d in docs] == [
        ("b.txt", "café", 5),
        ("d.pdf", "Hello page one\n\nSecond page", 27),
        ("sub/a.md", "# Title\n\nbody\n", 14),
    ]
    assert [(f.id, f.code) for f in failures] == [("c.txt", "UNREADABLE"), ("e.pdf", "UNREADABLE")]


def test_duplicates_fail_later_copies_and_complete_ids_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"id": i, "text": f"t{i}"}) for i in ("x", "y", "z"))
    )
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "y", "text": "again"}))
    files, _ = discover([tmp_path])
    failures: list[Failure] = []
    reader = Reader(files, Fields(), {"z"}, failures.append)
    assert [d.id for d in reader] == ["x", "y"]
    assert reader.skipped == 1
    [dup] = failures
    assert (dup.id, dup.code, dup.line) == ("y", "DUPLICATE_ID", 1)
    assert dup.source == str(tmp_path / "b.jsonl")
    assert dup.message == f"duplicate id; first seen at {tmp_path / 'a.jsonl'}:2"


def test_prescan_counts_what_the_reader_yields_and_learns_metadata_types(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "text": "x", "n": 1, "flag": True, "mixed": 1, "obj": {"k": 1}},
        {"id": "b", "text": "y", "n": 2.5, "flag": None, "mixed": "one"},
        "bad line",
        {"id": "a", "text": "duplicate"},
    ]
    (tmp_path / "a.jsonl").write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows)
    )
    pq.write_table(
        pa.table({"id": [1, 2], "text": ["p", "q"], "when": pa.array([1, 2], pa.timestamp("ms"))}),
        tmp_path / "b.parquet",
    )
    (tmp_path / "c.txt").write_text("whole")
    files, _ = discover([tmp_path])

    fresh = prescan(files, Fields(), set())
    assert (fresh.records, fresh.todo) == (7, 7)
    assert fresh.metadata.fields() == {
        "n": pa.float64(),
        "flag": pa.bool_(),
        "mixed": pa.string(),
        "obj": pa.string(),
        "when": pa.timestamp("ms"),
    }
    # Resuming: complete ids are not to do, but a duplicate of one is still reported.
    resumed = prescan(files, Fields(), {"a", "2", "c.txt"})
    assert (resumed.records, resumed.todo) == (7, 4)
    failures: list[Failure] = []
    left = list(Reader(files, Fields(), {"a", "2", "c.txt"}, failures.append))
    assert len(left) + len(failures) == resumed.todo

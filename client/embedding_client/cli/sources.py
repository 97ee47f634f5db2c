"""Inputs: walking files and directories, reading each format into documents, the pre-scan.

Formats by extension:
- .jsonl: one JSON object a line; the id and text fields are chosen by flags, every other
  field is metadata;
- .csv (with a header row) and .parquet: the same, a record a row;
- .txt, .md: the whole file is one document, its id the path relative to the input root;
- .pdf: the text of every page (needs pypdf, the [pdf] extra);
- .docx, .html/.htm: the text with its headings as Markdown `#` lines (markup.py; the
  [docx] and [html] extras).
Whole files (text, PDF, Word, HTML) have the path relative to the input root as their id.
With a Shard, only the documents it owns are read (whole files) or kept (records).
Anything else is skipped with a warning. A bad record becomes a Failure naming its file and
line, and reading goes on.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from embedding_client.cli import markup
from embedding_client.cli.documents import Document, Failure
from embedding_client.cli.schema import MetadataTypes
from embedding_client.cli.shards import WHOLE_CORPUS, Shard

KINDS = {
    ".jsonl": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
    ".pdf": "pdf",
    ".docx": "docx",
    ".html": "html",
    ".htm": "html",
}
# Kinds that are one document each, read whole.
WHOLE_FILE_KINDS = frozenset({"text", "pdf", "docx", "html"})
_PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Fields:
    id: str = "id"
    text: str = "text"


@dataclass(frozen=True)
class InputFile:
    path: Path
    root: Path  # the input it was found under: whole-file ids are relative to it
    kind: str

    @property
    def source(self) -> str:
        return str(self.path)

    def whole_file_id(self) -> str:
        return self.path.relative_to(self.root).as_posix()


def discover(
    inputs: Sequence[str | Path],
    exclude: Sequence[Path] = (),
    skip: Callable[[Path], bool] = lambda _: False,
) -> tuple[list[InputFile], list[str]]:
    """The files to read, in a fixed order (inputs as given, directories walked sorted),
    each once; and the paths skipped for their extension. Hidden files and folders,
    anything under `exclude` (the output) and files for which `skip` is true (the errors
    files of every shard) are left out of directory walks."""
    excluded = [p.resolve() for p in exclude]
    files: list[InputFile] = []
    skipped: list[str] = []
    seen: set[Path] = set()

    def add(path: Path, root: Path) -> None:
        real = path.resolve()
        if real in seen or _under(real, excluded) or skip(real):
            return
        seen.add(real)
        kind = KINDS.get(path.suffix.lower())
        if kind is None:
            skipped.append(str(path))
        else:
            files.append(InputFile(path, root, kind))

    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            for file in _walk(path, excluded):
                add(file, path)
        elif path.is_file():
            add(path, path.parent)
        else:
            raise FileNotFoundError(f"no such file or directory: {raw}")
    return files, skipped


def _walk(top: Path, excluded: list[Path]) -> Iterator[Path]:
    for folder, dirs, names in os.walk(top):
        here = Path(folder)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and not _under((here / d).resolve(), excluded)
        )
        for name in sorted(names):
            if not name.startswith("."):
                yield here / name


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


# ------------------------------------------------------------------------------ readers


def read_file(file: InputFile, fields: Fields) -> Iterator[Document | Failure]:
    """The file's documents, and a Failure for each record (or the whole file) that is bad."""
    try:
        yield from _READERS[file.kind](file, fields)
    except (OSError, UnicodeDecodeError, pa.ArrowException) as err:
        yield Failure(file.source, None, None, "UNREADABLE", f"cannot read the file: {err}", "read")


def _malformed(file: InputFile, line: int, doc_id: str | None, message: str) -> Failure:
    return Failure(file.source, line, doc_id, "MALFORMED", message, "read")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def record(
    obj: Mapping[str, Any], fields: Fields, file: InputFile, line: int
) -> Document | Failure:
    """A document from one record (a JSON object, a CSV or Parquet row)."""
    if fields.id not in obj:
        return _malformed(file, line, None, f"no {fields.id!r} field")
    raw_id = obj[fields.id]
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        message = f"field {fields.id!r} must be a string or an integer, not {_type_name(raw_id)}"
        return _malformed(file, line, None, message)
    doc_id = str(raw_id)
    if not doc_id:
        return _malformed(file, line, None, f"field {fields.id!r} is empty")
    if fields.text not in obj:
        return _malformed(file, line, doc_id, f"no {fields.text!r} field")
    text = obj[fields.text]
    if not isinstance(text, str):
        message = f"field {fields.text!r} must be a string, not {_type_name(text)}"
        return _malformed(file, line, doc_id, message)
    try:
        size = len(text.encode("utf-8"))
        doc_id.encode("utf-8")
    except UnicodeEncodeError as err:
        return _malformed(file, line, doc_id, f"not valid Unicode: {err.reason}")
    metadata = {k: v for k, v in obj.items() if k not in (fields.id, fields.text)}
    return Document(doc_id, text, file.source, line, metadata, size)


def _jsonl(file: InputFile, fields: Fields) -> Iterator[Document | Failure]:
    with open(file.path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = raw[3:] if n == 1 and raw.startswith(codecs.BOM_UTF8) else raw
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                yield _malformed(file, n, None, f"invalid JSON: {err.msg} (column {err.colno})")
                continue
            except ValueError as err:  # UnicodeDecodeError
                yield _malformed(file, n, None, f"invalid JSON: {err}")
                continue
            if not isinstance(obj, dict):
                yield _malformed(file, n, None, f"expected a JSON object, not {_type_name(obj)}")
                continue
            yield record(obj, fields, file, n)


def _csv(file: InputFile, fields: Fields) -> Iterator[Document | Failure]:
    csv.field_size_limit(2**31 - 1)  # the default (128 KiB) is shorter than many documents
    with open(file.path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        missing = [repr(name) for name in (fields.id, fields.text) if name not in header]
        if missing:
            yield _malformed(file, 1, None, f"the header has no {' or '.join(missing)} column")
            return
        start = reader.line_num + 1  # where the next record begins
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield _malformed(file, start, None, f"invalid CSV: {err}")
                start = reader.line_num + 1
                continue
            line, start = start, reader.line_num + 1
            if not row:
                continue
            if len(row) != len(header):
                message = f"{len(row)} fields where the header has {len(header)}"
                yield _malformed(file, line, None, message)
                continue
            yield record(dict(zip(header, row, strict=True)), fields, file, line)


def _parquet(file: InputFile, fields: Fields) -> Iterator[Document | Failure]:
    parquet = pq.ParquetFile(file.path)
    failure = _parquet_columns(file, parquet.schema_arrow, fields)
    if failure is not None:
        yield failure
        return
    row = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for obj in batch.to_pylist():
            row += 1
            yield record(obj, fields, file, row)


def _parquet_columns(file: InputFile, schema: pa.Schema, fields: Fields) -> Failure | None:
    missing = [repr(name) for name in (fields.id, fields.text) if name not in schema.names]
    if not missing:
        return None
    return Failure(
        file.source, None, None, "MALFORMED", f"no {' or '.join(missing)} column", "read"
    )


def _text(file: InputFile, fields: Fields) -> Iterator[Document | Failure]:
    data = file.path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        yield Failure(
            file.source, None, file.whole_file_id(), "UNREADABLE", f"not UTF-8: {err}", "read"
        )
        return
    yield Document(file.whole_file_id(), text, file.source, None, {}, len(data))


@dataclass(frozen=True)
class _Format:
    """A whole-file format read through an optional library."""

    many: str  # as users name such files: "reading {many} needs ..."
    one: str  # "cannot read {one}: ..."
    extra: str  # embedding-client's extra that installs the library
    library: str  # its distribution name
    extract: Callable[[Path], str]


def _pdf_text(path: Path) -> str:
    import pypdf

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # it warns about every odd object
    return "\n\n".join(page.extract_text() or "" for page in pypdf.PdfReader(path).pages)


def _html_file(path: Path) -> str:
    return markup.html_text(path.read_bytes())


_FORMATS = {
    "pdf": _Format("PDFs", "the PDF", "pdf", "pypdf", _pdf_text),
    "docx": _Format("Word files", "the Word file", "docx", "python-docx", markup.docx_text),
    "html": _Format("HTML files", "the HTML file", "html", "beautifulsoup4", _html_file),
}


def _formatted(file: InputFile, fields: Fields) -> Iterator[Document | Failure]:
    fmt = _FORMATS[file.kind]
    doc_id = file.whole_file_id()
    try:
        text = fmt.extract(file.path)
        size = len(text.encode("utf-8"))
    except ImportError:
        extra = f"embedding-client[{fmt.extra}]"
        message = f"reading {fmt.many} needs {fmt.library}: pip install '{extra}'"
        yield Failure(file.source, None, doc_id, "UNSUPPORTED", message, "read")
        return
    except Exception as err:  # the libraries raise many kinds for damaged or encrypted files
        message = f"cannot read {fmt.one}: {err}"
        yield Failure(file.source, None, doc_id, "UNREADABLE", message, "read")
        return
    yield Document(doc_id, text, file.source, None, {}, size)


_READERS: dict[str, Callable[[InputFile, Fields], Iterator[Document | Failure]]] = {
    "jsonl": _jsonl,
    "csv": _csv,
    "parquet": _parquet,
    "text": _text,
    **dict.fromkeys(_FORMATS, _formatted),
}


def owner(source: str, line: int | None, doc_id: str | None) -> str:
    """What decides a record's shard: its id, or where it is when it has none."""
    return doc_id if doc_id is not None else f"{source}:{line or 0}"


class Reader:
    """Every document of the inputs in order, each id once: a later duplicate is a Failure,
    and a document already complete in the output is skipped (counted in `skipped`). With
    a shard, only its own documents and failures come out; whole files of other shards
    are not even opened."""

    def __init__(
        self,
        files: Sequence[InputFile],
        fields: Fields,
        complete: Set[str],
        on_failure: Callable[[Failure], None],
        shard: Shard = WHOLE_CORPUS,
    ) -> None:
        self._files = files
        self._fields = fields
        self._complete = complete
        self._on_failure = on_failure
        self._shard = shard
        self.skipped = 0

    def __iter__(self) -> Iterator[Document]:
        first: dict[str, tuple[int, int]] = {}  # id -> (file index, line) of its first record
        owns = self._shard.owns
        for index, file in enumerate(self._files):
            if file.kind in WHOLE_FILE_KINDS and not owns(file.whole_file_id()):
                continue
            for item in read_file(file, self._fields):
                if not owns(owner(item.source, item.line, item.id)):
                    continue
                if isinstance(item, Failure):
                    self._on_failure(item)
                    continue
                seen = first.get(item.id)
                if seen is not None:
                    where = self._files[seen[0]].source + (f":{seen[1]}" if seen[1] else "")
                    message = f"duplicate id; first seen at {where}"
                    self._on_failure(Failure.of(item, "DUPLICATE_ID", message, "read"))
                    continue
                first[item.id] = (index, item.line or 0)
                if item.id in self._complete:
                    self.skipped += 1
                    continue
                yield item


@dataclass
class Scan:
    """What a quick pass over the inputs found, before anything is sent."""

    records: int = 0  # documents and bad records (each a line of progress)
    todo: int = 0  # of them, those not already complete in the output
    metadata: MetadataTypes = field(default_factory=MetadataTypes)


# (owner, id) of one record; the id is None for a record the Reader reports as bad.
_Count = Callable[[str, str | None], None]


def prescan(
    files: Sequence[InputFile], fields: Fields, complete: Set[str], shard: Shard = WHOLE_CORPUS
) -> Scan:
    """Counts what the Reader will yield or report, and learns the metadata columns' types.

    Whole files are not opened; Parquet files give their row count and schema, and their
    ids only when resuming or sharded. Only the shard's records are counted, but the
    metadata types come from every record, so that every shard writes the same columns.
    """
    scan = Scan()
    firsts: set[str] = set()

    def count(key: str, doc_id: str | None) -> None:
        if not shard.owns(key):
            return
        scan.records += 1
        if doc_id is None or not complete:
            scan.todo += 1
        elif doc_id in firsts:
            scan.todo += 1  # a duplicate: reported
        else:
            firsts.add(doc_id)
            scan.todo += doc_id not in complete

    for file in files:
        if file.kind in WHOLE_FILE_KINDS:
            count(file.whole_file_id(), file.whole_file_id())
        elif file.kind == "parquet":
            _prescan_parquet(file, fields, scan, count, complete=complete, shard=shard)
        elif file.kind == "jsonl":
            _prescan_jsonl(file, fields, scan, count)
        else:
            for item in read_file(file, fields):
                key = owner(item.source, item.line, item.id)
                if isinstance(item, Document):
                    scan.metadata.observe(item.metadata)
                    count(key, item.id)
                else:
                    count(key, None)
    return scan


def _prescan_jsonl(file: InputFile, fields: Fields, scan: Scan, count: _Count) -> None:
    """What _jsonl yields, without building documents: ids and metadata types only."""
    try:
        with open(file.path, "rb") as f:
            for n, raw in enumerate(f, 1):
                line = raw[3:] if n == 1 and raw.startswith(codecs.BOM_UTF8) else raw
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    count(owner(file.source, n, None), None)
                    continue
                raw_id = obj.get(fields.id) if isinstance(obj, dict) else None
                if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or raw_id == "":
                    count(owner(file.source, n, None), None)  # the Reader reports it
                    continue
                if not isinstance(obj.get(fields.text), str):
                    count(str(raw_id), None)  # reported under its id
                    continue
                scan.metadata.observe(
                    {k: v for k, v in obj.items() if k not in (fields.id, fields.text)}
                )
                count(str(raw_id), str(raw_id))
    except OSError:
        count(owner(file.source, None, None), None)


def _prescan_parquet(
    file: InputFile, fields: Fields, scan: Scan, count: _Count, *, complete: Set[str], shard: Shard
) -> None:
    try:
        parquet = pq.ParquetFile(file.path)
        schema = parquet.schema_arrow
        if _parquet_columns(file, schema, fields) is not None:
            count(owner(file.source, None, None), None)
            return
        for name, arrow_type in zip(schema.names, schema.types, strict=True):
            if name not in (fields.id, fields.text):
                scan.metadata.observe_arrow(name, arrow_type)
        if not complete and shard.whole:
            scan.records += parquet.metadata.num_rows
            scan.todo += parquet.metadata.num_rows
            return
        ids = parquet.read(columns=[fields.id]).column(0).to_pylist()
    except (OSError, pa.ArrowException):
        count(owner(file.source, None, None), None)  # the Reader reports it
        return
    for row, raw in enumerate(ids, 1):
        valid = raw is not None and not isinstance(raw, bool) and str(raw) != ""
        doc_id = str(raw) if valid else None
        count(owner(file.source, row, doc_id), doc_id)

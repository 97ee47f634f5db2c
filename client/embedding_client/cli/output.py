"""The output: a dataset directory of committed Parquet parts, the errors file, the writer.

OUT.parquet is a directory. Each part is written to a hidden temporary name, fsync'd, then
renamed to `part-<run>-<n>.parquet` and the directory fsync'd, so after `kill -9` at any
moment every visible part is whole (readers skip hidden files). A document's rows all go
into one part, so the ids of the committed parts are exactly the complete documents; a
rerun reads them, skips those documents and removes its leftover temporary files.

Shards of one corpus (`--shard I/N`) write into one dataset side by side: each names its
parts `part-shardIofN-<run>-<n>.parquet` and its errors file OUT.errors.shardIofN.jsonl,
holds a lock of its own, and cleans up only its own temporary files. A run of the whole
corpus excludes every shard run on the same dataset, and the reverse.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from embedding.v1 import embedding_pb2 as pb
from embedding_client.cli.connection import FatalError
from embedding_client.cli.documents import Document, Failure
from embedding_client.cli.progress import Stats
from embedding_client.cli.schema import SETTINGS_KEY, BadResult, RowBuffer, ViewsIgnored
from embedding_client.cli.shards import WHOLE_CORPUS, Shard

try:
    import fcntl
except ImportError:  # Windows: no advisory lock, the rest works
    fcntl = None  # type: ignore[assignment]

PART_GLOB = "part-*.parquet"
_TMP_PREFIX = ".tmp-"
_LOCK = ".lock"


def _stem(out: Path) -> str:
    return out.name[: -len(".parquet")] if out.name.endswith(".parquet") else out.name


def errors_path(out: Path, shard: Shard = WHOLE_CORPUS) -> Path:
    """OUT.parquet -> OUT.errors.jsonl (OUT.errors.shardIofN.jsonl for a shard), beside it."""
    tag = f".{shard.tag}" if shard.tag else ""
    return out.with_name(f"{_stem(out)}.errors{tag}.jsonl")


def is_errors_file(out: Path, path: Path) -> bool:
    """Whether `path` is an errors file of OUT, any shard's: never an input."""
    name = path.name
    return (
        path.parent.resolve() == out.parent.resolve()
        and name.startswith(f"{_stem(out)}.errors")
        and name.endswith(".jsonl")
    )


class Dataset:
    """OUT as a directory of parts; one run per shard at a time holds its lock."""

    def __init__(self, path: Path, shard: Shard = WHOLE_CORPUS) -> None:
        self.path = path
        self.shard = shard
        started = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        tag = f"{shard.tag}-" if shard.tag else ""
        self._run = f"{tag}{started}-{secrets.token_hex(3)}"
        self._seq = 0
        self._locks: list[IO[bytes]] = []

    def open(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise FatalError(f"{self.path} exists and is not a dataset directory")
        self.path.mkdir(parents=True, exist_ok=True)
        tag = self.shard.tag
        if tag:  # shards share the dataset's lock and each holds its own
            self._lock(_LOCK, shared=True, holder="a run of the whole corpus")
            self._lock(f"{_LOCK}-{tag}", shared=False, holder=f"a run of shard {self.shard}")
            leftovers = f"{_TMP_PREFIX}part-{tag}-*"  # other shards may be writing theirs
        else:
            self._lock(_LOCK, shared=False, holder="another embed-files run")
            leftovers = f"{_TMP_PREFIX}*"  # no shard can be running
        for leftover in self.path.glob(leftovers):
            leftover.unlink(missing_ok=True)  # a part a killed run never committed

    def _lock(self, name: str, *, shared: bool, holder: str) -> None:
        file = open(self.path / name, "ab")  # noqa: SIM115 (held for the whole run)
        self._locks.append(file)
        if fcntl is None:
            return
        try:
            fcntl.flock(file.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as err:
            self.close()  # and the locks taken so far
            raise FatalError(f"{holder} is writing {self.path}") from err

    def parts(self) -> list[Path]:
        return sorted(self.path.glob(PART_GLOB))

    def scan(self) -> tuple[set[str], dict[str, Any] | None]:
        """The ids of every committed part, and the settings the first part was made with."""
        ids: set[str] = set()
        settings: dict[str, Any] | None = None
        for part in self.parts():
            try:
                if settings is None:
                    meta = pq.read_schema(part).metadata or {}
                    if SETTINGS_KEY in meta:
                        settings = json.loads(meta[SETTINGS_KEY])
                ids.update(pq.read_table(part, columns=["id"]).column(0).to_pylist())
            except (OSError, pa.ArrowException, ValueError) as err:
                raise FatalError(f"cannot read committed part {part}: {err}") from err
        return ids, settings

    def commit(self, table: pa.Table, vector_columns: Sequence[str] = ()) -> Path:
        self._seq += 1
        name = f"part-{self._run}-{self._seq:05d}.parquet"
        tmp = self.path / f"{_TMP_PREFIX}{name}"
        # Vectors neither compress nor have useful statistics or dictionaries.
        others = [name for name in table.schema.names if name not in vector_columns]
        pq.write_table(table, tmp, use_dictionary=others, write_statistics=others)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        final = self.path / name
        os.replace(tmp, final)
        _fsync_dir(self.path)
        return final

    def close(self) -> None:
        for file in self._locks:
            file.close()  # releases the lock
        self._locks.clear()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ErrorLog:
    """OUT.errors.jsonl: one JSON object per failed document, for the latest run.

    A run starts the file afresh: whatever failed before is tried again, so it either
    succeeds or is listed again. Lines are appended and flushed as they come.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115 (open for the run)

    def write(self, failure: Failure) -> None:
        self._file.write(json.dumps(failure.to_json(), ensure_ascii=False) + "\n")
        self._file.flush()

    def sync(self) -> None:
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


_Event = tuple[str, Any]


class PartWriter:
    """The only thread that writes: rows into parts, failures into the errors file.

    A part is committed when it holds `part_rows` rows, or `part_seconds` after its first
    row, or at the end; a run killed meanwhile loses only the uncommitted part's documents,
    which the next run embeds again.
    """

    def __init__(
        self,
        dataset: Dataset,
        buffer: RowBuffer,
        errors: ErrorLog,
        stats: Stats,
        report: Callable[[str], None],
        *,
        part_rows: int = 20_000,
        part_bytes: int = 256 << 20,
        part_seconds: float = 30.0,
    ) -> None:
        self._dataset = dataset
        self._buffer = buffer
        self._errors = errors
        self._stats = stats
        self._report = report
        self._part_rows = part_rows
        self._part_bytes = part_bytes
        self._part_seconds = part_seconds
        self._queue: queue.Queue[_Event] = queue.Queue(maxsize=1024)
        self._thread = threading.Thread(target=self._run, name="embed-files-writer", daemon=True)
        self._failure: BaseException | None = None
        self._written: set[str] = set()
        self._first_row_at = 0.0
        self.parts = 0

    def start(self) -> None:
        self._thread.start()

    # Called from the stream (event loop) and the reader thread.

    def embedded(self, pairs: list[tuple[Document, pb.Embedding]]) -> None:
        self._put(("rows", pairs))

    def failed(self, failure: Failure) -> None:
        self._put(("failure", failure))

    def close(self) -> None:
        """Commit what is buffered and stop; raises what failed in the thread."""
        if self._thread.is_alive():
            self._put(("stop", None))
            self._thread.join()
        if self._failure is not None:
            raise self._stopped() from self._failure

    def _stopped(self) -> FatalError:
        if isinstance(self._failure, FatalError):
            return FatalError(str(self._failure))
        return FatalError(f"writing the output failed: {self._failure}")

    def _put(self, event: _Event) -> None:
        # Blocks while the writer is behind: that slows the stream, which is the point.
        while True:
            if self._failure is not None:
                raise self._stopped() from self._failure
            try:
                self._queue.put(event, timeout=0.5)
                return
            except queue.Full:
                continue

    # The thread.

    def _run(self) -> None:
        try:
            while True:
                try:
                    kind, payload = self._queue.get(timeout=self._until_due())
                except queue.Empty:
                    self._commit()
                    continue
                if kind == "stop":
                    self._commit()
                    return
                if kind == "rows":
                    self._rows(payload)
                else:
                    self._failed(payload)
        except BaseException as err:  # surfaced to the stream by _put and close
            self._failure = err

    def _rows(self, pairs: list[tuple[Document, pb.Embedding]]) -> None:
        for doc, embedding in pairs:
            if doc.id in self._written:
                continue  # answered twice (a resend raced its answer): keep one
            try:
                chunks, tokens = self._buffer.add(doc, embedding)
            except ViewsIgnored as err:
                raise FatalError(str(err)) from err  # not worth a line per document
            except BadResult as err:
                self._failed(Failure.of(doc, "BAD_RESULT", str(err)))
                continue
            if self._buffer.documents == 1:
                self._first_row_at = time.monotonic()
            self._written.add(doc.id)
            self._stats.documents += 1
            self._stats.chunks += chunks
            self._stats.tokens += tokens
            if self._due():  # between documents: a document's rows stay in one part
                self._commit()

    def _failed(self, failure: Failure) -> None:
        self._errors.write(failure)
        self._stats.errors += 1
        self._report(f"{failure.where()}: {failure.code}: {failure.message}")

    def _due(self) -> bool:
        buffer = self._buffer
        return buffer.rows >= self._part_rows or buffer.nbytes >= self._part_bytes

    def _until_due(self) -> float | None:
        if not self._buffer.rows:
            return None
        return max(0.0, self._first_row_at + self._part_seconds - time.monotonic())

    def _commit(self) -> None:
        if self._buffer.rows:
            self._dataset.commit(self._buffer.table(), self._buffer.schema.vector_columns())
            self._buffer.clear()
            self.parts += 1
        self._errors.sync()

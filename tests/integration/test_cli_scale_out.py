"""embed-files across replicas and workers, against the real MiniLM service: --streams over
a round_robin target of two servers, --shard workers into one dataset (one of them killed
and rerun), and the documents users have (Word, HTML) with document vectors."""

from __future__ import annotations

import re
import signal
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest
from prometheus_client.parser import text_string_to_metric_families

from embedding_client import EmbeddingClient
from embedding_client.cli.schema import DOCUMENT_CHUNK
from embedding_client.cli.shards import COUNT_ENV, INDEX_ENV
from tests.integration.conftest import ENGINE_ARGS, MINILM_NAMES
from tests.integration.test_cli import (
    PATIENCE_S,
    _assert_exactly_once,
    _cli,
    _spawn_cli,
    _wait_for_part,
    _write_jsonl,
)
from tests.proxy import HoldingProxy
from tests.servers import ServerProcess, free_port, start_server
from tests.unit.test_cli_markup import PAGE, PAGE_TEXT, WORD_TEXT, write_docx

SPREAD_DOCS = 240
SHARD_DOCS = 160
# What a held shard gets through the proxy: a few 10-document parts of MiniLM answers
# (384 float32, about 1.6 kB each), in messages of at most HELD_MESSAGE_ITEMS answers so
# that whole messages get through; far from its whole share.
HELD_AFTER_BYTES = 40 << 10
HELD_MESSAGE_ITEMS = 4
_METRICS_URL = re.compile(r"metrics http://[^\s/]+:(\d+)/metrics")


@pytest.fixture(scope="module")
def second_minilm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, int]]:
    """A second replica of the session's MiniLM server, with /metrics on a port of its own."""
    port = free_port()
    metrics = ["--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
    log = tmp_path_factory.mktemp("logs") / "minilm-2.log"
    server = start_server([*ENGINE_ARGS, *MINILM_NAMES, *metrics], log)
    yield server, port
    server.stop()


def _metrics_port(server: ServerProcess) -> int | None:
    """The /metrics port a server announced when it was ready (None: it serves none, e.g.
    because another process held the default port)."""
    found = _METRICS_URL.search(server.log_path.read_text(errors="replace"))
    return int(found.group(1)) if found else None


def _bulk_inputs(port: int) -> int:
    """Stream items (bulk priority) the server's engine has embedded since it started."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=PATIENCE_S) as reply:
        text = reply.read().decode()
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "embedding_inputs_total" and "bulk" in sample.labels.values()
        )
    )


def _rows(out: Path) -> pa.Table:
    """The dataset in a fixed order: parts hold documents in the order answers came."""
    return pq.read_table(out).sort_by([("id", "ascending"), ("chunk", "ascending")])


def _assert_same_rows(got: pa.Table, want: pa.Table) -> None:
    assert got.drop_columns(["vector"]).to_pylist() == want.drop_columns(["vector"]).to_pylist()
    np.testing.assert_allclose(
        np.array(got.column("vector").to_pylist(), np.float32),
        np.array(want.column("vector").to_pylist(), np.float32),
        atol=1e-6,
        rtol=0,
    )


def test_streams_spread_over_both_servers_and_equal_one_stream(
    minilm_server: ServerProcess, second_minilm: tuple[ServerProcess, int], tmp_path: Path
) -> None:
    second, second_port = second_minilm
    run = uuid.uuid4().hex[:8]  # texts no server has embedded (or cached) before
    texts = [f"Paragraph {i} of run {run} on rivers." for i in range(SPREAD_DOCS)]
    _write_jsonl(tmp_path / "in.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    ports = {"session": _metrics_port(minilm_server), "second": second_port}
    measured = {name: port for name, port in ports.items() if port is not None}
    before = {name: _bulk_inputs(port) for name, port in measured.items()}
    target = f"ipv4:{minilm_server.address},{second.address}"
    # A small window per stream: no stream can hold a large share of the corpus unanswered.
    args = ["in.jsonl", "--server", target, "--max-inflight", "16", "--items-per-message", "8"]
    four = _cli([*args, "--out", "four.parquet", "--streams", "4"], tmp_path)
    assert four.returncode == 0, four.stderr
    assert f"done: {SPREAD_DOCS} documents embedded" in four.stderr

    # Every item went to one engine or the other, each once.
    spread = {name: _bulk_inputs(port) - before[name] for name, port in measured.items()}
    if "session" not in spread:  # its /metrics is elsewhere: the rest is its share
        spread["session"] = SPREAD_DOCS - spread["second"]
    print(f"items per server with --streams 4: {spread}")
    assert sum(spread.values()) == SPREAD_DOCS
    assert min(spread.values()) > 0, spread

    one = _cli([*args, "--out", "one.parquet"], tmp_path)
    assert one.returncode == 0, one.stderr
    _assert_same_rows(
        _assert_exactly_once(tmp_path / "four.parquet", {f"d{i}" for i in range(SPREAD_DOCS)})
        .sort_by([("id", "ascending"), ("chunk", "ascending")]),
        _rows(tmp_path / "one.parquet"),
    )  # fmt: skip


def test_two_shards_equal_one_run_also_after_one_is_killed_and_rerun(
    minilm_server: ServerProcess, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _write_jsonl(
        data / "records.jsonl",
        [{"id": f"r{i}", "text": f"Record {i}: tides and estuaries."} for i in range(SHARD_DOCS)],
    )
    for i in range(6):
        (data / f"note-{i}.md").write_text(f"# Note {i}\n\nDeltas grow where rivers slow.\n")
    ids = {f"r{i}" for i in range(SHARD_DOCS)} | {f"note-{i}.md" for i in range(6)}
    server = ["--server", minilm_server.address]
    whole = _cli(["data", "--out", "whole.parquet", *server], tmp_path)
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "sharded.parquet"
    shard = ["data", "--out", "sharded.parquet", "--part-rows", "10"]
    # Shard 1 gets a few parts' worth of answers and then nothing: mid-run when killed,
    # whatever the speed of this machine. Shard 0 runs meanwhile, into the same dataset.
    proxy = HoldingProxy(minilm_server.address, budget=HELD_AFTER_BYTES)
    try:
        small = ["--items-per-message", str(HELD_MESSAGE_ITEMS), "--max-inflight", "8"]
        held = _spawn_cli([*shard, *small, "--shard", "1/2", "--server", proxy.address], tmp_path)
        _wait_for_part(out, held)
        zero = _cli([*shard, "--shard", "0/2", *server], tmp_path)
        assert zero.returncode == 0, zero.stderr
        assert held.poll() is None  # still held, not finished
        held.send_signal(signal.SIGKILL)
        held.communicate(timeout=PATIENCE_S)
    finally:
        proxy.close()
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert {p.split("-")[1] for p in parts} == {"shard0of2", "shard1of2"}
    partial = pq.read_table(out)
    assert partial.num_rows < len(ids)

    # The rerun takes its shard from an Indexed Job's variables, as a retried pod would.
    rerun = _cli([*shard, *server], tmp_path, env={INDEX_ENV: "1", COUNT_ENV: "2"})
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming:" in rerun.stderr and "shard 1/2:" in rerun.stderr
    _assert_same_rows(
        _assert_exactly_once(out, ids).sort_by([("id", "ascending"), ("chunk", "ascending")]),
        _rows(tmp_path / "whole.parquet"),
    )
    for index in (0, 1):  # nothing failed, and each shard kept its own errors file
        assert (tmp_path / f"sharded.errors.shard{index}of2.jsonl").read_text() == ""


def test_word_and_html_files_come_with_headings_and_document_vectors(
    minilm_server: ServerProcess, minilm: EmbeddingClient, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_docx(data / "bread.docx")
    (data / "bread.html").write_text(PAGE, encoding="utf-8")
    chunking = ["--chunk-tokens", "24", "--chunk-overlap", "4"]
    args = ["data", "--out", "out.parquet", "--server", minilm_server.address, *chunking]
    result = _cli([*args, "--document-vectors"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "done: 2 documents embedded" in result.stderr

    table = _rows(tmp_path / "out.parquet")
    rows = table.drop_columns(["vector"]).to_pylist()
    vectors = np.array(table.column("vector").to_pylist(), np.float32)
    for doc_id, text in (("bread.docx", WORD_TEXT), ("bread.html", PAGE_TEXT)):
        mine = [i for i, r in enumerate(rows) if r["id"] == doc_id]
        document = [i for i in mine if rows[i]["chunk"] == DOCUMENT_CHUNK]
        chunks = [i for i in mine if rows[i]["chunk"] >= 0]
        assert len(document) == 1 and len(chunks) > 1, doc_id
        (row,) = (rows[i] for i in document)
        assert row["text"] == text  # headings as Markdown, no markup, script or navigation
        assert row["token_count"] == sum(rows[i]["token_count"] for i in chunks)
        assert all(rows[i]["text"] == text[rows[i]["char_start"] : rows[i]["char_end"]]
                   for i in chunks)  # fmt: skip
        # The service's own whole-document vector: what Embed gives for the same chunking.
        reference = minilm.embed([text], chunk_tokens=24, chunk_overlap=4)
        np.testing.assert_allclose(vectors[document[0]], reference.vectors[0], atol=1e-6)
        chunk_reference = minilm.embed([rows[i]["text"] for i in chunks]).vectors
        assert ((vectors[chunks] * chunk_reference).sum(axis=1) > 0.99).all()

"""embed-files end to end, as a subprocess: against the real MiniLM server (vectors equal
Embed's), and against null-engine servers for kills, restarts and error files."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from embedding_client import EmbeddingClient
from embedding_client.auth import API_KEY_ENV
from tests.proxy import HoldingProxy
from tests.servers import ServerProcess, free_port, start_server

CLI = [sys.executable, "-m", "embedding_client.cli"]
NULL_ARGS = ["--engine", "null", "--metrics-port", "0"]
MAX_INPUT_CHARS = 300
BULK_DOCS = 8_000
# Waits (runs, polls) are bounded by this only against a hang, never as a speed assertion.
PATIENCE_S = 600.0
# What a held run gets through the proxy: a few parts of null-engine vectors (384 float32
# each, about 1.6 kB an answer), far from all of BULK_DOCS.
HELD_AFTER_BYTES = 2 << 20
KEY = "s3cret-key-0b9e"


def _cli(
    args: Sequence[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
        check=False,
    )


def _spawn_cli(args: Sequence[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _write_jsonl(path: Path, records: Sequence[dict[str, object] | str]) -> None:
    lines = (r if isinstance(r, str) else json.dumps(r) for r in records)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _bulk(path: Path, n: int = BULK_DOCS) -> set[str]:
    _write_jsonl(path, [{"id": f"doc-{i}", "text": f"document {i} of the bulk"} for i in range(n)])
    return {f"doc-{i}" for i in range(n)}


def _errors(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def _wait_for_part(out: Path, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + PATIENCE_S  # a bound on the poll, not a speed assertion
    while time.monotonic() < deadline:
        if out.is_dir() and any(out.glob("part-*.parquet")):
            return
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.01)
    raise AssertionError("no part committed in time")


def _assert_exactly_once(out: Path, ids: set[str]) -> pa.Table:
    table = pq.read_table(out)
    keys = list(zip(table.column("id").to_pylist(), table.column("chunk").to_pylist(), strict=True))
    assert len(keys) == len(set(keys)), "a (id, chunk) row was written twice"
    assert set(table.column("id").to_pylist()) == ids
    assert not list(out.glob(".tmp-*"))
    return table


@pytest.fixture(scope="module")
def null_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "null.log"
    server = start_server([*NULL_ARGS, "--max-input-chars", str(MAX_INPUT_CHARS)], log)
    yield server
    server.stop()


def test_a_mixed_directory_gives_embeds_vectors_with_spans_and_metadata(
    minilm_server: ServerProcess, minilm: EmbeddingClient, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    (data / "notes").mkdir(parents=True)
    _write_jsonl(
        data / "a.jsonl",
        [
            {"id": "j1", "text": "Paris is the capital of France.", "lang": "en", "rank": 1},
            {"id": "j2", "text": "Der Rhein fließt durch Köln.", "lang": "de", "rank": 2},
        ],
    )
    (data / "notes" / "guide.md").write_text("# Bread\n\nKnead the dough for ten minutes.\n")
    (data / "plain.txt").write_text("Rivers carry sediment to the sea.")
    (data / "b.csv").write_text('id,text,author\nc1,"Tea, then coffee.",ann\nc2,Cats sleep.,bo\n')
    pq.write_table(
        pa.table({"id": [1, 2], "text": ["Parquet row one.", "Parquet row two."],
                  "score": [0.25, 0.5]}),
        data / "c.parquet",
    )  # fmt: skip
    (data / "image.png").write_bytes(b"\x89PNG")
    result = _cli(["data", "--out", "out.parquet", "--server", minilm_server.address], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "skipping data/image.png: unknown extension" in result.stderr
    assert "done: 8 documents embedded" in result.stderr.splitlines()[-1]

    table = pq.read_table(tmp_path / "out.parquet").sort_by("id")
    assert table.schema.names == [
        "id", "chunk", "char_start", "char_end", "text", "token_count", "vector", "source",
        "lang", "rank", "author", "score",
    ]  # fmt: skip
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 384)
    rows = table.drop_columns(["vector"]).to_pylist()
    expected = {
        "1": ("Parquet row one.", "data/c.parquet", {"score": 0.25}),
        "2": ("Parquet row two.", "data/c.parquet", {"score": 0.5}),
        "c1": ("Tea, then coffee.", "data/b.csv", {"author": "ann"}),
        "c2": ("Cats sleep.", "data/b.csv", {"author": "bo"}),
        "j1": ("Paris is the capital of France.", "data/a.jsonl", {"lang": "en", "rank": 1}),
        "j2": ("Der Rhein fließt durch Köln.", "data/a.jsonl", {"lang": "de", "rank": 2}),
        "notes/guide.md": ("# Bread\n\nKnead the dough for ten minutes.\n",
                           "data/notes/guide.md", {}),
        "plain.txt": ("Rivers carry sediment to the sea.", "data/plain.txt", {}),
    }  # fmt: skip
    assert [r["id"] for r in rows] == list(expected)
    for row in rows:
        text, source, metadata = expected[row["id"]]
        assert (row["chunk"], row["char_start"], row["char_end"]) == (0, 0, len(text))
        assert (row["text"], row["source"]) == (text, source)
        meta = {k: row[k] for k in ("lang", "rank", "author", "score") if row[k] is not None}
        assert meta == metadata
    texts = [expected[i][0] for i in expected]
    reference = minilm.embed(texts)
    vectors = np.array(table.column("vector").to_pylist(), np.float32)
    np.testing.assert_allclose(vectors, reference.vectors, atol=1e-6, rtol=0)
    assert table.column("token_count").to_pylist() == reference.token_counts

    # Other encodings: bytes exactly as Embed sends them, with int8's scale; no text column.
    result = _cli(["data", "--out", "int8.parquet", "--server", minilm_server.address,
                   "--encoding", "int8", "--dimensions", "128", "--no-text"], tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    table = pq.read_table(tmp_path / "int8.parquet").sort_by("id")
    assert "text" not in table.schema.names
    assert table.schema.field("vector").type == pa.binary()
    reference_int8 = minilm.embed(texts, encoding="int8", dimensions=128).response.embeddings
    assert table.column("vector").to_pylist() == [e.data for e in reference_int8]
    np.testing.assert_allclose(
        table.column("scale").to_pylist(), [e.scale for e in reference_int8], rtol=1e-6
    )


def test_long_documents_come_back_as_chunks_with_spans_and_views_as_columns(
    minilm_server: ServerProcess, minilm: EmbeddingClient, tmp_path: Path
) -> None:
    long = " ".join(f"Sentence number {i} talks about rivers and their deltas." for i in range(40))
    _write_jsonl(
        tmp_path / "in.jsonl", [{"id": "long", "text": long}, {"id": "short", "text": "Hi."}]
    )
    args = ["in.jsonl", "--out", "out.parquet", "--server", minilm_server.address,
            "--chunk-tokens", "64", "--chunk-overlap", "8", "--view", "32:float32"]  # fmt: skip
    result = _cli(args, tmp_path)
    assert result.returncode == 0, result.stderr
    table = pq.read_table(tmp_path / "out.parquet").sort_by(
        [("id", "ascending"), ("chunk", "ascending")]
    )
    rows = table.drop_columns(["vector", "vector_32_float32"]).to_pylist()
    chunks = [r for r in rows if r["id"] == "long"]
    assert len(chunks) > 4 and [r["chunk"] for r in chunks] == list(range(len(chunks)))
    assert chunks[0]["char_start"] == 0 and chunks[-1]["char_end"] == len(long)
    for before, after in itertools.pairwise(chunks):
        assert before["char_start"] < after["char_start"] <= before["char_end"]  # overlapping
    assert all(r["text"] == long[r["char_start"] : r["char_end"]] for r in chunks)
    assert all(r["token_count"] <= 64 for r in chunks)
    vectors = np.array(table.column("vector").to_pylist(), np.float32)
    reference = minilm.embed([r["text"] for r in rows]).vectors
    cosines = (vectors * reference).sum(axis=1)
    assert cosines.min() > 0.99, cosines  # a chunk's vector is its text's
    views = np.array(table.column("vector_32_float32").to_pylist(), np.float32)
    np.testing.assert_allclose(views[-1], minilm.embed(["Hi."], dimensions=32).vectors[0],
                               atol=1e-6)  # fmt: skip


def test_a_rerun_after_kill_9_of_the_cli_writes_every_row_exactly_once(
    null_server: ServerProcess, tmp_path: Path
) -> None:
    ids = _bulk(tmp_path / "bulk.jsonl")
    args = ["bulk.jsonl", "--out", "out.parquet", "--part-rows", "200"]
    # The first run gets a few parts' worth of answers and then nothing: it is mid-run
    # when killed, whatever the speed of this machine.
    proxy = HoldingProxy(null_server.address, budget=HELD_AFTER_BYTES)
    try:
        first = _spawn_cli([*args, "--server", proxy.address], tmp_path)
        _wait_for_part(tmp_path / "out.parquet", first)
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=PATIENCE_S)
    finally:
        proxy.close()
    assert first.returncode == -signal.SIGKILL  # killed mid-run, not finished

    partial = pq.read_table(tmp_path / "out.parquet")  # readable as it was left
    assert 0 < partial.num_rows < len(ids)
    assert partial.num_rows == len(set(partial.column("id").to_pylist()))

    second = _cli([*args, "--server", null_server.address], tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resuming:" in second.stderr
    done = f"done: {len(ids) - partial.num_rows:,} documents embedded ({partial.num_rows:,} already"
    assert done in second.stderr
    assert _assert_exactly_once(tmp_path / "out.parquet", ids).num_rows == len(ids)


def test_the_server_killed_and_restarted_mid_run_still_gives_a_complete_file(
    tmp_path: Path,
) -> None:
    log = tmp_path / "server.log"
    server = start_server(NULL_ARGS, log)
    # The run reaches the server through a proxy that stops it a few parts in, so the
    # server dies mid-run however fast the machine; the restarted one answers everything.
    proxy = HoldingProxy(server.address, budget=HELD_AFTER_BYTES)
    try:
        ids = _bulk(tmp_path / "bulk.jsonl")
        args = ["bulk.jsonl", "--out", "out.parquet", "--server", proxy.address,
                "--part-rows", "400", "--retry-timeout", str(PATIENCE_S)]  # fmt: skip
        cli = _spawn_cli(args, tmp_path)
        _wait_for_part(tmp_path / "out.parquet", cli)
        server.process.kill()  # SIGKILL: no drain, the stream just breaks
        server.process.wait()
        server = start_server(NULL_ARGS, tmp_path / "restarted.log")
        proxy.upstream = server.address
        proxy.release()
        _, stderr = cli.communicate(timeout=PATIENCE_S)
        assert cli.returncode == 0, stderr
        assert "stream lost (UNAVAILABLE" in stderr
        assert f"done: {len(ids):,} documents embedded" in stderr
        assert _assert_exactly_once(tmp_path / "out.parquet", ids).num_rows == len(ids)
    finally:
        proxy.close()
        server.stop()


def test_item_errors_go_to_the_errors_file_and_the_exit_status(
    null_server: ServerProcess, tmp_path: Path
) -> None:
    _write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "ok-1", "text": "fine"},
            {"id": "empty", "text": ""},
            {"id": "long", "text": "x" * (MAX_INPUT_CHARS + 100)},
            {"id": "ok-2", "text": "also fine"},
        ],
    )
    args = ["in.jsonl", "--out", "out.parquet", "--server", null_server.address]
    result = _cli(args, tmp_path)
    assert result.returncode == 1, result.stderr
    summary = result.stderr.splitlines()[-1]
    assert "2 documents embedded" in summary
    assert "2 errors (listed in out.errors.jsonl)" in summary
    records = {r["id"]: r for r in _errors(tmp_path / "out.errors.jsonl")}
    assert set(records) == {"empty", "long"}
    for doc_id, line in (("empty", 2), ("long", 3)):
        record = records[doc_id]
        assert (record["source"], record["line"], record["stage"], record["code"]) == (
            "in.jsonl", line, "embed", "INVALID_ARGUMENT",
        )  # fmt: skip
    assert "empty" in str(records["empty"]["message"])
    assert str(MAX_INPUT_CHARS) in str(records["long"]["message"])
    assert set(pq.read_table(tmp_path / "out.parquet").column("id").to_pylist()) == {"ok-1", "ok-2"}

    # A rerun skips what is complete and tries the failures again: listed once more, not twice.
    again = _cli(args, tmp_path)
    assert again.returncode == 1
    assert "0 documents embedded (2 already done)" in again.stderr
    assert sorted(str(r["id"]) for r in _errors(tmp_path / "out.errors.jsonl")) == ["empty", "long"]


def test_a_malformed_jsonl_line_is_reported_by_file_and_line_and_the_rest_embedded(
    null_server: ServerProcess, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _write_jsonl(
        data / "a.jsonl",
        [
            {"id": "a", "text": "first"},
            '{"id": "broken", "text": ',
            {"id": "b", "text": "second"},
            {"id": "c", "body": "no text field"},
            {"id": "d", "text": ["not", "a", "string"]},
        ],
    )
    _write_jsonl(
        data / "b.jsonl", [{"id": "a", "text": "a duplicate id"}, {"id": "e", "text": "x"}]
    )
    result = _cli(["data", "--out", "out.parquet", "--server", null_server.address], tmp_path)
    assert result.returncode == 1
    assert "data/a.jsonl:2: MALFORMED: invalid JSON" in result.stderr
    assert "data/a.jsonl:4 (id 'c'): MALFORMED: no 'text' field" in result.stderr
    assert "data/a.jsonl:5 (id 'd'): MALFORMED: field 'text' must be a string, not list" in (
        result.stderr
    )
    assert "data/b.jsonl:1 (id 'a'): DUPLICATE_ID" in result.stderr
    table = pq.read_table(tmp_path / "out.parquet")
    assert sorted(table.column("id").to_pylist()) == ["a", "b", "e"]
    assert table.sort_by("id").column("text").to_pylist()[0] == "first"  # the first copy wins
    records = [(r["source"], r["line"], r["code"]) for r in _errors(tmp_path / "out.errors.jsonl")]
    assert records == [
        ("data/a.jsonl", 2, "MALFORMED"),
        ("data/a.jsonl", 4, "MALFORMED"),
        ("data/a.jsonl", 5, "MALFORMED"),
        ("data/b.jsonl", 1, "DUPLICATE_ID"),
    ]


def test_an_unreachable_server_stops_the_run_with_status_3(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "x"}])
    args = ["in.jsonl", "--out", "out.parquet", "--server", f"127.0.0.1:{free_port()}",
            "--retry-timeout", "1"]  # fmt: skip
    result = _cli(args, tmp_path)
    assert result.returncode == 3
    assert "no model info from" in result.stderr


def test_api_keys_for_the_client_and_embed_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server started with --api-keys: the right key works for embed, the stream and
    embed-files, from the argument or $EMBED_API_KEY; a wrong key and none fail plainly."""
    server = start_server([*NULL_ARGS, "--api-keys", f"{KEY},another"], tmp_path / "server.log")
    items = [("a", "first"), ("b", "second")]
    try:
        monkeypatch.delenv(API_KEY_ENV, raising=False)
        with EmbeddingClient(server.address, api_key=KEY) as client:
            assert client.embed(["hello"]).vectors.shape == (1, 384)
            assert sorted(r.id for r in client.embed_stream(items) if r.ok) == ["a", "b"]
        monkeypatch.setenv(API_KEY_ENV, KEY)
        with EmbeddingClient(server.address) as client:  # the key from the environment
            assert client.embed(["hello"]).vectors.shape == (1, 384)
        for key in ("wrong-key", ""):  # "" sends none, whatever the environment says
            with EmbeddingClient(server.address, api_key=key) as client:
                for call in (lambda: client.embed(["x"]), lambda: list(client.embed_stream(items))):
                    with pytest.raises(grpc.RpcError) as caught:
                        call()
                    assert isinstance(caught.value, grpc.Call)
                    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    details = caught.value.details() or ""
                    assert "missing or invalid API key" in details and KEY not in details

        _write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "x"}])
        args = ["in.jsonl", "--out", "out.parquet", "--server", server.address, "--quiet"]
        no_key = {API_KEY_ENV: ""}  # whatever the runner's own environment holds
        missing = _cli(args, tmp_path, env=no_key)
        assert missing.returncode == 3
        assert "requires an API key and none was given: pass one with --api-key" in missing.stderr
        refused = _cli([*args, "--api-key", "wrong-key"], tmp_path, env=no_key)
        assert refused.returncode == 3
        assert "refused the API key from --api-key" in refused.stderr
        assert "wrong-key" not in refused.stderr
        from_env = _cli(args, tmp_path, env={API_KEY_ENV: KEY})
        assert from_env.returncode == 0, from_env.stderr
        from_flag = _cli([*args, "--api-key", KEY, "--out", "again.parquet"], tmp_path, env=no_key)
        assert from_flag.returncode == 0, from_flag.stderr
        assert KEY not in from_env.stderr + from_flag.stderr
        assert pq.read_table(tmp_path / "again.parquet").column("id").to_pylist() == ["a"]
    finally:
        server.stop()

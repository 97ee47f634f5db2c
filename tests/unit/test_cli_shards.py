"""embed-files shards without a server: which shard owns a document, --shard and the
Indexed Job's variables, the readers' share of a corpus, and shards side by side in one
dataset (names, locks, leftovers)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from embedding_client.cli.connection import FatalError
from embedding_client.cli.documents import Document, Failure
from embedding_client.cli.main import EXIT_USAGE, main
from embedding_client.cli.output import Dataset, errors_path, is_errors_file
from embedding_client.cli.schema import OutputSchema, RowBuffer
from embedding_client.cli.shards import (
    COUNT_ENV,
    INDEX_ENV,
    WHOLE_CORPUS,
    Shard,
    bucket,
    parse_shard,
    shard_from_env,
)
from embedding_client.cli.sources import Fields, InputFile, Reader, discover, prescan
from tests.unit.test_cli_output import _float32, _settings

# --- which shard owns a document --------------------------------------------------------


def test_the_assignment_is_a_fixed_hash_of_the_id() -> None:
    # Pinned: the pods of one Job may run different releases of the CLI, which must agree
    # on the split, or documents are embedded twice or never.
    assert [bucket(k, 4) for k in ("doc-0", "doc-1", "doc-2", "notes/guide.md")] == [0, 1, 2, 0]
    assert [bucket("doc-1", n) for n in (1, 2, 3)] == [0, 1, 1]


def test_every_id_has_exactly_one_owner_and_the_shares_are_even() -> None:
    ids = [f"doc-{i}" for i in range(10_000)]
    shards = [Shard(i, 4) for i in range(4)]
    owners = Counter(sum(s.owns(k) for s in shards) for k in ids)
    assert owners == {1: len(ids)}
    sizes = [sum(s.owns(k) for k in ids) for s in shards]
    assert max(sizes) - min(sizes) < 0.1 * len(ids) / 4, sizes
    assert all(WHOLE_CORPUS.owns(k) for k in ids)


# --- --shard and the Indexed Job's variables ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2/2", "I must lie in 0..1 for N = 2"),
        ("0/0", "N must be at least 1, not 0"),
        ("-1/2", "expected I/N (such as 0/4), not '-1/2'"),
        ("1", "expected I/N (such as 0/4), not '1'"),
        ("a/b", "expected I/N (such as 0/4), not 'a/b'"),
    ],
)
def test_a_bad_shard_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_shard(text)
    assert str(caught.value) == message


def test_the_shard_flag_is_checked_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["in.jsonl", "--out", "out.parquet", "--shard", "3/3"])
    assert caught.value.code == EXIT_USAGE
    assert "argument --shard: I must lie in 0..2 for N = 3" in capsys.readouterr().err


def test_the_indexed_job_variables_give_the_shard() -> None:
    assert shard_from_env({}) == WHOLE_CORPUS
    assert shard_from_env({INDEX_ENV: "3", COUNT_ENV: "4"}) == Shard(3, 4)
    assert str(Shard(3, 4)) == "3/4" and Shard(3, 4).tag == "shard3of4"
    with pytest.raises(ValueError) as caught:
        shard_from_env({INDEX_ENV: "4", COUNT_ENV: "4"})
    assert str(caught.value) == (
        f"{INDEX_ENV}='4' with {COUNT_ENV}='4': I must lie in 0..3 for N = 4"
    )
    with pytest.raises(ValueError, match=f"{INDEX_ENV} is set but {COUNT_ENV} is not"):
        shard_from_env({INDEX_ENV: "0"})


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--streams", "0"], {}, "--streams is out of range"),
        ([], {INDEX_ENV: "1"}, f"{INDEX_ENV} is set but {COUNT_ENV} is not"),
        ([], {INDEX_ENV: "x", COUNT_ENV: "2"}, "expected I/N"),
    ],
)
def test_usage_errors_stop_before_anything_is_read(
    args: list[str],
    env: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in (INDEX_ENV, COUNT_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # Nothing is created or read: neither path exists.
    assert main(["/nonexistent/in", "--out", "/nonexistent/out", *args]) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_the_flag_beats_the_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Broken variables do not matter when --shard is given: the run gets as far as the
    # inputs, which are missing.
    monkeypatch.setenv(INDEX_ENV, "9")
    monkeypatch.setenv(COUNT_ENV, "2")
    out = tmp_path / "out"
    assert main([str(tmp_path / "missing"), "--out", str(out), "--shard", "0/2"]) == EXIT_USAGE
    assert "no such file or directory" in capsys.readouterr().err


# --- the readers' share ------------------------------------------------------------------


def _corpus(root: Path) -> list[InputFile]:
    records = [json.dumps({"id": f"r{i}", "text": f"record {i}", "n": i}) for i in range(40)]
    records += ["{not json", json.dumps({"id": "r0", "text": "a duplicate"})]
    (root / "a.jsonl").write_text("\n".join(records) + "\n")
    pq.write_table(
        pa.table({"id": [f"p{i}" for i in range(20)], "text": ["row"] * 20}), root / "b.parquet"
    )
    for i in range(10):
        (root / f"note-{i}.md").write_text(f"# Note {i}")
    (root / "broken.pdf").write_bytes(b"not a pdf")  # reported by its owner only
    files, _ = discover([root])
    return files


def test_shards_read_disjoint_shares_that_make_up_the_corpus(tmp_path: Path) -> None:
    files = _corpus(tmp_path)
    whole_failures: list[Failure] = []
    whole = [d.id for d in Reader(files, Fields(), set(), whole_failures.append)]
    shares: list[list[str]] = []
    failures: list[Failure] = []
    for i in range(3):
        shard = Shard(i, 3)
        own: list[Failure] = []
        share = [d.id for d in Reader(files, Fields(), set(), own.append, shard)]
        assert all(shard.owns(doc_id) for doc_id in share)
        scan = prescan(files, Fields(), set(), shard)
        assert scan.todo == scan.records == len(share) + len(own)  # progress counts the share
        assert scan.metadata.fields() == prescan(files, Fields(), set()).metadata.fields()
        shares.append(share)
        failures += own
    assert sorted(id for share in shares for id in share) == sorted(whole)
    assert len(whole) == 40 + 20 + 10
    key = lambda f: (f.source, f.line, f.code)  # noqa: E731
    assert sorted(map(key, failures)) == sorted(map(key, whole_failures))
    assert {f.code for f in failures} == {"MALFORMED", "DUPLICATE_ID", "UNREADABLE"}


def test_a_resumed_shard_skips_its_complete_documents(tmp_path: Path) -> None:
    files = _corpus(tmp_path)
    shard = Shard(1, 2)
    share = [d.id for d in Reader(files, Fields(), set(), lambda _: None, shard)]
    done = set(share[:5])
    reader = Reader(files, Fields(), done, lambda _: None, shard)
    assert [d.id for d in reader] == share[5:] and reader.skipped == 5
    assert (
        prescan(files, Fields(), done, shard).todo
        == prescan(files, Fields(), set(), shard).todo - 5
    )


# --- shards side by side in one dataset ----------------------------------------------------


def _commit_one(dataset: Dataset, doc_id: str) -> Path:
    buffer = RowBuffer(OutputSchema.build(_settings(), {}, True))
    buffer.add(Document(doc_id, "x", "s", None), _float32([0.5] * 8))
    return dataset.commit(buffer.table())


def test_shards_write_one_dataset_without_colliding(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    first, second = Dataset(out, Shard(0, 2)), Dataset(out, Shard(1, 2))
    first.open()
    second.open()  # at the same time: each holds its own lock
    with pytest.raises(FatalError, match="a run of shard 1/2 is writing"):
        Dataset(out, Shard(1, 2)).open()
    with pytest.raises(FatalError, match="another embed-files run is writing"):
        Dataset(out).open()  # the whole corpus would redo the shards' documents
    parts = [_commit_one(first, "a"), _commit_one(second, "b")]
    assert [p.name.split("-")[1] for p in parts] == ["shard0of2", "shard1of2"]
    (out / ".tmp-part-shard0of2-killed.parquet").write_bytes(b"half")
    (out / ".tmp-part-shard1of2-writing.parquet").write_bytes(b"half")
    first.close()
    again = Dataset(out, Shard(0, 2))
    again.open()  # its own leftovers go, the other shard's file being written stays
    assert not (out / ".tmp-part-shard0of2-killed.parquet").exists()
    assert (out / ".tmp-part-shard1of2-writing.parquet").exists()
    assert again.scan()[0] == {"a", "b"}
    again.close()
    second.close()
    whole = Dataset(out)
    whole.open()
    with pytest.raises(FatalError, match="a run of the whole corpus is writing"):
        Dataset(out, Shard(0, 2)).open()
    whole.close()
    assert sorted(pq.read_table(out).column("id").to_pylist()) == ["a", "b"]


def test_each_shard_has_its_own_errors_file_and_none_is_an_input(tmp_path: Path) -> None:
    out = tmp_path / "vecs.parquet"
    assert errors_path(out, Shard(2, 3)) == tmp_path / "vecs.errors.shard2of3.jsonl"
    assert errors_path(out) == tmp_path / "vecs.errors.jsonl"
    for shard in (WHOLE_CORPUS, Shard(0, 3), Shard(2, 3)):
        errors_path(out, shard).write_text("{}\n")
    (tmp_path / "data.jsonl").write_text('{"id": "a", "text": "x"}\n')
    files, _ = discover([tmp_path], exclude=[out], skip=lambda p: is_errors_file(out, p))
    assert [f.path.name for f in files] == ["data.jsonl"]

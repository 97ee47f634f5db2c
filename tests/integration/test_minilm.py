"""The bundled MiniLM through the real server and client, against a transformers reference."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from embedding.v1 import embedding_pb2 as pb
from embedding_client import EmbeddingClient
from tests.reference import minilm_reference
from tests.texts import TEXTS

# RPC and HTTP deadlines: only a hang reaches them, however loaded the machine.
PATIENCE_S = 600.0


def test_vectors_match_reference(minilm: EmbeddingClient, minilm_dir: Path) -> None:
    result = minilm.embed(TEXTS)
    expected = minilm_reference(minilm_dir, TEXTS)
    assert result.vectors.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(result.vectors, expected, atol=1e-4)
    assert result.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert result.prompt_tokens == sum(result.token_counts) > len(TEXTS)
    assert not any(result.truncated)


def test_batch_and_single_calls_agree(minilm: EmbeddingClient) -> None:
    together = minilm.embed(TEXTS).vectors
    alone = np.stack([minilm.embed([t]).vectors[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("dims", [32, 100, 384])
def test_matryoshka_slices_then_renormalizes(
    minilm: EmbeddingClient, minilm_dir: Path, dims: int
) -> None:
    got = minilm.embed(TEXTS[:4], dimensions=dims).vectors
    full = minilm_reference(minilm_dir, TEXTS[:4])[:, :dims]
    expected = full / np.linalg.norm(full, axis=1, keepdims=True)
    assert got.shape == (4, dims)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_unnormalized_vectors_keep_their_length(minilm: EmbeddingClient, minilm_dir: Path) -> None:
    raw = minilm.embed(TEXTS[:3], normalize=False).vectors
    norms = np.linalg.norm(raw, axis=1)
    assert np.all(np.abs(norms - 1.0) > 0.05), "raw mean-pooled vectors are not unit length"
    np.testing.assert_allclose(
        raw / norms[:, None], minilm_reference(minilm_dir, TEXTS[:3]), atol=1e-4
    )


def test_encodings_decode_to_the_float_vector(minilm: EmbeddingClient) -> None:
    exact = minilm.embed(TEXTS).vectors
    half = minilm.embed(TEXTS, encoding="float16")
    np.testing.assert_allclose(half.vectors, exact, atol=1e-3)
    assert len(half.response.embeddings[0].data) == 2 * 384

    q = minilm.embed(TEXTS, encoding="int8")
    scales = np.array([e.scale for e in q.response.embeddings])
    assert np.all(np.abs(q.vectors - exact) <= scales[:, None] / 2 + 1e-6)
    assert len(q.response.embeddings[0].data) == 384

    bits = minilm.embed(TEXTS, encoding="binary")
    assert len(bits.response.embeddings[0].data) == 384 // 8
    np.testing.assert_array_equal(bits.vectors, np.where(exact > 0, 1.0, -1.0))


def test_similarity_scores_are_reference_cosines(minilm: EmbeddingClient, minilm_dir: Path) -> None:
    queries, docs = TEXTS[:3], TEXTS[3:]
    ref_q, ref_d = minilm_reference(minilm_dir, queries), minilm_reference(minilm_dir, docs)
    expected = ref_q @ ref_d.T
    np.testing.assert_allclose(minilm.similarity(queries, docs).scores, expected, atol=1e-4)

    top = minilm.similarity(queries, docs, top_k=3).top_k
    for q, ranking in enumerate(top):
        best = np.argsort(-expected[q], kind="stable")[:3]
        assert [i for i, _ in ranking] == best.tolist()
        np.testing.assert_allclose([s for _, s in ranking], expected[q, best], atol=1e-4)


@pytest.mark.parametrize("items_per_message", [1, 64])
def test_stream_returns_every_id_once_with_its_vector(
    minilm: EmbeddingClient, items_per_message: int
) -> None:
    items = [(f"doc-{i}", TEXTS[i % len(TEXTS)] + f" #{i}") for i in range(200)]
    items.insert(50, ("empty", ""))
    results = list(minilm.embed_stream(items, items_per_message=items_per_message))
    by_id = {r.id: r for r in results}
    assert len(results) == len(items) == len(by_id)
    failed = by_id.pop("empty")
    assert (
        failed.error is not None and failed.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    )
    assert "input" in failed.error.message
    texts = [t for i, t in items if i != "empty"]
    expected = minilm.embed(texts).vectors
    got = np.stack([by_id[i].vector for i, _ in items if i != "empty"])  # type: ignore[misc]
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("items_per_message", [1, 64])
def test_stream_refuses_a_duplicate_id_in_flight(
    minilm: EmbeddingClient, items_per_message: int
) -> None:
    items = [("same", TEXTS[0]), ("same", TEXTS[1]), ("other", TEXTS[2])]
    results = list(minilm.embed_stream(items, items_per_message=items_per_message))
    assert len(results) == 3
    refused = [r for r in results if not r.ok]
    if items_per_message > 1:
        assert len(refused) == 1  # one message: the first "same" is surely still in flight
    # One per message: the second "same" may arrive after the first finished; both succeed.
    for r in refused:
        assert r.id == "same" and r.error is not None
        assert r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "already in flight" in r.error.message


def test_model_info(minilm: EmbeddingClient) -> None:
    info = minilm.model_info()
    assert info.dimension == info.max_dimensions == 384
    assert info.min_dimensions == 32
    assert info.max_input_tokens == 256
    assert info.pooling == "MEAN"
    assert info.dtype == "float32"
    assert info.instruction_template == ""
    assert info.limits.max_inputs_per_request == 2048
    assert info.limits.max_batch_tokens >= info.max_input_tokens


def _code_and_message(call: object) -> tuple[grpc.StatusCode, str]:
    assert isinstance(call, grpc.Call)
    return call.code(), call.details() or ""


@pytest.mark.parametrize(
    ("inputs", "options", "field", "words"),
    [
        ([], {}, "inputs", "at least one"),
        (["ok", ""], {}, "inputs[1]", "empty"),
        (["x"] * 2049, {}, "inputs", "2048"),
        (["ok"], {"dimensions": 16}, "options.dimensions", "32 to 384"),
        (["ok"], {"dimensions": 385}, "options.dimensions", "32 to 384"),
        (["ok"], {"instruction": "find"}, "options.instruction", "no instruction format"),
        (["ok"], {"prompt_name": "query"}, "options.prompt_name", "no prompt 'query'"),
        (["ok"], {"instruction": "a", "prompt_name": "b"}, "options.instruction", "exclusive"),
        (["ok"], {"truncate": 9}, "options.truncate", "unknown value 9"),
        (["ok"], {"encoding": 9}, "options.encoding", "unknown value 9"),
    ],
)
def test_bad_requests_name_the_field(
    minilm: EmbeddingClient,
    inputs: list[str],
    options: dict[str, int | str],
    field: str,
    words: str,
) -> None:
    stub = minilm._stub  # raw stub: the typed client cannot send unknown enum values
    request = pb.EmbedRequest(inputs=inputs, options=pb.EmbedOptions(**options))  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(request, timeout=PATIENCE_S)
    code, message = _code_and_message(caught.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith(field + ":") and words in message
    assert minilm.embed(["still serving"]).vectors.shape == (1, 384)


def test_a_repeated_embed_comes_from_the_vector_cache(
    minilm: EmbeddingClient, minilm_dir: Path
) -> None:
    stub = minilm._stub
    texts = ["The vector cache keys on token ids.", "No other test sends these two texts."]
    first = stub.Embed(pb.EmbedRequest(inputs=texts), timeout=PATIENCE_S)
    again = stub.Embed(pb.EmbedRequest(inputs=texts[::-1]), timeout=PATIENCE_S)
    assert (first.timing.cached, again.timing.cached) == (0, 2)
    assert [e.data for e in again.embeddings] == [e.data for e in first.embeddings][::-1]
    np.testing.assert_allclose(
        np.frombuffer(first.embeddings[0].data, "<f4"),
        minilm_reference(minilm_dir, texts[:1])[0],
        atol=1e-4,
    )
    # One entry (the raw vector) serves other dimensions too.
    small = stub.Embed(
        pb.EmbedRequest(inputs=texts[:1], options=pb.EmbedOptions(dimensions=64)),
        timeout=PATIENCE_S,
    )
    assert small.timing.cached == 1
    full = np.frombuffer(first.embeddings[0].data, "<f4")[:64]
    np.testing.assert_allclose(
        np.frombuffer(small.embeddings[0].data, "<f4"), full / np.linalg.norm(full), atol=1e-6
    )


def test_a_misspelt_vllm_arg_stops_the_server_before_the_engine_loads() -> None:
    import subprocess
    import sys

    flags = ["--port", "0", "--http-port", "0", "--metrics-port", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "service", *flags, "--vllm-args", "--quantizaton awq"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, done.stderr
    assert errors[0].endswith(
        "cannot start: --vllm-args: unrecognized arguments: --quantizaton awq"
        " (did you mean --quantization?)"
    )

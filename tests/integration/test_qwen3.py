"""A tiny Qwen3 built in a fixture: last-token pooling, instructions, truncation, Matryoshka.

Its window is Qwen3-Embedding's 32,768 tokens, so truncation is tested on a document of about
40,000 tokens, and each truncated vector is checked against a reference of the whole window.
The default policies at that window (gRPC refuses, HTTP cuts) are in test_qwen3_window.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from embedding_client import EmbeddingClient
from tests.models.tiny_qwen3 import MAX_POSITIONS
from tests.reference import last_token_reference, tokenize_for_reference
from tests.texts import TEXTS

DEFAULT_TASK = "Given a web search query, retrieve relevant passages that answer the query"
LIMIT = MAX_POSITIONS  # the tiny model's window: 32,768, as Qwen3-Embedding's


def _bare_ids(model_dir: Path, text: str) -> tuple[list[int], int]:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    assert eos is not None
    return tok.encode(text, add_special_tokens=False).ids, eos


def test_documents_match_last_token_reference(qwen: EmbeddingClient, qwen_dir: Path) -> None:
    result = qwen.embed(TEXTS)
    ids = tokenize_for_reference(qwen_dir, TEXTS)
    np.testing.assert_allclose(result.vectors, last_token_reference(qwen_dir, ids), atol=1e-4)
    assert result.token_counts == [len(i) for i in ids]


def test_instruction_is_formatted_the_qwen3_way(qwen: EmbeddingClient, qwen_dir: Path) -> None:
    task = "Given a question, find the passage that answers it"
    got = qwen.embed(TEXTS[:4], instruction=task).vectors
    formatted = [f"Instruct: {task}\nQuery:{t}" for t in TEXTS[:4]]
    expected = last_token_reference(qwen_dir, tokenize_for_reference(qwen_dir, formatted))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_query_prompt_name_uses_the_models_default_task(qwen: EmbeddingClient) -> None:
    by_prompt = qwen.embed(TEXTS[:3], prompt_name="query").vectors
    by_instruction = qwen.embed(TEXTS[:3], instruction=DEFAULT_TASK).vectors
    np.testing.assert_allclose(by_prompt, by_instruction, atol=1e-6)


@pytest.mark.parametrize("side", ["end", "start"])
def test_truncation_keeps_the_eos_token(
    qwen: EmbeddingClient, qwen_dir: Path, qwen_over_window: str, side: str
) -> None:
    long_text = qwen_over_window
    bare, eos = _bare_ids(qwen_dir, long_text)
    assert len(bare) > LIMIT
    kept = bare[: LIMIT - 1] if side == "end" else bare[-(LIMIT - 1) :]
    result = qwen.embed([long_text, TEXTS[0]], truncate=side)  # type: ignore[arg-type]
    expected = last_token_reference(qwen_dir, [[*kept, eos]])
    np.testing.assert_allclose(result.vectors[:1], expected, atol=1e-4)
    assert result.token_counts[0] == LIMIT and result.truncated == [True, False]


def test_truncation_from_the_start_keeps_the_instruction(
    qwen: EmbeddingClient, qwen_dir: Path, qwen_over_window: str
) -> None:
    task = "Find the passage"
    prefix = f"Instruct: {task}\nQuery:"
    long_text = qwen_over_window
    head, eos = _bare_ids(qwen_dir, prefix)
    body, _ = _bare_ids(qwen_dir, long_text)
    kept = [*head, *body[-(LIMIT - 1 - len(head)) :], eos]
    got = qwen.embed([long_text], instruction=task, truncate="start").vectors
    np.testing.assert_allclose(got, last_token_reference(qwen_dir, [kept]), atol=1e-4)


@pytest.mark.parametrize("dims", [32, 64, 127])
def test_matryoshka_dimensions(qwen: EmbeddingClient, qwen_dir: Path, dims: int) -> None:
    got = qwen.embed(TEXTS[:3], dimensions=dims).vectors
    ids = tokenize_for_reference(qwen_dir, TEXTS[:3])
    full = last_token_reference(qwen_dir, ids, normalize=False)[:, :dims]
    np.testing.assert_allclose(got, full / np.linalg.norm(full, axis=1, keepdims=True), atol=1e-4)


def test_similarity_applies_the_instruction_to_queries_only(
    qwen: EmbeddingClient, qwen_dir: Path
) -> None:
    task = "Find the passage"
    queries, docs = TEXTS[:2], TEXTS[2:6]
    q = last_token_reference(
        qwen_dir,
        tokenize_for_reference(qwen_dir, [f"Instruct: {task}\nQuery:{t}" for t in queries]),
    )
    d = last_token_reference(qwen_dir, tokenize_for_reference(qwen_dir, docs))
    got = qwen.similarity(queries, docs, instruction=task).scores
    np.testing.assert_allclose(got, q @ d.T, atol=1e-4)


def test_model_info_comes_from_the_model_files(qwen: EmbeddingClient) -> None:
    info = qwen.model_info()
    assert info.dimension == 128 and info.max_input_tokens == LIMIT
    assert info.pooling == "LAST"
    assert info.default_instruction == DEFAULT_TASK
    assert info.instruction_template == "Instruct: {instruction}\nQuery:"
    assert dict(info.prompts) == {"query": f"Instruct: {DEFAULT_TASK}\nQuery:", "document": ""}

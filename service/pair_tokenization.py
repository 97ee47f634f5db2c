"""(query, document) pairs as a cross-encoder reads them: token ids built in the service.

Two layouts, told apart from the model's files (detect_pair_format):

- CROSS_ENCODER (BERT, XLM-R, ...): the tokenizer's own pair template, `[CLS] q [SEP] d [SEP]`
  for BERT, `<s> q </s></s> d </s>` for XLM-R. The template is learned from the tokenizer's
  post-processor, and the ids equal what it builds for the pair.
- QWEN3_RERANKER: the prompt of Qwen3-Reranker's model card, a fixed prefix, then
  `<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {doc}`, then a fixed suffix. The
  model answers "yes" or "no" after it. The parts are tokenized separately at boundaries where
  Qwen's pre-tokenizer always splits, so the ids equal tokenizing the whole prompt (the tests
  check this on many texts).

Only the document is ever cut, from its end, so that the pair fits the window or a per-request
cap on the document's tokens; the query, the instruction and the template stay whole, and a
query that leaves no room for a document is refused.

Text from a request never becomes a special token: "[SEP]" or "<|im_end|>" inside a query or
document is tokenized as the characters it is. This keeps the layout (and the token types the
engine derives from the separator, see TokenTypeRule) exactly the template's, whatever the
texts hold; the model's own tokenizer would read such strings as control tokens.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, Unpack

from tokenizers import Tokenizer

from service.errors import INPUT_TOO_LONG, InvalidInputError
from service.tokenization import TokenizedInput


class PairFormat(enum.Enum):
    CROSS_ENCODER = "cross-encoder"  # the tokenizer's own pair template
    QWEN3_RERANKER = "qwen3-reranker"  # Qwen3-Reranker's prompt; scored as yes against no


# Qwen3-Reranker's model card (huggingface.co/Qwen/Qwen3-Reranker-0.6B), verbatim.
QWEN3_RERANKER_DEFAULT_INSTRUCTION = (
    "Given a web search query, retrieve relevant passages that answer the query"
)
QWEN3_RERANKER_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
QWEN3_RERANKER_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
# The tokens the yes/no head compares; each must be one token of the model's vocabulary.
QWEN3_RERANKER_TOKENS = ("no", "yes")


def qwen3_reranker_middle(instruction: str, query: str, document: str) -> str:
    """The model card's format_instruction: what goes between the prefix and the suffix."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def _is_sentence_transformers_embedder(model_dir: Path) -> bool:
    try:
        modules = json.loads((model_dir / "modules.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return False
    return isinstance(modules, list) and any(
        isinstance(m, dict) and str(m.get("type", "")).endswith("models.Pooling") for m in modules
    )


def detect_pair_format(model_dir: Path, forced: str = "auto") -> PairFormat:
    """How pairs are laid out for the model in `model_dir`.

    `forced` ("cross-encoder" or "qwen3-reranker") skips detection. Otherwise a Qwen3 model
    (config.json model_type "qwen3": the published Qwen3ForCausalLM checkpoints and their
    Qwen3ForSequenceClassification conversions) takes Qwen3-Reranker's prompt, and anything
    else the tokenizer's pair template. A Qwen3 folder with a sentence-transformers Pooling
    module is Qwen3-Embedding, not a reranker: ValueError (force the format to override).
    """
    if forced != "auto":
        try:
            return PairFormat(forced)
        except ValueError:
            choices = ", ".join(repr(f.value) for f in PairFormat)
            raise ValueError(f"unknown pair format {forced!r}; use 'auto', {choices}") from None
    config = _read_json(Path(model_dir) / "config.json")
    if config.get("model_type") != "qwen3":
        return PairFormat.CROSS_ENCODER
    if _is_sentence_transformers_embedder(Path(model_dir)):
        raise ValueError(
            f"{model_dir} is a Qwen3 embedding model (it has a sentence-transformers Pooling "
            "module), not a reranker"
        )
    return PairFormat.QWEN3_RERANKER


def single_token_id(tokenizer: Tokenizer, word: str) -> int | None:
    """The id of `word` when the tokenizer reads it as exactly one token, else None."""
    ids = tokenizer.encode(word, add_special_tokens=False).ids
    found = tokenizer.token_to_id(word)
    return found if found is not None and ids == [found] else None


def _load(tokenizer_file: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    # Some tokenizer.json files come with truncation or fixed padding configured; the ids
    # built here must be neither.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


@dataclass(frozen=True)
class PairTemplate:
    """The ids a tokenizer's post-processor puts around a pair: head q mid d tail; and
    around a single text, single_head q single_tail."""

    head: tuple[int, ...]
    mid: tuple[int, ...]
    tail: tuple[int, ...]
    single_head: tuple[int, ...]
    single_tail: tuple[int, ...]
    # Where token type 1 starts, counted from the first id of d (<= 0: in mid); None when
    # the template gives the pair no type 1 (XLM-R).
    type_one_from_d: int | None

    @property
    def special_count(self) -> int:
        return len(self.head) + len(self.mid) + len(self.tail)


def pair_template(tokenizer: Tokenizer) -> PairTemplate:
    """Learned by comparing a probe pair with and without the special tokens."""
    first = tokenizer.encode("first probe", add_special_tokens=False).ids
    second = tokenizer.encode("second probe", add_special_tokens=False).ids
    full = tokenizer.encode("first probe", "second probe", add_special_tokens=True)
    ids = full.ids
    single = tokenizer.encode("first probe", add_special_tokens=True).ids
    at = next((i for i in range(len(single)) if single[i : i + len(first)] == first), None)
    for a in range(len(ids) - len(first) + 1):
        if at is None or ids[a : a + len(first)] != first:
            continue
        after_a = a + len(first)
        for b in range(after_a, len(ids) - len(second) + 1):
            if ids[b : b + len(second)] == second:
                types = full.type_ids
                one = next((i for i, t in enumerate(types) if t == 1), None)
                return PairTemplate(
                    head=tuple(ids[:a]),
                    mid=tuple(ids[after_a:b]),
                    tail=tuple(ids[b + len(second) :]),
                    single_head=tuple(single[:at]),
                    single_tail=tuple(single[at + len(first) :]),
                    type_one_from_d=None if one is None else one - b,
                )
    raise ValueError("cannot tell how the tokenizer lays out a pair of texts")


@dataclass(frozen=True)
class TokenTypeRule:
    """Where token type 1 starts in a pair's ids: right after the `occurrence`-th (1-based)
    `separator` id. Text never yields special ids here (see the module's notes), so the
    separators in a pair's ids are exactly the template's."""

    separator: int
    occurrence: int

    def start(self, ids: Sequence[int]) -> int | None:
        """The position of the first type-1 token; None when `ids` hold no such separator
        (not a pair: everything is type 0)."""
        seen = 0
        for position, token in enumerate(ids):
            if token == self.separator:
                seen += 1
                if seen == self.occurrence:
                    return position + 1
        return None


def token_type_rule(tokenizer: Tokenizer) -> TokenTypeRule | None:
    """The rule for this tokenizer's pair template; None when pairs have no type 1.

    ValueError when type 1 does not start right after one of the template's special tokens
    (the position could then not be found from the ids alone).
    """
    template = pair_template(tokenizer)
    if template.type_one_from_d is None:
        return None
    # Ids of the template up to type 1's start, with no text: head, mid, then d's first ids.
    before = [*template.head, *template.mid]
    cut = len(before) + template.type_one_from_d
    specials = set(template.head) | set(template.mid) | set(template.tail)
    if not 0 < cut <= len(before) or before[cut - 1] not in specials:
        raise ValueError("token type 1 does not start after a special token of the template")
    separator = before[cut - 1]
    return TokenTypeRule(separator, before[:cut].count(separator))


class PairOptions(TypedDict, total=False):
    """What a rerank call may ask of the pairs (see PairTokenizer.pairs)."""

    instruction: str
    max_tokens_per_doc: int
    field_prefix: str


class PairTokenizer:
    """Builds the model inputs of (query, document) pairs; documents are cut, never refused."""

    def __init__(
        self,
        tokenizer_file: Path,
        max_tokens: int,
        pair_format: PairFormat,
        threads: int = 1,
        inline_chars: int = 0,
    ) -> None:
        self._fixed = _load(tokenizer_file)  # the template's own text: special tokens count
        self._text = _load(tokenizer_file)  # a request's text: special tokens are plain text
        self._text.encode_special_tokens = True
        self.max_tokens = max_tokens
        self.pair_format = pair_format
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pairs")
        self._inline_chars = inline_chars
        self._template: PairTemplate | None = None
        self._prefix: list[int] = []
        self._suffix: list[int] = []
        if pair_format is PairFormat.QWEN3_RERANKER:
            for word in QWEN3_RERANKER_TOKENS:
                if single_token_id(self._fixed, word) is None:
                    raise ValueError(f"the tokenizer has no single {word!r} token to score with")
            self._prefix = self._fixed.encode(QWEN3_RERANKER_PREFIX, add_special_tokens=False).ids
            self._suffix = self._fixed.encode(QWEN3_RERANKER_SUFFIX, add_special_tokens=False).ids
            self._check_prompt_split()
        else:
            self._template = pair_template(self._fixed)

    @property
    def default_instruction(self) -> str:
        """The instruction a pair gets when the request gives none ("": takes none)."""
        if self.pair_format is PairFormat.QWEN3_RERANKER:
            return QWEN3_RERANKER_DEFAULT_INSTRUCTION
        return ""

    async def pairs(
        self, query: str, documents: Sequence[str], **options: Unpack[PairOptions]
    ) -> list[TokenizedInput]:
        """One model input per document, in order; `truncated` says the document was cut.

        `instruction` replaces the model's default (Qwen3-Reranker); "" keeps it. A model
        without instructions refuses one. `max_tokens_per_doc` caps each document's tokens
        (0: only the window does). Errors are InvalidInputError naming
        f"{field_prefix}query", "...instruction" or "...max_tokens_per_doc".
        """
        work = functools.partial(self.pairs_sync, query, documents, **options)
        if len(query) + sum(map(len, documents)) <= self._inline_chars:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    def pairs_sync(
        self,
        query: str,
        documents: Sequence[str],
        *,
        instruction: str = "",
        max_tokens_per_doc: int = 0,
        field_prefix: str = "",
    ) -> list[TokenizedInput]:
        """`pairs`, on the calling thread."""
        if max_tokens_per_doc < 0:
            raise InvalidInputError(
                f"{field_prefix}max_tokens_per_doc",
                f"must be 0 (no cap) or positive, not {max_tokens_per_doc}",
            )
        if self.pair_format is PairFormat.QWEN3_RERANKER:
            return self._qwen3_pairs(
                query, documents, instruction, max_tokens_per_doc, field_prefix
            )
        if instruction:
            raise InvalidInputError(
                f"{field_prefix}instruction",
                "this reranker takes no instruction (only Qwen3-Reranker does)",
            )
        return self._template_pairs(query, documents, max_tokens_per_doc, field_prefix)

    def _template_pairs(
        self, query: str, documents: Sequence[str], cap: int, field_prefix: str
    ) -> list[TokenizedInput]:
        template = self._template
        assert template is not None
        q = self._text.encode(query, add_special_tokens=False).ids
        room = self.max_tokens - len(q) - template.special_count
        if room < 1:
            raise InvalidInputError(
                f"{field_prefix}query",
                f"query has {len(q)} tokens; with the model's {template.special_count} special "
                f"tokens it leaves no room for a document under the limit of {self.max_tokens} "
                "tokens",
                INPUT_TOO_LONG,
            )
        keep = min(room, cap) if cap else room
        before = [*template.head, *q, *template.mid]
        tail = list(template.tail)
        # An empty document is no second text: transformers (and so sentence-transformers
        # and vLLM) then encode the query alone.
        alone = [*template.single_head, *q, *template.single_tail]
        out = []
        for text, enc in zip(
            documents,
            self._text.encode_batch_fast(list(documents), add_special_tokens=False),
            strict=True,
        ):
            d = enc.ids
            if not text:
                out.append(TokenizedInput(list(alone), False))
            else:
                out.append(TokenizedInput(before + d[:keep] + tail, len(d) > keep))
        return out

    def _qwen3_pairs(
        self,
        query: str,
        documents: Sequence[str],
        instruction: str,
        cap: int,
        field_prefix: str,
    ) -> list[TokenizedInput]:
        head = self._qwen3_head(instruction or QWEN3_RERANKER_DEFAULT_INSTRUCTION, query)
        fixed = len(self._prefix) + len(self._suffix)
        room = self.max_tokens - fixed - len(head)
        if room < 1:
            n_query = len(self._text.encode(query, add_special_tokens=False).ids)
            around = fixed + len(head) - n_query
            if self.max_tokens - around < 1:
                raise InvalidInputError(
                    f"{field_prefix}instruction",
                    f"the instruction and the model's prompt take {around} tokens, leaving no "
                    f"room for a query and a document under the limit of {self.max_tokens}",
                    INPUT_TOO_LONG,
                )
            raise InvalidInputError(
                f"{field_prefix}query",
                f"query has {n_query} tokens; with the {around} tokens of the model's prompt "
                f"and instruction it leaves no room for a document under the limit of "
                f"{self.max_tokens} tokens",
                INPUT_TOO_LONG,
            )
        keep = min(room, cap) if cap else room
        before = self._prefix + head
        out = []
        for d in self._qwen3_documents(documents):
            out.append(TokenizedInput(before + d[:keep] + self._suffix, len(d) > keep))
        return out

    def _qwen3_head(self, instruction: str, query: str) -> list[int]:
        """The prompt's user part up to "<Document>:", which ends at a split: Qwen's
        pre-tokenizer never joins a colon with the space after it."""
        middle = qwen3_reranker_middle(instruction, query, "")
        return self._text.encode(middle.removesuffix(" "), add_special_tokens=False).ids

    def _qwen3_documents(self, documents: Sequence[str]) -> list[list[int]]:
        """Each document with the space before it, which joins its first word's token."""
        spaced = [" " + d for d in documents]
        return [e.ids for e in self._text.encode_batch_fast(spaced, add_special_tokens=False)]

    def _check_prompt_split(self) -> None:
        """The split tokenization must equal the whole prompt's; a tokenizer whose
        pre-tokenizer does not split where Qwen's does is refused at start."""
        probes = (("what is it?", "It is\n\n a  test."), ("x", ""), ("1", "  (2)"))
        for query, document in probes:
            whole = QWEN3_RERANKER_PREFIX + qwen3_reranker_middle(
                QWEN3_RERANKER_DEFAULT_INSTRUCTION, query, document
            )
            expected = self._fixed.encode(whole + QWEN3_RERANKER_SUFFIX, add_special_tokens=False)
            head = self._qwen3_head(QWEN3_RERANKER_DEFAULT_INSTRUCTION, query)
            split = self._prefix + head + self._qwen3_documents([document])[0] + self._suffix
            if split != expected.ids:
                raise ValueError(
                    "the tokenizer does not split Qwen3-Reranker's prompt where Qwen's does"
                )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

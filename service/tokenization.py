"""Tokenize in the service, with the model's fast tokenizer: long inputs off the event loop.

The batcher needs token counts before anything is batched, and sending token ids spares
vLLM's front end the work. Truncation is done here too, and always keeps the special
tokens the model adds (Qwen3 pools on the trailing <|endoftext|>; BERT models need
[CLS] ... [SEP]), and keeps an instruction prefix whole when cutting from the start.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

from tokenizers import Encoding, Tokenizer

from service.chunking import Chunker, ChunkSpec, Span
from service.errors import InputTooLongError, InvalidInputError

T = TypeVar("T")
log = logging.getLogger(__name__)


class Truncation(enum.Enum):
    REFUSE = "refuse"
    END = "end"
    START = "start"


@dataclass(frozen=True)
class TokenizedInput:
    ids: list[int]
    truncated: bool


@dataclass(frozen=True)
class ChunkedInput:
    """One text cut into chunks, each a whole model input, with its span in the text."""

    chunks: list[TokenizedInput]
    spans: list[Span]


@dataclass(frozen=True)
class TokenSpans:
    """What Tokenize answers for one text: the ids Embed would send, and where the tokens
    from the text sit in it (offsets[i] belongs to ids[text_start + i])."""

    ids: list[int]
    offsets: list[Span]
    text_start: int
    truncated: bool


def _special_tokens(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a single sequence.

    Learned by comparing a probe with and without special tokens, so it works for any
    template (BERT's [CLS] $A [SEP], Qwen3's $A <|endoftext|>, ...).
    """
    bare = tokenizer.encode("probe text", add_special_tokens=False).ids
    full = tokenizer.encode("probe text", add_special_tokens=True).ids
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise ValueError("cannot tell where the tokenizer puts its special tokens")


class TextTokenizer:
    def __init__(
        self, tokenizer_file: Path, max_tokens: int, threads: int, inline_chars: int = 0
    ) -> None:
        self._tok = Tokenizer.from_file(str(tokenizer_file))
        # Some models ship tokenizer.json with truncation and fixed padding configured
        # (MiniLM: 128). Either would silently change vectors, so both are turned off.
        self._tok.no_truncation()
        self._tok.no_padding()
        self._head, self._tail = _special_tokens(self._tok)
        self._chunker = Chunker(self._tok)
        self.max_tokens = max_tokens
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenize")
        # Handing work to a thread costs the event loop about as much as tokenizing a
        # sentence, so calls with at most this many characters are tokenized inline.
        self._inline_chars = inline_chars

    @property
    def special_count(self) -> int:
        return len(self._head) + len(self._tail)

    @property
    def vocab_size(self) -> int:
        """Ids below this are the tokenizer's (added tokens included)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def from_ids(
        self, inputs: Sequence[Sequence[int]], truncation: Truncation, field: str
    ) -> list[TokenizedInput]:
        """Token-id inputs, checked: non-empty, inside the vocabulary, within the window.

        They are the model's input as given. Truncation keeps the special tokens the
        tokenizer would have put at either end, where the input has them.
        """
        vocab = self.vocab_size
        out = []
        for i, given in enumerate(inputs):
            name = f"{field}[{i}]"
            ids = list(given)
            if not ids:
                raise InvalidInputError(name, "has no token ids")
            if max(ids) >= vocab or min(ids) < 0:
                bad = next(n for n, t in enumerate(ids) if not 0 <= t < vocab)
                raise InvalidInputError(
                    name,
                    f"token id {ids[bad]} at position {bad} is outside the model's vocabulary "
                    f"of {vocab} ids",
                )
            truncated = len(ids) > self.max_tokens
            if truncated:
                ids = self._truncate_ids(ids, truncation, name)
            out.append(TokenizedInput(ids, truncated))
        return out

    async def tokenize_each(
        self,
        texts: Sequence[str],
        prefix: str,
        truncation: Truncation,
        field: str,
        indexed: bool = True,
        *,
        limit: int = 0,
    ) -> list[TokenizedInput | InvalidInputError]:
        """Independent texts (stream items): each comes back tokenized or as its error.

        `limit` caps an input's tokens below the window (special tokens included); 0: none.
        """
        if sum(map(len, texts)) + len(prefix) * len(texts) <= self._inline_chars:
            return self._each(texts, prefix, truncation, field, indexed, limit=limit)
        loop = asyncio.get_running_loop()
        each = functools.partial(self._each, limit=limit)
        return await loop.run_in_executor(
            self._pool, each, texts, prefix, truncation, field, indexed
        )

    async def chunk_each(
        self, texts: Sequence[str], prefix: str, spec: ChunkSpec
    ) -> list[ChunkedInput | InvalidInputError]:
        """Each text as chunks that fit `spec`. A text that fits is one chunk spanning all
        of it; nothing is refused for its length."""
        if sum(map(len, texts)) + len(prefix) * len(texts) <= self._inline_chars:
            return self._chunk_each(texts, prefix, spec)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._chunk_each, texts, prefix, spec)

    async def spans(
        self, texts: Sequence[str], prefix: str, truncation: Truncation, field: str
    ) -> list[TokenSpans]:
        """Tokenize's answer: the ids `tokenize` gives, with the texts' token offsets."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._spans, texts, prefix, truncation, field)

    def tokenize_sync(
        self, texts: Sequence[str], prefix: str, truncation: Truncation, field: str
    ) -> list[TokenizedInput]:
        """All texts of one request, on the calling thread; the first bad one fails them all.

        `field` names the texts in errors: "inputs[3]", or "input" when not indexed.
        """
        return all_or_raise(self._each(texts, prefix, truncation, field, indexed=True))

    def _each(
        self,
        texts: Sequence[str],
        prefix: str,
        truncation: Truncation,
        field: str,
        indexed: bool,
        *,
        limit: int = 0,
    ) -> list[TokenizedInput | InvalidInputError]:
        limit = min(limit or self.max_tokens, self.max_tokens)
        budget = limit - self.special_count
        if budget < 1:
            error = InvalidInputError(
                field,
                f"a limit of {limit} tokens leaves no room for text beside the model's "
                f"{self.special_count} special tokens",
            )
            return [error] * len(texts)
        full = [prefix + t for t in texts] if prefix else list(texts)
        # encode_batch_fast skips offsets; they are only needed for the rare long input.
        encodings = self._tok.encode_batch_fast(full, add_special_tokens=False)
        out: list[TokenizedInput | InvalidInputError] = []
        for i, enc in enumerate(encodings):
            ids = enc.ids
            truncated = len(ids) > budget
            if truncated:
                name = f"{field}[{i}]" if indexed else field
                try:
                    ids = self._truncate(full[i], len(prefix), budget, truncation, name)
                except InvalidInputError as exc:
                    out.append(exc)
                    continue
                # Never silent to an operator: the metric counts it, this line names it.
                log.debug(
                    "%s: %d tokens cut to %d (truncate %s)",
                    name,
                    len(enc.ids) + self.special_count,
                    limit,
                    truncation.value,
                )
            out.append(TokenizedInput(self._head + ids + self._tail, truncated))
        return out

    def _chunk_each(
        self, texts: Sequence[str], prefix: str, spec: ChunkSpec
    ) -> list[ChunkedInput | InvalidInputError]:
        budget = spec.max_tokens - self.special_count
        n_prefix = len(self._tok.encode(prefix, add_special_tokens=False).ids) if prefix else 0
        # The splitter counts a chunk's text alone; laid after the prefix, its first token
        # may come out differently, so one token of slack.
        room = budget - n_prefix - (1 if prefix else 0)
        if room < 1:
            error = InvalidInputError(
                f"{spec.field}.max_tokens",
                f"{spec.max_tokens} leaves no room for text after the "
                f"{n_prefix + self.special_count} tokens of the instruction and special tokens",
            )
            return [error] * len(texts)
        overlap = max(min(spec.overlap_tokens, room // 2 - 1), 0)
        full = [prefix + t for t in texts] if prefix else list(texts)
        encodings = self._tok.encode_batch_fast(full, add_special_tokens=False)
        out: list[ChunkedInput | InvalidInputError] = []
        for text, enc in zip(texts, encodings, strict=True):
            if len(enc.ids) <= budget:
                whole = TokenizedInput(self._head + enc.ids + self._tail, False)
                out.append(ChunkedInput([whole], [(0, len(text))]))
                continue
            cuts = self._chunker.spans(text, room, overlap) or [((0, len(text)), 0)]
            spans = [span for span, _ in cuts]
            pieces = [prefix + text[start:end] for start, end in spans]
            chunks = []
            encoded = self._tok.encode_batch_fast(pieces, add_special_tokens=False)
            for k, piece in enumerate(encoded):
                ids = piece.ids
                if len(ids) > budget and cuts[k][1] != spans[k][0]:
                    # Over by a token at a boundary: this one goes without its overlap.
                    spans[k] = (cuts[k][1], spans[k][1])
                    again = prefix + text[spans[k][0] : spans[k][1]]
                    ids = self._tok.encode(again, add_special_tokens=False).ids
                # Only a span the splitter could not cut (whitespace it trims) is still over.
                chunks.append(
                    TokenizedInput(self._head + ids[:budget] + self._tail, len(ids) > budget)
                )
            out.append(ChunkedInput(chunks, spans))
        return out

    def _spans(
        self, texts: Sequence[str], prefix: str, truncation: Truncation, field: str
    ) -> list[TokenSpans]:
        budget = self.max_tokens - self.special_count
        out = []
        for i, (text, enc) in enumerate(
            zip(
                texts,
                self._tok.encode_batch([prefix + t for t in texts], add_special_tokens=False),
                strict=True,
            )
        ):
            # Offsets are code points into prefix + text, as Python indexes it.
            n_prefix = sum(1 for start, _ in enc.offsets if start < len(prefix)) if prefix else 0
            ids, offsets = enc.ids, enc.offsets
            # Over the window with truncation refused, Embed would refuse the text; its ids
            # come back whole, which is what a caller counting or chunking by itself needs.
            truncated = len(ids) > budget and truncation is not Truncation.REFUSE
            if truncated:
                kept = self._truncate(
                    prefix + text, len(prefix), budget, truncation, f"{field}[{i}]"
                )
                if truncation is Truncation.END:
                    offsets = offsets[: len(kept)]
                else:
                    offsets = offsets[:n_prefix] + offsets[len(ids) - (len(kept) - n_prefix) :]
                ids = kept
            shift = len(prefix)
            spans = [(start - shift, end - shift) for start, end in offsets[n_prefix:]]
            out.append(
                TokenSpans(
                    self._head + ids + self._tail, spans, len(self._head) + n_prefix, truncated
                )
            )
        return out

    def _truncate(
        self, text: str, prefix_chars: int, budget: int, truncation: Truncation, name: str
    ) -> list[int]:
        enc: Encoding = self._tok.encode(text, add_special_tokens=False)
        if truncation is Truncation.REFUSE:
            limit = budget + self.special_count
            raise InputTooLongError(name, len(enc.ids) + self.special_count, limit)
        if truncation is Truncation.END:
            return enc.ids[:budget]
        # From the start: keep the instruction prefix and the end of the text.
        n_prefix = sum(1 for start, _ in enc.offsets if start < prefix_chars)
        if n_prefix >= budget:
            raise InvalidInputError(
                name,
                f"the instruction alone takes {n_prefix + self.special_count} tokens, "
                f"leaving no room under the limit of {budget + self.special_count}",
            )
        return enc.ids[:n_prefix] + enc.ids[len(enc.ids) - (budget - n_prefix) :]

    def _truncate_ids(self, ids: list[int], truncation: Truncation, name: str) -> list[int]:
        if truncation is Truncation.REFUSE:
            raise InputTooLongError(name, len(ids), self.max_tokens)
        head = self._head if ids[: len(self._head)] == self._head else []
        tail = self._tail if self._tail and ids[-len(self._tail) :] == self._tail else []
        body = ids[len(head) : len(ids) - len(tail)]
        keep = self.max_tokens - len(head) - len(tail)
        body = body[:keep] if truncation is Truncation.END else body[len(body) - keep :]
        return head + body + tail

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def all_or_raise(items: Sequence[T | InvalidInputError]) -> list[T]:
    """The items, or the first error among them raised: a request fails as a whole."""
    for item in items:
        if isinstance(item, InvalidInputError):
            raise item
    return cast(list[T], list(items))

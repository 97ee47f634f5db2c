"""Where long texts are cut into chunks: spans that each fit a token budget.

The splitting itself is semantic-text-splitter's (Rust, counting with the model's own
tokenizer): it prefers paragraph, then sentence, then word boundaries to cutting inside a
word. Measured against semchunk on the benchmark corpus it made fewer chunks for the same
budget and releases the GIL while it works, so it runs on the tokenizer threads.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass

from semantic_text_splitter import TextSplitter
from tokenizers import Tokenizer

Span = tuple[int, int]  # [start, end) in code points: text[start:end] is the chunk


@dataclass(frozen=True)
class ChunkSpec:
    """A call's chunking: chunks of at most `max_tokens` tokens (prefix and special tokens
    included), consecutive ones sharing about `overlap_tokens`. `field` names the option
    in errors ("options.chunking")."""

    max_tokens: int
    overlap_tokens: int
    field: str


# Splitters are cheap to keep and a few ms to build; calls reuse a handful of sizes.
_KEPT_SPLITTERS = 16


class Chunker:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._splitters: OrderedDict[tuple[int, int], TextSplitter] = OrderedDict()
        self._lock = threading.Lock()  # splitters are built from several tokenizer threads

    def spans(self, text: str, capacity: int, overlap: int) -> list[tuple[Span, int]]:
        """Spans of `text` of about `capacity` tokens each (counted without special tokens),
        each after the first reaching back about `overlap` tokens into its predecessor;
        with each span, where it starts without that overlap.

        The splitter overlaps chunks only with whole units of the level it cut at, so text
        of sentences longer than `overlap` would get none. So it cuts with room for the
        overlap, and each chunk is then extended back by `overlap` tokens of the text,
        moved forward to the next word start so no word is cut.
        """
        core = capacity - overlap - (1 if overlap else 0)  # one token for boundary merges
        cuts = [
            (start, start + len(piece))
            for start, piece in self._splitter(core, 0).chunk_indices(text)
        ]
        if not overlap or len(cuts) < 2:
            return [(cut, cut[0]) for cut in cuts]
        starts = [
            start for start, _ in self._tokenizer.encode(text, add_special_tokens=False).offsets
        ]
        out = [(cuts[0], cuts[0][0])]
        for (previous, _), (start, end) in itertools.pairwise(cuts):
            first = bisect.bisect_left(starts, start)
            reach = starts[max(first - overlap, 0)]
            # Forward to the next word start where the reach has whitespace in it; text
            # without (CJK) is cut at a token boundary, which is a character boundary there.
            space = next((i for i in range(reach, start) if text[i].isspace()), None)
            if space is not None and reach > 0 and not text[reach - 1].isspace():
                reach = space
            while reach < start and text[reach].isspace():
                reach += 1
            # Never back to where the previous chunk starts: spans stay in order.
            out.append(((reach if reach > previous else start, end), start))
        return out

    def _splitter(self, capacity: int, overlap: int) -> TextSplitter:
        key = (capacity, overlap)
        with self._lock:
            splitter = self._splitters.get(key)
            if splitter is None:
                splitter = TextSplitter.from_huggingface_tokenizer(
                    self._tokenizer, capacity, overlap=overlap, trim=True
                )
                self._splitters[key] = splitter
                if len(self._splitters) > _KEPT_SPLITTERS:
                    self._splitters.popitem(last=False)
            else:
                self._splitters.move_to_end(key)
            return splitter

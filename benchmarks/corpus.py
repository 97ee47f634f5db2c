"""The benchmark corpus: real prose from the documentation already on this machine.

The text comes from the long descriptions (README files) of the Python distributions
installed next to the service. The versions are pinned, so every machine that ran
`make install` builds the same corpus. Code blocks, tables, link targets and markup are
stripped; what is left is split into paragraphs, and a paragraph is kept only when none of
its sentences appeared before (READMEs repeat badges, install lines and licence text).

Two kinds of text come out:
- paragraphs of 15 to 120 words (about 20 to 200 tokens), as documents;
- query-length fragments of 6 to 20 words, cut from sentences of those paragraphs.
"""

from __future__ import annotations

import json
import random
import re
import sysconfig
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

MIN_PARAGRAPH_WORDS = 15
MAX_PARAGRAPH_WORDS = 120
MAX_PARAGRAPH_CHARS = 800  # keeps paragraphs under about 200 tokens
QUERY_WORDS = (6, 20)

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")  # markdown [text](url) and images
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_*")  # rst `text <url>`_
_URL = re.compile(r"https?://\S+")
_TAG = re.compile(r"<[^>]+>")
_MARKUP = re.compile(r"[`*_]{1,3}|:[a-z]+:(?=`)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Corpus:
    """Named kinds of text; `short` is the kind interactive callers send, `long` bulk's."""

    kinds: dict[str, list[str]]
    short: str = "queries"
    long: str = "paragraphs"

    def save(self, path: Path) -> None:
        body = {"short": self.short, "long": self.long, "kinds": self.kinds}
        path.write_text(json.dumps(body, ensure_ascii=False), "utf-8")

    @classmethod
    def load(cls, path: Path) -> Corpus:
        body = json.loads(path.read_text("utf-8"))
        return cls(kinds=body["kinds"], short=body["short"], long=body["long"])


def _descriptions() -> list[tuple[str, str]]:
    """(distribution name, long description) for every installed distribution, sorted.

    Only site-packages is searched: what else is on sys.path depends on what was imported
    before (setuptools puts its vendored packages there), and the corpus must not.
    """
    found: dict[str, str] = {}
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    for dist in metadata.distributions(path=site):
        name = (dist.metadata["Name"] or "").lower()
        text = dist.read_text("METADATA") or ""
        # The long description follows the headers, after the first blank line.
        body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
        if name and body.strip():
            found[name] = body
    return sorted(found.items())


def _blocks(document: str) -> list[str]:
    """Prose blocks: blank-line separated, without code, tables, headings or directives."""
    blocks: list[str] = []
    current: list[str] = []
    in_fence = False
    for line in document.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            current = []
            continue
        stripped = line.strip()
        code_like = line.startswith(("    ", "\t")) or stripped.startswith(
            ("|", "+-", "..", ">>>", "$ ", "#", "=", "-" * 3, "<", "{", "[!")
        )
        if in_fence or not stripped or code_like:
            if current:
                blocks.append(" ".join(current))
            current = []
            continue
        current.append(stripped.removeprefix("- ").removeprefix("* "))
    if current:
        blocks.append(" ".join(current))
    return blocks


def _clean(block: str) -> str:
    text = _LINK.sub(r"\1", block)
    text = _RST_LINK.sub(r"\1", text)
    text = _URL.sub("", text)
    text = _TAG.sub("", text)
    text = _MARKUP.sub("", text)
    return _SPACE.sub(" ", text).strip()


def _is_prose(text: str) -> bool:
    words = text.split()
    if (
        len(text) > MAX_PARAGRAPH_CHARS
        or not MIN_PARAGRAPH_WORDS <= len(words) <= MAX_PARAGRAPH_WORDS
    ):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters / len(text) > 0.85 and text[-1] in ".!?:)"


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if s]


def build(paragraphs: int = 3000, queries: int = 3000, seed: int = 0) -> Corpus:
    """Up to `paragraphs` documents and `queries` fragments, shuffled with `seed`."""
    seen_sentences: set[str] = set()
    docs: list[str] = []
    for _, description in _descriptions():
        for block in _blocks(description):
            text = _clean(block)
            if not _is_prose(text):
                continue
            sentences = [s.lower() for s in _sentences(text)]
            keys = set(sentences)
            if len(keys) < len(sentences) or keys & seen_sentences:
                continue
            seen_sentences |= keys
            docs.append(text)

    rng = random.Random(seed)
    rng.shuffle(docs)
    fragments: list[str] = []
    seen_fragments: set[str] = set()
    for doc in docs:
        for sentence in _sentences(doc):
            words = sentence.split()
            if len(words) < QUERY_WORDS[0]:
                continue
            fragment = " ".join(words[: rng.randint(*QUERY_WORDS)])
            if fragment.lower() not in seen_fragments:
                seen_fragments.add(fragment.lower())
                fragments.append(fragment)
    rng.shuffle(fragments)
    return Corpus({"queries": fragments[:queries], "paragraphs": docs[:paragraphs]})


if __name__ == "__main__":
    corpus = build()
    for name, texts in corpus.kinds.items():
        words = sorted(len(t.split()) for t in texts)
        print(f"{name}: {len(texts)}, words median {words[len(words) // 2]}, max {words[-1]}")
        for text in texts[:3]:
            print("   ", text[:160])

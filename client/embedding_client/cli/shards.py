"""Sharding a corpus over workers: `--shard I/N`, or a Kubernetes Indexed Job's variables.

A document belongs to shard `blake2b(id) mod N`: every worker reads the same inputs and
keeps its own share, so the split depends on nothing that can differ between pods (listing
order, file sizes, which pod started first), only on the document ids. A bad record that
has no id is assigned by its place (`source:line`), so exactly one worker reports it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

# Set by Kubernetes on every pod of an Indexed Job; JOB_COMPLETIONS is set by the manifest
# (Kubernetes does not pass spec.completions down), so the two must agree.
INDEX_ENV = "JOB_COMPLETION_INDEX"
COUNT_ENV = "JOB_COMPLETIONS"


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"N must be at least 1, not {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"I must lie in 0..{self.count - 1} for N = {self.count}")

    @property
    def whole(self) -> bool:
        return self.count == 1

    @property
    def tag(self) -> str:
        """What names this shard's files in the output ("" for the whole corpus)."""
        return "" if self.whole else f"shard{self.index}of{self.count}"

    def owns(self, key: str) -> bool:
        """Whether the document with this id (or the bad record at `source:line`) is ours."""
        return self.whole or bucket(key, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE_CORPUS = Shard()


def bucket(key: str, count: int) -> int:
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def parse_shard(text: str) -> Shard:
    """`I/N` with 0 <= I < N; ValueError says what is wrong."""
    index, sep, count = text.partition("/")
    if not (sep and index.strip().isdigit() and count.strip().isdigit()):
        raise ValueError(f"expected I/N (such as 0/4), not {text!r}")
    return Shard(int(index), int(count))


def shard_from_env(env: Mapping[str, str]) -> Shard:
    """The shard of an Indexed Job's pod, or the whole corpus outside one."""
    index, count = env.get(INDEX_ENV, "").strip(), env.get(COUNT_ENV, "").strip()
    if not index and not count:
        return WHOLE_CORPUS
    if not index or not count:
        present, missing = (INDEX_ENV, COUNT_ENV) if index else (COUNT_ENV, INDEX_ENV)
        raise ValueError(
            f"{present} is set but {missing} is not: an Indexed Job's pod needs both "
            f"({COUNT_ENV} equal to the Job's spec.completions), or pass --shard I/N"
        )
    try:
        return parse_shard(f"{index}/{count}")
    except ValueError as err:
        raise ValueError(f"{INDEX_ENV}={index!r} with {COUNT_ENV}={count!r}: {err}") from err

"""Optional API keys, shared by both faces: loading them and checking a presented key.

Keys are compared as SHA-256 digests with hmac.compare_digest, against every configured key
without stopping at the first match, so timing reveals neither a key nor which one matched.
Keys never appear in logs or error messages.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

# What a caller without a valid key is told (it names the ways to send one, never a key).
MISSING_KEY_MESSAGE = (
    "missing or invalid API key: send 'authorization: Bearer <key>' or 'x-api-key: <key>'"
)


def load_keys(inline: str, file: str) -> list[str]:
    """Keys from a comma-separated setting and/or a file with one key per line (# comments)."""
    keys = [k.strip() for k in inline.split(",")]
    if file:
        lines = Path(file).read_text(encoding="utf-8").splitlines()
        keys += [line.strip() for line in lines if not line.lstrip().startswith("#")]
    return [k for k in keys if k]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def presented_key(headers: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The key from `authorization: Bearer <key>` or `x-api-key: <key>` (lower-case names)."""
    for name, value in headers or ():
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if name == "x-api-key":
            return text
        if name == "authorization" and text[:7].lower() == "bearer ":
            return text[7:]
    return ""


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys]
        if not self._digests:
            raise ValueError("ApiKeys needs at least one key")

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, key: str) -> bool:
        candidate = _digest(key)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(candidate, digest)
        return matched and bool(key)

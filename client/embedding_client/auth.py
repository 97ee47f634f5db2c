"""API keys: how the clients and embed-files present one to a server started with --api-keys.

The server reads `authorization: Bearer <key>` (or `x-api-key: <key>`) on every embedding RPC;
health and reflection stay open. The clients send the bearer form on every call, streams
included. The key is never part of an error message or a repr.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

# One variable for the library and embed-files (the server's own is EMBED_API_KEYS, plural).
API_KEY_ENV = "EMBED_API_KEY"

# The metadata names the server reads a key from (gRPC metadata names are lower case).
_KEY_HEADERS = frozenset({"authorization", "x-api-key"})


def resolve_api_key(api_key: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The key to send: `api_key` when given (an empty string sends none), else
    $EMBED_API_KEY, else none (""). Surrounding whitespace is dropped, as the server drops
    it from its own keys."""
    if api_key is None:
        api_key = (os.environ if environ is None else environ).get(API_KEY_ENV, "")
    key = api_key.strip()
    # gRPC metadata values are printable ASCII; anything else would fail every call with an
    # obscure "metadata was invalid" instead of here.
    if not all(" " <= c <= "~" for c in key):
        raise ValueError("the API key must be printable ASCII (it travels as gRPC metadata)")
    return key


def auth_metadata(
    metadata: Sequence[tuple[str, str]],
    api_key: str | None,
    environ: Mapping[str, str] | None = None,
) -> tuple[tuple[str, str], ...]:
    """`metadata` plus `authorization: Bearer <key>` for the key resolve_api_key picks.

    A key already in `metadata` (authorization or x-api-key) is kept as it is: it beats
    $EMBED_API_KEY, and passing it together with `api_key` is refused as ambiguous.
    """
    given = tuple(metadata)
    if any(name.lower() in _KEY_HEADERS for name, _ in given):
        if api_key:
            raise ValueError("pass the API key as api_key or in metadata, not both")
        return given
    key = resolve_api_key(api_key, environ)
    return (*given, ("authorization", f"Bearer {key}")) if key else given

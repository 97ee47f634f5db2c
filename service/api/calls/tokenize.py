"""Tokenize: the ids the embedding model would read for each text, with their character
spans, after the instruction or prompt and any truncation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.api.runtime import Runtime
from service.api.validation import RequestOptions
from service.tokenization import TokenSpans


@dataclass(frozen=True)
class TokenizeCall:
    texts: Sequence[str]
    options: RequestOptions
    field: str = "inputs"
    options_field: str = "options"
    model: str | None = None


@dataclass(frozen=True)
class TokenizeAnswer:
    results: list[TokenSpans]
    model: str


async def tokenize(rt: Runtime, call: TokenizeCall) -> TokenizeAnswer:
    model = rt.embedding_for(call.model)
    rt.validator.texts(call.texts, call.field)
    spec = rt.validator.options(call.options, prefix=call.options_field)
    results = await model.embedder.tokenize(call.texts, spec, call.field)
    return TokenizeAnswer(results, model.name)

"""Check requests and turn wire options into an EmbedSpec; errors name the field and the limit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from embedding.v1 import embedding_pb2 as pb
from service.errors import InvalidInputError
from service.model_card import ModelCard
from service.pipeline import EmbedSpec
from service.postprocess import Encoding
from service.tokenization import Truncation

_TRUNCATION = {
    pb.TRUNCATE_UNSPECIFIED: Truncation.REFUSE,
    pb.TRUNCATE_REFUSE: Truncation.REFUSE,
    pb.TRUNCATE_END: Truncation.END,
    pb.TRUNCATE_START: Truncation.START,
}
_ENCODING = {
    pb.ENCODING_UNSPECIFIED: Encoding.FLOAT32,
    pb.ENCODING_FLOAT32: Encoding.FLOAT32,
    pb.ENCODING_FLOAT16: Encoding.FLOAT16,
    pb.ENCODING_INT8: Encoding.INT8,
    pb.ENCODING_BINARY: Encoding.BINARY,
}


@dataclass(frozen=True)
class RequestLimits:
    max_inputs: int
    max_input_chars: int
    min_dimensions: int
    dimension: int


class RequestValidator:
    def __init__(self, card: ModelCard, limits: RequestLimits) -> None:
        self._card = card
        self._limits = limits

    @property
    def max_inputs(self) -> int:
        return self._limits.max_inputs

    def texts(self, texts: Sequence[str], field: str, allow_empty_list: bool = False) -> None:
        """The list itself and each text: count, emptiness, characters."""
        limit = self._limits.max_inputs
        if not texts and not allow_empty_list:
            raise InvalidInputError(field, "at least one text is required")
        if len(texts) > limit:
            raise InvalidInputError(
                field, f"{len(texts)} texts exceed the limit of {limit} per request"
            )
        for i, text in enumerate(texts):
            self.text(text, f"{field}[{i}]")

    def text(self, text: str, field: str) -> None:
        if not text:
            raise InvalidInputError(field, "text is empty")
        if len(text) > self._limits.max_input_chars:
            raise InvalidInputError(
                field,
                f"{len(text)} characters exceed the limit of {self._limits.max_input_chars}",
            )

    def options(self, opts: pb.EmbedOptions, field: str = "options") -> EmbedSpec:
        truncation = _TRUNCATION.get(opts.truncate)
        if truncation is None:
            raise InvalidInputError(f"{field}.truncate", f"unknown value {opts.truncate}")
        encoding = _ENCODING.get(opts.encoding)
        if encoding is None:
            raise InvalidInputError(f"{field}.encoding", f"unknown value {opts.encoding}")
        return EmbedSpec(
            prefix=self._prefix(opts, field),
            dimensions=self._dimensions(opts.dimensions, f"{field}.dimensions"),
            normalize=opts.normalize if opts.HasField("normalize") else True,
            truncation=truncation,
            encoding=encoding,
        )

    def _dimensions(self, asked: int, field: str) -> int:
        low, native = self._limits.min_dimensions, self._limits.dimension
        if asked == 0:
            return native
        if not low <= asked <= native:
            raise InvalidInputError(
                field, f"{asked} is outside the model's range of {low} to {native}"
            )
        return asked

    def _prefix(self, opts: pb.EmbedOptions, field: str) -> str:
        card = self._card
        if opts.instruction and opts.prompt_name:
            raise InvalidInputError(
                f"{field}.instruction",
                "instruction and prompt_name are exclusive; set only one",
            )
        if opts.instruction:
            if not card.instruction_template:
                raise InvalidInputError(
                    f"{field}.instruction",
                    f"model {card.name!r} has no instruction format; use prompt_name "
                    "or start the server with --instruction-template",
                )
            return card.instruction_prefix(opts.instruction)
        name = opts.prompt_name or card.default_prompt_name
        if not name:
            return ""
        if name not in card.prompts:
            known = ", ".join(sorted(card.prompts)) or "none"
            raise InvalidInputError(
                f"{field}.prompt_name", f"model has no prompt {name!r} (known: {known})"
            )
        return card.prompts[name]

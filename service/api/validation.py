"""Request checks shared by both faces; errors name the field, the index and the limit.

Each face turns its wire form into the plain values here (RequestOptions, lists of texts or
token ids) and calls the same checks, so a request means the same thing, and fails the same
way, whether it came over gRPC or HTTP. Only the field names differ: the caller's own
("inputs[3]" and "options.dimensions" on gRPC, "input[3]" and "dimensions" on HTTP).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.chunking import ChunkSpec
from service.errors import TOO_MANY_INPUTS, InvalidInputError
from service.model_card import ModelCard
from service.pipeline import EmbedSpec, View
from service.postprocess import Encoding
from service.tokenization import Truncation

_TRUNCATION = {"": Truncation.REFUSE, **{t.value: t for t in Truncation}}
_ENCODING = {"": Encoding.FLOAT32, **{e.value: e for e in Encoding}}


@dataclass(frozen=True)
class ViewOptions:
    """One asked view: dimensions (None: the call's) and an encoding name."""

    dimensions: int | None = None
    encoding: str = ""


MAX_VIEWS = 8


@dataclass(frozen=True)
class RequestOptions:
    """Embedding options as a face received them, not yet checked.

    `truncate` and `encoding` are names ("end", "int8"); empty means the default, and so
    does `dimensions` None (the native size).
    """

    instruction: str = ""
    prompt_name: str = ""
    dimensions: int | None = None
    normalize: bool | None = None
    truncate: str = ""
    encoding: str = ""
    chunk_max_tokens: int = 0  # 0: no chunking
    chunk_overlap_tokens: int = 0
    views: tuple[ViewOptions, ...] = ()


@dataclass(frozen=True)
class RequestLimits:
    max_inputs: int
    max_input_chars: int
    min_dimensions: int
    dimension: int
    max_input_tokens: int  # the model's window


def field_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class RequestValidator:
    def __init__(self, card: ModelCard, limits: RequestLimits) -> None:
        self._card = card
        self._limits = limits

    @property
    def max_inputs(self) -> int:
        return self._limits.max_inputs

    def count(self, n: int, field: str, what: str = "texts") -> None:
        """The number of inputs of one request."""
        if n == 0:
            raise InvalidInputError(field, f"at least one input is required (got no {what})")
        limit = self._limits.max_inputs
        if n > limit:
            raise InvalidInputError(
                field, f"{n} {what} exceed the limit of {limit} per request", TOO_MANY_INPUTS
            )

    def texts(self, texts: Sequence[str], field: str) -> None:
        """The list itself and each text: count, emptiness, characters."""
        self.count(len(texts), field)
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

    def options(
        self, opts: RequestOptions, prefix: str = "options", token_inputs: bool = False
    ) -> EmbedSpec:
        """`prefix` names the options in errors ("options" on gRPC, "" where they are
        top-level fields). Token inputs are the model's input as given, so nothing may be
        laid before them."""
        truncation = _TRUNCATION.get(opts.truncate)
        if truncation is None:
            raise InvalidInputError(
                field_name(prefix, "truncate"),
                f"unknown value {opts.truncate} (one of refuse, end, start)",
            )
        encoding = self._encoding(opts.encoding, field_name(prefix, "encoding"))
        if token_inputs:
            for name in ("instruction", "prompt_name"):
                if getattr(opts, name):
                    raise InvalidInputError(
                        field_name(prefix, name),
                        "does not apply to token-id inputs, which are the model's input as "
                        "given; send text to have it laid out",
                    )
        dimensions = self._dimensions(opts.dimensions, field_name(prefix, "dimensions"))
        return EmbedSpec(
            prefix="" if token_inputs else self._prefix(opts, prefix),
            dimensions=dimensions,
            normalize=True if opts.normalize is None else opts.normalize,
            truncation=truncation,
            encoding=encoding,
            chunking=self._chunking(opts, field_name(prefix, "chunking"), token_inputs),
            views=self._views(opts.views, field_name(prefix, "views"), dimensions),
        )

    @property
    def query_prompt_name(self) -> str:
        """The model's prompt for queries ("query"), or "" when it has none."""
        return "query" if "query" in self._card.prompts else ""

    def _chunking(self, opts: RequestOptions, field: str, token_inputs: bool) -> ChunkSpec | None:
        size, overlap = opts.chunk_max_tokens, opts.chunk_overlap_tokens
        if not size:
            if overlap:
                raise InvalidInputError(f"{field}.overlap_tokens", "needs max_tokens")
            return None
        if token_inputs:
            raise InvalidInputError(field, "does not apply to token-id inputs")
        window = self._limits.max_input_tokens
        if not 0 < size <= window:
            raise InvalidInputError(
                f"{field}.max_tokens", f"{size} is outside 1 to the model's window of {window}"
            )
        if not 0 <= overlap * 2 <= size:
            raise InvalidInputError(
                f"{field}.overlap_tokens", f"{overlap} is over half of max_tokens ({size})"
            )
        return ChunkSpec(size, overlap, field)

    def _views(self, asked: Sequence[ViewOptions], field: str, dimensions: int) -> tuple[View, ...]:
        if len(asked) > MAX_VIEWS:
            raise InvalidInputError(field, f"{len(asked)} views exceed the limit of {MAX_VIEWS}")
        return tuple(
            View(
                self._dimensions(v.dimensions, f"{field}[{i}].dimensions")
                if v.dimensions
                else dimensions,
                self._encoding(v.encoding, f"{field}[{i}].encoding"),
            )
            for i, v in enumerate(asked)
        )

    @staticmethod
    def _encoding(name: str, field: str) -> Encoding:
        encoding = _ENCODING.get(name)
        if encoding is None:
            names = ", ".join(e.value for e in Encoding)
            raise InvalidInputError(field, f"unknown value {name} (one of {names})")
        return encoding

    def _dimensions(self, asked: int | None, field: str) -> int:
        low, native = self._limits.min_dimensions, self._limits.dimension
        if asked is None:
            return native
        if not low <= asked <= native:
            raise InvalidInputError(
                field, f"{asked} is outside the model's range of {low} to {native}"
            )
        return asked

    def _prefix(self, opts: RequestOptions, prefix: str) -> str:
        card = self._card
        if opts.instruction and opts.prompt_name:
            raise InvalidInputError(
                field_name(prefix, "instruction"),
                "instruction and prompt_name are exclusive; set only one",
            )
        if opts.instruction:
            if not card.instruction_template:
                raise InvalidInputError(
                    field_name(prefix, "instruction"),
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
                field_name(prefix, "prompt_name"), f"model has no prompt {name!r} (known: {known})"
            )
        return card.prompts[name]

"""Domain errors raised below the faces. Only service/api maps them to a protocol's errors."""

from __future__ import annotations

from collections.abc import Sequence


class InvalidInputError(ValueError):
    """A request field is wrong. `field` is a path such as "inputs[3]" or "options.dimensions".

    `reason` is a stable, machine-readable name for the errors a client can act on by itself
    (a client that splits large calls looks for TOO_MANY_TOKENS); empty for the rest.
    """

    def __init__(self, field: str, description: str, reason: str = "") -> None:
        super().__init__(f"{field}: {description}" if field else description)
        self.field = field
        self.description = description
        self.reason = reason


# InvalidInputError.reason values.
TOO_MANY_INPUTS = "TOO_MANY_INPUTS"
TOO_MANY_TOKENS = "TOO_MANY_TOKENS"
INPUT_TOO_LONG = "INPUT_TOO_LONG"


class InputTooLongError(InvalidInputError):
    """An input has more tokens than the model accepts and truncation was not asked for."""

    def __init__(self, field: str, tokens: int, limit: int) -> None:
        super().__init__(
            field,
            f"input has {tokens} tokens, over the model's limit of {limit}; "
            "shorten it or ask for truncation (truncate: end or start)",
            INPUT_TOO_LONG,
        )
        self.tokens = tokens
        self.limit = limit


class UnknownModelError(LookupError):
    """The caller named a model this server does not serve."""

    def __init__(self, asked: str, served: Sequence[str]) -> None:
        names = ", ".join(repr(n) for n in served)
        super().__init__(f"model {asked!r} does not exist here; this server serves {names}")
        self.asked = asked
        self.served = tuple(served)


class NotReadyError(RuntimeError):
    """The engine is still loading or the server is draining."""


class ModelLoadError(RuntimeError):
    """The model cannot be found or loaded; the process cannot serve at all."""

"""Domain errors raised below the servicer. Only service/api maps them to gRPC statuses."""

from __future__ import annotations


class InvalidInputError(ValueError):
    """A request field is wrong. `field` is a path such as "inputs[3]" or "options.dimensions"."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class InputTooLongError(InvalidInputError):
    """An input has more tokens than the model accepts and truncation was not asked for."""

    def __init__(self, field: str, tokens: int, limit: int) -> None:
        super().__init__(
            field,
            f"input has {tokens} tokens, over the model's limit of {limit}; "
            "shorten it or set options.truncate to TRUNCATE_END or TRUNCATE_START",
        )
        self.tokens = tokens
        self.limit = limit


class NotReadyError(RuntimeError):
    """The engine is still loading or the server is draining."""

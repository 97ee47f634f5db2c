"""Every domain error, raised below the faces: requests, models, admission, deadlines and
engines. Only service/api maps them to a protocol's errors (service/api/problems.py)."""

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


# Admission and deadlines (the batcher and the pipeline).


class QueueFullError(Exception):
    """Admission refused; ``reason`` names the bound that was hit and its limit."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class DeadlineExpiredError(Exception):
    """The item's deadline passed before it was dispatched; it never reached the engine."""


class BatcherClosedError(Exception):
    """The batcher is closing or closed."""


class DeadlineTooShortError(Exception):
    """The caller's deadline ends before the queue could plausibly serve it."""


# Engines.


class EngineUnavailableError(RuntimeError):
    """The engine cannot serve (dead, shut down, or failed on a batch); a retry may work."""


class EngineConfigError(ValueError):
    """The engine refused its settings at start-up. The message is one line naming the
    service flag to change and what it accepts."""

"""What every answer reports beside its results, whichever face carries it: the model that
answered, the tokens it read, where the time went and how many inputs were cut. Each face
only converts it (gRPC: Usage, Timing and trailing metadata; HTTP: usage and headers)."""

from __future__ import annotations

from dataclasses import dataclass

from service.pipeline import Timing


@dataclass(frozen=True)
class Metadata:
    model: str  # the name the answering model is reported by
    prompt_tokens: int
    timing: Timing | None  # None: nothing ran (an answer from the model's card alone)
    truncated: int = 0  # inputs (rerank: documents) cut to fit the window

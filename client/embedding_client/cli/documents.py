"""What flows between the readers, the stream and the writer: documents and failures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Document:
    id: str
    text: str
    source: str  # the input file
    line: int | None  # 1-based line (jsonl, csv) or row (parquet); None for whole files
    metadata: dict[str, Any] = field(default_factory=dict)
    size: int = 0  # UTF-8 bytes of text, what it costs in a message


@dataclass(frozen=True, slots=True)
class Failure:
    """One line of the errors file: a document (or a whole input) that was not embedded."""

    source: str
    line: int | None
    id: str | None
    code: str  # a gRPC status name from the server, or MALFORMED, DUPLICATE_ID, UNREADABLE, ...
    message: str
    stage: str  # "read" (the input) or "embed" (the server's answer)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "line": self.line,
            "stage": self.stage,
            "code": self.code,
            "message": self.message,
        }

    def where(self) -> str:
        place = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{place} (id {self.id!r})" if self.id is not None else place

    @classmethod
    def of(cls, doc: Document, code: str, message: str, stage: str = "embed") -> Failure:
        return cls(doc.source, doc.line, doc.id, code, message, stage)

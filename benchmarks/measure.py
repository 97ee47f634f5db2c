"""What one measurement point holds, and how CPU time is read from the kernel."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Point:
    """Texts and tokens done in `seconds`, with one latency per call (seconds)."""

    texts: int = 0
    tokens: int = 0
    seconds: float = 0.0
    calls: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list, repr=False)
    cpu_s: float | None = None  # the serving process's CPU seconds during the point

    @property
    def docs_per_s(self) -> float:
        return self.texts / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float | None:
        if not self.latencies:
            return None
        return float(np.percentile(np.asarray(self.latencies), q) * 1000)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "texts": self.texts,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "calls": self.calls,
            "errors": self.errors,
            "docs_per_s": round(self.docs_per_s, 2),
            "tokens_per_s": round(self.tokens_per_s, 1),
        }
        for q in (50, 95, 99):
            p = self.percentile_ms(q)
            out[f"p{q}_ms"] = None if p is None else round(p, 2)
        out["max_ms"] = round(max(self.latencies) * 1000, 2) if self.latencies else None
        if self.cpu_s is not None:
            out["cpu_s"] = round(self.cpu_s, 3)
            out["cpu_s_per_1000_texts"] = round(self.cpu_s / max(self.texts, 1) * 1000, 3)
        return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process, all its threads, not its children.

    /proc/<pid>/stat fields 14 and 15; a child process (vLLM's engine core) is counted
    only in its own entry, which is what lets the serving path be measured apart.
    """
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

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
    cached: int = 0  # inputs the server said came from its vector cache (vLLM: never says)

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
            "cached": self.cached,
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


def _ticks(stat: str) -> tuple[str, float]:
    """(name, user + system CPU seconds) from the text of a /proc .../stat file."""
    head, tail = stat.rsplit(")", 1)
    fields = tail.split()
    return head.split("(", 1)[1], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _threads(pid: int) -> list[str]:
    """The thread ids of `pid`; none once it has gone."""
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def thread_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of each live thread of `pid`, by thread name (threads of one name summed).

    A thread that has ended is no longer listed; its time stays in cpu_seconds(pid)."""
    out: dict[str, float] = {}
    for tid in _threads(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="utf-8", errors="replace") as f:
                name, seconds = _ticks(f.read())
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + seconds
    return out


def children(pid: int) -> list[int]:
    """The direct child processes of `pid` (/proc/<pid>/task/<tid>/children)."""
    out: list[int] = []
    for tid in _threads(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            continue
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before their children."""
    out: list[int] = []
    todo = children(pid)
    while todo:
        child = todo.pop(0)
        out.append(child)
        todo += children(child)
    return out


def command(pid: int) -> str:
    """The command line of `pid` as `ps` shows it (a process title set with setproctitle,
    such as vLLM's "VLLM::EngineCore", replaces it); "" once the process is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent on anything but idle and I/O wait since boot (/proc/stat)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user .. steal, less idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")

"""What the user sees: a bar on a terminal, periodic lines elsewhere, always a summary.

Everything goes to stderr. Counters are written by the writer thread (and `skipped` by the
reader) and only read here, from a thread of its own that wakes a few times a second.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, TextIO

from tqdm import tqdm  # type: ignore[import-untyped]

Mode = Literal["bar", "log", "quiet"]
PROBLEMS_SHOWN = 20  # item errors printed; the rest are only in the errors file


@dataclass
class Stats:
    documents: int = 0  # embedded (rows in a part, or in the buffer for the next one)
    chunks: int = 0
    tokens: int = 0
    errors: int = 0  # documents (or whole inputs) that failed
    skipped: int = 0  # complete in the output before this run
    started: float = field(default_factory=time.monotonic)  # the run's start: rates are whole-run

    @property
    def done(self) -> int:
        return self.documents + self.errors

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def rates(self) -> tuple[float, float]:
        """(documents, tokens) per second since the start."""
        seconds = max(self.elapsed(), 1e-9)
        return self.documents / seconds, self.tokens / seconds


class Progress:
    def __init__(
        self,
        stats: Stats,
        mode: Mode,
        *,
        interval: float = 10.0,
        stream: TextIO | None = None,
    ) -> None:
        self._stats = stats
        self._mode = mode
        self._interval = interval
        self._stream = stream or sys.stderr
        self._total: int | None = None
        self._bar: tqdm | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._problems = 0

    def start(self, total: int | None) -> None:
        self._total = total
        if self._mode == "quiet":
            return
        if self._mode == "bar":
            self._bar = tqdm(
                total=total,
                unit="doc",
                file=self._stream,
                dynamic_ncols=True,
                smoothing=0.05,
                mininterval=0.25,
            )
        self._thread = threading.Thread(target=self._run, name="embed-files-progress", daemon=True)
        self._thread.start()

    def note(self, message: str) -> None:
        """A line the user should see whatever the mode (warnings, reconnects)."""
        with self._lock:
            if self._bar is not None:
                self._bar.write(f"embed-files: {message}", file=self._stream)
            else:
                print(f"embed-files: {message}", file=self._stream, flush=True)

    def problem(self, message: str, errors_file: str) -> None:
        """An item's failure: the first few are printed, all are in the errors file."""
        self._problems += 1
        if self._problems <= PROBLEMS_SHOWN:
            self.note(message)
        elif self._problems == PROBLEMS_SHOWN + 1:
            self.note(f"more errors: see {errors_file}")

    def _run(self) -> None:
        period = 0.25 if self._bar is not None else self._interval
        while not self._stop.wait(period):
            self._tick()

    def _tick(self) -> None:
        stats = self._stats
        if self._bar is not None:
            with self._lock:
                _, tokens = stats.rates()
                errors = f", {_count(stats.errors, 'error')}" if stats.errors else ""
                self._bar.set_postfix_str(f"{tokens:,.0f} tok/s{errors}", refresh=False)
                self._bar.update(stats.done - self._bar.n)  # redraws, postfix included
        else:
            self.note(self.status_line())

    def status_line(self) -> str:
        stats = self._stats
        docs, tokens = stats.rates()
        done = f"{stats.done:,}" if self._total is None else f"{stats.done:,}/{self._total:,}"
        eta = ""
        if self._total and docs > 0:
            eta = f", ETA {_duration(max(self._total - stats.done, 0) / docs)}"
        return (
            f"{done} documents, {stats.chunks:,} chunks, {stats.tokens:,} tokens, "
            f"{_count(stats.errors, 'error')}, {docs:,.1f} docs/s, {tokens:,.0f} tokens/s{eta}"
        )

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            self._tick()
            self._bar.close()
            self._bar = None


def summary_line(stats: Stats, out: str, errors_file: str, ending: str = "") -> str:
    docs, tokens = stats.rates()
    skipped = f" ({stats.skipped:,} already done)" if stats.skipped else ""
    errors = _count(stats.errors, "error")
    if stats.errors:
        errors += f" (listed in {errors_file})"
    return (
        f"{ending or 'done'}: {_count(stats.documents, 'document')} embedded{skipped}, "
        f"{_count(stats.chunks, 'chunk')}, {_count(stats.tokens, 'token')}, {errors}, in "
        f"{_duration(stats.elapsed())}: {docs:,.1f} docs/s, {tokens:,.0f} tokens/s; "
        f"output in {out}"
    )


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")

"""Handing freed heap memory back to the operating system after a burst.

glibc keeps memory a process freed in its arenas for reuse. After a flood of stream items
(their texts, token ids and results), the process would stay at its peak size, and in a pod
with a memory limit that peak is what gets it killed. malloc_trim(0) returns the free pages;
it is what TEI calls after its batches for the same reason. Elsewhere than glibc it does
nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


_TRIM = _malloc_trim()


def trim_heap() -> bool:
    """Return free heap pages to the OS; whether anything could be done."""
    return _TRIM is not None and bool(_TRIM(0))


class HeapTrimmer:
    """Trims in a worker thread (it can take milliseconds on a large heap), at most once per
    `min_interval_s`, a moment after it is asked (the last frees happen right after)."""

    def __init__(self, min_interval_s: float = 5.0, delay_s: float = 0.5) -> None:
        self._min_interval_s = min_interval_s
        self._delay_s = delay_s
        self._last = -float("inf")
        self._pending: asyncio.TimerHandle | None = None

    def request(self) -> None:
        if _TRIM is None or self._pending is not None:
            return
        loop = asyncio.get_running_loop()
        wait = max(self._delay_s, self._last + self._min_interval_s - time.monotonic())
        self._pending = loop.call_later(wait, self._run, loop)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        self._pending = None
        self._last = time.monotonic()
        loop.run_in_executor(None, trim_heap)

"""How many stream items the server holds at once: per stream, and across all streams.

An item counts from the moment it is read off its stream until its result has been handed
to gRPC. Each stream may hold up to `per_stream` items and all of them together `total`; a
stream that cannot get room simply stops being read, and HTTP/2 flow control pushes back on
its client. So many streams that never read their results hold `total` items between them,
not `per_stream` each.

When streams compete for room, a freed slot goes to the waiting stream that holds the
fewest, so shares even out. Once no stream holds anything, `on_idle` runs (the server hands
freed memory back to the operating system there).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class StreamBudget:
    def __init__(
        self, total: int, per_stream: int, on_idle: Callable[[], None] | None = None
    ) -> None:
        if total < 1 or per_stream < 1:
            raise ValueError("stream budgets must be positive")
        self.total = total
        self.per_stream = min(per_stream, total)  # a stream's own room never exceeds all
        self.held = 0
        self._waiting: dict[Share, asyncio.Future[None]] = {}
        self._on_idle = on_idle

    def share(self) -> Share:
        """The room of one new stream."""
        return Share(self)

    def _grant(self) -> None:
        """Give free room, one item at a time, to the waiting stream holding the fewest."""
        while self._waiting and self.held < self.total:
            eligible = [s for s in self._waiting if s.held < self.per_stream]
            if not eligible:
                return
            share = min(eligible, key=lambda s: s.held)
            future = self._waiting.pop(share)
            share.held += 1
            self.held += 1
            future.set_result(None)

    def _released(self) -> None:
        self._grant()
        if self.held == 0 and self._on_idle is not None:
            self._on_idle()


class Share:
    def __init__(self, budget: StreamBudget) -> None:
        self._budget = budget
        self.held = 0

    async def acquire(self, n: int = 1) -> None:
        """Room for `n` more items, waiting as long as it takes (one item at a time)."""
        budget = self._budget
        for _ in range(n):
            if not budget._waiting and self.held < budget.per_stream and budget.held < budget.total:
                self.held += 1
                budget.held += 1
                continue
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            budget._waiting[self] = future
            budget._grant()  # room may be free, held back only for streams at their own cap
            try:
                await future
            except asyncio.CancelledError:
                budget._waiting.pop(self, None)
                if future.done() and not future.cancelled():
                    self.release()  # granted just as the caller left
                raise

    def release(self, n: int = 1) -> None:
        self.held -= n
        self._budget.held -= n
        self._budget._released()

    def close(self) -> None:
        """The stream ended: its room goes back, whatever it still held."""
        self._budget._waiting.pop(self, None)
        if self.held:
            self.release(self.held)

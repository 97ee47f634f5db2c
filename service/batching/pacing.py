"""How fast the engine works, measured on the batches it finishes.

The batcher sizes BULK batches from it (so each takes about `interactive_step_s`), and
estimates waits and retry hints from it. The speed is tokens finished per second of engine
*service* time: a batch that waited in the engine behind another is charged only from the
moment the other finished, so two batches in flight do not halve the estimate. Batches the
engine ran in one step finish together; their tokens are pooled with the next sample.
"""

from __future__ import annotations

# Weight of the newest sample in the running averages.
EWMA_WEIGHT = 0.2
# Samples shorter than this are pooled with the next: they are one step's leftovers.
MIN_SAMPLE_S = 0.002


class EngineSpeed:
    def __init__(self, prior_latency_s: float) -> None:
        self.tokens_per_s = 0.0  # 0: not measured yet
        self.batch_latency_s = prior_latency_s  # dispatch -> vectors, per batch
        self._inflight = 0
        self._mark = 0.0  # when the engine last started from idle or finished a batch
        self._pending_tokens = 0
        self._pending_s = 0.0

    def dispatched(self, now: float) -> None:
        if self._inflight == 0:
            self._mark = now  # idle until now: that time was nobody's service
        self._inflight += 1

    def finished(self, tokens: int, dispatched_at: float, now: float, delivered: bool) -> None:
        """A batch left the engine: with vectors (`delivered`), or failed or cancelled.

        A batch that brought no vectors moves nothing: the time since the mark belongs to
        the batches still in the engine (a recalled batch never ran at all).
        """
        self._inflight -= 1
        if not delivered:
            return
        latency = now - dispatched_at
        self.batch_latency_s += EWMA_WEIGHT * (latency - self.batch_latency_s)
        self._pending_tokens += tokens
        self._pending_s += max(now - self._mark, 0.0)
        self._mark = now
        if self._pending_s >= MIN_SAMPLE_S:
            rate = self._pending_tokens / self._pending_s
            weight = EWMA_WEIGHT if self.tokens_per_s else 1.0
            self.tokens_per_s += weight * (rate - self.tokens_per_s)
            self._pending_tokens, self._pending_s = 0, 0.0

    def tokens_in(self, seconds: float) -> int | None:
        """Tokens the engine gets through in `seconds`; None until measured."""
        if not self.tokens_per_s or seconds <= 0:
            return None
        return max(1, int(self.tokens_per_s * seconds))

"""Splitting one large call into sub-calls the server accepts; shared by both clients.

- The plan: which slices of the inputs go in which sub-call, from the server's limits
  (GetModelInfo) and a token estimate made from characters, since the client does not
  tokenize.
- The refusals that mean "split further": INVALID_ARGUMENT whose ErrorInfo reason is
  TOO_MANY_TOKENS (the estimate was low) or TOO_MANY_INPUTS (limits not known yet, or a
  server with other limits); such a sub-call is cut in two and both halves are retried.
- SplitRun: the bookkeeping of one split call (what is left to send, results in input order).
  Each client only drives it: threads of gRPC futures for the sync one, tasks for asyncio.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2

from embedding.v1 import embedding_pb2 as pb
from embedding_client.codec import Options

T = TypeVar("T")

# Sub-calls of one split call in flight at once, unless the client is told otherwise.
DEFAULT_MAX_CONCURRENCY = 4

# The server's ErrorInfo domain and the reasons that ask for smaller calls.
ERROR_DOMAIN = "embedding.v1"
TOO_MANY_TOKENS = "TOO_MANY_TOKENS"
TOO_MANY_INPUTS = "TOO_MANY_INPUTS"
_SPLITTABLE = frozenset({TOO_MANY_TOKENS, TOO_MANY_INPUTS})

# Characters per token the estimate assumes. English runs at about 4 with BERT's WordPiece or
# Qwen's BPE, code at about 3, CJK at 1 to 1.5. 2 keeps most text well under the server's
# limit at the price of a few more sub-calls than needed; text that tokenizes denser is
# caught by the TOO_MANY_TOKENS refusal and bisected.
CHARS_PER_TOKEN = 2.0
# Special tokens per model input ([CLS] and [SEP], Qwen's <|endoftext|>), with room to spare.
SPECIAL_TOKENS = 4

# A call with at most this many inputs and characters goes out as is, without asking the
# server's limits first: every server accepts it unless configured far below the defaults
# (2048 inputs, 131,072 tokens), and then its refusal still leads to splitting. So a
# one-text call costs one RPC, as it always did.
SMALL_CALL_INPUTS = 64
SMALL_CALL_CHARS = 16_384

# Sub-calls in flight together take at most this share of the server's queue, so that they
# are admitted beside other traffic rather than refused with RESOURCE_EXHAUSTED.
QUEUE_SHARE = 0.5


@dataclass(frozen=True)
class Budget:
    """Bounds on one call: inputs and estimated tokens; 0 is no bound."""

    items: int = 0
    tokens: int = 0

    def fits(self, items: int, tokens: int) -> bool:
        return (not self.items or items <= self.items) and (
            not self.tokens or tokens <= self.tokens
        )


def needs_limits(texts: Sequence[str]) -> bool:
    """Whether a call is large enough that the server's limits must be known to send it."""
    if len(texts) > SMALL_CALL_INPUTS:
        return True
    return sum(len(t) for t in texts) > SMALL_CALL_CHARS


class TokenEstimate:
    """A generous guess of the tokens the server counts for one text, from its length."""

    def __init__(self, info: pb.GetModelInfoResponse, options: Options) -> None:
        self._overhead = math.ceil(_prefix_chars(info, options) / CHARS_PER_TOKEN) + SPECIAL_TOKENS
        self._chunk = options.chunk_tokens
        self._overlap = options.chunk_overlap
        # Truncation caps every input at the window (chunking instead accepts longer ones).
        truncating = options.truncate != "refuse" and not self._chunk
        self._cap = info.max_input_tokens if truncating else 0

    def __call__(self, text: str) -> int:
        body = math.ceil(len(text) / CHARS_PER_TOKEN)
        if self._chunk:
            # Every chunk repeats the prefix, the special tokens and the overlap.
            per_chunk = self._overhead + self._overlap
            room = max(1, self._chunk - per_chunk)
            return body + max(1, math.ceil(body / room)) * per_chunk
        tokens = body + self._overhead
        return min(tokens, self._cap) if self._cap else tokens


def _prefix_chars(info: pb.GetModelInfoResponse, options: Options) -> int:
    """Characters the server puts before each text: the laid-out instruction or the prompt."""
    if options.instruction:
        template = info.instruction_template
        if template:
            return len(template.replace("{instruction}", options.instruction))
        return len(options.instruction)
    if options.prompt_name:
        return len(info.prompts.get(options.prompt_name, ""))
    return 0


def _bounded(limit: int, queue: int, share: float) -> int:
    """The smaller of `limit` and `share` of `queue`, where 0 means no bound."""
    if not queue:
        return limit
    part = max(1, int(queue * share))
    return min(limit, part) if limit else part


def embed_budgets(limits: pb.ServerLimits, concurrency: int) -> tuple[Budget, Budget]:
    """(a call that is sent whole, each sub-call of a split one).

    A call within the server's limits is one call, as before. A split one is cut finer, so
    that `concurrency` sub-calls together take at most QUEUE_SHARE of the server's queue.
    """
    whole = Budget(limits.max_inputs_per_request, limits.max_request_tokens)
    share = QUEUE_SHARE / max(1, concurrency)
    piece = Budget(
        _bounded(whole.items, limits.max_queue_items, share),
        _bounded(whole.tokens, limits.max_queue_tokens, share),
    )
    return whole, piece


def plan(
    texts: Sequence[str],
    whole: Budget,
    piece: Budget,
    estimate: Callable[[str], int] | None = None,
) -> list[range]:
    """Consecutive slices of `texts` covering all of them, in order: one if `whole` holds
    them all, else as few as `piece` allows. A text over `piece` on its own is a slice of its
    own (the server decides). Without `estimate`, tokens are not counted."""
    n = len(texts)
    costs = [estimate(t) for t in texts] if estimate else [0] * n
    if whole.fits(n, sum(costs)):
        return [range(n)]
    pieces: list[range] = []
    start = tokens = 0
    for i, cost in enumerate(costs):
        full = (piece.items and i - start >= piece.items) or (
            piece.tokens and tokens + cost > piece.tokens
        )
        if full and i > start:
            pieces.append(range(start, i))
            start, tokens = i, 0
        tokens += cost
    pieces.append(range(start, n))
    return pieces


def plan_embed(
    texts: Sequence[str],
    options: Options,
    info: pb.GetModelInfoResponse | None,
    concurrency: int,
) -> list[range]:
    """The sub-calls of one Embed call; without the server's limits, the call as is."""
    if info is None:
        return [range(len(texts))]
    whole, piece = embed_budgets(info.limits, concurrency)
    return plan(texts, whole, piece, TokenEstimate(info, options))


def plan_tokenize(texts: Sequence[str], info: pb.GetModelInfoResponse | None) -> list[range]:
    """The sub-calls of one Tokenize call: by the input count alone (nothing is queued)."""
    if info is None:
        return [range(len(texts))]
    budget = Budget(items=info.limits.max_inputs_per_request)
    return plan(texts, budget, budget)


def halves(piece: range) -> list[range]:
    mid = piece.start + len(piece) // 2
    return [range(piece.start, mid), range(mid, piece.stop)]


def replan(pieces: list[range], refused: range) -> list[range]:
    """The plan after the whole call `refused` was refused as too large: the plan made with
    the limits now known, or its two halves where that plan still sends it whole."""
    return pieces if len(pieces) > 1 else halves(refused)


def refusal_reason(exc: BaseException) -> str:
    """The ErrorInfo reason of an INVALID_ARGUMENT from the server; empty for the rest."""
    if isinstance(exc, grpc.aio.AioRpcError):
        code, trailing = exc.code(), tuple(exc.trailing_metadata())
    elif isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        code, trailing = exc.code(), tuple(exc.trailing_metadata() or ())
    else:
        return ""
    if code != grpc.StatusCode.INVALID_ARGUMENT:
        return ""
    for key, value in trailing:
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
                return info.reason
    return ""


def can_split(exc: BaseException, piece: range) -> bool:
    """Whether a refused sub-call should be cut in two and retried: one text that is itself
    too long cannot be, and its error is the caller's."""
    return len(piece) > 1 and refusal_reason(exc) in _SPLITTABLE


class SplitRun(Generic[T]):
    """One split call: the slices still to send, and the results of those answered.

    A client takes slices while it has room, reports each answer or failure, and asks for
    `result()` once nothing is left or in flight. A failure that splitting cannot help is
    raised by `failed`; the client then cancels what it still has in flight.
    """

    def __init__(self, pieces: Iterable[range], merge: Callable[[list[T]], T]) -> None:
        self._todo: deque[range] = deque(pieces)
        self._done: dict[int, T] = {}
        self._merge = merge

    @property
    def has_work(self) -> bool:
        return bool(self._todo)

    def take(self) -> range:
        return self._todo.popleft()

    def succeeded(self, piece: range, result: T) -> None:
        self._done[piece.start] = result

    def failed(self, piece: range, exc: BaseException) -> None:
        if not can_split(exc, piece):
            raise exc
        # The halves go first: they hold the earliest inputs still missing.
        self._todo.extendleft(reversed(halves(piece)))

    def result(self) -> T:
        return self._merge([self._done[start] for start in sorted(self._done)])

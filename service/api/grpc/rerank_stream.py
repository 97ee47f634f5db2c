"""One RerankStream call: many queries, each ranked as Rerank would, as bulk work.

Each message is one item: an id and a whole RerankRequest. An item holds one slot of the
stream budget per document (each document is one (query, document) engine item), so a
stream holds as many documents in flight as EmbedStream holds texts. Its pairs are bulk
work in the stream's fair share, behind interactive calls; items are answered as they
finish, each with its RerankResponse or its own error.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from embedding.v1 import embedding_pb2 as pb
from service.api.calls.rerank import rerank
from service.api.grpc import wire
from service.api.grpc.status import to_status
from service.api.grpc.stream import ItemStream
from service.api.grpc.stream_budget import StreamBudget
from service.api.runtime import Runtime
from service.errors import TOO_MANY_INPUTS, InvalidInputError


@dataclass(frozen=True, slots=True)
class _Item:
    id: str
    request: pb.RerankRequest
    slots: int  # the stream room it holds until answered: one per document


class RerankStreamSession(ItemStream[pb.RerankStreamRequest, _Item, pb.RerankStreamResponse]):
    def __init__(self, rt: Runtime, budget: StreamBudget, deadline: float | None) -> None:
        super().__init__(budget, pb.RerankStreamResponse)
        self._rt = rt
        self._deadline = deadline
        # An item never needs more slots than exist, or its reader would wait forever.
        self._max_documents = budget.per_stream

    async def _read(self, request: pb.RerankStreamRequest) -> None:
        n = len(request.request.documents)
        try:
            # Too many documents fail before taking room; the rest is checked as Rerank does.
            self._rt.validator.count(1 + n, "query+documents")
            if n > self._max_documents:
                raise InvalidInputError(
                    "documents",
                    f"{n} documents exceed the limit of {self._max_documents} per item of a"
                    " stream (its stream_max_inflight); send them in several items",
                    TOO_MANY_INPUTS,
                )
        except InvalidInputError as exc:
            await self._refuse(exc, request.id)
            return
        await self._read_one(_Item(request.id, request.request, max(n, 1)), max(n, 1))

    async def _dispatch(self) -> None:
        """Every item is one rerank call of its own."""
        for item in self._pending:
            self._start(self._rerank(item))
        self._pending.clear()

    async def _rerank(self, item: _Item) -> None:
        started = time.perf_counter()
        try:
            call = wire.rerank_call(item.request, self._deadline, flow=self)
            answer = await rerank(self._rt, call)
            ranked = wire.rerank_response(item.request, answer, started)
            response = pb.RerankStreamResponse(id=item.id, response=ranked)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the item's own error; the stream goes on
            response = pb.RerankStreamResponse(id=item.id, error=to_status(exc))
        self._reply(response, item.slots, (item.id,))

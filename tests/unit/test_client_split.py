"""Client-side splitting: the plan, and both clients against a fake in-process gRPC server.

The fake counts one token per character, denser than the client's estimate, so token
refusals (TOO_MANY_TOKENS) and their bisection really happen.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Any, Protocol, Unpack

import grpc
import grpc.aio
import numpy as np
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from embedding_client import AsyncEmbeddingClient, EmbeddingClient, EmbedResult, Options
from embedding_client import splitting as sp
from embedding_client.codec import OptionsKwargs
from embedding_client.results import TokenizedResult

# How long a fake waits for an event that must come before calling the test hung: a
# passing run never waits this long, however loaded the machine.
PATIENCE_S = 120.0

DEFAULT_LIMITS = pb.ServerLimits(
    max_inputs_per_request=2048,
    max_request_tokens=131072,
    max_queue_items=8192,
    max_queue_tokens=262144,
)


def _texts(n: int, width: int = 0) -> list[str]:
    """Texts that name their index: "17 xxxx", padded to `width` characters."""
    return [f"{i} ".ljust(width, "x") for i in range(n)]


# --- the plan ---------------------------------------------------------------------------


def _info(limits: pb.ServerLimits = DEFAULT_LIMITS, **fields: Any) -> pb.GetModelInfoResponse:
    return pb.GetModelInfoResponse(model="fake", max_input_tokens=256, limits=limits, **fields)


def _covers(pieces: list[range], n: int) -> bool:
    return [i for p in pieces for i in p] == list(range(n)) and all(len(p) for p in pieces)


def test_a_call_within_the_limits_is_one_piece() -> None:
    texts = _texts(2048, 100)
    assert sp.plan_embed(texts, Options(), _info(), 4) == [range(2048)]
    assert sp.plan_embed(texts, Options(), None, 4) == [range(2048)]


def test_over_the_count_pieces_take_a_share_of_the_queue() -> None:
    whole, piece = sp.embed_budgets(DEFAULT_LIMITS, 4)
    assert whole == sp.Budget(2048, 131072) and piece == sp.Budget(1024, 32768)
    pieces = sp.plan_embed(_texts(5000), Options(), _info(), 4)
    assert [len(p) for p in pieces] == [1024] * 4 + [904] and _covers(pieces, 5000)
    # With no queue bounds reported, pieces fill the request limit.
    bare = pb.ServerLimits(max_inputs_per_request=2048)
    assert [len(p) for p in sp.plan_embed(_texts(5000), Options(), _info(bare), 4)] == [
        2048,
        2048,
        904,
    ]


def test_over_the_token_estimate_pieces_stay_within_it() -> None:
    limits = pb.ServerLimits(max_inputs_per_request=2048, max_request_tokens=10_000)
    rng = np.random.default_rng(0)
    texts = ["y" * int(n) for n in rng.integers(1, 3000, 500)]
    estimate = sp.TokenEstimate(_info(limits), Options())
    pieces = sp.plan_embed(texts, Options(), _info(limits), 4)
    assert len(pieces) > 1 and _covers(pieces, len(texts))
    for p in pieces:
        assert sum(estimate(texts[i]) for i in p) <= 10_000
    # One text over the budget alone is a piece of its own; the server has the last word.
    lone = sp.plan_embed(["a", "z" * 30_000, "b"], Options(), _info(limits), 4)
    assert lone == [range(1), range(1, 2), range(2, 3)]


def test_the_estimate_counts_prefixes_truncation_and_chunks() -> None:
    info = _info(instruction_template="Instruct: {instruction}\nQuery:", prompts={"q": "query: "})
    plain = sp.TokenEstimate(info, Options())
    assert plain("x" * 100) == 50 + sp.SPECIAL_TOKENS
    instructed = sp.TokenEstimate(info, Options(instruction="find it"))
    assert instructed("x" * 100) == plain("x" * 100) + 12  # 23 characters of prefix
    assert sp.TokenEstimate(info, Options(prompt_name="q"))("x" * 100) == plain("x" * 100) + 4
    assert sp.TokenEstimate(info, Options(truncate="end"))("x" * 10_000) == 256
    chunked = sp.TokenEstimate(info, Options(chunk_tokens=100, chunk_overlap=20))
    # 5000 tokens of text in chunks of 76 new tokens: 66 chunks, each 24 tokens over that.
    assert chunked("x" * 10_000) == 5000 + 66 * 24


def test_small_calls_go_out_without_limits() -> None:
    assert not sp.needs_limits(_texts(64, 256))
    assert sp.needs_limits(_texts(65))
    assert sp.needs_limits(["x" * (sp.SMALL_CALL_CHARS + 1)])


def test_split_run_bisects_refusals_and_keeps_the_order() -> None:
    run: sp.SplitRun[list[int]] = sp.SplitRun(
        [range(0, 4), range(4, 6)], lambda parts: [i for p in parts for i in p]
    )
    first = run.take()
    run.failed(first, _refusal(sp.TOO_MANY_TOKENS))
    assert [run.take(), run.take(), run.take()] == [range(0, 2), range(2, 4), range(4, 6)]
    for piece in (range(4, 6), range(2, 4), range(0, 2)):
        run.succeeded(piece, list(piece))
    assert not run.has_work and run.result() == list(range(6))
    with pytest.raises(grpc.aio.AioRpcError):
        run.failed(range(0, 1), _refusal(sp.TOO_MANY_TOKENS))  # one text: not split further
    with pytest.raises(grpc.aio.AioRpcError):
        run.failed(range(0, 4), _refusal("QUEUE_FULL"))


# --- reading the server's refusals ------------------------------------------------------


def _status(reason: str, domain: str = sp.ERROR_DOMAIN) -> status_pb2.Status:
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=f"refused: {reason}")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=domain))
    return status


def _refusal(
    reason: str,
    domain: str = sp.ERROR_DOMAIN,
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
) -> grpc.aio.AioRpcError:
    details = _status(reason, domain).SerializeToString()
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", details))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, "refused")


def test_refusal_reason_reads_error_info_of_invalid_argument_only() -> None:
    assert sp.refusal_reason(_refusal(sp.TOO_MANY_TOKENS)) == sp.TOO_MANY_TOKENS
    assert sp.refusal_reason(_refusal(sp.TOO_MANY_TOKENS, domain="elsewhere")) == ""
    assert sp.refusal_reason(_refusal("X", code=grpc.StatusCode.RESOURCE_EXHAUSTED)) == ""
    assert sp.refusal_reason(ValueError("no")) == ""


def test_the_servers_own_status_is_understood() -> None:
    from service.api.grpc.status import to_status
    from service.errors import TOO_MANY_INPUTS, TOO_MANY_TOKENS, InvalidInputError

    for reason in (TOO_MANY_TOKENS, TOO_MANY_INPUTS):
        status = to_status(InvalidInputError("inputs", "too many", reason))
        trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
        exc = grpc.aio.AioRpcError(
            grpc.StatusCode(  # the code the status carries
                next(c for c in grpc.StatusCode if c.value[0] == status.code)
            ),
            grpc.aio.Metadata(),
            trailing,
        )
        assert sp.refusal_reason(exc) == reason


# --- both clients against a fake server -------------------------------------------------


class FakeService(pb_grpc.EmbeddingServiceServicer):
    """Embeds "17 xxx" as [17, len]; refuses as the real server does; records what it saw."""

    def __init__(self) -> None:
        self.limits = pb.ServerLimits()
        # The first `gather` Embed calls are held until that many are in the server at once,
        # so a client that keeps n in flight shows peak == n however slow the machine.
        self.gather = 0
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.active = self.peak = self.info_calls = self.refused = self.cancelled = 0
        self.sizes: list[int] = []  # inputs of every Embed or Tokenize call, refused or not
        self.accepted: list[int] = []  # inputs of every Embed call answered
        self.slow_started = threading.Event()  # a "slow" call is running in the server

    def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetModelInfoResponse:
        with self.lock:
            self.info_calls += 1
        return _info(self.limits)

    def _admit(self, texts: Sequence[str], context: grpc.ServicerContext) -> None:
        limits = self.limits
        reason = ""
        if limits.max_inputs_per_request and len(texts) > limits.max_inputs_per_request:
            reason = sp.TOO_MANY_INPUTS
        elif limits.max_request_tokens and sum(map(len, texts)) > limits.max_request_tokens:
            reason = sp.TOO_MANY_TOKENS
        if reason:
            with self.lock:
                self.refused += 1
            context.abort_with_status(rpc_status.to_status(_status(reason)))

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        texts = list(request.inputs)
        with self.lock:
            self.sizes.append(len(texts))
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.changed.notify_all()
            if len(self.sizes) <= self.gather:
                self.changed.wait_for(lambda: self.peak >= self.gather, PATIENCE_S)
        try:
            self._admit(texts, context)
            if any(t.startswith("boom") for t in texts):
                # Fail only once the other call is in flight, however slow the machine.
                self.slow_started.wait(PATIENCE_S)
                context.abort(grpc.StatusCode.INTERNAL, "boom")
            if any(t.startswith("slow") for t in texts):
                self._wait_for_cancel(context)
            with self.lock:
                self.accepted.append(len(texts))
            return pb.EmbedResponse(
                embeddings=[_vector(t) for t in texts],
                model="fake",
                usage=pb.Usage(prompt_tokens=sum(map(len, texts)), total_tokens=0),
            )
        finally:
            with self.lock:
                self.active -= 1

    def _wait_for_cancel(self, context: grpc.ServicerContext) -> None:
        ended = threading.Event()
        context.add_callback(ended.set)  # runs when the call ends (here: is cancelled)
        self.slow_started.set()
        if ended.wait(PATIENCE_S):
            with self.lock:
                self.cancelled += 1

    def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.ServicerContext
    ) -> pb.TokenizeResponse:
        texts = list(request.inputs)
        with self.lock:
            self.sizes.append(len(texts))
        self._admit(texts, context)
        results = [
            pb.TokenizedInput(
                ids=[101, *(ord(c) for c in t), 102],
                offsets=[pb.TokenSpan(char_start=i, char_end=i + 1) for i in range(len(t))],
                text_start=1,
            )
            for t in texts
        ]
        return pb.TokenizeResponse(results=results, model="fake")

    def EmbedStream(
        self, request_iterator: Iterator[pb.EmbedStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.EmbedStreamResponse]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not faked")

    def Similarity(
        self, request: pb.SimilarityRequest, context: grpc.ServicerContext
    ) -> pb.SimilarityResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not faked")

    def Rerank(self, request: pb.RerankRequest, context: grpc.ServicerContext) -> pb.RerankResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not faked")

    def RerankStream(
        self, request_iterator: Iterator[pb.RerankStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.RerankStreamResponse]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not faked")


def _vector(text: str) -> pb.Embedding:
    v = np.array([float(text.split(maxsplit=1)[0]), float(len(text))], dtype="<f4")
    return pb.Embedding(
        data=v.tobytes(), dimensions=2, encoding=pb.ENCODING_FLOAT32, token_count=len(text)
    )


class Caller(Protocol):
    def embed(self, texts: Sequence[str], **options: Unpack[OptionsKwargs]) -> EmbedResult: ...
    def tokenize(self, texts: Sequence[str]) -> list[TokenizedResult]: ...
    def close(self) -> None: ...


class SyncCaller:
    def __init__(self, address: str, max_concurrency: int) -> None:
        self.client = EmbeddingClient(address, max_concurrency=max_concurrency)

    def embed(self, texts: Sequence[str], **options: Unpack[OptionsKwargs]) -> EmbedResult:
        return self.client.embed(texts, **options)

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedResult]:
        return self.client.tokenize(texts)

    def close(self) -> None:
        self.client.close()


class AsyncCaller:
    """The async client on a loop of its own, called from the (sync) test."""

    def __init__(self, address: str, max_concurrency: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = self.loop.run_until_complete(self._open(address, max_concurrency))

    @staticmethod
    async def _open(address: str, max_concurrency: int) -> AsyncEmbeddingClient:
        return AsyncEmbeddingClient(address, max_concurrency=max_concurrency)

    def embed(self, texts: Sequence[str], **options: Unpack[OptionsKwargs]) -> EmbedResult:
        return self.loop.run_until_complete(self.client.embed(texts, **options))

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedResult]:
        return self.loop.run_until_complete(self.client.tokenize(texts))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


@pytest.fixture
def fake() -> Iterator[tuple[FakeService, str]]:
    service = FakeService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_EmbeddingServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield service, f"127.0.0.1:{port}"
    server.stop(grace=None)


KINDS: dict[str, type[SyncCaller] | type[AsyncCaller]] = {"sync": SyncCaller, "async": AsyncCaller}


@pytest.fixture(params=list(KINDS))
def connect(request: pytest.FixtureRequest, fake: tuple[FakeService, str]) -> Iterator[Any]:
    """connect(max_concurrency=4) -> a Caller of the sync or the async client."""
    callers: list[Caller] = []

    def make(max_concurrency: int = 4) -> Caller:
        caller: Caller = KINDS[request.param](fake[1], max_concurrency)
        callers.append(caller)
        return caller

    yield make
    for caller in callers:
        caller.close()


def _in_order(result: EmbedResult, texts: Sequence[str]) -> None:
    n = len(texts)
    assert result.vectors.shape == (n, 2)
    np.testing.assert_array_equal(result.vectors[:, 0], np.arange(n))
    assert result.token_counts == [len(t) for t in texts]
    assert result.prompt_tokens == sum(map(len, texts)) == result.response.usage.prompt_tokens
    assert len(result.response.embeddings) == n and result.model == "fake"


def test_a_small_call_is_one_rpc_and_never_asks_the_limits(
    fake: tuple[FakeService, str], connect: Any
) -> None:
    service, _ = fake
    service.limits = DEFAULT_LIMITS
    result = connect().embed(["0 hello"])
    _in_order(result, ["0 hello"])
    assert service.sizes == [1] and service.info_calls == 0


def test_a_long_list_is_split_by_count_and_comes_back_in_order(
    fake: tuple[FakeService, str], connect: Any
) -> None:
    service, _ = fake
    service.limits = DEFAULT_LIMITS
    caller = connect()
    texts = _texts(5000)
    _in_order(caller.embed(texts), texts)
    assert sorted(service.sizes) == sorted([1024] * 4 + [904])
    # The limits are asked once per client, not per call.
    _in_order(caller.embed(texts[:300]), texts[:300])
    assert service.info_calls == 1


@pytest.mark.parametrize("max_concurrency", [1, 2, 4])
def test_sub_calls_in_flight_never_exceed_max_concurrency(
    fake: tuple[FakeService, str], connect: Any, max_concurrency: int
) -> None:
    service, _ = fake
    service.limits = pb.ServerLimits(max_inputs_per_request=10)
    service.gather = max_concurrency
    texts = _texts(200)
    _in_order(connect(max_concurrency).embed(texts), texts)
    assert service.sizes == [10] * 20
    assert service.peak == max_concurrency


def test_token_refusals_are_bisected_until_each_half_fits(
    fake: tuple[FakeService, str], connect: Any
) -> None:
    service, _ = fake
    service.limits = pb.ServerLimits(max_inputs_per_request=2048, max_request_tokens=1000)
    texts = _texts(200, 50)  # the client guesses 29 tokens a text, the fake counts 50
    _in_order(connect().embed(texts), texts)
    assert service.refused > 0 and 34 in service.sizes and 17 in service.sizes
    assert sum(service.accepted) == 200 and max(service.accepted) * 50 <= 1000


def test_a_refused_small_call_learns_the_limits_and_splits(
    fake: tuple[FakeService, str], connect: Any
) -> None:
    service, _ = fake
    service.limits = pb.ServerLimits(max_inputs_per_request=8)
    caller = connect()
    texts = _texts(20)
    _in_order(caller.embed(texts), texts)
    assert sorted(service.sizes) == [4, 8, 8, 20] and service.info_calls == 1
    service.sizes.clear()
    _in_order(caller.embed(texts), texts)  # now planned from the limits: no refusal
    assert sorted(service.sizes) == [4, 8, 8]

    service.limits = pb.ServerLimits(max_request_tokens=100)
    texts = _texts(10, 30)
    _in_order(connect().embed(texts), texts)


def test_one_text_over_the_token_limit_is_the_callers_error(
    fake: tuple[FakeService, str], connect: Any
) -> None:
    service, _ = fake
    service.limits = pb.ServerLimits(max_request_tokens=100)
    caller = connect()
    for texts in (["0 " + "x" * 200], [*_texts(40, 20), "40 " + "x" * 200]):
        with pytest.raises(grpc.RpcError) as caught:
            caller.embed(texts)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert sp.refusal_reason(caught.value) == sp.TOO_MANY_TOKENS


def test_the_first_failure_cancels_the_calls_in_flight_and_is_raised(
    fake: tuple[FakeService, str], connect: Any
) -> None:
    service, _ = fake
    service.limits = pb.ServerLimits(max_inputs_per_request=10)
    texts = ["boom", *_texts(100)[1:]]
    texts[10] = "slow 10"
    with pytest.raises(grpc.RpcError) as caught:
        connect(2).embed(texts)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    give_up = time.monotonic() + PATIENCE_S  # a bound on the loop, not a speed assertion
    while service.cancelled < 1 and time.monotonic() < give_up:
        time.sleep(0.01)
    assert service.cancelled == 1
    assert len(service.sizes) == 2  # nothing was sent after the failure


def test_tokenize_splits_by_count_and_keeps_the_order(
    fake: tuple[FakeService, str], connect: Any
) -> None:
    service, _ = fake
    service.limits = pb.ServerLimits(max_inputs_per_request=10)
    texts = _texts(95)
    results = connect().tokenize(texts)
    assert sorted(service.sizes) == sorted([10] * 9 + [5])
    assert [r.ids[1:-1] for r in results] == [[ord(c) for c in t] for t in texts]
    assert results[3].text_start == 1 and results[3].offsets[0] == (0, 1)


# --- the real servicer's refusals (fake engine) ---------------------------------------


async def test_the_real_servers_token_refusals_are_bisected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.config import ServiceConfig
    from service.server import EmbeddingServer
    from tests.fakes import FakeEngine, factory

    config = ServiceConfig(  # no HTTP or metrics port: nothing to collide with a parallel run
        port=0,
        http_port=0,
        metrics_port=0,
        grace_s=1.0,
        max_request_tokens=300,
        max_queue_tokens=9000,
    )
    server = EmbeddingServer(config, factory(FakeEngine()))  # type: ignore[arg-type]
    bisected: list[range] = []
    halves = sp.halves

    def counted(piece: range) -> list[range]:
        bisected.append(piece)
        return halves(piece)

    monkeypatch.setattr(sp, "halves", counted)
    await server.start()
    try:
        # Every "!" and "?" is a token of its own: denser than the client's guess.
        texts = [f"{i} " + "!?" * 20 for i in range(100)]
        async with AsyncEmbeddingClient(f"127.0.0.1:{server.port}") as client:
            info = await client.model_info()
            assert info.limits.max_request_tokens == 300
            whole = await client.embed(texts)
            alone = [await client.embed(texts[i : i + 5]) for i in range(0, 100, 5)]
        np.testing.assert_array_equal(whole.vectors, np.concatenate([a.vectors for a in alone]))
        assert whole.token_counts == [c for a in alone for c in a.token_counts]
        assert sum(whole.token_counts) > 300 and bisected  # refused, then split
    finally:
        await server.stop(grace_s=0)

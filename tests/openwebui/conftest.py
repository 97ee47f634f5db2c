"""The knowledge-base journey in the real Open WebUI against the real service: Open WebUI's
own cached venv (built here on first use), and one of each for this folder: the service
(the bundled MiniLM, with a tiny BERT cross-encoder beside it as its rerank model), Open
WebUI, an admin, and a knowledge base holding five real documents.

The processes are package-scoped, which for this folder is the session's worth of sharing,
and ends them (two vLLM engines and Open WebUI) before the rest of a full run goes on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.models.tiny_bert_reranker import build_tiny_bert_reranker
from tests.openwebui import documents
from tests.openwebui.venv import ensure_venv, venv_dir
from tests.openwebui.webui import KnowledgeBase, OpenWebUI, Upload, offline_env, start_openwebui
from tests.servers import ServerProcess, start_server

# `make serve`'s defaults, with a small memory share (two test runs may share the machine).
SERVER_ARGS = ["--gpu-memory-utilization", "0.05"]
# The rerank model beside it: a tiny cross-encoder needs little memory.
RERANK_ARGS = ["--rerank-gpu-memory-utilization", "0.05"]

CONTENT_TYPES = {".md": "text/markdown", ".txt": "text/plain", ".pdf": "application/pdf"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        path = Path(str(item.fspath))
        if here in path.parents:
            item.add_marker(pytest.mark.openwebui)
            # The journey runs the real engine; the venv cache's own tests run nothing.
            if path.name == "test_knowledge_base.py":
                item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def openwebui_venv() -> Path:
    """Built here on first use (minutes); a failure to build fails the tests, never skips."""
    fresh = not (venv_dir() / ".complete").exists()
    started = time.monotonic()
    venv = ensure_venv()
    if fresh:
        print(f"\nbuilt the Open WebUI venv {venv} in {time.monotonic() - started:.0f}s")
    return venv


@pytest.fixture(scope="package")
def reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT cross-encoder (ms-marco-MiniLM's shape, random weights): no real reranker
    weights exist offline. Its scores are real cross-encoder scores; its ranking is noise."""
    return build_tiny_bert_reranker(tmp_path_factory.mktemp("models") / "tiny-bert-reranker")


@pytest.fixture(scope="package")
def embedding_server(
    reranker_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One service for every mode: MiniLM, and the cross-encoder as its --rerank-model. A
    rerank request's `model` chooses: the cross-encoder's name, or MiniLM's for cosines."""
    log = tmp_path_factory.mktemp("openwebui-logs") / "service.log"
    server = start_server([*SERVER_ARGS, "--rerank-model", str(reranker_dir), *RERANK_ARGS], log)
    yield server
    server.stop()


def _model_names(server: ServerProcess, kind: str) -> list[str]:
    """The names /v1/models lists for the models of this kind ("embed" or "score")."""
    response = httpx.get(f"{server.base_url}/models", timeout=30)
    response.raise_for_status()
    return [str(card["id"]) for card in response.json()["data"] if card.get("kind") == kind]


@pytest.fixture(scope="package")
def served_model(embedding_server: ServerProcess) -> str:
    """The model name the service reports, which is what a user copies into Open WebUI."""
    names = _model_names(embedding_server, "embed")
    assert names, "/v1/models lists no embedding model"
    return names[0]


@pytest.fixture(scope="package")
def reranker_model(embedding_server: ServerProcess) -> str:
    """The cross-encoder's name as /v1/models lists it (kind "score"): Open WebUI's
    RAG_RERANKING_MODEL for the cross-encoder."""
    names = _model_names(embedding_server, "score")
    assert names, "/v1/models lists no rerank model (kind 'score')"
    return names[0]


@pytest.fixture(scope="package")
def openwebui(
    openwebui_venv: Path,
    embedding_server: ServerProcess,
    served_model: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OpenWebUI]:
    workdir = tmp_path_factory.mktemp("open-webui")
    env = offline_env(workdir / "data", embedding_server.base_url, served_model)
    webui = start_openwebui(openwebui_venv, workdir, env)
    webui.signup("Admin", "admin@example.com", "correct horse battery staple")
    yield webui
    webui.stop()


@pytest.fixture(scope="package")
def knowledge_base(
    openwebui: OpenWebUI, openwebui_venv: Path, tmp_path_factory: pytest.TempPathFactory
) -> KnowledgeBase:
    """Uploads, waits for processing, creates a knowledge base and adds the files, as the
    web page does. Failures are recorded for the tests to report, not raised here."""
    paths = documents.materialize(openwebui_venv, tmp_path_factory.mktemp("documents"))
    uploaded = [
        (name, openwebui.upload(path, CONTENT_TYPES[path.suffix])["id"])
        for name, path in paths.items()
    ]
    uploads = []
    for name, file_id in uploaded:
        status = openwebui.wait_processed(file_id)
        error = openwebui.file_error(file_id) if status == "failed" else ""
        uploads.append(Upload(name, file_id, status, error, False, ""))
    response = openwebui.post(
        "/api/v1/knowledge/create",
        json={"name": "Manuals", "description": "Package guides and licences"},
    )
    response.raise_for_status()
    kb_id = str(response.json()["id"])
    for upload in uploads:
        added = openwebui.post(
            f"/api/v1/knowledge/{kb_id}/file/add", json={"file_id": upload.file_id}
        )
        upload.added = added.status_code == 200
        upload.add_error = "" if upload.added else f"{added.status_code} {added.text[:300]}"
    return KnowledgeBase(kb_id, uploads)

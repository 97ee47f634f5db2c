"""The knowledge-base journey in the real Open WebUI against the real service: Open WebUI's
own cached venv (built here on first use), and one of each for this folder: the service
(bundled MiniLM), Open WebUI, an admin, and a knowledge base holding five real documents.

The processes are package-scoped, which for this folder is the session's worth of sharing,
and ends them (a vLLM engine and Open WebUI) before the rest of a full run goes on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.openwebui import documents
from tests.openwebui.venv import ensure_venv, venv_dir
from tests.openwebui.webui import KnowledgeBase, OpenWebUI, Upload, offline_env, start_openwebui
from tests.servers import ServerProcess, start_server

# `make serve`'s defaults, with a small memory share (two test runs may share the machine).
SERVER_ARGS = ["--gpu-memory-utilization", "0.05"]

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
def embedding_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("openwebui-logs") / "service.log"
    server = start_server(SERVER_ARGS, log)
    yield server
    server.stop()


@pytest.fixture(scope="package")
def served_model(embedding_server: ServerProcess) -> str:
    """The model name the service reports, which is what a user copies into Open WebUI."""
    response = httpx.get(f"{embedding_server.base_url}/models", timeout=30)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


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

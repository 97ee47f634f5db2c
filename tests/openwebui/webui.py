"""Run the real Open WebUI offline on loopback, and drive its REST API as its web page does."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.servers import free_port

# Generous bounds for a 2-core machine shared with the embedding engine: failing only
# after them, with what was seen, rather than asserting how fast anything is.
START_TIMEOUT_S = 600.0
PROCESSING_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 600.0


def offline_env(data_dir: Path, embedding_base_url: str, model: str) -> dict[str, str]:
    """Open WebUI's environment: its defaults except what keeps it offline and what points
    it at the service (what a user sets for an OpenAI-compatible embedding server)."""
    return {
        "DATA_DIR": str(data_dir),
        "WEBUI_SECRET_KEY": secrets.token_urlsafe(24),
        "WEBUI_AUTH": "True",
        "ENABLE_SIGNUP": "True",
        # Offline: OFFLINE_MODE also turns off the version check and model auto-updates.
        "OFFLINE_MODE": "True",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "SCARF_NO_ANALYTICS": "true",
        "DO_NOT_TRACK": "true",
        "ANONYMIZED_TELEMETRY": "false",
        # Its HTTP clients honour proxy variables; the service is on loopback.
        "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1,localhost"])),
        # No chat backends: there is no LLM here, and none may be reached for.
        "ENABLE_OLLAMA_API": "False",
        "ENABLE_OPENAI_API": "False",
        # The embedding engine "openai" (so the default sentence-transformers model, which
        # would be downloaded, is never loaded) pointed at the service.
        "RAG_EMBEDDING_ENGINE": "openai",
        "RAG_OPENAI_API_BASE_URL": embedding_base_url,
        "RAG_OPENAI_API_KEY": "sk-anything",
        "RAG_EMBEDDING_MODEL": model,
        # The reranker is external (no cross-encoder to download); it is used only while
        # hybrid search is on, which the tests switch per run.
        "RAG_RERANKING_ENGINE": "external",
        "RAG_EXTERNAL_RERANKER_URL": f"{embedding_base_url}/rerank",
        "RAG_EXTERNAL_RERANKER_API_KEY": "sk-anything",
        "RAG_RERANKING_MODEL": model,
    }


@dataclass
class Upload:
    name: str
    file_id: str
    status: str  # Open WebUI's processing status: completed or failed
    error: str  # its error text when failed
    added: bool  # whether /knowledge/{id}/file/add took it
    add_error: str


@dataclass
class KnowledgeBase:
    id: str
    uploads: list[Upload]

    def file_id(self, name: str) -> str:
        return next(u.file_id for u in self.uploads if u.name == name)


@dataclass
class OpenWebUI:
    """A running Open WebUI, and the admin session signed up on it."""

    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    token: str = ""
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.base_url, timeout=REQUEST_TIMEOUT_S)

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> list[str]:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace").splitlines()

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    # ------------------------------------------------------------------ REST, as the page

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path, headers=self._headers())

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.post(path, headers=self._headers(), **kwargs)

    def signup(self, name: str, email: str, password: str) -> dict[str, Any]:
        """The first user to sign up becomes the admin; keeps its token."""
        response = self.post(
            "/api/v1/auths/signup", json={"name": name, "email": email, "password": password}
        )
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        self.token = str(body["token"])
        return body

    def upload(self, path: Path, content_type: str) -> dict[str, Any]:
        with path.open("rb") as f:
            response = self.post("/api/v1/files/", files={"file": (path.name, f, content_type)})
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def wait_processed(self, file_id: str, timeout_s: float = PROCESSING_TIMEOUT_S) -> str:
        """Polls the file's processing status until it is completed or failed."""
        deadline = time.monotonic() + timeout_s
        status = "pending"
        while time.monotonic() < deadline:
            response = self.get(f"/api/v1/files/{file_id}/process/status")
            response.raise_for_status()
            status = str(response.json()["status"])
            if status in ("completed", "failed"):
                return status
            time.sleep(1)
        raise TimeoutError(f"file {file_id} still {status!r} after {timeout_s:.0f}s")

    def file_error(self, file_id: str) -> str:
        response = self.get(f"/api/v1/files/{file_id}")
        response.raise_for_status()
        data = response.json().get("data") or {}
        return str(data.get("error") or "")

    def update_rag_config(self, **settings: Any) -> dict[str, Any]:
        """The admin panel's Documents settings, saved."""
        response = self.post("/api/v1/retrieval/config/update", json=settings)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


def start_openwebui(venv: Path, workdir: Path, env: dict[str, str]) -> OpenWebUI:
    """`open-webui serve` on a free loopback port; returns once /ready answers 200."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "open-webui.log"
    # Only what a shell would pass on; nothing of the test venv's Python setup.
    base = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    base["PATH"] = f"{venv / 'bin'}{os.pathsep}{base.get('PATH', '')}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(venv / "bin" / "open-webui"), "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**base, **env},
        )
    webui = OpenWebUI(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"open-webui exited with {process.returncode}:\n{webui.log_tail()}")
        try:
            if webui.http.get("/ready", timeout=5).status_code == 200:
                return webui
        except httpx.HTTPError:
            pass
        time.sleep(1)
    webui.stop()
    raise RuntimeError(f"open-webui not ready after {START_TIMEOUT_S:.0f}s:\n{webui.log_tail()}")

"""The Open WebUI venv cache: a half-finished build is redone, a finished one reused, and a
failed one fails loudly (no network or pip here: the build step is replaced)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.openwebui import venv as owui_venv


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(owui_venv.OVERRIDE_ENV, raising=False)
    done: list[Path] = []

    def fake_build(venv: Path, use_constraints: bool, log: Path) -> None:
        venv.mkdir(parents=True, exist_ok=True)
        (venv / owui_venv.MARKER).write_text("open-webui==0\n")
        done.append(venv)

    monkeypatch.setattr(owui_venv, "_build", fake_build)
    return done


def test_cache_path_names_version_and_hash(builds: list[Path], tmp_path: Path) -> None:
    venv = owui_venv.venv_dir()
    assert venv.parent == tmp_path / "embedding-service"
    assert venv.name.startswith(f"open-webui-{owui_venv.pinned_version()}-")


def test_builds_once_then_reuses(builds: list[Path]) -> None:
    first = owui_venv.ensure_venv()
    assert owui_venv.ensure_venv() == first
    assert builds == [first]


def test_half_finished_build_is_redone(builds: list[Path]) -> None:
    venv = owui_venv.venv_dir()
    (venv / "bin").mkdir(parents=True)  # an earlier build stopped before its marker
    assert owui_venv.ensure_venv() == venv
    assert builds == [venv]


def test_failed_build_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(owui_venv.OVERRIDE_ENV, raising=False)
    monkeypatch.setattr(owui_venv, "base_python", lambda: "/nonexistent/python3.11")
    with pytest.raises(owui_venv.VenvBuildError, match="python -m venv"):
        owui_venv.ensure_venv()

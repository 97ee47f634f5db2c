"""Build (once) and find the cached virtual environment that runs the real Open WebUI.

Open WebUI pins ~150 packages that clash with the service's own (openai, transformers,
chromadb...), so it gets a venv of its own, outside the repo, keyed by a hash of what it
installs: `${XDG_CACHE_HOME:-~/.cache}/embedding-service/open-webui-<version>-<hash>`.
The test session builds it on first use; `python -m tests.openwebui.venv` does the same by
hand, and `--refreeze` rewrites constraints.txt from a fresh, unconstrained install.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements.txt"
# `pip freeze` of a working install: later installs reproduce exactly these versions.
CONSTRAINTS = HERE / "constraints.txt"
# Written last: a folder without it is a half-finished build and is rebuilt.
MARKER = ".complete"
# Points at an existing Open WebUI venv instead of the cached one (a developer's own).
OVERRIDE_ENV = "OPENWEBUI_VENV"


class VenvBuildError(RuntimeError):
    """The venv could not be built; the message says which step failed and why."""


def requirements() -> list[str]:
    """The pinned requirements, in install order."""
    lines = (line.split("#", 1)[0].strip() for line in REQUIREMENTS.read_text().splitlines())
    return [line for line in lines if line]


def pinned_version(name: str = "open-webui") -> str:
    for requirement in requirements():
        if requirement.startswith(f"{name}=="):
            return requirement.split("==", 1)[1]
    raise VenvBuildError(f"{REQUIREMENTS} pins no {name}")


def base_python() -> str:
    """The machine's Python 3.11 (Open WebUI 0.12 wants >=3.11,<3.13)."""
    found = shutil.which("python3.11")
    if found:
        return found
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    raise VenvBuildError("no python3.11 on PATH: Open WebUI 0.12 needs Python 3.11 or 3.12")


def cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "embedding-service"


def venv_dir(use_constraints: bool = True) -> Path:
    """Where the venv for the current requirement (and constraint) lists lives."""
    if OVERRIDE_ENV in os.environ:
        return Path(os.environ[OVERRIDE_ENV])
    digest = hashlib.sha256(REQUIREMENTS.read_bytes())
    if use_constraints and CONSTRAINTS.exists():
        digest.update(CONSTRAINTS.read_bytes())
    return cache_root() / f"open-webui-{pinned_version()}-{digest.hexdigest()[:12]}"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _run(cmd: list[str], log: Path, step: str) -> None:
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        env = {**os.environ, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        try:
            code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        except OSError as exc:
            raise VenvBuildError(f"building the Open WebUI venv failed at {step}: {exc}") from exc
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise VenvBuildError(
            f"building the Open WebUI venv failed at {step} (exit {code}); is the package "
            f"registry reachable? Full log: {log}\n{tail}"
        )


def _build(venv: Path, use_constraints: bool, log: Path) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    log.write_text("")
    _run([base_python(), "-m", "venv", str(venv)], log, "python -m venv")
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--progress-bar", "off"]
    if use_constraints:
        pip += ["-c", str(CONSTRAINTS)]
    # One requirement at a time, in order: torch first, so pip takes the CPU wheel on disk
    # before anything that depends on torch could pull another build from the index.
    for requirement in requirements():
        _run([*pip, requirement], log, f"pip install {requirement}")
    freeze = subprocess.run(
        [str(venv_python(venv)), "-m", "pip", "freeze", "--all", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (venv / MARKER).write_text(freeze)


def ensure_venv(use_constraints: bool = True) -> Path:
    """The Open WebUI venv, built first if it is missing or half-finished.

    Raises VenvBuildError (never skips) when it cannot be built, e.g. with no registry.
    """
    venv = venv_dir(use_constraints)
    if (venv / MARKER).exists():
        return venv
    if OVERRIDE_ENV in os.environ:
        raise VenvBuildError(f"{OVERRIDE_ENV}={venv} has no {MARKER}: not a finished build")
    if use_constraints and not CONSTRAINTS.exists():
        raise VenvBuildError(f"{CONSTRAINTS} is missing: run python -m tests.openwebui.venv")
    venv.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time across processes; the others wait and then find the marker.
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / MARKER).exists():
            _build(venv, use_constraints, Path(f"{venv}.log"))
    return venv


def _size_mb(path: Path) -> int:
    total = sum(p.lstat().st_size for p in path.rglob("*") if not p.is_symlink())
    return total // 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--refreeze",
        action="store_true",
        help="install without constraints.txt, then rewrite it from that install's pip freeze",
    )
    args = parser.parse_args()
    started = time.monotonic()
    venv = ensure_venv(use_constraints=not args.refreeze)
    print(f"{venv}: ready in {time.monotonic() - started:.0f} s, {_size_mb(venv)} MiB")
    if args.refreeze:
        header = f"# pip freeze of {' + '.join(requirements())} on Python 3.11 (CPU torch).\n"
        CONSTRAINTS.write_text(header + (venv / MARKER).read_text())
        print(f"wrote {CONSTRAINTS}")


if __name__ == "__main__":
    main()

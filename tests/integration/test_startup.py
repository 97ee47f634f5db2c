"""Start-up as an operator meets it: refused engine settings in one line, and a SIGTERM
while the model loads ends the process without waiting for the load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.servers import ROOT, free_port

# Bounds only: a passing run never gets near them, whatever else the machine is doing.
EXIT_BOUND_S = 600.0


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "service", "--port", str(free_port()), "--http-port", "0"]
    cmd += ["--metrics-port", "0", "--gpu-memory-utilization", "0.1", *args]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def _wait_for_line(process: subprocess.Popen[bytes], log: Path, text: str) -> None:
    deadline = time.monotonic() + EXIT_BOUND_S
    while text not in log.read_text(errors="replace"):
        assert process.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, f"no {text!r} in:\n{log.read_text()}"
        time.sleep(0.05)


def test_a_setting_the_engine_refuses_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    process = _spawn(["--dtype", "float13"], log)
    assert process.wait(EXIT_BOUND_S) == 1
    lines = log.read_text().splitlines()
    errors = [line for line in lines if "cannot start" in line]
    assert len(errors) == 1, lines
    # The line names the model whose engine refused, then the flag and the values it takes.
    assert errors[0].endswith(
        "cannot start: sentence-transformers/all-MiniLM-L6-v2: the engine refused its settings:"
        " --dtype 'float13' is not accepted: use one of 'auto', 'half', 'float16', 'bfloat16',"
        " 'float' or 'float32'"
    )
    assert not any("validation error" in line or "pydantic" in line for line in lines)


def test_sigterm_while_the_model_loads_exits_without_finishing_the_load(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    process = _spawn([], log)
    _wait_for_line(process, log, "loading")
    # Let the load get under way far enough to have started the engine's process.
    psutil_process = psutil.Process(process.pid)
    deadline = time.monotonic() + EXIT_BOUND_S
    while not psutil_process.children(recursive=True) and time.monotonic() < deadline:
        time.sleep(0.05)
    children = psutil_process.children(recursive=True)
    process.send_signal(signal.SIGTERM)
    assert process.wait(EXIT_BOUND_S) == 0
    text = log.read_text()
    assert "stopping while the model loads" in text
    assert "serving" not in text.replace("stopping while", ""), text
    # The engine processes the load had started are gone too, not orphaned.
    _, alive = psutil.wait_procs(children, timeout=EXIT_BOUND_S)
    assert not alive

"""What a supervisor hands one front-end process: kept free of vllm imports, since the
single-process server imports it too."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.engines.vllm_engine import EngineAttachment


@dataclass(frozen=True)
class FrontEndSlot:
    """Front end `index` of `count`: the listening HTTP socket they all accept on (None
    without HTTP), its client slot of each model's engine core by model kind (none with the
    null engine), and the pipe on which it tells the supervisor it is ready."""

    index: int
    count: int
    http_socket: socket.socket | None
    engines: Mapping[str, EngineAttachment]
    ready: Connection
    supervisor: int  # its pid: a front end whose supervisor is gone must not serve on

    def supervised(self) -> bool:
        return os.getppid() == self.supervisor

    def report_ready(self, metrics_port: int, ready_line: str) -> None:
        """Serving: its private /metrics port (0: none) for the supervisor to merge, and its
        ready line for the supervisor to log once for all."""
        self.ready.send((metrics_port, ready_line))

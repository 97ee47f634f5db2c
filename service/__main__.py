"""Entry point: `python -m service [flags]` (see --help; every flag has an EMBED_* variable)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

import uvloop

from service.config import load_config
from service.front_ends.supervisor import front_end_count, supervise
from service.server import serve
from service.telemetry.logs import configure_logging


def main(argv: Sequence[str] | None = None) -> int:
    config = load_config(argv)
    configure_logging(config.log_level, config.log_format)
    count = front_end_count(config)
    if count > 1:
        return supervise(config, count)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())

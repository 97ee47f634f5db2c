"""embed-files against a bare client stream of the same texts (issue 14; target >= 0.95).

Both embed the corpus's paragraphs through the same server, in alternating order (bare,
CLI, CLI, bare, ...), `rounds` times each:
- the bare stream: `EmbeddingClient.embed_stream`, 64 items per message, every vector
  decoded, timed from the call to the last result;
- the CLI: `embed-files` run in this process through its `main()`, from a JSONL file to a
  fresh Parquet dataset, timed whole (pre-scan, reading, streaming, the final commit).
The ratio is the CLI's median docs/s over the bare stream's. Every run appends its own
marker to each text, so no run is answered from the server's vector cache or from another
run's work.

    python -m benchmarks.cli                       # starts its own MiniLM service
    python -m benchmarks.cli --server HOST:PORT    # an already running one
    python -m benchmarks.cli -- --engine null      # its own service, with these flags

`compare()` is the function to call from elsewhere (it is synchronous: from async code, run
it with asyncio.to_thread); `run_with_service()` starts and stops a service around it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.corpus import Corpus, build
from benchmarks.servers import start_service
from embedding_client import EmbeddingClient
from embedding_client.cli.main import main as embed_files

# The server's caches would answer repeated texts without the engine.
SERVICE_ARGS = ["--prefix-caching", "false", "--vector-cache-mb", "0"]


def _texts(texts: Sequence[str], run: int) -> list[str]:
    return [f"{text} ({run})" for text in texts]


def _bare(address: str, texts: Sequence[str]) -> float:
    began = time.perf_counter()
    n = 0
    with EmbeddingClient(address) as client:
        items = ((str(i), text) for i, text in enumerate(texts))
        for result in client.embed_stream(items, items_per_message=64):
            if result.vector is None:
                raise RuntimeError(f"item {result.id} failed: {result.error}")
            n += 1
    if n != len(texts):
        raise RuntimeError(f"{n} results for {len(texts)} texts")
    return time.perf_counter() - began


def _cli(address: str, texts: Sequence[str], work: Path) -> float:
    source, out = work / "corpus.jsonl", work / "out.parquet"
    with open(source, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": str(i), "text": text}) + "\n")
    began = time.perf_counter()
    status = embed_files([str(source), "--out", str(out), "--server", address, "--quiet"])
    seconds = time.perf_counter() - began
    if status != 0:
        raise RuntimeError(f"embed-files exited with {status}")
    shutil.rmtree(out)
    return seconds


def compare(address: str, texts: Sequence[str], rounds: int = 3) -> dict[str, Any]:
    """docs/s of each run of each side, their medians and the ratio CLI / bare."""
    runs: dict[str, list[float]] = {"bare": [], "cli": []}
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        for n in range(2 * rounds):
            # bare, cli, cli, bare, bare, cli, ...: neither side always goes first.
            side = ("bare", "cli")[(n % 2) ^ ((n // 2) % 2)]
            corpus = _texts(texts, n)
            seconds = _cli(address, corpus, Path(tmp)) if side == "cli" else _bare(address, corpus)
            runs[side].append(len(texts) / seconds)
            print(f"  {side:4s} run {n + 1}: {len(texts) / seconds:8.1f} docs/s", flush=True)
    bare, cli = statistics.median(runs["bare"]), statistics.median(runs["cli"])
    return {
        "texts": len(texts),
        "rounds": rounds,
        "bare_docs_per_s": runs["bare"],
        "cli_docs_per_s": runs["cli"],
        "bare_median": bare,
        "cli_median": cli,
        "ratio": cli / bare,
    }


async def run_with_service(
    service_args: Sequence[str], texts: Sequence[str], rounds: int, log: Path
) -> dict[str, Any]:
    """compare() against a service of its own, started with SERVICE_ARGS + service_args."""
    server = await start_service([*SERVICE_ARGS, *service_args], log, name="service-cli")
    try:
        result = await asyncio.to_thread(compare, f"127.0.0.1:{server.port}", texts, rounds)
    finally:
        server.stop()
    result["service_args"] = [*SERVICE_ARGS, *service_args]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", help="an already running service (default: start one)")
    parser.add_argument("--corpus", type=Path, help="a corpus JSON file (default: built here)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side")
    parser.add_argument("--limit", type=int, default=0, help="texts per run (0: all)")
    parser.add_argument("--json", type=Path, help="write the result here")
    args, service_args = parser.parse_known_args(argv)
    service_args = [a for a in service_args if a != "--"]
    corpus = Corpus.load(args.corpus) if args.corpus else build()
    texts = corpus.kinds[corpus.long]
    texts = texts[: args.limit] if args.limit else texts
    print(f"embed-files vs bare stream: {len(texts)} {corpus.long}, {args.rounds} rounds")
    if args.server:
        result = compare(args.server, texts, args.rounds)
    else:
        log = Path(tempfile.gettempdir()) / "bench-cli-service.log"
        result = asyncio.run(run_with_service(service_args, texts, args.rounds, log))
    print(
        f"bare {result['bare_median']:.1f} docs/s, embed-files {result['cli_median']:.1f} "
        f"docs/s: ratio {result['ratio']:.3f} (target >= 0.95)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scenario 1, the engine ceiling: the service's own vLLM engine with no server in front.

The engine is built exactly as the service builds it (service.engines.loading.load_vllm, from
the same ServiceConfig), the corpus is tokenized beforehand with the service's tokenizer,
and the token ids go in as large batches, several in flight, so the engine never waits for
work. What it reaches is the most any server in front of this engine could.

Runs in a process of its own (vLLM spawns its engine-core process, and the memory goes back
when it ends):

    python -m benchmarks.ceiling --kind paragraphs --seconds 20 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.corpus import Corpus, build
from benchmarks.measure import Point, cpu_seconds
from service.config import ServiceConfig, load_config
from service.engines.loading import load_vllm
from service.model_card import resolve_model_path
from service.server import served_names
from service.tokenization import TextTokenizer, Truncation

BATCH = 256  # sequences per engine call
INFLIGHT = 4  # engine calls outstanding


async def _drive(config: ServiceConfig, kind: str, texts: Sequence[str], seconds: float) -> Point:
    path = resolve_model_path(config.model)
    engine = await asyncio.to_thread(load_vllm, config, path, served_names(config)[0])
    try:
        batches = _token_batches(path, engine.info.max_input_tokens, kind, texts)
        await engine.embed(batches[0][:8])  # first-call costs stay out of the timing
        pending: set[asyncio.Task[object]] = set()
        sizes: dict[asyncio.Task[object], tuple[int, int]] = {}
        done_texts = done_tokens = 0
        cpu_before = cpu_seconds(os.getpid())
        began = time.perf_counter()
        for batch in batches:
            if time.perf_counter() - began > seconds:
                break
            if len(pending) >= INFLIGHT:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
                    done_texts += sizes[task][0]
                    done_tokens += sizes[task][1]
            task = asyncio.ensure_future(engine.embed(batch))
            sizes[task] = (len(batch), sum(map(len, batch)))
            pending.add(task)
        for task in pending:
            await task
            done_texts += sizes[task][0]
            done_tokens += sizes[task][1]
        elapsed = time.perf_counter() - began
        # This process is the engine's client alone (no server, nothing to
        # tokenize): the CPU any front end on this engine pays at least.
        cpu_s = cpu_seconds(os.getpid()) - cpu_before
    finally:
        await engine.close()
    return Point(texts=done_texts, tokens=done_tokens, seconds=elapsed, cpu_s=cpu_s)


def _token_batches(
    path: Path, max_tokens: int, kind: str, texts: Sequence[str]
) -> list[list[list[int]]]:
    """The ids the service would send for `texts`, with its tokenizer and truncation."""
    tokenizer = TextTokenizer(path / "tokenizer.json", max_tokens, threads=1)
    try:
        ids = [t.ids for t in tokenizer.tokenize_sync(texts, "", Truncation.END, kind)]
    finally:
        tokenizer.close()
    return [ids[i : i + BATCH] for i in range(0, len(ids), BATCH)]


def run(config: ServiceConfig, kind: str, texts: Sequence[str], seconds: float) -> Point:
    return asyncio.run(_drive(config, kind, texts, seconds))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, help="a corpus JSON file (default: built here)")
    parser.add_argument("--kind", default="paragraphs", help="which of the corpus's kinds")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", help="write the result here")
    args, rest = parser.parse_known_args(argv)
    config = load_config(rest)  # the service's own flags: --model, --max-batch-tokens, ...
    corpus = Corpus.load(args.corpus) if args.corpus else build()
    point = run(config, args.kind, corpus.kinds[args.kind], args.seconds)
    print(f"ceiling {args.kind}: {point.docs_per_s:.1f} docs/s, {point.tokens_per_s:.0f} tok/s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(point.to_json(), f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What chunking costs: the splitter per 1,000 tokens, and stream throughput with chunking on
where every input is a single chunk (the price of asking for it on ordinary paragraphs).

The splitter is measured in this process on documents made of the corpus's paragraphs,
against semchunk when it is installed (it is not a dependency; it was the other candidate).
Throughput alternates plain and chunked streams of the paragraphs on one server, so both
see the same machine.

    python -m benchmarks.chunking --out benchmarks/results/chunking
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from benchmarks import load
from benchmarks.corpus import Corpus, build
from benchmarks.servers import start_service
from embedding.v1 import embedding_pb2 as pb
from service.chunking import Chunker
from service.config import BUNDLED_MODEL
from service.model_card import resolve_model_path

WINDOW = 256  # MiniLM's: chunks as a default CLI run would cut them
OVERLAP = 32
DOC_PARAGRAPHS = 40  # about 5,000 tokens a document


def _documents(paragraphs: Sequence[str]) -> list[str]:
    step = DOC_PARAGRAPHS
    return ["\n\n".join(paragraphs[i : i + step]) for i in range(0, len(paragraphs) - step, step)]


def splitter_cost(tokenizer: Tokenizer, docs: Sequence[str]) -> dict[str, Any]:
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch_fast(list(docs)))
    out: dict[str, Any] = {"documents": len(docs), "tokens": tokens}
    chunker = Chunker(tokenizer)
    for overlap in (0, OVERLAP):
        chunker.spans(docs[0], WINDOW - 2, overlap)  # the splitter built outside the timing
        began = time.perf_counter()
        chunks = sum(len(chunker.spans(d, WINDOW - 2, overlap)) for d in docs)
        seconds = time.perf_counter() - began
        out[f"semantic_text_splitter_overlap_{overlap}"] = {
            "ms_per_1000_tokens": round(seconds / tokens * 1e6, 2),
            "chunks": chunks,
        }
    try:  # not a dependency: measured where it is installed
        semchunk: Any = importlib.import_module("semchunk")
    except ImportError:
        return out
    chunk = semchunk.chunkerify(
        lambda t: len(tokenizer.encode(t, add_special_tokens=False)), WINDOW - 2
    )
    for overlap in (0, OVERLAP):
        began = time.perf_counter()
        chunks = sum(len(chunk(d, overlap=overlap / (WINDOW - 2) or None)) for d in docs)
        seconds = time.perf_counter() - began
        out[f"semchunk_overlap_{overlap}"] = {
            "ms_per_1000_tokens": round(seconds / tokens * 1e6, 2),
            "chunks": chunks,
        }
    return out


async def throughput(port: int, paragraphs: Sequence[str], rounds: int) -> dict[str, Any]:
    chunked = pb.EmbedOptions(chunking=pb.Chunking(max_tokens=WINDOW, overlap_tokens=OVERLAP))
    rates: dict[str, list[float]] = {"plain": [], "chunked": []}

    async def one(texts: Sequence[str], options: pb.EmbedOptions | None) -> float:
        # A connection per stream: the server closes connections older than 5 minutes.
        client = load.GrpcClient(port)
        try:
            return (await load.stream(client.stub, texts, options=options)).docs_per_s
        finally:
            await client.close()

    await one(paragraphs[:200], None)  # warm
    for _ in range(rounds):
        for name, options in (("plain", None), ("chunked", chunked)):
            rates[name].append(round(await one(paragraphs, options), 2))
    plain, chunk = sum(rates["plain"]), sum(rates["chunked"])
    return {"docs_per_s": rates, "chunked_over_plain": round(chunk / plain, 3)}


async def run(
    service_args: list[str], corpus: Corpus, out: Path, rounds: int = 3
) -> dict[str, Any]:
    paragraphs = corpus.kinds[corpus.long]
    tokenizer = Tokenizer.from_file(str(resolve_model_path(BUNDLED_MODEL) / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    result: dict[str, Any] = {"splitter": splitter_cost(tokenizer, _documents(paragraphs))}
    server = await start_service(service_args, out / "logs" / "chunking.log", "chunking")
    try:
        result["throughput"] = await throughput(server.port, paragraphs, rounds)
    finally:
        server.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/chunking"))
    parser.add_argument("--rounds", type=int, default=3)
    args, service_args = parser.parse_known_args()
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    service_args = ["--prefix-caching", "false", "--vector-cache-mb", "0", *service_args]
    result = asyncio.run(run(service_args, build(), args.out, args.rounds))
    (args.out / "chunking.json").write_text(json.dumps(result, indent=2) + "\n", "utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

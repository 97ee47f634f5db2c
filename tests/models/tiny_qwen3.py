"""A tiny, deterministic stand-in for Qwen3-Embedding that needs no model hub.

The real Qwen3-Embedding weights cannot be downloaded here, so tests build this folder instead.
It has the same file layout and the same behaviour that the service depends on:

- config.json says ``Qwen3ForCausalLM``; vLLM's ``runner="pooling"`` turns it into an embedding
  model, exactly as it does for the real checkpoint;
- the weights are those of the base ``Qwen3Model`` (keys without a ``model.`` prefix), as in the
  real checkpoint;
- the tokenizer is a byte-level BPE whose post-processor appends ``<|endoftext|>`` to every
  sequence, and ``<|endoftext|>`` is also the pad token. The special tokens come after the BPE
  vocabulary, as in Qwen's tokenizer, so nothing can get away with assuming that pad is id 0;
- the sentence-transformers files ask for last-token pooling plus normalization, and carry the
  query prompt;
- ``max_position_embeddings`` is 32,768, Qwen3-Embedding's window, and the tokenizer and
  sentence-transformers configs say the same. A smaller window hid issue 19: the service refused
  to start any model whose window is larger than ``--max-batch-tokens``. The model is so small
  that an input of the full window still embeds in seconds on a CPU.

Building it is deterministic: the same bytes every run, given the same CPython (its docstrings
are the tokenizer's training text) and the same torch (its random generator makes the weights).
It takes a few seconds, most of it importing torch and transformers.
"""

from __future__ import annotations

import ast
import pathlib
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Any

from tokenizers import Tokenizer

from tests.models.qwen3_files import (
    SPECIAL_TOKENS,
    train_tokenizer,
    write_json,
    write_sentence_transformers_files,
    write_tokenizer_files,
)

VOCAB_SIZE = 1000
MAX_POSITIONS = 32768  # Qwen3-Embedding's window (all three sizes)
HIDDEN_SIZE = 128
SEED = 1234

# The special tokens are appended after the BPE vocabulary, like Qwen's (151643 = EOS there).
BPE_VOCAB_SIZE = VOCAB_SIZE - len(SPECIAL_TOKENS)
EOS_TOKEN_ID = BPE_VOCAB_SIZE

# Real English prose that every CPython 3.11 install has on disk: the licence text and the
# docstrings of these modules. A fixed list in a fixed order keeps the training input stable.
_CORPUS_MODULES = (
    "argparse.py",
    "asyncio/events.py",
    "asyncio/queues.py",
    "asyncio/tasks.py",
    "collections/__init__.py",
    "concurrent/futures/_base.py",
    "contextlib.py",
    "dataclasses.py",
    "email/message.py",
    "functools.py",
    "http/client.py",
    "json/__init__.py",
    "logging/__init__.py",
    "pathlib.py",
    "shutil.py",
    "subprocess.py",
    "textwrap.py",
    "threading.py",
    "typing.py",
    "unittest/case.py",
    "urllib/parse.py",
    "zipfile.py",
)

# Qwen3-Embedding-0.6B's config.json, scaled down. Legacy keys (torch_dtype, rope_theta) are kept
# on purpose: the real file has them, so vLLM and transformers must cope with them here too.
_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": EOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": EOS_TOKEN_ID,
    "head_dim": 64,  # CPU attention in vLLM rejects head_dim 16; 64 works
    "hidden_act": "silu",
    "hidden_size": HIDDEN_SIZE,
    # Larger than Qwen's 0.02 so that vectors depend more on the text: queries that share the
    # long instruction prefix came out at mean cosine 0.87 with 0.02 and 0.68 with 0.2.
    "initializer_range": 0.2,
    "intermediate_size": 256,
    "max_position_embeddings": MAX_POSITIONS,
    "max_window_layers": 2,
    "model_type": "qwen3",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,  # as in the 0.6B; the embedder has no lm_head anyway
    "torch_dtype": "float32",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": VOCAB_SIZE,
}


def build_tiny_qwen3(target: pathlib.Path) -> pathlib.Path:
    """Write the tiny model folder into ``target`` (created if needed) and return it."""
    target = pathlib.Path(target)
    target.mkdir(parents=True, exist_ok=True)
    write_json(target / "config.json", _CONFIG)
    _write_weights(target / "model.safetensors")
    write_tokenizer_files(target, train_tokenizer(_corpus(), BPE_VOCAB_SIZE), MAX_POSITIONS)
    write_sentence_transformers_files(target, HIDDEN_SIZE, MAX_POSITIONS)
    return target


def _write_weights(path: pathlib.Path) -> None:
    # Imported here: torch and transformers are slow to import, and only this step needs them.
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(**{k: v for k, v in _CONFIG.items() if k != "architectures"})
    # fork_rng: a fixed seed for the weights without disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen3Model(config)
        # transformers initialises RMSNorm weights to exactly 1, which makes every raw (not yet
        # normalized) last-token vector have norm sqrt(hidden_size). Trained models do not, and
        # tests of normalization should not pass by that accident, so jitter them.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.add_(0.2 * torch.randn_like(param))
    # Save the base model's tensors without a "model." prefix, as Qwen3-Embedding does.
    # Non-persistent buffers (rotary inv_freq) are not in the state dict, as in a real checkpoint.
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if any(t.dtype != torch.float32 for t in tensors.values()):
        raise RuntimeError("expected float32 weights")
    save_file(tensors, str(path), metadata={"format": "pt"})


def _corpus() -> list[str]:
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / "LICENSE.txt").read_text(encoding="utf-8"), *_docstrings(_CORPUS_MODULES)]


def _docstrings(modules: Sequence[str]) -> Iterator[str]:
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for relative in modules:
        tree = ast.parse((stdlib / relative).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


# Prose for long test documents: docstrings of modules that are not the tokenizer's training
# text, so a document tokenizes as unseen English does (about 2.6 characters a token).
_DOCUMENT_MODULES = (
    "inspect.py",
    "os.py",
    "socket.py",
    "tarfile.py",
    "tempfile.py",
    "smtplib.py",
    "mailbox.py",
    "optparse.py",
    "configparser.py",
    "enum.py",
    "pdb.py",
    "random.py",
    "traceback.py",
    "asyncio/base_events.py",
    "asyncio/streams.py",
    "selectors.py",
    "queue.py",
    "sched.py",
    "calendar.py",
    "ftplib.py",
    "imaplib.py",
    "pickle.py",
)  # about 77,000 tokens of the tiny tokenizer in all (CPython 3.11)


def long_document(model_dir: pathlib.Path, min_tokens: int) -> str:
    """Natural English of `min_tokens` tokens or a few more (the EOS included), counted with the
    model's own tokenizer: paragraphs of docstrings, cut after a word. The same text every time."""
    tokenizer = Tokenizer.from_file(str(pathlib.Path(model_dir) / "tokenizer.json"))

    def count(text: str) -> int:
        return len(tokenizer.encode(text).ids)

    paragraphs: list[str] = []
    estimate = 0  # pieces counted alone do not add up exactly across the joins
    for paragraph in _docstrings(_DOCUMENT_MODULES):
        paragraphs.append(paragraph)
        estimate += count(paragraph)  # its EOS stands for the join
        if estimate >= min_tokens:
            text = "\n\n".join(paragraphs)
            if count(text) >= min_tokens:
                break
    else:
        raise ValueError(f"the prose runs out before {min_tokens} tokens")
    # The shortest run of whole words from the start that still reaches min_tokens.
    cuts = [i for i, char in enumerate(text) if char == " "] + [len(text)]
    low, high = 0, len(cuts) - 1
    while low < high:
        middle = (low + high) // 2
        if count(text[: cuts[middle]]) >= min_tokens:
            high = middle
        else:
            low = middle + 1
    return text[: cuts[low]]

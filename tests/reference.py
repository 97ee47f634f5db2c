"""Reference embeddings from plain transformers + torch, to check the service's vectors against.

Deliberately independent of the code under test: no vLLM and no sentence-transformers, only the
textbook recipe for each model. Models are loaded once per folder and run in float32, eval mode,
without gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import AutoModel, AutoTokenizer

# sentence_bert_config.json of all-MiniLM-L6-v2: sentence-transformers truncates there.
MINILM_MAX_SEQ_LENGTH = 256


@functools.lru_cache(maxsize=8)
def _load_model(model_dir: Path) -> Any:
    # sdpa, named rather than left to transformers' default: eager attention would hold a
    # (tokens x tokens) float32 matrix per head, 6 GiB for two heads at 27.5k tokens.
    model = AutoModel.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.eval()


@functools.lru_cache(maxsize=8)
def _load_auto_tokenizer(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(model_dir))


@functools.lru_cache(maxsize=8)
def _load_fast_tokenizer(model_dir: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # Some tokenizer.json files (MiniLM's) pad and truncate to a fixed 128; the ids that the
    # service sends are neither padded nor truncated by the tokenizer.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def minilm_reference(model_dir: Path, texts: Sequence[str]) -> npt.NDArray[np.float32]:
    """all-MiniLM-L6-v2 as sentence-transformers computes it: mean pooling, then L2; (n, 384)."""
    model_dir = Path(model_dir).resolve()
    tokenizer = _load_auto_tokenizer(model_dir)
    model = _load_model(model_dir)
    # Explicit padding/truncation override the fixed 128 configured in the bundled tokenizer.json,
    # giving sentence-transformers' semantics: pad to the longest, truncate at max_seq_length.
    batch = tokenizer(
        list(texts),
        padding=True,
        truncation=True,
        max_length=MINILM_MAX_SEQ_LENGTH,
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        pooled = F.normalize(summed / counts, p=2, dim=1)
    result: npt.NDArray[np.float32] = pooled.numpy().astype(np.float32)
    return result


def last_token_reference(
    model_dir: Path, token_ids: Sequence[Sequence[int]], normalize: bool = True
) -> npt.NDArray[np.float32]:
    """Qwen3-Embedding's recipe: the last position's hidden state of the base model.

    ``token_ids`` are final model inputs (they already end with the EOS the model pools on).
    Sequences are left-padded, so the last position of every row is a real token. Without
    padding (one sequence, or all of one length) no mask is passed, so sdpa runs its causal
    kernel, which never holds the whole attention matrix: for the tiny Qwen3 at 27.5k tokens
    the whole process peaks at about 0.75 GiB, and the call takes 2-8 s on two shared cores.
    """
    if not token_ids or any(len(ids) == 0 for ids in token_ids):
        raise ValueError("token_ids must hold at least one non-empty sequence")
    model_dir = Path(model_dir).resolve()
    model = _load_model(model_dir)
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    longest = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), longest), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, longest - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, longest - len(ids) :] = 1
    # Positions count real tokens only, so each row sees the positions it would see unpadded
    # (RoPE is relative, so this changes rounding only, but it keeps the comparison tight).
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    padded = any(len(ids) < longest for ids in token_ids)
    with torch.no_grad():
        hidden = model(
            input_ids=input_ids,
            attention_mask=attention_mask if padded else None,
            position_ids=position_ids,
        ).last_hidden_state
        pooled = hidden[:, -1, :]
        if normalize:
            pooled = F.normalize(pooled, p=2, dim=1)
    result: npt.NDArray[np.float32] = pooled.numpy().astype(np.float32)
    return result


def tokenize_for_reference(model_dir: Path, texts: Sequence[str]) -> list[list[int]]:
    """Token ids as the model's tokenizer.json gives them, special tokens included (EOS last)."""
    tokenizer = _load_fast_tokenizer(Path(model_dir).resolve())
    return [list(enc.ids) for enc in tokenizer.encode_batch(list(texts), add_special_tokens=True)]

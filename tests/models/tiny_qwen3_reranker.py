"""A tiny, deterministic stand-in for Qwen3-Reranker that needs no model hub.

The published Qwen3-Reranker checkpoints are plain causal LMs; the score is the model's
next-token preference for "yes" over "no" after the model card's prompt. This folder has the
same layout and the same properties the service depends on:

- config.json says ``Qwen3ForCausalLM`` with ``tie_word_embeddings`` true, as Qwen3-Reranker-0.6B
  does, and the weights carry the ``model.`` prefix with no separate ``lm_head`` (tied);
- the tokenizer is the tiny Qwen3's byte-level BPE (tests/models/qwen3_files.py) without the
  Qwen3-Embedding post-processor that appends ``<|endoftext|>`` (the reranker's tokenizer adds
  nothing), with Qwen's chat special tokens ``<|im_start|>`` and ``<|im_end|>``, the added (not
  special) ``<think>`` and ``</think>``, and ``yes`` and ``no`` each a single BPE token;
- ``max_position_embeddings`` is 256, so a paragraph overflows the window and the document has
  to be cut between the prompt's fixed prefix and suffix.
"""

from __future__ import annotations

import pathlib
from typing import Any

from tokenizers import AddedToken, Tokenizer, processors

from tests.models.qwen3_files import EOS_TOKEN, SPECIAL_TOKENS, train_tokenizer, write_json
from tests.models.tiny_qwen3 import _corpus

BPE_VOCAB_SIZE = 995
THINK_TOKENS = ("<think>", "</think>")
# Config rows past the tokenizer's ids, as the real checkpoint has (151,936 for 151,669 ids).
VOCAB_SIZE = 1024
MAX_POSITIONS = 256
HIDDEN_SIZE = 128
SEED = 2468

EOS_TOKEN_ID = BPE_VOCAB_SIZE  # <|endoftext|>
IM_END_ID = BPE_VOCAB_SIZE + SPECIAL_TOKENS.index("<|im_end|>")

# Qwen3-Reranker-0.6B's config.json, scaled down (legacy keys kept, as the real file has them).
_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": EOS_TOKEN_ID,
    "eos_token_id": IM_END_ID,
    "head_dim": 64,  # CPU attention in vLLM rejects head_dim 16; 64 works
    "hidden_act": "silu",
    "hidden_size": HIDDEN_SIZE,
    # Larger than Qwen's 0.02 so that the yes/no logits differ by a few units between pairs.
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
    "tie_word_embeddings": True,  # as in Qwen3-Reranker-0.6B
    "torch_dtype": "float32",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": VOCAB_SIZE,
}

# Bare "yes" and "no" pre-tokens (after a newline nothing attaches to them), frequent enough
# that BPE learns each as one token.
_YES_NO = "yes\nno\n" * 400


def build_tiny_qwen3_reranker(target: pathlib.Path, weights: bool = True) -> pathlib.Path:
    """Write the model folder into ``target`` (created if needed) and return it.

    ``weights`` False leaves the weights out (tokenizer and config tests need no torch).
    """
    target = pathlib.Path(target)
    target.mkdir(parents=True, exist_ok=True)
    write_json(target / "config.json", _CONFIG)
    if weights:
        _write_weights(target / "model.safetensors")
    _write_tokenizer(target, _train_tokenizer())
    write_json(
        target / "generation_config.json",
        {"bos_token_id": EOS_TOKEN_ID, "eos_token_id": [IM_END_ID, EOS_TOKEN_ID]},
    )
    return target


def _train_tokenizer() -> Tokenizer:
    tokenizer = train_tokenizer([*_corpus(), _YES_NO], BPE_VOCAB_SIZE)
    # Qwen3's own post-processor: byte-level offsets only, no tokens added.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    for word in ("yes", "no"):
        if len(tokenizer.encode(word).ids) != 1:
            raise RuntimeError(f"{word!r} is not a single token")
    return tokenizer


def _write_tokenizer(target: pathlib.Path, tokenizer: Tokenizer) -> None:
    tokenizer.save(str(target / "tokenizer.json"), pretty=True)
    added = {
        str(tokenizer.token_to_id(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token in SPECIAL_TOKENS,
        }
        for token in (*SPECIAL_TOKENS, *THINK_TOKENS)
    }
    write_json(
        target / "tokenizer_config.json",
        {
            "added_tokens_decoder": added,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "model_max_length": MAX_POSITIONS,
            "pad_token": EOS_TOKEN,
            "split_special_tokens": False,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": None,
        },
    )
    write_json(
        target / "special_tokens_map.json",
        {"eos_token": "<|im_end|>", "pad_token": EOS_TOKEN},
    )


def _write_weights(path: pathlib.Path) -> None:
    # Imported here: torch and transformers are slow to import, and only this step needs them.
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**{k: v for k, v in _CONFIG.items() if k != "architectures"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen3ForCausalLM(config)  # type: ignore[no-untyped-call]
        with torch.no_grad():  # RMSNorm weights are exactly 1 at init; trained ones are not
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.add_(0.2 * torch.randn_like(param))
    # Tied: the checkpoint holds the embedding once, under model.embed_tokens, as Qwen's does.
    tensors = {
        name: t.detach().contiguous()
        for name, t in model.state_dict().items()
        if name != "lm_head.weight"
    }
    if any(t.dtype != torch.float32 for t in tensors.values()):
        raise RuntimeError("expected float32 weights")
    save_file(tensors, str(path), metadata={"format": "pt"})

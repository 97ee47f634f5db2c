"""The files of a Qwen3-Embedding-style model folder, apart from config.json and weights.

Shared by the tiny test model (tests/models/tiny_qwen3.py) and the GPU benchmark's models
with real shapes (benchmarks/gpu.py): a byte-level BPE tokenizer trained on given text, whose
post-processor appends <|endoftext|> as Qwen3-Embedding's does (the model pools on it), the
tokenizer config, and the sentence-transformers files the service's model card reads
(last-token pooling, normalization, the query prompt).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")

QUERY_PROMPT = (
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
)

# Qwen2/Qwen3's pre-tokenizer split, copied from their tokenizer.json.
_QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def write_json(path: pathlib.Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def train_tokenizer(texts: Iterable[str], bpe_vocab_size: int) -> Tokenizer:
    """Byte-level BPE as Qwen's; the special tokens come right after the BPE vocabulary (as
    in Qwen's tokenizer), so EOS is id `bpe_vocab_size`."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        # All 256 byte symbols, so any text can be encoded and nothing is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() != bpe_vocab_size:
        raise RuntimeError(f"BPE vocabulary is {tokenizer.get_vocab_size()}, not {bpe_vocab_size}")
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    if tokenizer.token_to_id(EOS_TOKEN) != bpe_vocab_size:
        raise RuntimeError(f"{EOS_TOKEN} got id {tokenizer.token_to_id(EOS_TOKEN)}")
    # Qwen3-Embedding's tokenizer appends EOS to every sequence; the model pools on it.
    tokenizer.post_processor = TemplateProcessing(
        single=f"$A:0 {EOS_TOKEN}:0",
        pair=f"$A:0 {EOS_TOKEN}:0 $B:1 {EOS_TOKEN}:1",
        special_tokens=[(EOS_TOKEN, bpe_vocab_size)],
    )
    # The service truncates and pads on its own; the tokenizer must not do it behind its back.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def eos_id(tokenizer: Tokenizer) -> int:
    found = tokenizer.token_to_id(EOS_TOKEN)
    if found is None:
        raise ValueError(f"tokenizer has no {EOS_TOKEN}")
    return int(found)


def write_tokenizer_files(target: pathlib.Path, tokenizer: Tokenizer, max_len: int) -> None:
    tokenizer.save(str(target / "tokenizer.json"), pretty=True)
    first = eos_id(tokenizer)
    added_tokens = {
        str(first + i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, token in enumerate(SPECIAL_TOKENS)
    }
    write_json(
        target / "tokenizer_config.json",
        {
            "added_tokens_decoder": added_tokens,
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": EOS_TOKEN,
            "model_max_length": max_len,
            "pad_token": EOS_TOKEN,
            "padding_side": "left",  # as Qwen3-Embedding: the last position is always the EOS
            "split_special_tokens": False,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": None,
        },
    )
    write_json(
        target / "special_tokens_map.json",
        {"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN},
    )


def write_sentence_transformers_files(target: pathlib.Path, hidden: int, max_len: int) -> None:
    modules = (("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize"))
    write_json(
        target / "modules.json",
        [
            {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{t}"}
            for i, (path, t) in enumerate(modules)
        ],
    )
    write_json(
        target / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": hidden,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": True,
            "include_prompt": True,
        },
    )
    write_json(
        target / "config_sentence_transformers.json",
        {
            "prompts": {"query": QUERY_PROMPT, "document": ""},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )
    write_json(
        target / "sentence_bert_config.json",
        {"max_seq_length": max_len, "do_lower_case": False},
    )

"""A tiny, deterministic BERT cross-encoder (ms-marco-MiniLM's layout) that needs no model hub.

Same files and behaviour as a published sequence-classification cross-encoder:

- config.json says ``BertForSequenceClassification`` with one label, ``type_vocab_size`` 2 (pairs
  carry token type ids) and sentence-transformers' sigmoid activation, as ms-marco-MiniLM's does;
- the tokenizer is a lower-casing WordPiece whose post-processor builds ``[CLS] q [SEP] d [SEP]``
  with token type 1 on ``d [SEP]``, trained with ``tokenizers`` on CPython's own prose;
- the weights are random with a fixed seed, at shapes vLLM's CPU attention accepts (head_dim
  64), scaled up (initializer range 0.2) so the logits spread over a few units rather than
  sitting at 0, and token types change them visibly;
- ``max_position_embeddings`` is 128, so a paragraph already overflows the window.
"""

from __future__ import annotations

import pathlib
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing

from tests.models.qwen3_files import write_json
from tests.models.tiny_qwen3 import _corpus

VOCAB_SIZE = 1000
MAX_POSITIONS = 128
HIDDEN_SIZE = 128
SEED = 4321
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

_CONFIG: dict[str, Any] = {
    "architectures": ["BertForSequenceClassification"],
    "attention_probs_dropout_prob": 0.1,
    "classifier_dropout": None,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": HIDDEN_SIZE,
    "id2label": {"0": "LABEL_0"},
    "label2id": {"LABEL_0": 0},
    "initializer_range": 0.2,
    "intermediate_size": 256,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": MAX_POSITIONS,
    "model_type": "bert",
    "num_attention_heads": 2,  # head_dim 64: vLLM's CPU attention rejects 16
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "sentence_transformers": {"activation_fn": "torch.nn.modules.activation.Sigmoid"},
    "torch_dtype": "float32",
    "type_vocab_size": 2,
    "vocab_size": VOCAB_SIZE,
}


def build_tiny_bert_reranker(target: pathlib.Path, weights: bool = True) -> pathlib.Path:
    """Write the model folder into ``target`` (created if needed) and return it.

    ``weights`` False leaves the weights out (tokenizer and config tests need no torch).
    """
    target = pathlib.Path(target)
    target.mkdir(parents=True, exist_ok=True)
    write_json(target / "config.json", _CONFIG)
    if weights:
        _write_weights(target / "model.safetensors")
    _write_tokenizer(target, _train_tokenizer())
    return target


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"WordPiece vocabulary is {tokenizer.get_vocab_size()}")
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    # BERT's template: the second sequence and its [SEP] are token type 1.
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _write_tokenizer(target: pathlib.Path, tokenizer: Tokenizer) -> None:
    tokenizer.save(str(target / "tokenizer.json"), pretty=True)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    (target / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab), "utf-8")
    added = {
        str(tokenizer.token_to_id(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in SPECIAL_TOKENS
    }
    write_json(
        target / "tokenizer_config.json",
        {
            "added_tokens_decoder": added,
            "clean_up_tokenization_spaces": True,
            "cls_token": "[CLS]",
            "do_lower_case": True,
            "mask_token": "[MASK]",
            "model_max_length": MAX_POSITIONS,
            "pad_token": "[PAD]",
            "sep_token": "[SEP]",
            "strip_accents": None,
            "tokenize_chinese_chars": True,
            "tokenizer_class": "BertTokenizer",
            "unk_token": "[UNK]",
        },
    )
    write_json(
        target / "special_tokens_map.json",
        {
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
            "pad_token": "[PAD]",
            "sep_token": "[SEP]",
            "unk_token": "[UNK]",
        },
    )


def _write_weights(path: pathlib.Path) -> None:
    # Imported here: torch and transformers are slow to import, and only this step needs them.
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(**{k: v for k, v in _CONFIG.items() if k != "architectures"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = BertForSequenceClassification(config)  # type: ignore[no-untyped-call]
        # transformers sets LayerNorm weights to exactly 1 and biases to 0; trained models
        # have neither, and a test should not pass by that accident.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "LayerNorm" in name or name.endswith(".bias"):
                    param.add_(0.1 * torch.randn_like(param))
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if any(t.dtype != torch.float32 for t in tensors.values()):
        raise RuntimeError("expected float32 weights")
    save_file(tensors, str(path), metadata={"format": "pt"})

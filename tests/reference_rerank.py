"""Reference reranker scores from plain transformers + torch, to check the service's against.

Deliberately independent of the code under test (no vLLM, nothing from service/): each model
family is scored the textbook way, from the query and document texts.

- BERT-style cross-encoders: the tokenizer's own pair encoding (AutoTokenizer, as
  sentence-transformers' CrossEncoder loads it) with ``truncation="only_second"``, then
  AutoModelForSequenceClassification; the score is sigmoid(logit), as CrossEncoder.predict
  gives it. Token type ids are asked for explicitly: transformers 5's generic
  PreTrainedTokenizerFast leaves them out unless told, and BERT then silently reads all
  zeros.
- Qwen3-Reranker: the model card's recipe, copied here: its prompt, its tokenization (prefix,
  formatted pair, suffix), its truncation of the pair to fit beside prefix and suffix, and
  softmax over the last position's "no" and "yes" logits of AutoModelForCausalLM.

Models run in float32, eval mode, without gradients, one pair at a time (no padding).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

# From Qwen3-Reranker's model card (huggingface.co/Qwen/Qwen3-Reranker-0.6B).
QWEN3_DEFAULT_INSTRUCTION = (
    "Given a web search query, retrieve relevant passages that answer the query"
)
QWEN3_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
# What vLLM's shipped qwen3_reranker.jinja renders instead (Jinja drops the last newline).
QWEN3_SUFFIX_VLLM_TEMPLATE = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n"


@dataclass(frozen=True)
class Scores:
    logits: npt.NDArray[np.float64]  # BERT: the logit; Qwen3: logit(yes) - logit(no)
    probabilities: npt.NDArray[np.float64]  # sigmoid(logit) = softmax([no, yes])[yes]
    input_ids: list[list[int]]  # what the model read, per pair


@functools.lru_cache(maxsize=4)
def _classifier(model_dir: Path) -> Any:
    model = cast(Any, AutoModelForSequenceClassification).from_pretrained(
        str(model_dir), dtype=torch.float32
    )
    return model.eval()


@functools.lru_cache(maxsize=4)
def _causal_lm(model_dir: Path) -> Any:
    model = cast(Any, AutoModelForCausalLM).from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()


def cross_encoder_scores(
    model_dir: Path,
    query: str,
    documents: Sequence[str],
    *,
    max_tokens_per_doc: int = 0,
    token_types: bool = True,
) -> Scores:
    """sentence-transformers' CrossEncoder recipe: the pair through the tokenizer, the
    document cut to fit the model's window (and to `max_tokens_per_doc` tokens if given).

    `token_types` False feeds all-zero token types: a wrong input, for tests to show that
    token types matter.
    """
    model_dir = Path(model_dir).resolve()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = _classifier(model_dir)
    max_length = int(model.config.max_position_embeddings)
    if max_tokens_per_doc:
        n_query = len(tokenizer(query, add_special_tokens=False)["input_ids"])
        specials = tokenizer.num_special_tokens_to_add(pair=True)
        max_length = min(max_length, n_query + specials + max_tokens_per_doc)
    logits, ids = [], []
    for document in documents:
        batch = tokenizer(
            query,
            document,
            truncation="only_second",
            max_length=max_length,
            return_token_type_ids=True,
            return_tensors="pt",
        )
        if not token_types:
            batch["token_type_ids"] = torch.zeros_like(batch["token_type_ids"])
        with torch.no_grad():
            logits.append(float(model(**batch).logits[0, 0]))
        ids.append(batch["input_ids"][0].tolist())
    values = np.array(logits, dtype=np.float64)
    return Scores(values, 1.0 / (1.0 + np.exp(-values)), ids)


def qwen3_reranker_scores(
    model_dir: Path,
    query: str,
    documents: Sequence[str],
    *,
    instruction: str | None = None,
    suffix: str = QWEN3_SUFFIX,
) -> Scores:
    """The model card's recipe, with the model's window as its max_length.

    `suffix` can be replaced to show what a wrong prompt ending does to the scores.
    """
    model_dir = Path(model_dir).resolve()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    model = _causal_lm(model_dir)
    window = int(model.config.max_position_embeddings)
    prefix_tokens = tokenizer.encode(QWEN3_PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(suffix, add_special_tokens=False)
    no_id = tokenizer.convert_tokens_to_ids("no")
    yes_id = tokenizer.convert_tokens_to_ids("yes")
    task = QWEN3_DEFAULT_INSTRUCTION if instruction is None else instruction
    pairs = [f"<Instruct>: {task}\n<Query>: {query}\n<Document>: {doc}" for doc in documents]
    encoded = tokenizer(
        pairs,
        padding=False,
        truncation="longest_first",
        return_attention_mask=False,
        max_length=window - len(prefix_tokens) - len(suffix_tokens),
    )
    logits, probabilities, ids = [], [], []
    for middle in encoded["input_ids"]:
        input_ids = prefix_tokens + list(middle) + suffix_tokens
        with torch.no_grad():
            last = model(input_ids=torch.tensor([input_ids])).logits[0, -1, :]
        no_yes = torch.stack([last[no_id], last[yes_id]])
        probabilities.append(float(torch.log_softmax(no_yes, dim=0)[1].exp()))
        logits.append(float(last[yes_id] - last[no_id]))
        ids.append(input_ids)
    return Scores(np.array(logits), np.array(probabilities), ids)

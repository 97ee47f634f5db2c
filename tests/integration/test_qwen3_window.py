"""Issue 19: a model whose window is larger than --max-batch-tokens starts and serves it whole.

The session's tiny Qwen3 has Qwen3-Embedding's window (32,768 tokens) and its server runs with
the service's default flags, so --max-batch-tokens is 4,096. That server once refused to start
(vLLM: "max_num_batched_tokens (4096) is smaller than max_model_len (32768)"). Here: it starts,
embeds a document of most of the window in one call exactly, and applies each face's default
policy to a document past the window, keeping the EOS the model pools on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from tokenizers import Tokenizer

from embedding_client import EmbeddingClient
from tests.models.qwen3_files import eos_id
from tests.models.tiny_qwen3 import long_document
from tests.reference import last_token_reference, tokenize_for_reference
from tests.servers import ServerProcess
from tests.texts import TEXTS

WINDOW = 32768  # Qwen3-Embedding's, and the tiny model's
DEFAULT_BATCH_TOKENS = 4096  # the service's default --max-batch-tokens


def _tokenizer(model_dir: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _cut_at_end(model_dir: Path, text: str) -> list[int]:
    """What cutting `text` at the end must give: the first WINDOW - 1 tokens, then the EOS."""
    tokenizer = _tokenizer(model_dir)
    bare = tokenizer.encode(text, add_special_tokens=False).ids
    assert len(bare) > WINDOW
    return [*bare[: WINDOW - 1], eos_id(tokenizer)]


def _post(server: ServerProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    # /v1/embeddings lives under the OpenAI base URL, /tokenize beside it.
    root = server.base_url.removesuffix("/v1")
    return httpx.post(f"{root}{path}", json=body, timeout=300)


def _model(server: ServerProcess) -> str:
    return str(httpx.get(f"{server.base_url}/models", timeout=10).json()["data"][0]["id"])


def test_the_32k_model_starts_with_the_default_flags(
    qwen_server: ServerProcess, qwen: EmbeddingClient
) -> None:
    flags = qwen_server.process.args
    assert isinstance(flags, list)
    assert "--max-batch-tokens" not in flags and "--max-model-len" not in flags
    info = qwen.model_info()
    assert info.max_input_tokens == WINDOW
    # The situation of issue 19: the batcher's budget is far below the window.
    assert info.limits.max_batch_tokens == DEFAULT_BATCH_TOKENS < WINDOW


def test_a_27500_token_document_embeds_in_one_call(qwen: EmbeddingClient, qwen_dir: Path) -> None:
    document = long_document(qwen_dir, 27_500)
    [ids] = tokenize_for_reference(qwen_dir, [document])
    assert 27_500 <= len(ids) < 27_600
    result = qwen.embed([document])  # one input: one Embed call, never split by the client
    assert result.token_counts == [len(ids)] and result.truncated == [False]
    assert not result.chunks[0]
    diff = float(np.abs(result.vectors - last_token_reference(qwen_dir, [ids])).max())
    assert diff <= 1e-4, f"max abs diff {diff:.3g} from the transformers reference"


def test_past_the_window_grpc_refuses_by_default(
    qwen: EmbeddingClient, qwen_dir: Path, qwen_over_window: str
) -> None:
    [ids] = tokenize_for_reference(qwen_dir, [qwen_over_window])
    assert len(ids) > WINDOW
    with pytest.raises(grpc.RpcError) as caught:
        qwen.embed([TEXTS[0], qwen_over_window])
    err = caught.value
    assert isinstance(err, grpc.Call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = err.details() or ""
    assert message.startswith("inputs[1]:"), message
    assert f"{len(ids)} tokens" in message and f"limit of {WINDOW}" in message, message


def test_past_the_window_http_cuts_at_the_end_by_default(
    qwen_server: ServerProcess, qwen: EmbeddingClient, qwen_over_window: str
) -> None:
    reply = _post(
        qwen_server,
        "/v1/embeddings",
        {"model": _model(qwen_server), "input": [qwen_over_window], "encoding_format": "float"},
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-truncated-inputs"] == "1"
    body = reply.json()
    [item] = body["data"]
    assert item["truncated"] is True and body["usage"]["prompt_tokens"] == WINDOW
    # The same vector as gRPC's explicit cut at the end of the same text.
    by_grpc = qwen.embed([qwen_over_window], truncate="end")
    assert by_grpc.token_counts == [WINDOW] and by_grpc.truncated == [True]
    got = np.array([item["embedding"]], dtype=np.float32)
    np.testing.assert_allclose(got, by_grpc.vectors, atol=1e-6)


def test_the_cut_keeps_the_eos_and_exactly_the_window(
    qwen_server: ServerProcess, qwen: EmbeddingClient, qwen_dir: Path, qwen_over_window: str
) -> None:
    expected = _cut_at_end(qwen_dir, qwen_over_window)
    eos = expected[-1]
    # gRPC, asked to cut at the end.
    [cut] = qwen.tokenize([qwen_over_window], truncate="end")
    assert cut.truncated
    assert len(cut.ids) == WINDOW and cut.ids[-1] == eos
    assert cut.ids == expected
    # HTTP, with its default (cut at the end).
    reply = _post(qwen_server, "/tokenize", {"input": qwen_over_window})
    assert reply.status_code == 200, reply.text
    [item] = reply.json()["data"]
    assert item["truncated"] is True
    assert len(item["tokens"]) == WINDOW and item["tokens"][-1] == eos
    assert item["tokens"] == expected

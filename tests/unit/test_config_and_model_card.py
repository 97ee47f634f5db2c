"""Configuration precedence and model conventions read from model files."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ServiceConfig, load_config
from service.model_card import load_model_card, resolve_model_path
from tests.models.tiny_qwen3 import build_tiny_qwen3


def test_defaults_env_and_flags() -> None:
    assert load_config([], {}) == ServiceConfig()
    env = {"EMBED_PORT": "6000", "EMBED_MAX_WAIT_MS": "5", "EMBED_ENFORCE_EAGER": "false"}
    cfg = load_config([], env)
    assert (cfg.port, cfg.max_wait_ms, cfg.enforce_eager) == (6000, 5.0, False)
    assert load_config(["--port", "7000"], env).port == 7000


def test_bad_values_are_refused() -> None:
    with pytest.raises(SystemExit):
        load_config([], {"EMBED_PORT": "abc"})
    with pytest.raises(SystemExit):
        load_config(["--max-queue-tokens", "10"], {})


def test_minilm_card() -> None:
    card = load_model_card(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"), "m")
    assert card.pooling == "MEAN"
    assert card.instruction_template == "" and card.prompts == {}


def test_qwen3_card_learns_the_instruction_template(tmp_path: Path) -> None:
    card = load_model_card(build_tiny_qwen3(tmp_path / "q"), "q")
    assert card.pooling == "LAST"
    assert card.instruction_template == "Instruct: {instruction}\nQuery:"
    assert card.default_instruction.startswith("Given a web search query")
    assert card.instruction_prefix("X") == "Instruct: X\nQuery:"


def test_template_override(tmp_path: Path) -> None:
    card = load_model_card(build_tiny_qwen3(tmp_path / "q"), "q", "task: {instruction} | ")
    assert card.instruction_prefix("X") == "task: X | "


@pytest.mark.parametrize(
    ("model", "names", "served"),
    [
        # A Hub id answers to itself and to its last part, which is the same model.
        (
            "sentence-transformers/all-MiniLM-L6-v2",
            "",
            ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"),
        ),
        ("plain-id", "", ("plain-id",)),
        # Given names replace the defaults; the first is the one reported.
        ("org/m", "m-prod, text-embedding-3-small,,m-prod", ("m-prod", "text-embedding-3-small")),
    ],
)
def test_served_names(model: str, names: str, served: tuple[str, ...]) -> None:
    from service.server import served_names

    config = ServiceConfig(model=model, served_model_name=names)
    assert served_names(config) == served


def test_a_local_folder_is_named_by_its_last_part(tmp_path: Path) -> None:
    from service.server import served_names

    (tmp_path / "my-model").mkdir()
    assert served_names(ServiceConfig(model=str(tmp_path / "my-model"))) == ("my-model",)


def test_truncation_defaults_per_face() -> None:
    cfg = load_config([], {})
    # HTTP clients (Open WebUI, Chroma) cannot ask for truncation; gRPC callers can.
    assert (cfg.http_truncate, cfg.grpc_truncate) == ("end", "refuse")
    cfg = load_config(["--grpc-truncate", "start"], {"EMBED_HTTP_TRUNCATE": "refuse"})
    assert (cfg.http_truncate, cfg.grpc_truncate) == ("refuse", "start")
    with pytest.raises(SystemExit):
        load_config(["--http-truncate", "middle"], {})

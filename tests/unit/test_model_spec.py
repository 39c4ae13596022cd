"""Candidate tables per architecture, built on the meta device from tiny configs (no weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import ConfigError
from common.modeling import model_spec, resolve_model_path

LABELS = ("negative", "positive")


def tiny(tmp_path: Path, config: dict[str, object]) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_minilm_has_24_attention_candidates_and_a_classifier_head() -> None:
    spec = model_spec(resolve_model_path("embedded"), LABELS)
    assert len(spec.candidates) == 24 and spec.model_type == "bert"
    assert {m.name.split(".", 4)[-1] for m in spec.candidates} == {
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
    }
    assert all((m.in_features, m.out_features) == (384, 384) for m in spec.candidates)
    assert spec.heads == (("classifier.weight", (2, 384)), ("classifier.bias", (2,)))
    with_mlp = model_spec(resolve_model_path("embedded"), LABELS, include_mlp=True)
    assert len(with_mlp.candidates) == 24 + 12


def test_gpt2_fused_attention_reports_conv1d_shapes_as_in_out(tmp_path: Path) -> None:
    path = tiny(
        tmp_path,
        {
            "model_type": "gpt2",
            "n_embd": 16,
            "n_layer": 2,
            "n_head": 2,
            "vocab_size": 50,
            "n_positions": 32,
            "pad_token_id": 0,
        },
    )
    spec = model_spec(path, LABELS)
    c_attn = spec.candidate("transformer.h.0.attn.c_attn")
    assert (c_attn.in_features, c_attn.out_features) == (16, 48)  # Conv1D weight is (16, 48): in, out
    assert [m.name for m in spec.candidates][:2] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]
    assert spec.heads == (("score.weight", (2, 16)),)


def test_llama_table_with_mlp(tmp_path: Path) -> None:
    path = tiny(
        tmp_path,
        {
            "model_type": "llama",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "vocab_size": 50,
            "pad_token_id": 0,
        },
    )
    spec = model_spec(path, LABELS, include_mlp=True)
    kinds = [m.name.rsplit(".", 2)[-2] + "." + m.name.rsplit(".", 1)[-1] for m in spec.candidates]
    assert kinds == [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    assert spec.candidate("model.layers.0.self_attn.k_proj").out_features == 8  # grouped-query attention


def test_unknown_architecture_names_the_matrices_found_and_the_flag(tmp_path: Path) -> None:
    path = tiny(
        tmp_path,
        {"model_type": "distilbert", "dim": 16, "hidden_dim": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 50},
    )
    with pytest.raises(ConfigError) as caught:
        model_spec(path, LABELS)
    message = str(caught.value)
    assert "architecture 'distilbert' has no candidate table" in message
    assert "attention.q_lin" in message and "model.candidates" in message
    spec = model_spec(path, LABELS, candidates=["q_lin", "v_lin"])
    assert [m.name for m in spec.candidates] == [
        "distilbert.transformer.layer.0.attention.q_lin",
        "distilbert.transformer.layer.0.attention.v_lin",
    ]


def test_candidates_matching_nothing_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no weight matrix .* ends in \['nope'\]"):
        model_spec(resolve_model_path("embedded"), LABELS, candidates=["nope"])

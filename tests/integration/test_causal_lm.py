"""Decoder LLMs: a short causal-LM federation on the embedded SmolLM2 through the console scripts, and a
small random GPT-2 (fused c_attn, Conv1D) whose adapters of unequal ranks are aggregated and loaded back."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from common.adapters import LoraPair, broadcast_tensors, fold_update, init_global
from common.data import CAUSAL_LM, Example
from common.modeling import AdaptedModel, load_base, load_tokenizer, model_spec, resolve_model_path
from common.types import ModelSpec, Quantization, TrainPlan
from coordinator.modes.lora import write_adapter
from coordinator.strategy import get_strategy
from edge_agent.trainer import train_local

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LABELS = ("negative", "positive")
CPU = torch.device("cpu")


def llm_federation(run_dir: Path) -> dict[str, Any]:
    """Two agents on SmolLM2-135M-Instruct, one round of three steps on q/v, 16 held-out tweets."""
    return {
        "coordinator": {
            "planner": "uniform",
            "run": {"rounds": 1, "min_agents": 2, "run_dir": str(run_dir), "round_deadline_s": 300,
                    "registration_timeout_s": 300, "finish_grace_s": 10},
            "lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
            "selection": {"mode": "all"},
            "training": {"batch_size": 2, "max_steps": 3, "max_seq_len": 64, "learning_rate": 0.002},
            "model": {"path": "embedded-llm"},
            "evaluation": {"heldout": "embedded", "max_samples": 16, "agents": True},
        },
        "agents": {
            "count": 2,
            "config": {"threads": 1, "model": {"path": "embedded-llm"}, "calibration": {"enabled": False},
                       "data": {"max_samples": 40, "val_fraction": 0.1}},
        },
    }  # fmt: skip


def test_a_causal_lm_round_through_the_console_scripts(tmp_path: Path) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    config = tmp_path / "llm.yaml"
    config.write_text(json.dumps(llm_federation(run_dir)))  # JSON is YAML

    # Execute
    proc = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "local_federation.py"), "--config", str(config), "--timeout", "600"],
        capture_output=True, text=True, timeout=660, cwd=ROOT,
    )  # fmt: skip

    # Assert: a zero-shot line, one round from both agents, a causal peft adapter over q/v
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    assert any(line.startswith("round 0/1 (zero-shot):") and "perplexity" in line for line in lines), lines
    assert lines[-1].startswith("final accuracy: ")
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    assert sorted(records[1]["agents"]) == ["agent-1", "agent-2"]
    assert records[1]["heldout"]["samples"] == 16 and records[1]["agents_eval"]["samples"] > 0
    assert records[1]["heldout"]["loss"] < records[0]["heldout"]["loss"], "three steps already lower the response loss"
    adapter = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and adapter["modules_to_save"] == []
    assert len(adapter["target_modules"]) == 60 and all(
        m.endswith(("q_proj", "v_proj")) for m in adapter["target_modules"]
    )
    spec = model_spec(resolve_model_path("embedded-llm"), LABELS, task=CAUSAL_LM)
    assert spec.model_type == "llama" and spec.heads == ()


# ---------------------------------------------------------------- GPT-2: fused attention, Conv1D


def tiny_gpt2(directory: Path) -> Path:
    """A random 2-layer GPT-2 from a config, with a word-level tokenizer, saved as a model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<eos>", "<unk>", "tweet", "good", "bad", "movie", "positive", "negative", "is", "it", "?"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>"
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(words)))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def plan_for(spec: ModelSpec, rank: int, plan_id: str) -> TrainPlan:
    modules = tuple(m.name for m in spec.candidates)
    return TrainPlan(
        plan_id=plan_id,
        target_modules=modules,
        rank_pattern=dict.fromkeys(modules, rank),
        lora_alpha=2.0 * rank,
        lora_dropout=0.0,
        modules_to_save=(),
        batch_size=2,
        local_epochs=1,
        max_steps=3,
        learning_rate=0.05,
        weight_decay=0.0,
        quantization=Quantization.NONE,
        max_seq_len=16,
        deadline_s=1e9,
        seed=0,
    )


def test_gpt2_fused_attention_adapters_of_unequal_ranks_aggregate_and_load_back(tmp_path: Path) -> None:
    # Prepare: two agents of ranks 2 and 4 train from the same global on their own examples
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = str(tiny_gpt2(tmp_path / "gpt2"))
    spec = model_spec(path, LABELS, task=CAUSAL_LM)
    tokenizer = load_tokenizer(path)
    plans = {"a": plan_for(spec, 2, "pa"), "b": plan_for(spec, 4, "pb")}
    global_ = init_global(spec, plans["b"], seed=0)
    data = {
        "a": [Example("tweet good movie", 1, "positive")] * 6,
        "b": [Example("tweet bad movie", 0, "negative")] * 6,
    }
    folded = []
    for agent, plan in plans.items():
        adapted = AdaptedModel(load_base(path, LABELS, Quantization.NONE, CPU, CAUSAL_LM), CAUSAL_LM)
        adapted.ensure(plan)
        adapted.load(broadcast_tensors(global_, plan, spec))
        result = train_local(adapted.model, tokenizer, data[agent], plan, CPU, 1e12, "off", task=CAUSAL_LM)
        assert result.steps == 3
        folded.append(fold_update(agent, 6.0, adapted.extract(), plan))

    # Execute: aggregate with rank padding, write the peft adapter, load it back on the base
    new_global, _ = get_strategy("rank-padding")(global_, folded)
    new_global = replace(new_global, round=1)
    write_adapter(tmp_path / "adapter", new_global, 8.0, path, (), CAUSAL_LM)
    base = AutoModelForCausalLM.from_pretrained(path)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload()

    # Assert: the candidates are GPT-2's fused c_attn and c_proj Conv1D layers, and each merged weight moved
    # by exactly the global's B @ A, transposed as Conv1D stores (in, out)
    assert {m.name.split(".")[-2] + "." + m.name.split(".")[-1] for m in spec.candidates} == {
        "attn.c_attn",
        "attn.c_proj",
    }
    attn = next(m for m in spec.candidates if m.name.endswith("attn.c_attn"))
    assert (attn.in_features, attn.out_features) == (32, 96)
    state = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(state) == 2 * len(spec.candidates)
    for module, pair in new_global.lora.items():
        delta = dict(merged.named_parameters())[f"{module}.weight"].detach() - before[f"{module}.weight"]
        torch.testing.assert_close(delta, (pair.b @ pair.a).T, rtol=1e-4, atol=1e-6)
        assert float((pair.b @ pair.a).abs().max()) > 0, "training moved every adapter"


def test_a_plan_with_a_rank_per_matrix_reproduces_the_global_in_peft(tmp_path: Path) -> None:
    # Prepare: ranks 4, 2, 1, 4 over the four matrices (a per-matrix plan), a global with non-zero products
    path = str(tiny_gpt2(tmp_path / "gpt2"))
    spec = model_spec(path, LABELS, task=CAUSAL_LM)
    modules = tuple(m.name for m in spec.candidates)
    ranks = dict(zip(modules, (4, 2, 1, 4), strict=True))
    plan = replace(plan_for(spec, 4, "pm"), rank_pattern=ranks)
    generator = torch.Generator().manual_seed(3)
    fresh = init_global(spec, plan, seed=0)
    global_ = replace(
        fresh,
        lora={m: LoraPair(p.a, torch.randn(p.b.shape, generator=generator)) for m, p in fresh.lora.items()},
    )
    adapted = AdaptedModel(load_base(path, LABELS, Quantization.NONE, CPU, CAUSAL_LM), CAUSAL_LM)
    before = {n: p.detach().clone() for n, p in adapted.base.named_parameters()}

    # Execute
    model = adapted.ensure(plan)
    adapted.load(broadcast_tensors(global_, plan, spec))
    scales = {m: model.get_submodule("base_model.model." + m).scaling["default"] for m in modules}
    merged = model.merge_and_unload()

    # Assert: peft scales every matrix by the same alpha / r (alpha_pattern), and the merged weights moved
    # by exactly the global's products at each matrix's own rank
    assert set(scales.values()) == {plan.lora_alpha / 4}
    for module in modules:
        delta = dict(merged.named_parameters())[f"{module}.weight"].detach() - before[f"{module}.weight"]
        pair = global_.lora[module]
        expected = pair.b[:, : ranks[module]] @ pair.a[: ranks[module]]
        torch.testing.assert_close(delta, expected.T, rtol=1e-4, atol=1e-5)

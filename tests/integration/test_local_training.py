"""The agent's model and training loop on the real MiniLM at every quantization level (CPU)."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import pytest
import torch

from common.adapters import broadcast_tensors, check_tensors, expected_tensors, init_global
from common.batching import evaluate, is_split
from common.data import DataSource, embedded_split
from common.modeling import layer_split, model_spec, resolve_model_path
from common.types import ModelSpec, Quantization, TrainPlan
from coordinator.planner import PlanOptions, uniform_plan
from edge_agent.model import LocalModel
from edge_agent.profiler import measure_flops, profile
from edge_agent.trainer import TrainResult, train_local

LABELS = ("negative", "positive")


def make_plan(quantization: Quantization) -> tuple[TrainPlan, ModelSpec]:
    path = resolve_model_path("embedded")
    spec = model_spec(path, LABELS)
    options = PlanOptions(("query", "value"), 4, 8.0, 0.0, 8, 1, 3, 2e-3, 0.0, 32, quantization, 60.0, 1)
    measured = profile(torch.device("cpu"), torch.float32, 24, 0)
    return uniform_plan({"a": measured}, spec, options, 1).plans["a"], spec


@pytest.mark.integration
@pytest.mark.parametrize("quantization", [Quantization.NONE, Quantization.INT8, Quantization.NF4])
def test_quantized_base_trains_lora_and_extracts_planned_tensors(quantization: Quantization) -> None:
    plan, spec = make_plan(quantization)
    model = LocalModel(resolve_model_path("embedded"), LABELS, torch.device("cpu"))
    adapted = model.prepare(plan)
    start = broadcast_tensors(init_global(spec, plan, seed=0), plan, spec)
    adapted.load(start)
    examples = embedded_split(DataSource("embedded"))[0][:24]
    result = train_local(
        adapted.model, model.tokenizer, examples, plan, torch.device("cpu"), time.monotonic() + 120, progress="off"
    )
    tensors = adapted.extract()
    check_tensors(tensors, expected_tensors(plan, spec))
    assert result.steps == 3 and result.samples == 24 and result.mean_loss == result.mean_loss
    moved = [name for name in tensors if name.endswith(".lora_B") and float(tensors[name].abs().sum()) > 0]
    assert moved, "training must move B away from its zero start"
    if quantization is not Quantization.NONE:
        layer = adapted.model.base_model.model.bert.encoder.layer[0].attention.self.query
        assert "bnb" in type(layer).__module__ or "bnb" in type(layer.base_layer).__module__


@pytest.mark.integration
def test_deadline_stops_training_early_and_counts_what_was_done() -> None:
    plan, _ = make_plan(Quantization.NONE)
    model = LocalModel(resolve_model_path("embedded"), LABELS, torch.device("cpu"))
    adapted = model.prepare(plan)
    examples = embedded_split(DataSource("embedded"))[0][:24]
    result = train_local(
        adapted.model, model.tokenizer, examples, plan, torch.device("cpu"), time.monotonic() - 1, progress="off"
    )
    assert result.stopped_early and result.steps == 1 and result.samples == 8


def from_one_start() -> tuple[TrainPlan, dict[str, torch.Tensor], LocalModel]:
    """A seeded plan, the broadcast it starts every variant from, and the model to train."""
    plan, spec = make_plan(Quantization.NONE)
    start = broadcast_tensors(init_global(spec, plan, seed=0), plan, spec)
    return plan, start, LocalModel(resolve_model_path("embedded"), LABELS, torch.device("cpu"))


def train_variant(
    model: LocalModel, start: dict[str, torch.Tensor], plan: TrainPlan
) -> tuple[TrainResult, dict[str, torch.Tensor]]:
    """One local round of `plan` from `start` on 24 embedded tweets: its result and the trained tensors."""
    adapted = model.prepare(plan)
    adapted.load(start)
    examples = embedded_split(DataSource("embedded"))[0][:24]
    result = train_local(
        adapted.model, model.tokenizer, examples, plan, torch.device("cpu"), time.monotonic() + 120, progress="off"
    )
    return result, adapted.extract()


@pytest.mark.integration
def test_fedprox_keeps_the_trained_tensors_closer_to_where_the_round_started_them() -> None:
    # Prepare: the same seeded plan with mu 0 and a large mu, from the same start
    plan, start, model = from_one_start()

    def drift(mu: float) -> tuple[float, float]:
        result, moved = train_variant(model, start, replace(plan, proximal_mu=mu))
        squared = sum(float((moved[n] - start[n]).pow(2).sum()) for n in start if n.endswith((".lora_A", ".lora_B")))
        return squared**0.5, result.mean_loss

    # Execute
    free, free_loss = drift(0.0)
    held, held_loss = drift(1e4)

    # Assert: the proximal pull shrinks the move; the reported loss stays the data loss (finite, similar)
    assert held < 0.5 * free
    assert math.isfinite(held_loss) and abs(held_loss - free_loss) < 0.5


def test_training_scores_its_matrices_when_the_plan_asks() -> None:
    # Prepare
    plan, start, model = from_one_start()

    # Execute
    tracked = train_variant(model, start, replace(plan, track_importance=True))[0].importance
    untracked = train_variant(model, start, replace(plan, track_importance=False))[0].importance

    # Assert: every trained matrix scored, positive and finite; nothing when the plan does not ask
    assert set(tracked) == set(plan.target_modules)
    assert all(math.isfinite(v) and v > 0 for v in tracked.values())
    assert untracked == {}


def test_flops_measurement_is_positive_and_sane() -> None:
    flops = measure_flops(torch.device("cpu"), torch.float32, seconds=0.2, size=256)
    assert 1e7 < flops < 1e13


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_profile_reports_device_memory_and_nf4_trains() -> None:
    device = torch.device("cuda:0")
    measured = profile(device, torch.bfloat16, 1, 0)
    _, total = torch.cuda.mem_get_info(device)
    assert measured.total_memory_bytes == total and measured.device.startswith("cuda")
    plan, spec = make_plan(Quantization.NF4)
    model = LocalModel(resolve_model_path("embedded"), LABELS, device)
    adapted = model.prepare(plan)
    adapted.load(broadcast_tensors(init_global(spec, plan, seed=0), plan, spec))
    examples = embedded_split(DataSource("embedded"))[0][:24]
    result = train_local(adapted.model, model.tokenizer, examples, plan, device, time.monotonic() + 120, "off")
    assert result.steps == 3 and result.peak_memory_bytes > 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("quantization", [Quantization.NONE, Quantization.NF4])
def test_a_base_split_over_two_gpus_trains_evaluates_and_extracts_its_adapter(quantization: Quantization) -> None:
    devices = [torch.device("cuda:0"), torch.device("cuda:1")]
    plan, spec = make_plan(quantization)
    plan = replace(plan, placement="layers")
    model = LocalModel(resolve_model_path("embedded"), LABELS, devices[0])
    adapted = model.prepare(plan, layer_split(devices, [torch.cuda.mem_get_info(d)[1] for d in devices]))
    start = broadcast_tensors(init_global(spec, plan, seed=0), plan, spec)
    adapted.load(start)
    examples = embedded_split(DataSource("embedded"))[0][:24]
    assert is_split(adapted.model), f"one device holds it all: {adapted.model.hf_device_map}"
    result = train_local(adapted.model, model.tokenizer, examples, plan, devices[0], time.monotonic() + 120, "off")
    scored = evaluate(adapted.model, model.tokenizer, examples, plan.max_seq_len, devices[0])
    tensors = adapted.extract()
    assert result.steps == 3 and result.peak_memory_bytes > 0 and math.isfinite(scored.loss)
    check_tensors(tensors, expected_tensors(plan, spec))
    assert any(not torch.equal(tensors[name], start[name]) for name in start)

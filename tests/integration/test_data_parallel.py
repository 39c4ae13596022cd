"""A data-parallel agent's process group on CPU (gloo): two processes train one plan to the adapter one process
trains with the same global batch, and a rank that dies fails the task cleanly and the group starts again."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from common.adapters import broadcast_tensors, init_global
from common.data import DataSource, Example, embedded_split
from common.modeling import layer_split, model_spec, resolve_model_path
from common.types import Quantization, TrainPlan
from coordinator.planner import PlanOptions, uniform_plan
from edge_agent.collective import Collective
from edge_agent.model import LocalModel
from edge_agent.parallel import DeviceGroup, GroupFailed, Job
from edge_agent.profiler import profile
from edge_agent.trainer import TrainResult, train_local

LABELS = ("negative", "positive")
Setting = tuple[TrainPlan, dict[str, torch.Tensor], list[Example]]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The embedded MiniLM without dropout: each rank draws its own dropout masks, so only a model without
    any can train to the very adapter one process trains."""
    source = Path(resolve_model_path("embedded"))
    target = tmp_path_factory.mktemp("minilm-no-dropout")
    for entry in source.iterdir():
        if entry.name != "config.json":
            (target / entry.name).symlink_to(entry)
    config = json.loads((source / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


@pytest.fixture(scope="module")
def setting(base: str) -> Setting:
    """A seeded plan without LoRA dropout, its start, and 40 tweets."""
    spec = model_spec(base, LABELS)
    options = PlanOptions(("query", "value"), 4, 8.0, 0.0, 8, 1, 5, 2e-3, 0.0, 32, Quantization.NONE, 120.0, 1)
    plan = uniform_plan({"a": profile(CPU, torch.float32, 40, 0)}, spec, options, 1).plans["a"]
    plan = dataclasses.replace(plan, lora_dropout=0.0)
    start = broadcast_tensors(init_global(spec, plan, seed=0), plan, spec)
    examples = embedded_split(DataSource("embedded"))[0][:40]
    return plan, start, list(examples)


@pytest.fixture(scope="module")
def group() -> Iterator[DeviceGroup]:
    group = DeviceGroup([CPU, CPU], threads=1, compute_share=1.0, timeout_s=60.0)
    group.start()
    yield group
    group.close()


def job(base: str, plan: TrainPlan, start: dict[str, torch.Tensor], examples: list[Example]) -> Job:
    from safetensors.torch import save

    tensors = save({k: v.contiguous().clone() for k, v in start.items()})
    return Job((base, LABELS, "seq-cls"), id(examples), plan, tensors, "seq-cls")


def train_rank0(
    base: str, plan: TrainPlan, start: dict[str, torch.Tensor], examples: list[Example], collective: Collective | None
) -> tuple[TrainResult, dict[str, torch.Tensor]]:
    model = LocalModel(base, LABELS, CPU)
    adapted = model.prepare(plan)
    adapted.load(start)
    result = train_local(
        adapted.model, model.tokenizer, examples, plan, CPU, time.monotonic() + 120, "off", group=collective
    )
    return result, adapted.extract()


@pytest.mark.integration
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])  # SGD is not scale-invariant: a wrong average shows
def test_two_processes_train_the_adapter_one_process_trains(
    base: str, setting: Setting, group: DeviceGroup, optimizer: str
) -> None:
    torch.set_num_threads(1)
    plan, start, examples = setting
    plan = dataclasses.replace(
        plan, optimizer=optimizer, learning_rate=0.05 if optimizer == "sgd" else plan.learning_rate
    )
    alone, expected = train_rank0(base, plan, start, examples, None)
    both, got = group.train(
        job(base, plan, start, examples), examples, lambda c: train_rank0(base, plan, start, examples, c)
    )
    assert both.steps == alone.steps == 5 and both.samples == alone.samples == 40
    assert group.allreduce_bytes_per_s > 0
    assert abs(both.mean_loss - alone.mean_loss) < 1e-4 * max(1.0, abs(alone.mean_loss))
    assert expected.keys() == got.keys()
    moved = 0.0
    for name, tensor in expected.items():
        diff = float((got[name] - tensor).abs().max())
        scale = float(tensor.abs().max()) + 1e-12
        assert diff <= 1e-3 * scale + 1e-7, f"{name}: differs by {diff:.2e} (scale {scale:.2e})"
        moved += float((tensor - start[name]).abs().sum()) if name in start else 0.0
    assert moved > 0, "the plan must have trained something for the comparison to mean anything"


@pytest.mark.integration
def test_a_killed_rank_fails_the_task_and_the_group_starts_again(
    base: str, setting: Setting, group: DeviceGroup
) -> None:
    plan, start, examples = setting
    slow = dataclasses.replace(plan, max_steps=400, local_epochs=100)
    helper = group.helpers[0][0]
    killer = threading.Timer(3.0, helper.kill)
    killer.start()
    began = time.monotonic()
    with pytest.raises(GroupFailed, match=r"exited with code|Connection closed|failed"):
        group.train(job(base, slow, start, examples), examples, lambda c: train_rank0(base, slow, start, examples, c))
    killer.cancel()
    assert time.monotonic() - began < 60, "a dead rank must fail the task within seconds, not at the timeout"
    assert group.collective is None and not group.helpers
    result, _ = group.train(
        job(base, plan, start, examples), examples, lambda c: train_rank0(base, plan, start, examples, c)
    )
    assert result.steps == 5 and group.world == 2


@pytest.mark.integration
def test_a_plan_split_by_layers_trains_in_rank_0_after_the_helpers_free_their_bases(
    base: str, setting: Setting, group: DeviceGroup
) -> None:
    # Prepare: the helpers hold a base from a data-parallel task
    plan, start, examples = setting
    group.train(job(base, plan, start, examples), examples, lambda c: train_rank0(base, plan, start, examples, c))
    layers = dataclasses.replace(plan, placement="layers")
    split = layer_split([CPU, CPU], [2**30, 2**30])
    model = LocalModel(base, LABELS, CPU)

    # Execute: free the helpers' bases, then train the split plan in this process alone
    freed, again = group.release(), group.release()
    adapted = model.prepare(layers, split)
    adapted.load(start)
    result = train_local(adapted.model, model.tokenizer, examples, layers, CPU, time.monotonic() + 120, "off")
    trained = adapted.extract()
    expected = train_rank0(base, plan, start, examples, None)[1]

    # Assert: one helper freed one base (and then none); the split base (one CPU process) trains what one process
    # trains; a replicated plan after it loads the base again, unsplit
    assert (freed, again) == (1, 0) and group.helpers
    assert result.steps == 5 and model.split == split
    assert trained.keys() == expected.keys()
    assert all(torch.allclose(trained[name], expected[name], atol=1e-6) for name in expected)
    model.prepare(plan)
    assert model.split is None

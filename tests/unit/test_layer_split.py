"""Where a base split by layers goes: from_pretrained's placement for several devices, and the loss of a split
model with its logits on another device than its labels."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from common.batching import forward, is_split, task_loss
from common.data import SEQ_CLS
from common.modeling import layer_split
from common.types import Accelerator, Quantization, TrainPlan
from edge_agent.agent import Agent
from edge_agent.profiler import profile


def test_gpus_get_accelerate_s_balanced_map_within_each_one_s_memory() -> None:
    # Execute
    placement = layer_split([torch.device("cuda:0"), torch.device("cuda:3")], [80 * 2**30, 40 * 2**30])

    # Assert: indices as accelerate keys them, nothing for the CPU (no offload: a base that does not fit fails)
    assert placement == {"device_map": "balanced", "max_memory": {0: 80 * 2**30, 3: 40 * 2**30}}


def test_cpu_processes_share_one_memory_so_the_split_base_is_one_process_s() -> None:
    assert layer_split([torch.device("cpu")] * 3, [2**30] * 3) == {"device_map": {"": "cpu"}}


@pytest.mark.parametrize(
    ("devices", "memory", "message"),
    [
        (["cuda:0"], [1], "two or more devices"),
        (["cuda:0", "cuda:1"], [1], "each with its memory"),
        (["cuda", "cuda:1"], [1, 1], "named with their index"),
        (["cpu", "cuda:1"], [1, 1], "named with their index"),
    ],
)
def test_a_split_that_cannot_be_placed_is_refused(devices: list[str], memory: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        layer_split([torch.device(d) for d in devices], memory)


class Classifier(torch.nn.Module):
    """Stands in for a classifier whose logits come back elsewhere than its inputs: it records what it is given."""

    def __init__(self, placed: dict[str, str]) -> None:
        super().__init__()
        self.hf_device_map = placed
        self.linear = torch.nn.Linear(4, 3)
        self.given: list[str] = []

    def forward(self, **inputs: Any) -> Any:
        self.given = sorted(inputs)
        logits = self.linear(inputs["x"])
        loss = torch.nn.functional.cross_entropy(logits, inputs["labels"]) if "labels" in inputs else None
        return SimpleNamespace(logits=logits, loss=loss)


def test_a_split_model_s_loss_is_taken_from_its_logits_and_a_whole_one_s_from_the_model() -> None:
    # Prepare
    torch.manual_seed(0)
    inputs = {"x": torch.randn(5, 4), "labels": torch.tensor([0, 1, 2, 1, 0])}
    whole = Classifier({"": "cpu"})
    split = Classifier({"embed": "cuda:0", "head": "cuda:1"})
    split.load_state_dict(whole.state_dict())

    # Execute
    _, own = forward(whole, inputs, SEQ_CLS)
    out, taken = forward(split, inputs, SEQ_CLS)

    # Assert: the whole model computes its own loss; the split one is not given the labels, and its loss is
    # task_loss of its logits, the same figure
    assert not is_split(whole) and is_split(split) and not is_split(torch.nn.Linear(1, 1))
    assert whole.given == ["labels", "x"] and split.given == ["x"]
    assert torch.equal(taken, task_loss(out.logits, inputs["labels"], SEQ_CLS))
    assert float(taken.detach()) == pytest.approx(float(own.detach()), rel=1e-6)


def test_an_agent_splits_only_a_layers_lora_plan_and_only_over_several_devices() -> None:
    # Prepare: a two-GPU agent's profile, and one of a single device
    gpus = (Accelerator("cuda:0", "GPU", 40 * 2**30, 1e14), Accelerator("cuda:1", "GPU", 24 * 2**30, 1e14))
    pair, one = (
        SimpleNamespace(profile=SimpleNamespace(devices=gpus)),
        SimpleNamespace(profile=SimpleNamespace(devices=())),
    )
    plan = TrainPlan("p", ("m",), {"m": 4}, 8.0, 0.0, (), 8, 1, 0, 1e-3, 0.0, Quantization.NF4, 32, 60.0, 1)
    layers = replace(plan, placement="layers")

    # Execute / Assert
    assert Agent._split(pair, layers) == {"device_map": "balanced", "max_memory": {0: 40 * 2**30, 1: 24 * 2**30}}  # type: ignore[arg-type]
    assert Agent._split(pair, plan) is None  # type: ignore[arg-type]
    assert Agent._split(pair, replace(layers, mode="ferret")) is None  # type: ignore[arg-type]
    assert Agent._split(one, layers) is None  # type: ignore[arg-type]


def test_only_two_gpus_or_more_can_split_a_base() -> None:
    measured = profile(torch.device("cpu"), torch.float32, 1, 0)
    gpu, cpu = Accelerator("cuda:0", "GPU", 2**30, 1e12), Accelerator("cpu", "cpu", 2**30, 1e10)
    assert replace(measured, devices=(gpu, replace(gpu, device="cuda:1"))).can_split
    assert not replace(measured, devices=(cpu, cpu)).can_split
    assert not replace(measured, devices=(gpu, cpu)).can_split
    assert not replace(measured, devices=(gpu,)).can_split and not measured.can_split

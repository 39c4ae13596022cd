"""The importance probe on the real MiniLM (CPU): scores, determinism, and the agent's model afterwards."""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from common.data import DataSource, Example, embedded_split
from common.errors import ConfigError
from common.importance import SensitivityTracker
from common.modeling import AdaptedModel, load_base, load_tokenizer, model_spec, resolve_model_path
from common.types import ModelSpec, Quantization
from coordinator.planner import PlanOptions, uniform_plan
from edge_agent.caps import Throttle
from edge_agent.probe import ProbeResult, run_probe
from edge_agent.profiler import profile
from edge_agent.trainer import train_local

LABELS = ("negative", "positive")
CPU = torch.device("cpu")
KINDS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")


@dataclass(frozen=True)
class Setup:
    spec: ModelSpec
    tokenizer: object
    examples: list[Example]
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class Probed:
    adapted: AdaptedModel
    head_before: dict[str, torch.Tensor]
    first: ProbeResult
    second: ProbeResult


@pytest.fixture(scope="module")
def setup() -> Setup:
    path = resolve_model_path("embedded")
    spec = model_spec(path, LABELS)
    examples = embedded_split(DataSource("embedded"))[0][:320]
    return Setup(spec, load_tokenizer(path), examples, tuple(m.name for m in spec.candidates))


def fresh_model() -> AdaptedModel:
    return AdaptedModel(load_base(resolve_model_path("embedded"), LABELS, Quantization.NONE, CPU))


def probe(
    adapted: AdaptedModel, setup: Setup, candidates: tuple[str, ...] = (), deadline_s: float = 300
) -> ProbeResult:
    return run_probe(
        adapted,
        setup.tokenizer,
        setup.examples,
        candidates or setup.candidates,
        rank=4,
        steps=20,
        batch_size=16,
        learning_rate=1e-3,
        max_seq_len=48,
        seed=7,
        device=CPU,
        deadline=time.monotonic() + deadline_s,
    )


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("classifier.")}


@pytest.fixture(scope="module")
def probed(setup: Setup) -> Probed:
    adapted = fresh_model()
    head_before = head_state(adapted.base)
    first = probe(adapted, setup)
    second = probe(adapted, setup)
    return Probed(adapted, head_before, first, second)


def kind_shares(scores: dict[str, float]) -> dict[str, float]:
    total = sum(scores.values())
    return {kind: sum(v for name, v in scores.items() if name.endswith(kind)) / total for kind in KINDS}


@pytest.mark.integration
def test_probe_scores_every_candidate_and_the_scores_are_not_uniform(setup: Setup, probed: Probed) -> None:
    scores = probed.first.scores

    assert list(scores) == list(setup.candidates) and len(scores) == 24
    assert all(math.isfinite(v) and v >= 0 for v in scores.values())
    assert max(scores.values()) > 2 * min(scores.values())
    shares = kind_shares(scores)
    assert max(shares.values()) > 2 * min(shares.values()), shares
    assert (probed.first.steps, probed.first.samples) == (20, 320) and probed.first.seconds > 0


@pytest.mark.integration
def test_probe_is_deterministic_for_a_seed(probed: Probed) -> None:
    first, second = probed.first.scores, probed.second.scores

    assert sorted(first, key=first.__getitem__) == sorted(second, key=second.__getitem__)
    assert second == pytest.approx(first, rel=1e-5)


@pytest.mark.integration
def test_probe_hands_back_a_bare_frozen_base_with_the_agents_head(probed: Probed) -> None:
    adapted = probed.adapted
    names = [name for name, _ in adapted.base.named_parameters()]

    assert adapted.model is None and adapted.layout is None
    assert not any("lora_" in name or "modules_to_save" in name for name in names)
    assert not any(p.requires_grad for p in adapted.base.parameters())
    after = head_state(adapted.base)
    assert after.keys() == probed.head_before.keys()
    assert all(torch.equal(after[n], probed.head_before[n]) for n in after)


@pytest.mark.integration
def test_plain_lora_plan_wraps_and_trains_after_the_probe(setup: Setup, probed: Probed) -> None:
    options = PlanOptions(("query", "value"), 4, 8.0, 0.0, 8, 1, 1, 2e-3, 0.0, 32, Quantization.NONE, 60.0, 1)
    plan = uniform_plan({"a": profile(CPU, torch.float32, 8, 0)}, setup.spec, options, 1).plans["a"]

    model = probed.adapted.ensure(plan)
    result = train_local(model, setup.tokenizer, setup.examples[:8], plan, CPU, time.monotonic() + 60, "off")

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert result.steps == 1 and result.samples == 8 and math.isfinite(result.mean_loss)
    assert trainable and not any("lora_E" in n for n in trainable)
    moved = [t for name, t in probed.adapted.extract().items() if name.endswith(".lora_B") and t.abs().sum() > 0]
    assert moved, "one step must move B away from its zero start"


@pytest.mark.integration
def test_probe_past_its_deadline_still_takes_one_step_and_scores(setup: Setup) -> None:
    adapted = fresh_model()

    result = probe(adapted, setup, deadline_s=-1)

    assert (result.steps, result.samples) == (1, 16)
    assert len(result.scores) == 24 and all(math.isfinite(v) for v in result.scores.values())


@pytest.mark.integration
def test_unknown_candidate_is_refused_and_the_base_is_handed_back(setup: Setup) -> None:
    adapted = fresh_model()
    candidates = (setup.candidates[0], "bert.encoder.layer.0.attention.self.nonexistent")

    with pytest.raises(ConfigError, match="nonexistent"):
        probe(adapted, setup, candidates)

    assert not any("lora_" in name for name, _ in adapted.base.named_parameters())
    assert not any(p.requires_grad for p in adapted.base.parameters())


@pytest.mark.integration
def test_tracker_matches_peft_rank_allocator_over_three_steps() -> None:
    # peft leaves these untyped; reach them through Any.
    adalora: Any = importlib.import_module("peft.tuners.adalora.layer")
    # A module whose parameter names look like peft's ("lora_A.default", ...), trained on a toy loss.
    generator = torch.Generator().manual_seed(0)
    module = nn.Module()
    for factor, shape in (("lora_A", (3, 5)), ("lora_E", (3, 1)), ("lora_B", (4, 3))):
        setattr(module, factor, nn.ParameterDict({"default": nn.Parameter(torch.randn(*shape, generator=generator))}))
    config = SimpleNamespace(beta1=0.85, beta2=0.85, target_r=3)
    allocator = adalora.RankAllocator(module, config, "default")
    tracker = SensitivityTracker()
    params = dict(module.named_parameters())

    for step in range(3):
        x = torch.randn(2, 5, generator=generator)
        a, e, b = params["lora_A.default"], params["lora_E.default"], params["lora_B.default"]
        loss = ((x @ (a * e).T @ b.T) ** 2).sum() * (step + 1)
        torch.autograd.backward(loss)
        allocator.update_ipt(module)
        tracker.update(params)
        for p in params.values():
            p.grad = None

    for name in params:
        torch.testing.assert_close(tracker.score(name), allocator._element_score(name), rtol=1e-6, atol=0)


@pytest.mark.integration
def test_a_capped_agent_probes_at_its_compute_share(setup: Setup) -> None:
    # Prepare: the same short probe with and without a half-share throttle
    adapted = fresh_model()

    def timed(throttle: Throttle | None) -> tuple[float, ProbeResult]:
        start = time.perf_counter()
        result = run_probe(adapted, setup.tokenizer, setup.examples, setup.candidates, 4, 4, 16, 1e-3, 48, 7, CPU,
                           time.monotonic() + 300, throttle)  # fmt: skip
        return time.perf_counter() - start, result

    # Execute: a first probe pays the one-off costs (lazy imports, first kernels) outside the comparison
    timed(None)
    free_seconds, free = timed(None)
    throttle = Throttle(0.5)
    capped_seconds, capped = timed(throttle)

    # Assert: the probe's steps ran through the throttle, which slept as long again, so the capped probe took
    # about twice its work (judged within the one run: a busy CI host changes both runs' step times), and the
    # scores are the same (the throttle only sleeps)
    assert throttle.work_s >= 0.3 * free_seconds, (throttle.work_s, free_seconds)
    assert throttle.slept_s >= 0.95 * throttle.work_s, (throttle.slept_s, throttle.work_s)
    assert capped_seconds >= throttle.work_s + throttle.slept_s, (capped_seconds, throttle.work_s, throttle.slept_s)
    assert capped.scores == free.scores

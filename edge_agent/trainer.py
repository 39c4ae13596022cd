"""One readable local training loop: shuffle, batch, forward, backward, clip, step, log."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from common.adapters import PEFT_PREFIX
from common.batching import encode, forward
from common.data import SEQ_CLS, Example
from common.importance import SensitivityTracker, lora_scores
from common.types import TrainPlan
from edge_agent.caps import Throttle
from edge_agent.collective import Collective
from edge_agent.profiler import peak_memory_bytes, reset_peak_memory

log = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0  # clipping keeps one skewed local batch from throwing the adapter far off
WARMUP_FRACTION = 0.1  # a short warm-up: every round starts a fresh AdamW with empty moments


@dataclass(frozen=True)
class TrainResult:
    """What a local round did."""

    samples: int  # samples actually processed (the aggregation weight)
    steps: int
    seconds: float
    mean_loss: float
    peak_memory_bytes: int
    stopped_early: bool  # the deadline cut the planned work short
    importance: dict[str, float] = field(default_factory=dict)  # plan.track_importance: score per module


def train_local(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    plan: TrainPlan,
    device: torch.device,
    deadline: float,
    progress: str = "auto",
    on_step: Callable[[int, float], None] | None = None,
    throttle: Throttle | None = None,
    task: str = SEQ_CLS,
    group: Collective | None = None,
) -> TrainResult:
    """Train the model's trainable tensors on examples per the plan, stopping at the deadline.

    `deadline` is a time.monotonic() value; the loop stops before a step it could not finish in time,
    judged by the mean step time so far, and reports the samples it actually processed. `throttle`
    (the agent's compute share) sleeps after each step, so step times and the deadline include it.
    `group`: this process is one rank of a data-parallel agent. Every rank draws the same batches, computes
    on its share of each, and steps on the gradients averaged over the whole batch; rank 0's deadline
    decides for all, and the result (loss, peak memory) is the group's.
    """
    total = plan.steps_for(len(examples))
    generator = torch.Generator().manual_seed(plan.seed)
    torch.manual_seed(plan.seed + (group.rank if group is not None else 0))  # LoRA dropout: its own masks per rank
    params = [p for p in model.parameters() if p.requires_grad]
    # FedProx (Li et al. 2020): pull the trained tensors towards where this round started them.
    anchors = [p.detach().clone() for p in params] if plan.proximal_mu > 0 else []
    optimizer: torch.optim.Optimizer
    if plan.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=plan.learning_rate, weight_decay=plan.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=plan.learning_rate, weight_decay=plan.weight_decay)
    warmup = max(1, int(total * WARMUP_FRACTION))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    throttle = throttle or Throttle(1.0)
    tracker, watched = _importance_watch(model, plan)
    placed = sorted({p.device for p in model.parameters()} | {device}, key=str)  # a split base: several
    for each in placed:
        reset_peak_memory(each)
    bar = _Progress(progress, total, f"train {plan.plan_id}")
    model.train()
    start = time.perf_counter()
    steps = samples = 0
    loss_sum = 0.0
    stopped_early = False
    order: list[int] = []
    while steps < total:
        if not order:
            order = torch.randperm(len(examples), generator=generator).tolist()
        batch = [examples[i] for i in order[: plan.batch_size]]
        order = order[plan.batch_size :]
        elapsed = time.perf_counter() - start
        late = bool(steps) and time.monotonic() + elapsed / steps > deadline
        if group.agree(late) if group is not None else late:
            stopped_early = True
            break
        with throttle:  # float(loss) waits for the GPU, so the throttle times the whole step
            share = group.share(batch) if group is not None else batch
            loss_value = 0.0
            if share:  # a rank whose share of a short last batch is empty still joins the all-reduce
                inputs = encode(tokenizer, share, plan.max_seq_len, device, task)
                _, loss = forward(model, inputs, task)
                objective = loss
                if anchors:
                    proximal = sum(
                        ((p - a).pow(2).sum() for p, a in zip(params, anchors, strict=True)), loss.new_zeros(())
                    )
                    objective = loss + 0.5 * plan.proximal_mu * proximal
                objective.backward()
                loss_value = float(loss.detach())
            if group is not None:
                loss_value = group.average(params, loss_value, len(share), len(batch))
            if tracker is not None:
                tracker.update(watched)  # the raw gradients, before clipping (as the probe reads them)
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        steps += 1
        samples += len(batch)
        loss_sum += loss_value
        if on_step is not None:
            on_step(len(batch), loss_value)
        bar.update(steps, loss_sum / steps)
    seconds = time.perf_counter() - start
    peak = max(peak_memory_bytes(each) for each in placed)  # the busiest device's, as the planner prices it
    bar.close()
    if stopped_early:
        log.warning("train: deadline reached after %d of %d steps", steps, total)
    return TrainResult(
        samples=samples,
        steps=steps,
        seconds=seconds,
        mean_loss=loss_sum / steps if steps else float("nan"),
        peak_memory_bytes=group.largest(peak) if group is not None else peak,
        stopped_early=stopped_early,
        importance=lora_scores(tracker, _pairs(plan)) if tracker is not None else {},
    )


def _pairs(plan: TrainPlan) -> dict[str, tuple[str, str]]:
    """peft's parameter names of each planned module's A and B."""
    return {
        module: (f"{PEFT_PREFIX}{module}.lora_A.default.weight", f"{PEFT_PREFIX}{module}.lora_B.default.weight")
        for module in plan.target_modules
    }


def _importance_watch(model: Any, plan: TrainPlan) -> tuple[SensitivityTracker | None, dict[str, torch.Tensor]]:
    """A tracker over the plan's LoRA tensors when the plan asks for scores (LoRA mode only), and those
    tensors; (None, {}) otherwise. Only adapter tensors are watched: cheap next to the step itself."""
    if not plan.track_importance or plan.mode != "lora":
        return None, {}
    named = dict(model.named_parameters())
    watched = {name: named[name] for pair in _pairs(plan).values() for name in pair if name in named}
    return SensitivityTracker(), watched


class _Progress:
    """A tqdm bar on a terminal, else a log line every 10% of the steps."""

    def __init__(self, mode: str, total: int, label: str) -> None:
        self.total = total
        self.label = label
        self.bar: Any = None
        self.next_line = 0
        self.mode = "bar" if mode == "bar" or (mode == "auto" and sys.stderr.isatty()) else mode
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="step", leave=False)
        self.start = time.perf_counter()

    def update(self, step: int, mean_loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{mean_loss:.4f}")
        elif self.mode != "off" and step >= self.next_line:
            rate = step / max(time.perf_counter() - self.start, 1e-9)
            log.info("%s: step %d/%d loss %.4f (%.2f steps/s)", self.label, step, self.total, mean_loss, rate)
            self.next_line = step + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

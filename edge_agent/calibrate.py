"""Calibration (METHOD.md section 2): short measured training runs at two batch sizes, before registering.

The coordinator's cost model takes its activation slope, overhead and step-time line from these points
rather than from formulas alone. Each run is the real training loop (edge_agent.trainer.train_local) with
LoRA of one rank on every candidate plus the heads, at full precision, under the agent's compute throttle,
so what is measured is what a round would cost. Every batch is exactly seq_len tokens long, so the two
points differ only in batch size.

A third, shallow run at the larger batch trains LoRA on the last layer's candidates only: the backward then
stops at that layer, and the difference to the full-depth run is what a mask of late layers saves in
activation memory and step time (coordinator.costmodel interpolates in between).
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import replace
from typing import Any

import torch

from common.adapters import (
    broadcast_tensors,
    expected_tensors,
    head_modules,
    init_global,
    last_layer_modules,
    layer_count,
)
from common.data import Example
from common.types import CalibrationPoint, ModelSpec, Quantization, TrainPlan
from edge_agent.caps import Throttle
from edge_agent.model import LocalModel
from edge_agent.profiler import reset_peak_memory
from edge_agent.trainer import train_local

log = logging.getLogger(__name__)

LEARNING_RATE = 1e-4  # small: calibration should barely move the adapter it leaves behind
ALPHA_PER_RANK = 2.0  # alpha = 2 * rank, the coordinator's default (16 at rank 8); cost does not depend on it
DROPOUT = 0.05  # the coordinator's default (costmodel.CALIBRATION_DROPOUT): dropout's masks count as activations
FILLER = Example(text="calibration", label=0)  # stands in for data when the agent has none


def calibration_plan(
    spec: ModelSpec, batch_size: int, seq_len: int, rank: int, steps: int, shallow: bool = False
) -> TrainPlan:
    """A plan for one calibration run: LoRA at `rank` on every candidate (shallow: on the last layer's only,
    so the backward stops there), heads in full, full precision."""
    modules = last_layer_modules(spec) if shallow else tuple(module.name for module in spec.candidates)
    return TrainPlan(
        plan_id=f"calibration-b{batch_size}" + ("-shallow" if shallow else ""),
        target_modules=modules,
        rank_pattern=dict.fromkeys(modules, rank),
        lora_alpha=ALPHA_PER_RANK * rank,
        lora_dropout=DROPOUT,
        modules_to_save=head_modules(spec),
        batch_size=batch_size,
        local_epochs=steps,  # with batch_size * steps examples, one epoch is `steps` full batches
        max_steps=steps,
        learning_rate=LEARNING_RATE,
        weight_decay=0.0,
        quantization=Quantization.NONE,
        max_seq_len=seq_len,
        deadline_s=math.inf,
        seed=0,
    )


def long_examples(tokenizer: Any, examples: list[Example], count: int, seq_len: int) -> list[Example]:
    """`count` examples cycled from `examples`, each text repeated until it has at least seq_len tokens.

    encode() pads a batch to its longest member and truncates at seq_len, so texts that all reach seq_len
    make every batch exactly seq_len tokens: the measurement does not depend on tweet lengths.
    """
    source = examples or [FILLER]
    out: list[Example] = []
    for i in range(count):
        example = source[i % len(source)]
        text = example.text.strip() or FILLER.text
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        repeats = max(1, math.ceil(seq_len / max(tokens, 1)))
        out.append(replace(example, text=" ".join([text] * repeats)))
    return out


def calibrate(
    model: LocalModel,
    examples: list[Example],
    spec: ModelSpec,
    batch_sizes: tuple[int, int],
    seq_len: int,
    rank: int,
    steps: int,
    throttle: Throttle | None,
) -> tuple[CalibrationPoint, ...]:
    """Measure step time and peak memory of `steps` training steps at each batch size, smallest first.

    The model is left loaded at full precision with the calibration adapter; the next plan loads its own
    layout and tensors. A batch size that runs out of memory (a capped GPU) ends calibration with the
    points measured so far: the planner then falls back to its formulas for what is missing.
    """
    if steps < 2:
        raise ValueError("calibration needs at least two steps: the first one is warm-up")
    points: list[CalibrationPoint] = []
    batch_size = max(batch_sizes)
    try:
        for batch_size in sorted(batch_sizes):
            plan = calibration_plan(spec, batch_size, seq_len, rank, steps)
            points.append(measure(model, examples, spec, plan, throttle))
        if layer_count(spec) > 1:
            # The shallow run: how much less memory and time a mask of the top layers needs (module docstring).
            plan = calibration_plan(spec, batch_size, seq_len, rank, steps, shallow=True)
            points.append(replace(measure(model, examples, spec, plan, throttle), layers=1))
    except torch.OutOfMemoryError:
        log.warning("calibration: batch %d x %d tokens does not fit in memory; stopping here", batch_size, seq_len)
    if model.adapted is not None and model.adapted.model is not None:
        model.adapted.model.zero_grad(set_to_none=True)  # an out-of-memory backward leaves gradients behind
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()  # the runs' activations and optimizer state are garbage now
    return tuple(points)


def measure(
    model: LocalModel, examples: list[Example], spec: ModelSpec, plan: TrainPlan, throttle: Throttle | None
) -> CalibrationPoint:
    """One calibration run of a calibration_plan.

    Step time is the mean over the steps after the first (the first pays for lazy initialisation), the
    throttle's sleeps included; peak memory is the process's (CPU) or the CUDA allocator's peak during
    the run.
    """
    adapted = model.prepare(plan)
    # Every run starts from the same valid adapter, so a later run does not continue an earlier one.
    adapted.load(broadcast_tensors(init_global(spec, plan, 0), plan, spec))
    batch = long_examples(model.tokenizer, examples, plan.batch_size * plan.max_steps, plan.max_seq_len)
    stamps: list[float] = []
    gc.collect()  # garbage of the previous run must not count towards this run's peak
    reset_peak_memory(model.device)
    result = train_local(
        adapted.model,
        model.tokenizer,
        batch,
        plan,
        model.device,
        math.inf,
        progress="off",
        on_step=lambda samples, loss: stamps.append(time.perf_counter()),
        throttle=throttle,
        task=model.task,
    )
    # Consecutive step ends are one step apart, the throttle's sleep after the earlier one included.
    step_seconds = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return CalibrationPoint(
        batch_size=plan.batch_size,
        seq_len=plan.max_seq_len,
        rank=max(plan.rank_pattern.values()),
        quantization=plan.quantization,
        step_seconds=step_seconds,
        peak_memory_bytes=result.peak_memory_bytes,
        trainable_parameters=sum(math.prod(info.shape) for info in expected_tensors(plan, spec)),
    )

"""The importance probe (METHOD.md section 1): a few AdaLoRA steps on local data, one score per candidate.

The agent's base is borrowed from its AdaptedModel, wrapped with peft's AdaLoRA at a fixed rank, trained
for a few steps while a SensitivityTracker watches the adapter gradients, and handed back bare so that
the next plan's LoRA wrapper is built as usual. peft's own rank allocator is never called: nothing is
pruned, and its scores (keyed by the inner model's names) are not needed.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from common.adapters import HEAD_INIT_STD
from common.batching import encode, task_loss
from common.data import Example
from common.errors import ConfigError
from common.importance import SensitivityTracker, matrix_scores
from common.modeling import HEAD_MODULES, PEFT_TASK, AdaptedModel
from edge_agent.caps import Throttle

if TYPE_CHECKING:
    from collections.abc import Iterator

    from torch import nn

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's adapter name
PEFT_PREFIX = "base_model.model."  # peft's prefix before the base model's own parameter names
SCHEDULE_MARGIN = 10  # AdaLoRA's warm-up outlasts the probe by this many steps, so no budget ever shrinks


@dataclass(frozen=True)
class ProbeResult:
    """What a probe measured."""

    scores: dict[str, float]  # candidate module name -> importance (sum of its triplet scores)
    samples: int  # samples processed, the weight of this agent's scores
    steps: int
    seconds: float


def run_probe(
    adapted: AdaptedModel,
    tokenizer: Any,
    examples: list[Example],
    candidates: tuple[str, ...],
    rank: int,
    steps: int,
    batch_size: int,
    learning_rate: float,
    max_seq_len: int,
    seed: int,
    device: torch.device,
    deadline: float,
    throttle: Throttle | None = None,
) -> ProbeResult:
    """Score every candidate by AdaLoRA sensitivity x uncertainty over a few steps; leaves `adapted` bare.

    `deadline` is a time.monotonic() value; the probe always takes at least one step, so it has scores.
    """
    if not examples or not candidates:
        raise ConfigError("probe: needs at least one example and one candidate module")
    if min(rank, steps, batch_size) < 1:
        raise ConfigError(f"probe: rank, steps and batch_size must be >= 1, got {rank}, {steps}, {batch_size}")
    from peft import AdaLoraConfig, get_peft_model

    start = time.perf_counter()
    base = adapted.bare()
    saved_heads = _head_state(base)
    config = AdaLoraConfig(
        task_type=PEFT_TASK[adapted.task],
        init_r=rank,
        target_r=rank,
        target_modules=list(candidates),
        lora_alpha=rank,  # peft scales by alpha / ranknum: 1 at a fixed rank
        lora_dropout=0.0,
        # Off: peft adds the penalty only when the forward gets labels (we never pass them), and with it
        # the A/B scores follow the random init instead of the data (STACK.md).
        orth_reg_weight=0.0,
        # peft refuses a schedule without a budgeting phase; update_and_allocate is never called anyway.
        tinit=steps + SCHEDULE_MARGIN,
        tfinal=0,
        total_step=steps + 100,
        deltaT=1,
    )
    peft_model: Any = None
    try:
        with _seeded(seed, device):
            _reset_heads(base, seed)
            peft_model = get_peft_model(base, config)  # A, B ~ N(0, 0.02) and E = 0, from the seeded RNG
            triplets = _triplets(peft_model, candidates)
            tracker, done, samples = _train(
                peft_model,
                tokenizer,
                examples,
                triplets,
                steps,
                batch_size,
                learning_rate,
                max_seq_len,
                seed,
                device,
                deadline,
                throttle or Throttle(1.0),
                adapted.task,
            )
    finally:
        # Hand the base back as bare() gave it: no adapter, the agent's own head, everything frozen.
        if peft_model is not None:
            adapted.base = peft_model.unload()
        _restore_heads(adapted.base, saved_heads)
        for param in adapted.base.parameters():
            param.requires_grad_(False)
    scores = matrix_scores(tracker, triplets)
    seconds = time.perf_counter() - start
    top = sorted(scores, key=scores.__getitem__, reverse=True)[:3]
    log.info(
        "probe: %d steps on %d samples in %.1fs; top %s",
        done,
        samples,
        seconds,
        ", ".join(f"{name}={scores[name]:.3g}" for name in top),
    )
    return ProbeResult(scores=scores, samples=samples, steps=done, seconds=seconds)


def _train(
    peft_model: Any,
    tokenizer: Any,
    examples: list[Example],
    triplets: dict[str, tuple[str, str, str]],
    steps: int,
    batch_size: int,
    learning_rate: float,
    max_seq_len: int,
    seed: int,
    device: torch.device,
    deadline: float,
    throttle: Throttle,
    task: str,
) -> tuple[SensitivityTracker, int, int]:
    """The probe's training loop; returns the tracker, the steps taken and the samples seen."""
    named = dict(peft_model.named_parameters())
    watched = {name: named[name] for triple in triplets.values() for name in triple}
    params = [p for p in peft_model.parameters() if p.requires_grad]  # the adapters and the head copy
    # No weight decay: twenty steps need no regularisation, and decay would shrink |w| in I = |w * grad|.
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    tracker = SensitivityTracker()
    peft_model.train()
    done = samples = 0
    order: list[int] = []
    while done < steps and (done == 0 or time.monotonic() < deadline):
        if not order:
            order = torch.randperm(len(examples), generator=generator).tolist()
        batch = [examples[i] for i in order[:batch_size]]
        order = order[batch_size:]
        with throttle:  # a capped agent probes at its compute share too, as it trains
            inputs = encode(tokenizer, batch, max_seq_len, device, task)
            labels = inputs.pop("labels")
            # Without labels neither transformers nor AdaLoRA compute a loss, so no orthogonality penalty
            # can sneak in whatever orth_reg_weight says.
            logits = peft_model(**inputs).logits
            loss = task_loss(logits, labels, task)
            torch.autograd.backward(loss)
            tracker.update(watched)  # reads .grad: before zero_grad(set_to_none=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        done += 1
        samples += len(batch)
    if done < steps:
        log.warning("probe: deadline reached after %d of %d steps", done, steps)
    return tracker, done, samples


def _triplets(peft_model: Any, candidates: tuple[str, ...]) -> dict[str, tuple[str, str, str]]:
    """Each candidate's (lora_A, lora_E, lora_B) parameter names; ConfigError for one peft did not wrap."""
    names = {name for name, _ in peft_model.named_parameters()}
    triplets: dict[str, tuple[str, str, str]] = {}
    for module in candidates:
        triple = (
            f"{PEFT_PREFIX}{module}.lora_A.{ADAPTER}",
            f"{PEFT_PREFIX}{module}.lora_E.{ADAPTER}",
            f"{PEFT_PREFIX}{module}.lora_B.{ADAPTER}",
        )
        if not all(name in names for name in triple):
            raise ConfigError(f"probe: candidate {module!r} got no AdaLoRA adapter (is it a full module name?)")
        triplets[module] = triple
    return triplets


def _head_params(base: nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in base.named_parameters() if n.split(".")[0] in HEAD_MODULES]


def _head_state(base: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the head tensors, so the probe's head never leaks into the agent's training."""
    return {name: param.detach().clone() for name, param in _head_params(base)}


def _restore_heads(base: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in _head_params(base):
            param.copy_(saved[name])


def _reset_heads(base: nn.Module, seed: int) -> None:
    """Every agent probes from the same head: weights N(0, 0.02) from `seed`, biases zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in _head_params(base):
            if name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * HEAD_INIT_STD)


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNGs (AdaLoRA init, base dropout) for a block, leaving the caller's streams as they were."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield

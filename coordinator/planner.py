"""Per-agent plans: profiles + model spec in, one TrainPlan per agent out. Pure functions.

`uniform` gives every agent the same configuration; it stays as the baseline the paper compares with.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

from common.adapters import head_modules
from common.errors import ConfigError
from common.types import DeviceProfile, ModelSpec, Quantization, TrainPlan


@dataclass(frozen=True)
class PlanOptions:
    """Run-wide settings the planner turns into plans."""

    targets: tuple[str, ...]  # module suffixes, or ("all",)
    rank: int
    alpha: float
    dropout: float
    batch_size: int
    local_epochs: int
    max_steps: int
    learning_rate: float
    weight_decay: float
    max_seq_len: int
    quantization: Quantization
    deadline_s: float
    seed: int


def resolve_targets(spec: ModelSpec, targets: tuple[str, ...]) -> tuple[str, ...]:
    """Full module names of the candidates matching the suffixes, in model order; ConfigError if none match."""
    if targets == ("all",):
        return tuple(m.name for m in spec.candidates)
    chosen = tuple(m.name for m in spec.candidates if any(m.name == t or m.name.endswith("." + t) for t in targets))
    unmatched = [t for t in targets if not any(m == t or m.endswith("." + t) for m in chosen)]
    if unmatched:
        kinds = sorted({m.name.split(".")[-1] for m in spec.candidates})
        raise ConfigError(f"lora.targets: {unmatched} match no candidate of {spec.model_type} (ends: {kinds})")
    return chosen


def plan_id(round_: int, agent_id: str, fields: Mapping[str, object]) -> str:
    """A short stable id for a plan: round, agent and a hash of its contents."""
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"r{round_}-{agent_id}-{digest}"


def uniform_plan(
    profiles: Mapping[str, DeviceProfile], spec: ModelSpec, options: PlanOptions, round_: int
) -> dict[str, TrainPlan]:
    """The same configuration for every agent (seeds differ per agent so dropout and order differ)."""
    modules = resolve_targets(spec, options.targets)
    ranks = {m: options.rank for m in modules}
    plans: dict[str, TrainPlan] = {}
    for index, agent_id in enumerate(sorted(profiles)):
        fields = {
            "modules": modules,
            "rank": options.rank,
            "alpha": options.alpha,
            "batch": options.batch_size,
            "quant": options.quantization.value,
            "lr": options.learning_rate,
        }
        plans[agent_id] = TrainPlan(
            plan_id=plan_id(round_, agent_id, fields),
            target_modules=modules,
            rank_pattern=ranks,
            lora_alpha=options.alpha,
            lora_dropout=options.dropout,
            modules_to_save=head_modules(spec),
            batch_size=options.batch_size,
            local_epochs=options.local_epochs,
            max_steps=options.max_steps,
            learning_rate=options.learning_rate,
            weight_decay=options.weight_decay,
            quantization=options.quantization,
            max_seq_len=options.max_seq_len,
            deadline_s=options.deadline_s,
            seed=options.seed * 1_000_003 + round_ * 1_009 + index,
        )
    return plans


PLANNERS = {"uniform": uniform_plan}

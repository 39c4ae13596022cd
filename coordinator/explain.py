"""`fedpipe-coordinator plan --explain`: re-plan from a run directory's saved agents and say why.

The orchestrator writes `agents.json` (profiles, model spec, mask, importance, corrections) each time it
plans; this view loads it with the run's config (or flags over it), runs the planner, and prints per
agent the configuration, its predicted memory and round time, and the binding constraint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.types import CalibrationPoint, DeviceProfile, ModelSpec, ModuleShape, Quantization
from coordinator.planner import PLANNERS, PlanOptions, PlanSet

AGENTS_FILE = "agents.json"


def snapshot(
    profiles: Mapping[str, DeviceProfile],
    spec: ModelSpec,
    mask: tuple[str, ...] | None,
    scores: Mapping[str, float],
    corrections: Mapping[str, tuple[float, float]],
) -> dict[str, Any]:
    """What the planner saw, as JSON-ready data."""

    def profile_record(profile: DeviceProfile) -> dict[str, Any]:
        record = asdict(profile)
        record["calibration"] = [{**asdict(p), "quantization": p.quantization.value} for p in profile.calibration]
        return record

    return {
        "spec": asdict(spec),
        "profiles": {agent: profile_record(p) for agent, p in profiles.items()},
        "mask": list(mask) if mask is not None else None,
        "scores": dict(scores),
        "corrections": {agent: list(pair) for agent, pair in corrections.items()},
    }


Snapshot = tuple[
    dict[str, DeviceProfile], ModelSpec, tuple[str, ...] | None, dict[str, float], dict[str, tuple[float, float]]
]


def load_snapshot(path: Path) -> Snapshot:
    """Inverse of snapshot, read from a run directory's agents.json."""
    if not path.is_file():
        raise ConfigError(f"--run-dir: {path} not found; a coordinator writes it when it first plans")
    return from_snapshot(json.loads(path.read_text()))


def from_snapshot(data: Mapping[str, Any]) -> Snapshot:
    """Inverse of snapshot: profiles, spec, mask, scores and corrections."""
    raw = data["spec"]
    spec = ModelSpec(
        fingerprint=raw["fingerprint"],
        model_type=raw["model_type"],
        task=raw["task"],
        labels=tuple(raw["labels"]),
        candidates=tuple(ModuleShape(**m) for m in raw["candidates"]),
        heads=tuple((name, tuple(shape)) for name, shape in raw["heads"]),
        base_parameters=raw["base_parameters"],
        linear_parameters=raw.get("linear_parameters", 0),
    )
    profiles = {}
    for agent, record in data["profiles"].items():
        points = tuple(
            CalibrationPoint(**{**p, "quantization": Quantization(p["quantization"])}) for p in record["calibration"]
        )
        profiles[agent] = DeviceProfile(**{**record, "calibration": points})
    mask = tuple(data["mask"]) if data.get("mask") else None
    corrections = {agent: (float(t), float(m)) for agent, (t, m) in data.get("corrections", {}).items()}
    return profiles, spec, mask, dict(data.get("scores", {})), corrections


def replan(
    planner: str, options: PlanOptions, run_dir: Path, round_: int = 0
) -> tuple[PlanSet, dict[str, DeviceProfile]]:
    """The plans the configured planner makes from the run's saved agents."""
    profiles, spec, mask, scores, corrections = load_snapshot(run_dir / AGENTS_FILE)
    options = replace(options, scores=scores, corrections=corrections)
    if mask is not None:
        options = replace(options, targets=mask)
    return PLANNERS[planner](profiles, spec, options, round_), profiles


def render(planned: PlanSet, profiles: Mapping[str, DeviceProfile]) -> str:
    """One block per agent: configuration, predicted memory and time, binding constraint."""
    lines = [f"round time T: {planned.round_seconds:.1f}s" if planned.round_seconds else "round time: per plan"]
    for agent in sorted(profiles):
        profile = profiles[agent]
        caps = f"{profile.total_memory_bytes / 2**30:.2f} GiB, {profile.flops_per_s / 1e9:.1f} GFLOP/s"
        if profile.compute_share < 1:
            caps += f", compute share {profile.compute_share:g}"
        if agent in planned.excluded:
            lines.append(f"{agent} ({caps}): LEFT OUT: {planned.excluded[agent]}")
            continue
        plan = planned.plans[agent]
        prediction = planned.predictions.get(agent)
        ranks = sorted(set(plan.rank_pattern.values()))
        line = (
            f"{agent} ({caps}): batch {plan.batch_size}, rank {'/'.join(map(str, ranks))} on "
            f"{len(plan.target_modules)} matrices, base {plan.quantization.value}"
        )
        if prediction is not None:
            line += (
                f"; predicted peak {prediction.peak_memory_bytes / 2**20:.0f} of "
                f"{prediction.usable_memory_bytes / 2**20:.0f} MiB, {prediction.step_seconds:.3f}s/step x "
                f"{prediction.steps} steps = {prediction.round_seconds:.1f}s, {prediction.samples} samples, "
                f"under-training {prediction.under_training:.2f}; binding: {prediction.binding}"
            )
        lines.append(line)
    return "\n".join(lines)

"""`fedpipe-coordinator plan --explain`: re-plan from a run directory's saved agents and say why.

The orchestrator writes `agents.json` (profiles, model spec, mask, importance, corrections) each time it
plans; this view loads it with the run's config (or flags over it), runs the planner, and prints per
agent the configuration, its predicted memory and round time, and the binding constraint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from common.types import DeviceProfile
from coordinator.bounds import counted_profiles
from coordinator.planner import PLANNERS, PlanOptions, PlanSet
from coordinator.rundir import AGENTS_FILE, load_snapshot


def replan(
    planner: str, options: PlanOptions, run_dir: Path, round_: int = 0, weight_ratio: float = 0.0
) -> tuple[PlanSet, dict[str, DeviceProfile]]:
    """The plans the configured planner makes from the run's saved agents (data sizes counted as the
    coordinator counts them: at most weight_ratio x the median)."""
    profiles, spec, mask, scores, corrections = load_snapshot(run_dir / AGENTS_FILE)
    options = replace(options, scores=scores, corrections=corrections)
    if mask is not None:
        options = replace(options, targets=mask)
    return PLANNERS[planner](counted_profiles(profiles, weight_ratio), spec, options, round_), profiles


def render(planned: PlanSet, profiles: Mapping[str, DeviceProfile]) -> str:
    """One block per agent: configuration, predicted memory and time, binding constraint."""
    lines = [f"round time T: {planned.round_seconds:.1f}s" if planned.round_seconds else "round time: per plan"]
    for agent in sorted(profiles):
        profile = profiles[agent]
        caps = f"{profile.total_memory_bytes / 2**30:.2f} GiB, {profile.flops_per_s / 1e9:.1f} GFLOP/s"
        if profile.compute_share < 1:
            caps += f", compute share {profile.compute_share:g}"
        if profile.devices:  # memory and FLOP/s above are per device
            caps += f", {profile.world} devices, all-reduce {profile.allreduce_bytes_per_s / 1e9:.2f} GB/s"
        if agent in planned.excluded:
            lines.append(f"{agent} ({caps}): LEFT OUT: {planned.excluded[agent]}")
            continue
        plan = planned.plans[agent]
        prediction = planned.predictions.get(agent)
        ranks = sorted(set(plan.rank_pattern.values()))
        trained = (
            f"rank {'/'.join(map(str, ranks))} on {len(plan.target_modules)} matrices"
            if ranks
            else f"{len(plan.target_modules)} matrices in full"
        )
        line = f"{agent} ({caps}): batch {plan.batch_size}, {trained}, base {plan.quantization.value}"
        if profile.devices and plan.mode == "lora":
            line += " split by layers over its devices" if plan.placement == "layers" else " on each device"
        if prediction is not None:
            line += (
                f"; predicted peak {prediction.peak_memory_bytes / 2**20:.0f} of "
                f"{prediction.usable_memory_bytes / 2**20:.0f} MiB, {prediction.step_seconds:.3f}s/step x "
                f"{prediction.steps} steps = {prediction.round_seconds:.1f}s, {prediction.samples} samples, "
                f"under-training {prediction.under_training:.2f}; binding: {prediction.binding}"
            )
        lines.append(line)
    return "\n".join(lines)

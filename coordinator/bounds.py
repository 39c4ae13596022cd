"""What an agent may claim: bounds on every figure it reports, and weights the coordinator can stand behind.

Agents measure and the coordinator decides, but a measurement is only a claim: one hostile agent could
report a billion samples or a step time of 1e-300 s and take over the plan and the aggregate. So every
field of a profile, an upload header and a report is checked against floors and ceilings (a refusal names
the field), and every weight that comes from an agent's own count (its data size for the planner, its
samples for aggregation, evaluation and importance) is capped at a multiple of the round's median.
Pure functions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

from common.certs import AGENT_ID_PATTERN
from common.errors import InvalidArgument
from common.types import DeviceProfile, Evaluation, ImportanceReport, ModelSpec, ProbePlan, TrainPlan, UpdateMeta
from coordinator.config import LimitsSection
from coordinator.costmodel import step_flops_per_token

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
MAX_DEVICE_CHARS = 64
MAX_DEVICE_NAME_CHARS = 256
MAX_THREADS = 4096
MAX_DEVICES = 64  # devices of one data-parallel agent (eight 8-GPU nodes is already far past an edge server)
MAX_ALLREDUCE_BYTES_PER_S = 1e13  # 10 TB/s: above any interconnect
MAX_BATCH = 1 << 16
MAX_SEQ_LEN = 1 << 17
MAX_RANK = 4096
MAX_TRAINABLE = 10**12
MIN_STEP_SECONDS = 1e-5  # no framework steps faster than this, whatever its FLOP/s
MAX_POLL_S = 60.0
MAX_SCORE = 1e30  # importance scores are normalised per agent; this keeps their sum finite
MAX_LOSS = 1e6
MAX_IMPORTANCE = 1e30  # a training score is |w x grad| smoothed, squared: tiny in practice; finite is what counts
MAX_TRAIN_SECONDS = 7 * 86_400.0
_PRINTABLE = re.compile(r"[ -~]*")


def check_agent_id(agent_id: str, field: str = "agent_id") -> str:
    """The id if it has the form of an agent id (as certificates carry them), else InvalidArgument."""
    if not re.fullmatch(AGENT_ID_PATTERN, agent_id):
        raise InvalidArgument(field, "must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return agent_id


def _text(value: str, field: str, limit: int, empty: bool = True) -> None:
    if len(value) > limit:
        raise InvalidArgument(field, f"longer than {limit} characters ({len(value)})")
    if not _PRINTABLE.fullmatch(value):
        raise InvalidArgument(field, "holds characters other than printable ASCII")
    if not empty and not value:
        raise InvalidArgument(field, "empty")


def _between(value: float, low: float, high: float, field: str) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidArgument(field, f"must be finite and within [{low:g}, {high:g}], got {value:g}")


def check_profile(profile: DeviceProfile, spec: ModelSpec, limits: LimitsSection) -> None:
    """Every field of a registering agent's profile within the run's limits; InvalidArgument names the first off."""
    _text(profile.device, "profile.device", MAX_DEVICE_CHARS, empty=False)
    _text(profile.device_name, "profile.device_name", MAX_DEVICE_NAME_CHARS)
    if profile.compute_dtype not in COMPUTE_DTYPES:
        raise InvalidArgument("profile.compute_dtype", f"must be one of {list(COMPUTE_DTYPES)}")
    memory = float(limits.max_memory_bytes)
    _between(profile.total_memory_bytes, limits.min_memory_bytes, memory, "profile.total_memory_bytes")
    _between(profile.free_memory_bytes, 0, memory, "profile.free_memory_bytes")
    _between(profile.host_memory_bytes, 0, memory, "profile.host_memory_bytes")
    _between(profile.memory_cap_bytes, 0, memory, "profile.memory_cap_bytes")
    _between(profile.flops_per_s, limits.min_flops_per_s, limits.max_flops_per_s, "profile.flops_per_s")
    _between(profile.compute_share, 1e-3, 1.0, "profile.compute_share")
    _between(profile.threads, 1, MAX_THREADS, "profile.threads")
    _between(profile.num_train_samples, 1, limits.max_train_samples, "profile.num_train_samples")
    _between(profile.num_val_samples, 0, limits.max_train_samples, "profile.num_val_samples")
    if len(profile.devices) > MAX_DEVICES:
        raise InvalidArgument("profile.devices", f"{len(profile.devices)} devices, at most {MAX_DEVICES}")
    for index, accelerator in enumerate(profile.devices):
        _text(accelerator.device, f"profile.devices[{index}].device", MAX_DEVICE_CHARS, empty=False)
        _text(accelerator.device_name, f"profile.devices[{index}].device_name", MAX_DEVICE_NAME_CHARS)
        _between(
            accelerator.total_memory_bytes,
            limits.min_memory_bytes,
            memory,
            f"profile.devices[{index}].total_memory_bytes",
        )
        _between(
            accelerator.flops_per_s,
            limits.min_flops_per_s,
            limits.max_flops_per_s,
            f"profile.devices[{index}].flops_per_s",
        )
    if profile.devices:
        _between(profile.allreduce_bytes_per_s, 1.0, MAX_ALLREDUCE_BYTES_PER_S, "profile.allreduce_bytes_per_s")
    if len(profile.calibration) > limits.max_calibration_points:
        raise InvalidArgument(
            "profile.calibration", f"{len(profile.calibration)} points, at most {limits.max_calibration_points}"
        )
    for index, point in enumerate(profile.calibration):
        field = f"profile.calibration[{index}]"
        _between(point.batch_size, 1, MAX_BATCH, f"{field}.batch_size")
        _between(point.seq_len, 1, MAX_SEQ_LEN, f"{field}.seq_len")
        _between(point.rank, 0, MAX_RANK, f"{field}.rank")
        _between(point.peak_memory_bytes, 0, memory, f"{field}.peak_memory_bytes")
        _between(point.trainable_parameters, 0, MAX_TRAINABLE, f"{field}.trainable_parameters")
        # A step cannot run faster than its frozen-base FLOPs at the FLOP/s ceiling.
        tokens = point.batch_size * point.seq_len
        floor = max(MIN_STEP_SECONDS, step_flops_per_token(spec, 0) * tokens / limits.max_flops_per_s)
        _between(point.step_seconds, floor, limits.max_step_seconds, f"{field}.step_seconds")


def check_wait(wait_s: float) -> float:
    """A task poll's wait: finite and within [0, MAX_POLL_S]."""
    _between(wait_s, 0.0, MAX_POLL_S, "wait_s")
    return wait_s


def check_meta(meta: UpdateMeta, plan: TrainPlan, allowed_samples: int, limits: LimitsSection) -> None:
    """An upload header's figures: positive samples within what the plan allows, steps within the plan's,
    finite non-negative loss and time, a peak within the memory ceiling, importance scores only for the
    plan's matrices and finite (each agent's scores are normalised before they count, so their scale can't
    outweigh other agents')."""
    if meta.samples == 0:
        raise InvalidArgument("samples", "must be positive: an update with no samples has no weight")
    if meta.samples > allowed_samples:
        raise InvalidArgument("samples", f"{meta.samples} exceeds the {allowed_samples} this plan allows")
    _between(meta.steps, 0, allowed_samples // plan.batch_size, "steps")
    _between(meta.train_loss, 0.0, MAX_LOSS, "train_loss")
    _between(meta.train_seconds, 0.0, MAX_TRAIN_SECONDS, "train_seconds")
    _between(meta.projection_seconds, 0.0, MAX_TRAIN_SECONDS, "projection_seconds")
    _between(meta.peak_memory_bytes, 0, limits.max_memory_bytes, "peak_memory_bytes")
    unplanned = sorted(set(meta.importance) - set(plan.target_modules))
    if unplanned:
        raise InvalidArgument("importance", f"scores matrices the plan does not train: {unplanned[:3]}")
    for module, score in meta.importance.items():
        _between(score, 0.0, MAX_IMPORTANCE, f"importance[{module}]")


def check_evaluation(evaluation: Evaluation, num_val_samples: int, classes: int) -> None:
    """An evaluation report: accuracy in [0, 1], finite loss, no more samples than the agent's validation split;
    a confusion matrix (classifiers; optional) of the run's classes x classes whole counts that add up to the
    samples and whose diagonal gives the accuracy."""
    _between(evaluation.accuracy, 0.0, 1.0, "accuracy")
    _between(evaluation.loss, 0.0, MAX_LOSS, "loss")
    _between(evaluation.samples, 0, num_val_samples, "samples")
    confusion = evaluation.confusion
    if not confusion:
        return
    if len(confusion) != classes or any(len(row) != classes for row in confusion):
        shape = f"{classes} x {classes} (the run's classes)" if classes else "empty (the run's task has no classes)"
        raise InvalidArgument("confusion", f"must be {shape}, got {len(confusion)} rows")
    values = [v for row in confusion for v in row]
    if not all(math.isfinite(v) and v >= 0 and v == int(v) for v in values):
        raise InvalidArgument("confusion", "must hold whole, non-negative counts")
    if sum(values) != evaluation.samples:
        raise InvalidArgument("confusion", f"counts add up to {sum(values):g}, not the {evaluation.samples} samples")
    correct = sum(confusion[i][i] for i in range(classes))
    if evaluation.samples and abs(correct / evaluation.samples - evaluation.accuracy) > 1e-6:
        raise InvalidArgument("confusion", f"its diagonal gives accuracy {correct / evaluation.samples:.6f}, "
                              f"the report says {evaluation.accuracy:.6f}")  # fmt: skip


def check_importance(report: ImportanceReport, probe: ProbePlan) -> None:
    """A probe report: every candidate and nothing else, finite scores, no more samples or steps than the probe."""
    missing = sorted(set(probe.candidates) - set(report.scores))
    extra = sorted(set(report.scores) - set(probe.candidates))
    if missing or extra:
        raise InvalidArgument("scores", f"missing {missing[:3]}, not candidates {extra[:3]}")
    for name, score in report.scores.items():
        _between(score, 0.0, MAX_SCORE, f"scores[{name}]")
    _between(report.samples, 1, probe.steps * probe.batch_size, "samples")
    _between(report.steps, 0, probe.steps, "steps")
    _between(report.seconds, 0.0, MAX_TRAIN_SECONDS, "seconds")


# ---------------------------------------------------------------- weights


def median(values: Sequence[float]) -> float:
    """The median (the mean of the middle two for an even count); ValueError when empty."""
    if not values:
        raise ValueError("median of nothing")
    ordered = sorted(values)
    middle = len(ordered) // 2
    return float(ordered[middle]) if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def capped(weights: Mapping[str, float], ratio: float) -> dict[str, float]:
    """Each weight at most ratio x the median weight (ratio 0: unchanged).

    With one hostile agent among three or more, the median is an honest agent's figure, so the hostile
    one holds at most ratio / (ratio + n - 1) of the total. With two agents no majority exists and the cap
    cannot tell them apart (it never binds there for ratio >= 2).
    """
    if ratio <= 0 or not weights:
        return dict(weights)
    bound = ratio * median(list(weights.values()))
    return {key: min(value, bound) for key, value in weights.items()}


def counted_profiles(profiles: Mapping[str, DeviceProfile], ratio: float) -> dict[str, DeviceProfile]:
    """Profiles with the data sizes the planner counts: each agent's at most ratio x the median (ratio 0: all)."""
    train = capped({a: float(p.num_train_samples) for a, p in profiles.items()}, ratio)
    val = capped({a: float(p.num_val_samples) for a, p in profiles.items()}, ratio)
    return {
        agent: replace(
            profile, num_train_samples=max(1, math.floor(train[agent])), num_val_samples=math.floor(val[agent])
        )
        for agent, profile in profiles.items()
    }


def allowed_samples(plan: TrainPlan, counted: DeviceProfile) -> int:
    """The most samples an update for this plan may claim: its steps on the counted data, times its batch."""
    return plan.steps_for(counted.num_train_samples) * plan.batch_size


def relative_bound(norms: Mapping[str, float], multiple: float, min_updates: int = 3) -> float | None:
    """multiple x the median change norm of a round's updates, or None when the bound is off (multiple 0) or
    the round has fewer than min_updates (with two, the median is their mean and cannot tell them apart)."""
    if multiple <= 0 or len(norms) < min_updates:
        return None
    return multiple * median(list(norms.values()))


def tensor_bounds(
    norms: Mapping[str, Mapping[str, float]],
    multiple: float,
    min_updates: int = 3,
    sizes: Mapping[str, int] | None = None,
    total_bound: float | None = None,
) -> dict[str, float]:
    """Per tensor name, multiple x the median of its change norm over the round's updates that carry it (those
    carried by at least min_updates). An update's whole norm can hide a large change to one small tensor (a
    classifier bias moved by all of its budget); this bound cannot be spent elsewhere.

    With `sizes` (values per tensor) and the round's whole-update bound, a tensor may always move by its share
    of that bound by size, total_bound x sqrt(size / all sizes): what an update at the bound spread evenly
    would give it. Without that floor a tensor that most agents barely move (the bias of a label an agent
    hardly sees) has a median near zero, and an honest agent with skewed labels lands at 20x it.
    """
    if multiple <= 0:
        return {}
    by_tensor: dict[str, list[float]] = {}
    for update in norms.values():
        for name, norm in update.items():
            by_tensor.setdefault(name, []).append(norm)
    total_size = sum(sizes.values()) if sizes else 0
    bounds = {}
    for name, values in by_tensor.items():
        if len(values) < min_updates:
            continue
        bound = multiple * median(values)
        if sizes and total_bound is not None and total_size > 0:
            bound = max(bound, total_bound * math.sqrt(sizes.get(name, 0) / total_size))
        bounds[name] = bound
    return bounds

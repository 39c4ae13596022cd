"""The planner's closed loop: per-agent corrections of the cost model from what agents measured. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.planner import Prediction

Scales = tuple[float, float]  # (step time, peak memory) multipliers of an agent's predictions


@dataclass(frozen=True)
class Measured:
    """What an agent's upload says of its round."""

    steps: int
    train_seconds: float
    peak_memory_bytes: int  # 0: not measured

    @property
    def step_seconds(self) -> float:
        return self.train_seconds / self.steps


def refit(scales: Scales, measured: Measured, predicted: Prediction, threshold: float) -> Scales | None:
    """The agent's new scales when its step time or peak memory is off the prediction by more than threshold
    (relative), each off figure scaled by measured / predicted; None when neither is, or nothing was measured.
    The prediction already carries the old scales, so the ratio multiplies them."""
    if measured.steps == 0:
        return None
    time_scale, memory_scale = scales
    refitted = False
    if predicted.step_seconds > 0:
        time_ratio = measured.step_seconds / predicted.step_seconds
        if abs(time_ratio - 1) > threshold:
            time_scale, refitted = time_scale * time_ratio, True
    if measured.peak_memory_bytes and predicted.peak_memory_bytes > 0:
        memory_ratio = measured.peak_memory_bytes / predicted.peak_memory_bytes
        if abs(memory_ratio - 1) > threshold:
            memory_scale, refitted = memory_scale * memory_ratio, True
    return (time_scale, memory_scale) if refitted else None

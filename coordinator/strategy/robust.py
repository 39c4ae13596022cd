"""Robust aggregation: coordinate-wise median and trimmed mean (Yin et al., ICML 2018), for runs that expect
hostile or broken agents among the honest ones.

Both work like the per-slot average (per module over the agents that trained it, per rank slot over the agents whose
rank covers it, heads per tensor) but replace the weighted mean by a per-coordinate statistic that a
minority of agents cannot move far. They ignore sample weights on purpose: a weight is the agents' own
claim, and a robust statistic that honoured it could be outvoted by one large claim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch

from common.adapters import FoldedUpdate, GlobalAdapter
from coordinator.strategy.slot_average import aggregate as padded


def coordinate_median(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Per coordinate, the median of the tensors (the mean of the middle two for an even count)."""
    del weights  # unweighted by design (module docstring)
    ordered = torch.stack([t.to(torch.float64) for t in tensors]).sort(dim=0).values
    count = ordered.shape[0]
    middle = count // 2
    value = ordered[middle] if count % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return value.to(tensors[0].dtype)


def trim_count(count: int, fraction: float) -> int:
    """Values dropped at each end: floor(fraction x count), keeping at least one."""
    return min(math.floor(fraction * count), (count - 1) // 2)


def trimmed_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float], fraction: float) -> torch.Tensor:
    """Per coordinate, the mean after dropping the trim_count(n, fraction) lowest and highest values."""
    del weights  # unweighted by design (module docstring)
    ordered = torch.stack([t.to(torch.float64) for t in tensors]).sort(dim=0).values
    drop = trim_count(ordered.shape[0], fraction)
    return ordered[drop : ordered.shape[0] - drop].mean(dim=0).to(tensors[0].dtype)


def median_aggregate(global_: GlobalAdapter, updates: Sequence[FoldedUpdate]) -> tuple[GlobalAdapter, dict[str, float]]:
    """The coordinate-median strategy."""
    return padded(global_, updates, coordinate_median)


def trimmed_aggregate(
    fraction: float,
) -> Callable[[GlobalAdapter, Sequence[FoldedUpdate]], tuple[GlobalAdapter, dict[str, float]]]:
    """The trimmed-mean strategy at a trim fraction."""
    return partial(padded, combine=partial(trimmed_mean, fraction=fraction))

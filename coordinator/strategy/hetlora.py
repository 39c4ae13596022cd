"""HetLoRA's aggregation (Cho et al. 2024, "sparsity-weighted"): zero-padded factors averaged per rank slot
with weights proportional to the norm of each agent's update ||B_i A_i||_F, per module.

Like the paper, the norm replaces the sample count for the adapters (heads stay sample-weighted); an agent
whose product is zero everywhere falls back to the sample weights. The global keeps the largest rank; the
paper's rank self-pruning is not part of it.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.adapters import FoldedUpdate, GlobalAdapter
from coordinator.strategy.lowrank import product_norm
from coordinator.strategy.slot_average import aggregate_module
from coordinator.strategy.weighted import assemble, by_module


def aggregate(global_: GlobalAdapter, updates: Sequence[FoldedUpdate]) -> tuple[GlobalAdapter, dict[str, float]]:
    """Norm-weighted per-slot average; modules nobody trained keep their value."""
    round_ = by_module(updates)
    lora = {}
    for module in round_.holders:
        pairs = round_.pairs(module)
        weights = [product_norm(pair) for pair in pairs]
        if not sum(weights) > 0:
            weights = round_.weights(module)
        lora[module] = aggregate_module(global_.lora.get(module), pairs, weights)
    return assemble(global_, round_, lora)

"""Plain FedAvg of LoRA factors, for runs where every agent trains the same modules at one rank."""

from __future__ import annotations

from collections.abc import Sequence

from common.adapters import FoldedUpdate, GlobalAdapter
from coordinator.strategy import slot_average


def aggregate(global_: GlobalAdapter, updates: Sequence[FoldedUpdate]) -> tuple[GlobalAdapter, dict[str, float]]:
    """FedAvg; ValueError when ranks differ, since plain averaging is then undefined."""
    # A module new to the global must still arrive at one rank: the first update's sets it.
    ranks = {module: pair.rank for module, pair in global_.lora.items()}
    for update in updates:
        for module, pair in update.lora.items():
            expected = ranks.setdefault(module, pair.rank)
            if expected != pair.rank:
                raise ValueError(
                    f"fedavg needs equal ranks: {update.agent_id} sent rank {pair.rank} for {module}, "
                    f"expected {expected}; use the rank-padding strategy"
                )
    # With equal ranks every slot is covered by every holder, so the per-slot average is FedAvg of A and B.
    return slot_average.aggregate(global_, updates)

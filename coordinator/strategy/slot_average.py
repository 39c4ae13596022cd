"""The per-slot baseline (`slot-average`): zero-pad folded LoRA factors to one rank, average per rank slot.

This was FedPipe's default before exact rank padding (coordinator/strategy/exact.py) and stays as the
baseline it is measured against, and as the layout the robust strategies (per-coordinate statistics) and
HetLoRA use. It is not the mean of the agents' updates: the mean of products B_i A_i is not the product
of the means, and slot j has no fixed meaning across agents.

Per module m, only the agents that trained m take part. Every update is already folded (B carries
alpha / r, see common.adapters), so all dW share one scale. A (r_i x d_in) and B (d_out x r_i) are
padded to R = max(global rank, r_i), and slot j of the new global is the sample-weighted mean over
the agents with r_i > j; a slot no agent covers keeps its global value. With equal ranks and weights
this is exactly FedAvg of A and B.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.adapters import FoldedUpdate, GlobalAdapter, LoraPair, pad_rank
from coordinator.strategy.weighted import Combine, assemble, by_module, weighted_mean


def aggregate_module(
    current: LoraPair | None, pairs: Sequence[LoraPair], weights: Sequence[float], combine: Combine = weighted_mean
) -> LoraPair:
    """Rank-padded, per-slot combination (the weighted mean by default) of one module's pairs."""
    rank = max([pair.rank for pair in pairs] + ([current.rank] if current is not None else []))
    base = pad_rank(current, rank) if current is not None else None
    a_rows: list[torch.Tensor] = []
    b_cols: list[torch.Tensor] = []
    for slot in range(rank):
        covering = [(pair, w) for pair, w in zip(pairs, weights, strict=True) if pair.rank > slot]
        if not covering:
            assert base is not None  # rank exceeds every pair's only through the global's rank
            a_rows.append(base.a[slot])
            b_cols.append(base.b[:, slot])
            continue
        slot_weights = [w for _, w in covering]
        a_rows.append(combine([pair.a[slot] for pair, _ in covering], slot_weights))
        b_cols.append(combine([pair.b[:, slot] for pair, _ in covering], slot_weights))
    return LoraPair(a=torch.stack(a_rows), b=torch.stack(b_cols, dim=1))


def aggregate(
    global_: GlobalAdapter, updates: Sequence[FoldedUpdate], combine: Combine = weighted_mean
) -> tuple[GlobalAdapter, dict[str, float]]:
    """New global adapter from the updates of one round; modules nobody trained keep their value."""
    round_ = by_module(updates)
    lora = {
        m: aggregate_module(global_.lora.get(m), round_.pairs(m), round_.weights(m), combine) for m in round_.holders
    }
    return assemble(global_, round_, lora, combine)

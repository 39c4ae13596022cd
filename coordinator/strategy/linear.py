"""Linear aggregation of LoRA updates: the old global plus the mean change, per coordinate, in one fixed layout.

What differential-privacy noise and secure aggregation act on must combine linearly. Each agent's change is
laid out in the same named tensors: the folded global's A (rank x d_in) and B (d_out x rank, alpha / r in it,
see common.adapters) padded to the round's largest rank per module, and the heads. It is zero where the
agent's plan trains nothing: rows of A and columns of B past its rank, modules outside its mask. The round's
sum over agents is divided, per coordinate, by how many plans cover that coordinate (a count fixed by the
plans alone, so it says nothing about anyone's data) and added to the global. With unit weights, and every
planned agent delivering, this is exactly slot-average (and at equal ranks FedAvg of the factors): the unit
tests hold it to that.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from common.adapters import LORA_A, FoldedUpdate, GlobalAdapter, LoraPair, lora_names, pad_rank
from common.types import ModelSpec, TrainPlan

Terms = dict[str, torch.Tensor]  # name -> one agent's change (or a sum of changes), float64, in the layout's shape
Layout = dict[str, torch.Tensor]  # name -> per coordinate, how many plans cover it (float64)


def layout_ranks(global_: GlobalAdapter, plans: Iterable[TrainPlan]) -> dict[str, int]:
    """Per module, the larger of the global's rank and every plan's rank for it."""
    ranks = dict(global_.ranks())
    for plan in plans:
        for module, rank in plan.rank_pattern.items():
            ranks[module] = max(rank, ranks.get(module, 0))
    return ranks


def coverage(global_: GlobalAdapter, plan: TrainPlan, ranks: Mapping[str, int], spec: ModelSpec) -> Layout:
    """1 where this plan trains a coordinate of the layout, 0 elsewhere."""
    covered: Layout = {}
    for module, rank in sorted(ranks.items()):
        a_name, b_name = lora_names(module)
        shape = spec.candidate(module)
        a = torch.zeros(rank, shape.in_features, dtype=torch.float64)
        b = torch.zeros(shape.out_features, rank, dtype=torch.float64)
        mine = plan.rank_pattern.get(module, 0) if module in plan.target_modules else 0
        a[:mine] = 1.0
        b[:, :mine] = 1.0
        covered[a_name], covered[b_name] = a, b
    saved = set(plan.modules_to_save)
    for name, value in sorted(global_.heads.items()):
        covered[name] = torch.full(value.shape, 1.0 if name.rsplit(".", 1)[0] in saved else 0.0, dtype=torch.float64)
    return covered


def layout(global_: GlobalAdapter, plans: Mapping[str, TrainPlan], spec: ModelSpec) -> Layout:
    """Per coordinate, the number of the round's plans that train it: the mean's denominators."""
    ranks = layout_ranks(global_, plans.values())
    counts: Layout = {}
    for _, plan in sorted(plans.items()):
        for name, covered in coverage(global_, plan, ranks, spec).items():
            counts[name] = counts[name] + covered if name in counts else covered
    return counts


def _padded(global_: GlobalAdapter, module: str, a_shape: torch.Size, b_shape: torch.Size) -> LoraPair:
    """The global's pair for module padded to the layout's rank (zeros for a module it lacks)."""
    pair = global_.lora.get(module)
    if pair is None:
        return LoraPair(a=torch.zeros(a_shape), b=torch.zeros(b_shape))
    return pad_rank(pair, a_shape[0])


def terms(global_: GlobalAdapter, update: FoldedUpdate, layout_: Layout) -> Terms:
    """One agent's folded update as its change to the global in the layout; zero where it trained nothing."""
    out: Terms = {name: torch.zeros_like(count) for name, count in layout_.items()}
    for module, pair in update.lora.items():
        a_name, b_name = lora_names(module)
        if a_name not in out:
            raise ValueError(f"{update.agent_id} trained {module}, which no plan of the round covers")
        rank = out[a_name].shape[0]
        if pair.rank > rank:
            raise ValueError(f"{update.agent_id} trained {module} at rank {pair.rank}, over the layout's {rank}")
        base = _padded(global_, module, out[a_name].shape, out[b_name].shape)
        out[a_name][: pair.rank] = pair.a.double() - base.a[: pair.rank].double()
        out[b_name][:, : pair.rank] = pair.b.double() - base.b[:, : pair.rank].double()
    for name, value in update.heads.items():
        if name not in out:
            raise ValueError(f"{update.agent_id} sent head {name}, which no plan of the round covers")
        out[name] = value.double() - global_.heads[name].double()
    return out


def apply_mean(global_: GlobalAdapter, sums: Mapping[str, torch.Tensor], layout_: Layout) -> GlobalAdapter:
    """The global plus sums / counts where a plan covers the coordinate (elsewhere it keeps its value)."""

    def moved(name: str, before: torch.Tensor) -> torch.Tensor:
        counts = layout_[name]
        mean = torch.where(counts > 0, sums[name] / counts.clamp(min=1.0), torch.zeros_like(counts))
        return (before.double() + mean).to(before.dtype)

    lora = dict(global_.lora)
    modules = sorted({name.removesuffix(LORA_A) for name in layout_ if name.endswith(LORA_A)})
    for module in modules:
        a_name, b_name = lora_names(module)
        base = _padded(global_, module, layout_[a_name].shape, layout_[b_name].shape)
        lora[module] = LoraPair(a=moved(a_name, base.a), b=moved(b_name, base.b))
    heads = {name: moved(name, value) if name in layout_ else value for name, value in global_.heads.items()}
    return GlobalAdapter(round=global_.round + 1, lora=lora, heads=heads)


def trained(layout_: Layout) -> dict[str, int]:
    """Per module some plan trains, the largest rank trained (what a server optimizer truncates to)."""
    ranks = {
        name.removesuffix(LORA_A): int((count.sum(dim=1) > 0).sum())
        for name, count in layout_.items()
        if name.endswith(LORA_A)
    }
    return {module: rank for module, rank in ranks.items() if rank > 0}


def covered_coordinates(layout_: Layout) -> int:
    """How many coordinates at least one plan trains."""
    return sum(int((count > 0).sum()) for count in layout_.values())

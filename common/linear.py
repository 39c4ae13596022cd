"""Linear aggregation of LoRA updates: the global plus the mean change, per coordinate, in one fixed layout.

What differential-privacy noise and secure aggregation act on must combine linearly. Each agent's change is
laid out in the same named tensors: folded A (rank x d_in) and B (d_out x rank, alpha / r in it, see
common.adapters) padded to the round's largest rank per module, and the heads. The change is taken from
what the agent was sent (broadcast_tensors: slots past the global's rank start as peft starts them, alike
for every agent) and is zero where its plan trains nothing: rows of A and columns of B past its rank,
modules outside its mask. The round's sum over agents is divided, per coordinate, by how many plans cover
that coordinate (a count fixed by the plans alone, so it says nothing about anyone's data) and added to
what was sent. With unit weights, and every planned agent delivering, this is exactly slot-average (and at
equal ranks FedAvg of the factors): the unit tests hold it to that.

An agent can lay out its own change from its upload, its download, its plan and the layout's shapes
(`terms`), which secure aggregation needs: the coordinator then never holds it. `terms`, `shapes` and
`mean_change` serve the Ferret mode's coefficient layout too (coordinator.modes.ferret).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from common.adapters import LORA_A, LORA_B, GlobalAdapter, LoraPair, extended_pair, lora_names, scaling
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


def layout(
    global_: GlobalAdapter, plans: Mapping[str, TrainPlan], spec: ModelSpec, counted: Iterable[str] | None = None
) -> Layout:
    """Per coordinate, the number of the round's plans that train it (of the `counted` agents' plans only, when
    given): the mean's denominators. The shapes come from every plan."""
    ranks = layout_ranks(global_, plans.values())
    counts: Layout = {
        name: torch.zeros_like(c) for name, c in coverage(global_, next(iter(plans.values())), ranks, spec).items()
    }
    chosen = set(plans) if counted is None else set(counted)
    for _, plan in sorted((a, p) for a, p in plans.items() if a in chosen):
        for name, covered in coverage(global_, plan, ranks, spec).items():
            counts[name] += covered
    return counts


def terms(
    upload: Mapping[str, torch.Tensor],
    sent: Mapping[str, torch.Tensor],
    plan: TrainPlan,
    shapes: Mapping[str, tuple[int, ...]],
) -> Terms:
    """One agent's change in the layout: each uploaded tensor less what it was sent (a tensor it was not sent, such
    as Ferret's coefficients, is a change already), LoRA's B folded with the plan's alpha, placed in the leading
    corner of its layout tensor (rows of A, columns of B, the first coefficients) and zero elsewhere; ValueError
    for a tensor the layout lacks or cannot hold."""
    out: Terms = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}
    for name, value in upload.items():
        if name not in out:
            raise ValueError(f"{name} is not in the round's layout")
        change = value.double() - sent[name].double() if name in sent else value.double()
        if name.endswith(LORA_B) and plan.mode == "lora":
            module = name.removesuffix(LORA_B)
            change = change * scaling(plan.alpha_of(module), plan.rank_pattern[module])
        if change.dim() != out[name].dim() or any(c > o for c, o in zip(change.shape, out[name].shape, strict=True)):
            raise ValueError(f"{name}: a change of shape {tuple(change.shape)} in a layout of {tuple(out[name].shape)}")
        out[name][tuple(slice(0, size) for size in change.shape)] = change
    return out


def sent_global(global_: GlobalAdapter, layout_: Layout, spec: ModelSpec) -> Terms:
    """What the round's agents were sent, folded, at the layout's ranks (float64): the mean is added to it."""
    base: Terms = {}
    for name, count in layout_.items():
        if name.endswith(LORA_A):
            module = name.removesuffix(LORA_A)
            # The layout's rank is at least the global's, so the extended pair has exactly that rank.
            pair = extended_pair(global_, module, int(count.shape[0]), spec)
            base[name] = pair.a.double()
            base[module + LORA_B] = pair.b.double()
        elif not name.endswith(LORA_B):
            base[name] = global_.heads[name].double()
    return base


def shapes(layout_: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The layout's tensor shapes (what an agent lays its change out in)."""
    return {name: tuple(count.shape) for name, count in layout_.items()}


def mean_change(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count where a plan covers the coordinate, 0 where none does."""
    return torch.where(count > 0, total / count.clamp(min=1.0), torch.zeros_like(count))


def apply_mean(
    global_: GlobalAdapter, sums: Mapping[str, torch.Tensor], layout_: Layout, spec: ModelSpec
) -> GlobalAdapter:
    """What was sent plus sums / counts where a plan covers the coordinate (elsewhere the global's value)."""
    base = sent_global(global_, layout_, spec)
    moved = {name: base[name] + mean_change(sums[name], count) for name, count in layout_.items()}
    lora = dict(global_.lora)
    for name in sorted(layout_):
        if name.endswith(LORA_A):
            module = name.removesuffix(LORA_A)
            lora[module] = LoraPair(a=moved[name].float(), b=moved[module + LORA_B].float())
    heads = {name: moved[name].to(value.dtype) if name in moved else value for name, value in global_.heads.items()}
    return GlobalAdapter(round=global_.round + 1, lora=lora, heads=heads)


def trained(layout_: Layout) -> dict[str, int]:
    """Per module some plan trains, the largest rank trained (what a server optimizer truncates to)."""
    ranks = {
        name.removesuffix(LORA_A): int((count.sum(dim=1) > 0).sum())
        for name, count in layout_.items()
        if name.endswith(LORA_A)
    }
    return {module: rank for module, rank in ranks.items() if rank > 0}


def norm(terms_: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over every tensor of an update's terms, in float64."""
    return math.sqrt(sum(float(value.double().pow(2).sum()) for value in terms_.values()))


def clip(terms_: Mapping[str, torch.Tensor], bound: float) -> tuple[Terms, float]:
    """The terms scaled to L2 norm at most bound (DP-FedAvg's clip), and their norm before."""
    total = norm(terms_)
    factor = bound / total if total > bound else 1.0
    return {name: value * factor for name, value in terms_.items()}, total


def flatten(terms_: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Every tensor, in name order, as one float64 vector (what secure aggregation sums)."""
    return torch.cat([terms_[name].double().flatten() for name in sorted(terms_)]) if terms_ else torch.zeros(0)


def unflatten(vector: torch.Tensor, shapes: Mapping[str, tuple[int, ...]]) -> Terms:
    """Inverse of flatten for these shapes; ValueError when the length does not match."""
    sizes = {name: int(torch.Size(shapes[name]).numel()) for name in sorted(shapes)}
    if vector.numel() != sum(sizes.values()):
        raise ValueError(f"a vector of {vector.numel()} values for a layout of {sum(sizes.values())}")
    out: Terms = {}
    offset = 0
    for name, size in sizes.items():
        out[name] = vector[offset : offset + size].reshape(shapes[name]).double()
        offset += size
    return out

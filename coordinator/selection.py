"""Which weight matrices get LoRA: importance scores in, the global mask out. Pure functions.

Agents score every candidate matrix with an AdaLoRA probe on their own data (METHOD.md section 1).
Raw scores are products of weights and gradients, so their scale follows each agent's loss and data:
each agent's scores are normalised to sum to 1 before they are averaged, weighted by the samples the
probe saw. Then the highest-scoring matrices are kept while their LoRA parameters fit the budget.
Later re-selections (selection.rescore: training) take the trained matrices' scores from the training
itself, which the agents accumulate over their adapters and send with their uploads (`rescore`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.errors import ConfigError
from common.types import ImportanceReport, ModuleShape


@dataclass(frozen=True)
class Selection:
    """The mask and what it was chosen from."""

    mask: tuple[str, ...]  # selected modules, in model order
    scores: Mapping[str, float]  # combined score of every candidate
    budget: int  # trainable LoRA parameters allowed
    used: int  # trainable LoRA parameters of the mask


def combine(reports: Mapping[str, ImportanceReport], candidates: Sequence[str]) -> dict[str, float]:
    """Sample-weighted mean of each agent's normalised scores, for every candidate (0 where unscored)."""
    total_samples = sum(report.samples for report in reports.values())
    if not reports or total_samples <= 0:
        raise ValueError("no importance reports with samples to combine")
    combined = dict.fromkeys(candidates, 0.0)
    for agent in sorted(reports):  # a fixed order keeps float sums reproducible
        report = reports[agent]
        mass = sum(report.scores.get(name, 0.0) for name in candidates)
        if mass <= 0:
            continue  # an agent whose probe saw no gradient says nothing about the ranking
        weight = report.samples / total_samples
        for name in candidates:
            combined[name] += weight * report.scores.get(name, 0.0) / mass
    return combined


def rescore(previous: Mapping[str, float], training: Mapping[str, float]) -> dict[str, float]:
    """Combined scores for a re-selection from training: the matrices the round trained take their training
    scores, rescaled so that together they keep the share of the previous scores they had (the two
    measurements have different scales; only their ranking within the trained set is taken from training);
    every other candidate keeps its previous (probe) score, so it can still enter when a trained matrix
    falls below it."""
    trained = [m for m in training if m in previous]
    mass_before = sum(previous[m] for m in trained)
    mass_now = sum(training[m] for m in trained)
    scores = dict(previous)
    if mass_now <= 0:
        return scores
    for module in trained:
        scores[module] = training[module] * mass_before / mass_now
    return scores


def lora_cost(module: ModuleShape, rank: int) -> int:
    """Trainable parameters of a rank-r LoRA pair on this matrix; rank 0: the matrix trained in full (Ferret)."""
    if rank == 0:
        return module.in_features * module.out_features
    return rank * (module.in_features + module.out_features)


def resolve_budget(budget: float, candidates: Sequence[ModuleShape], rank: int) -> int:
    """A budget given as a fraction (<= 1) of the all-candidates LoRA size, or an absolute count (> 1)."""
    if budget <= 0:
        raise ConfigError(f"selection.budget: must be positive, got {budget}")
    if budget <= 1:
        return round(budget * sum(lora_cost(m, rank) for m in candidates))
    return int(budget)


def select(scores: Mapping[str, float], candidates: Sequence[ModuleShape], rank: int, budget: int) -> Selection:
    """Greedy top-score selection under a parameter budget; ties go to the earlier module in model order.

    A matrix that does not fit is skipped and smaller ones may still enter, so the budget is used as far as
    the ranking allows. ConfigError when not even the best-scored matrix fits.
    """
    order = {module.name: index for index, module in enumerate(candidates)}
    ranked = sorted(candidates, key=lambda m: (-scores.get(m.name, 0.0), order[m.name]))
    chosen: list[ModuleShape] = []
    used = 0
    for module in ranked:
        cost = lora_cost(module, rank)
        if used + cost <= budget:
            chosen.append(module)
            used += cost
    if not chosen:
        smallest = min(lora_cost(m, rank) for m in candidates)
        raise ConfigError(
            f"selection.budget: {budget} trainable parameters fit no matrix (the smallest needs {smallest})"
        )
    mask = tuple(m.name for m in sorted(chosen, key=lambda m: order[m.name]))
    return Selection(mask=mask, scores=dict(scores), budget=budget, used=used)

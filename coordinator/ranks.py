"""A LoRA rank for each selected matrix: one agent's parameter budget spread by importance, exactly (a MILP).

The planner fixes an agent's batch, precision and round time, and with them how many LoRA parameters it
can afford (memory and step time are affine in that count: coordinator.costmodel). Here that budget is
shared out over the mask's matrices, each at rank 0 (not trained this round) or one of the search ranks:

    maximise  sum_m s_m * log2(1 + r_m)   subject to   sum_m r_m * (d_in_m + d_out_m) <= budget

s_m is the matrix's importance (normalised to sum 1; equal when nothing was scored). Why log2(1 + r): the
update a matrix needs has a decaying spectrum, so each doubling of its rank buys about the same increment
of captured energy, not twice as much; with a linear objective the budget would go to one matrix at the
largest rank, with log2(1 + r) it goes first to the important matrices and then spreads, and an agent too
small for every matrix drops the least important. Solved by scipy's HiGHS over one-hot binaries per
matrix (at most one rank each); `brute_force` enumerates every assignment and is the test oracle.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np

from common.errors import ConfigError


def value(rank: int) -> float:
    """The diminishing-returns worth of one matrix at a rank (0 for an untrained matrix)."""
    return math.log2(1 + rank)


def _weights(modules: Sequence[str], scores: Mapping[str, float]) -> dict[str, float]:
    """Importance normalised to sum 1 over the modules; uniform when no module has a positive score."""
    raw = {m: max(0.0, float(scores.get(m, 0.0))) for m in modules}
    total = sum(raw.values())
    if total <= 0 or not math.isfinite(total):
        return dict.fromkeys(modules, 1.0 / len(modules))
    # A small floor keeps a scored-zero matrix eligible when the budget has room left over for it.
    floor = 1e-3 / len(modules)
    return {m: raw[m] / total + floor for m in modules}


def allocate(
    modules: Sequence[str],
    widths: Mapping[str, int],
    scores: Mapping[str, float],
    ranks: Sequence[int],
    budget: int,
) -> dict[str, int]:
    """Per module its rank (only the trained ones: rank > 0), the objective's optimum within the budget.

    widths: d_in + d_out of each module (a rank-r adapter has r x width parameters). ConfigError when not
    even the smallest rank on one matrix fits the budget.
    """
    if not modules:
        return {}
    choices = sorted({int(r) for r in ranks if r > 0})
    if not choices:
        raise ConfigError("planning.ranks: no positive rank to allocate")
    if min(choices) * min(widths[m] for m in modules) > budget:
        raise ConfigError(f"a budget of {budget} LoRA parameters holds no matrix at rank {min(choices)}")
    from scipy.optimize import Bounds, LinearConstraint, milp

    weight = _weights(modules, scores)
    names = list(modules)
    count = len(names) * len(choices)
    # Variable (i, k): module i at rank choices[k]. milp minimises, so the objective is negated; it is scaled so
    # its largest term is 1e6, because HiGHS stops within an absolute gap of 1e-6 (scipy cannot set it), which
    # would otherwise let an assignment a little short of the optimum through.
    terms = [weight[m] * value(r) for m in names for r in choices]
    objective = -np.array(terms) * (1e6 / max(terms))
    params = np.array([float(r * widths[m]) for m in names for r in choices])
    one_each = np.zeros((len(names), count))
    for i in range(len(names)):
        one_each[i, i * len(choices) : (i + 1) * len(choices)] = 1.0
    result = milp(
        objective,
        constraints=[LinearConstraint(one_each, 0.0, 1.0), LinearConstraint(params[np.newaxis, :], 0.0, float(budget))],
        integrality=np.ones(count),
        bounds=Bounds(0.0, 1.0),
        options={"mip_rel_gap": 0.0, "presolve": True},
    )
    if result.status != 0 or result.x is None:  # the smallest single choice fits, so this is HiGHS failing
        raise ArithmeticError(f"HiGHS: {result.message}")
    chosen: dict[str, int] = {}
    for i, module in enumerate(names):
        picked = result.x[i * len(choices) : (i + 1) * len(choices)]
        if picked.max() > 0.5:
            chosen[module] = choices[int(np.argmax(picked))]
    return _in_importance_order(chosen, names, widths, weight)


def _in_importance_order(
    chosen: Mapping[str, int], modules: Sequence[str], widths: Mapping[str, int], weight: Mapping[str, float]
) -> dict[str, int]:
    """Among matrices of equal width, the ranks handed out again from the most important down.

    Same widths, same cost; and by the rearrangement inequality the objective cannot fall. It settles what
    the solver's tolerance leaves open between near-equal scores, so a more important matrix of the same
    shape never gets less rank.
    """
    by_width: dict[int, list[str]] = {}
    for module in modules:
        by_width.setdefault(widths[module], []).append(module)
    ordered: dict[str, int] = {}
    for group in by_width.values():
        ranks = sorted((chosen.get(m, 0) for m in group), reverse=True)
        for module, rank in zip(sorted(group, key=lambda m: -weight[m]), ranks, strict=True):
            if rank > 0:
                ordered[module] = rank
    return {m: ordered[m] for m in modules if m in ordered}


def objective(ranks: Mapping[str, int], modules: Sequence[str], scores: Mapping[str, float]) -> float:
    """The objective of an assignment (modules absent from it are untrained)."""
    weight = _weights(modules, scores)
    return sum(weight[m] * value(ranks.get(m, 0)) for m in modules)


def brute_force(
    modules: Sequence[str],
    widths: Mapping[str, int],
    scores: Mapping[str, float],
    ranks: Sequence[int],
    budget: int,
) -> tuple[dict[str, int], float]:
    """Every assignment, for tests on small instances: the best one and its objective."""
    choices = [0, *sorted({int(r) for r in ranks if r > 0})]
    best: tuple[dict[str, int], float] = ({}, -1.0)
    for combo in itertools.product(choices, repeat=len(modules)):
        if sum(r * widths[m] for m, r in zip(modules, combo, strict=True)) > budget:
            continue
        assignment = {m: r for m, r in zip(modules, combo, strict=True) if r > 0}
        score = objective(assignment, modules, scores)
        if score > best[1] + 1e-12:
            best = (assignment, score)
    return best

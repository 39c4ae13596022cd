"""The exact assignment behind the fedpipe planner: one configuration per agent, solved as a MILP.

Each agent i picks exactly one option c from its feasible list (one-hot binaries z_ic, sum_c z_ic = 1).
Each option carries a cost (the weighted objective: under-training first, then rank capacity, then
precision, already folded into one number by the caller) and its upload bytes; an optional coupling
constraint bounds the round's total upload bytes. Without that bound, or when every agent's own best option
already keeps within it, the problem separates and each agent's cheapest option is the exact optimum (what a
thousand agents plan in); otherwise scipy's HiGHS solves the MILP exactly (mip_rel_gap 0), over a sparse
constraint matrix. `brute_force` enumerates every combination and is the test oracle.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Option:
    """One configuration an agent may take."""

    cost: float  # objective contribution (lower is better)
    upload_bytes: int


@dataclass(frozen=True)
class Instance:
    """Options per agent and the optional bound on the round's upload bytes (0 = none)."""

    options: Sequence[Sequence[Option]]
    max_upload_bytes: int = 0


class Infeasible(Exception):
    """No assignment satisfies the constraints."""


def solve(instance: Instance) -> tuple[list[int], float]:
    """Chosen option index per agent and the objective."""
    if any(not options for options in instance.options):
        raise Infeasible("an agent has no option")
    costs = np.array([o.cost for options in instance.options for o in options], dtype=float)
    uploads = np.array([o.upload_bytes for options in instance.options for o in options], dtype=float)
    chosen = solve_flat(costs, [len(options) for options in instance.options], uploads, instance.max_upload_bytes)
    return chosen, float(sum(instance.options[a][c].cost for a, c in enumerate(chosen)))


def solve_flat(costs: np.ndarray, sizes: Sequence[int], uploads: np.ndarray, max_upload_bytes: int = 0) -> list[int]:
    """solve() over arrays: every agent's option costs and upload bytes laid end to end, sizes[i] options for
    agent i; the chosen option index per agent."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    if not sizes or min(sizes) < 1:
        raise Infeasible("an agent has no option")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    # Each agent's cheapest option, the last of equals: callers list an agent's options from the least to the
    # most of each resource, so among equal objectives this is the richest one (the tie HiGHS settled so too).
    lowest = np.repeat(np.minimum.reduceat(costs, starts), sizes)
    index = np.arange(len(costs))
    cheapest = np.maximum.reduceat(np.where(costs <= lowest, index, -1), starts)
    if max_upload_bytes <= 0 or float(uploads[cheapest].sum()) <= max_upload_bytes:
        return [int(c) for c in cheapest - starts]
    count = len(costs)
    rows = np.repeat(np.arange(len(sizes)), sizes)
    one_hot = csr_array((np.ones(count), (rows, index)), shape=(len(sizes), count))
    result = milp(
        costs,
        constraints=[
            LinearConstraint(one_hot, 1.0, 1.0),
            LinearConstraint(uploads[np.newaxis, :], -np.inf, float(max_upload_bytes)),
        ],
        integrality=np.ones(count),
        bounds=Bounds(0.0, 1.0),
        options={"mip_rel_gap": 0.0, "presolve": True},
    )
    if result.status != 0 or result.x is None:
        raise Infeasible(f"HiGHS: {result.message}")
    return [int(np.argmax(result.x[start : start + size])) for start, size in zip(starts, sizes, strict=True)]


def brute_force(instance: Instance) -> tuple[list[int], float]:
    """Every combination, for tests on small instances."""
    best: tuple[list[int], float] | None = None
    for combo in itertools.product(*(range(len(options)) for options in instance.options)):
        if instance.max_upload_bytes > 0:
            total = sum(instance.options[a][c].upload_bytes for a, c in enumerate(combo))
            if total > instance.max_upload_bytes:
                continue
        value = sum(instance.options[a][c].cost for a, c in enumerate(combo))
        if best is None or value < best[1]:
            best = (list(combo), value)
    if best is None:
        raise Infeasible("no combination satisfies the upload bound")
    return best

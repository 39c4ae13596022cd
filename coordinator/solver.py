"""The exact assignment behind the fedpipe planner: one configuration per agent, solved as a MILP.

Each agent i picks exactly one option c from its feasible list (one-hot binaries z_ic, sum_c z_ic = 1).
Each option carries a cost (the weighted objective: under-training first, then rank capacity, then
precision, already folded into one number by the caller) and its upload bytes; an optional coupling
constraint bounds the round's total upload bytes. scipy's HiGHS solves it exactly (mip_rel_gap 0).
`brute_force` enumerates every combination and is the test oracle.
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
    """Chosen option index per agent and the objective, by HiGHS MILP."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if any(not options for options in instance.options):
        raise Infeasible("an agent has no option")
    sizes = [len(options) for options in instance.options]
    offsets = np.cumsum([0, *sizes])
    count = int(offsets[-1])
    cost = np.array([o.cost for options in instance.options for o in options], dtype=float)
    one_hot = np.zeros((len(sizes), count))
    for agent, size in enumerate(sizes):
        one_hot[agent, offsets[agent] : offsets[agent] + size] = 1.0
    constraints = [LinearConstraint(one_hot, 1.0, 1.0)]
    if instance.max_upload_bytes > 0:
        upload = np.array([o.upload_bytes for options in instance.options for o in options], dtype=float)
        constraints.append(LinearConstraint(upload[np.newaxis, :], -np.inf, float(instance.max_upload_bytes)))
    result = milp(
        cost,
        constraints=constraints,
        integrality=np.ones(count),
        bounds=Bounds(0.0, 1.0),
        options={"mip_rel_gap": 0.0, "presolve": True},
    )
    if result.status != 0 or result.x is None:
        raise Infeasible(f"HiGHS: {result.message}")
    chosen = [int(np.argmax(result.x[offsets[a] : offsets[a] + sizes[a]])) for a in range(len(sizes))]
    return chosen, float(sum(instance.options[a][c].cost for a, c in enumerate(chosen)))


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

"""Ferret's projection: exact on a full orthonormal basis, unbiased on the shared random bases, and the
truncated basis of the public Ferret code shown to shrink the update to about a third."""

from __future__ import annotations

import hashlib
import itertools
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.ferret import (
    allot,
    direction,
    direction_seed,
    directions,
    project,
    project_on,
    reconstruct,
    reconstruct_from,
    weights_digest,
)

SHAPE = (8, 8)
D = 64


def delta(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def test_a_full_orthonormal_basis_reconstructs_the_update_exactly() -> None:
    # Prepare: K = d orthonormal directions
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    basis = [row.to(torch.float32) for row in q.T]
    update = delta()

    # Execute
    coefficients = project_on(update, basis, D)
    rebuilt = reconstruct_from(coefficients, basis, D).reshape(SHAPE)

    # Assert
    torch.testing.assert_close(rebuilt, update, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("basis", ["gaussian", "rademacher"])
def test_the_reconstruction_is_unbiased_over_rounds(basis: str) -> None:
    # Prepare: 4 directions a round on a 64-value block, 2000 rounds
    update = delta(1)
    rounds = 2000

    # Execute
    samples = torch.stack(
        [reconstruct(project(update, 7, r, "blk", 4, basis), SHAPE, 7, r, "blk", basis) for r in range(rounds)]
    ).double()

    # Assert: every coordinate's mean within 4 standard errors of the update
    mean = samples.mean(dim=0)
    standard_error = samples.std(dim=0) / math.sqrt(rounds)
    z = ((mean - update.double()) / standard_error).abs()
    assert float(z.max()) < 4.0, float(z.max())


def test_the_truncated_basis_of_the_public_ferret_code_gives_about_a_third_of_the_update() -> None:
    # Prepare: a standard normal truncated to +-d^-1/2 (variance about 1/(3d), not 1/d)
    update = delta(2)
    bound = 1 / math.sqrt(D)
    generator = torch.Generator().manual_seed(5)
    rebuilt = torch.zeros(D, dtype=torch.float64)
    rounds, per_round = 3000, 4
    for _ in range(rounds):
        basis = [
            torch.nn.init.trunc_normal_(torch.empty(D), 0.0, 1.0, -bound, bound, generator=generator)
            for _ in range(per_round)
        ]
        rebuilt += reconstruct_from(project_on(update, basis, per_round), basis, D).double()

    # Execute
    mean = rebuilt / rounds
    ratio = float(mean @ update.double().reshape(-1) / update.double().pow(2).sum())

    # Assert
    assert 0.28 < ratio < 0.39, ratio


def test_directions_are_the_same_bytes_in_another_process() -> None:
    # Prepare
    program = (
        "import hashlib, torch; from common.ferret import directions; "
        "h = hashlib.sha256(); "
        "[h.update(v.numpy().tobytes()) for basis in ('gaussian', 'rademacher') "
        "for v in directions(11, 3, 'enc.layer.0.q', 5, 1000, basis)]; print(h.hexdigest())"
    )
    here = hashlib.sha256()
    for basis in ("gaussian", "rademacher"):
        for v in directions(11, 3, "enc.layer.0.q", 5, 1000, basis):
            here.update(v.numpy().tobytes())

    # Execute
    there = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout.strip()

    # Assert
    assert there == here.hexdigest()


def test_seeds_differ_by_run_round_block_and_index_and_directions_have_the_planned_spread() -> None:
    # Prepare
    seeds = {direction_seed(r, k, b, i) for r in (0, 1) for k in (1, 2) for b in ("a", "b") for i in (0, 1)}

    # Execute
    v = direction(direction_seed(0, 1, "a", 0), 100_000)
    signs = direction(direction_seed(0, 1, "a", 0), 100_000, "rademacher")

    # Assert: 16 distinct seeds; E[v v^T] = I / d means a squared norm of about 1
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)
    assert abs(float(v.pow(2).sum()) - 1.0) < 0.02 and abs(float(v.mean())) < 1e-4
    assert torch.allclose(signs.abs(), torch.full_like(signs, 1 / math.sqrt(100_000)))
    assert float(signs.pow(2).sum()) == pytest.approx(1.0, rel=1e-5)


def test_a_new_round_gives_new_directions() -> None:
    first = next(directions(0, 1, "a", 1, 50, "gaussian"))
    second = next(directions(0, 2, "a", 1, 50, "gaussian"))
    assert not torch.equal(first, second)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from("abcdefgh"), st.floats(0, 1e6), min_size=1, max_size=8),
    st.integers(0, 5000),
)
def test_allotment_gives_each_block_at_least_two_and_shares_the_rest_by_norm(
    norms: dict[str, float], budget: int
) -> None:
    # Prepare
    sizes = dict.fromkeys(norms, 10_000)

    # Execute
    counts = allot(norms, sizes, budget)

    # Assert
    assert set(counts) == set(norms)
    assert all(c >= 2 for c in counts.values())
    assert sum(counts.values()) == max(budget, 2 * len(norms))
    ordered = sorted(norms, key=norms.__getitem__)
    assert all(counts[a] <= counts[b] + 1 for a, b in itertools.pairwise(ordered))


def test_allotment_never_exceeds_a_blocks_size() -> None:
    assert allot({"tiny": 1e9, "big": 1.0}, {"tiny": 6, "big": 10_000}, 100) == {"tiny": 6, "big": 2}


def test_the_weights_digest_follows_values_names_and_order_free() -> None:
    a = {"x": torch.ones(2), "y": torch.zeros(3)}
    assert weights_digest(a) == weights_digest(dict(reversed(a.items())))
    assert weights_digest(a) != weights_digest({"x": torch.ones(2), "y": torch.tensor([0.0, 0.0, 1e-30])})

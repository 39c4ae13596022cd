"""Low-rank arithmetic in factored form: sums of products B_k A_k, re-factored by SVD, never densified.

A sum sum_k B_k A_k (B_k: d_out x r_k, A_k: r_k x d_in) is the product of the stacked factors
B = [B_1 .. B_n] and A = [A_1; ..; A_n]. With B = Q_b R_b and A^T = Q_a R_a (reduced QR) it equals
Q_b (R_b R_a^T) Q_a^T, and the SVD of the small core R_b R_a^T = U S V^T gives the SVD of the sum:
(Q_b U) S (Q_a V)^T. Cost: two QRs of d x K and one SVD of min(d, K)^2, K = sum r_k, so a 4096 x 4096
module with ranks up to 64 takes milliseconds and megabytes. Only when K is so large that the dense matrix
is the cheaper object (a hundred agents on a 384-wide model) is it formed. Everything runs in float64 and
comes back float32.

The global keeps a fixed split of the SVD, so that its leading r components are its best rank-r
approximation (Eckart-Young) and truncation to an agent's rank drops the weakest directions: A's rows are
the right singular vectors scaled to A_ROW_NORM, the row norm of peft's default A (kaiming-uniform with
a = sqrt(5) has variance 1 / (3 d_in) per entry, so a row has norm 1/sqrt(3) whatever d_in), and B carries
the magnitudes. Every round an agent thus starts from A at the scale peft would give it, and a component
the update left at zero still has a usable A row (B = 0, dW unchanged) instead of a dead zero pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.adapters import LoraPair

A_ROW_NORM = 1.0 / math.sqrt(3.0)


@dataclass(frozen=True)
class Refactored:
    """The SVD-ordered pair of a factored sum at a kept rank, and the energy (squared Frobenius norm) of the
    components it dropped."""

    pair: LoraPair
    singular_values: torch.Tensor  # all of them, descending, float64
    dropped_energy: float


def stack(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B_1 .. B_n] and [A_1; ..; A_n] in float64 (one tensor each is passed through, not copied)."""
    if len(bs) == 1 and len(as_) == 1:
        return bs[0].to(torch.float64), as_[0].to(torch.float64)
    return torch.cat([x.to(torch.float64) for x in bs], dim=1), torch.cat([x.to(torch.float64) for x in as_], dim=0)


def refactor(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], rank: int) -> Refactored:
    """sum_k bs[k] @ as_[k] as an SVD-ordered pair of at most rank components."""
    b, a = stack(bs, as_)
    d_out, d_in, k = b.shape[0], a.shape[1], b.shape[1]
    if k * (d_out + d_in) >= d_out * d_in:
        # Stacked ranks past about half the smaller side (a hundred agents on a 384-wide model): the factored
        # route would cost more than the dense matrix it avoids, which is then small enough to form.
        left_all, s, right_all = dense_top(b @ a, rank)
    else:
        q_b, r_b = torch.linalg.qr(b)
        q_a, r_a = torch.linalg.qr(a.T)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
        left_all, right_all = q_b @ u, q_a @ vh.T
    return split(left_all, s, right_all, rank)


def from_dense(matrix: torch.Tensor, rank: int) -> Refactored:
    """A dense matrix as an SVD-ordered pair of at most rank components (the same split as refactor)."""
    return split(*dense_top(matrix.to(torch.float64), rank), rank)


def dense_top(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading `rank` left and right singular vectors of a float64 matrix and all its singular values,
    from the eigendecomposition of its Gram matrix on the smaller side: about half the time of an SVD for the
    384-wide modules of a hundred-agent round. Squaring loses relative precision only in the small singular
    values (around 1e-8 of the largest), which are the truncated tail; a kept one that small would make the
    other side's vectors inaccurate, so that case takes the SVD."""
    rows, cols = matrix.shape
    tall = rows >= cols
    gram = matrix.T @ matrix if tall else matrix @ matrix.T
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    s = values.sqrt()
    kept = max(1, min(rank, s.shape[0]))
    if float(s[kept - 1]) <= 1e-7 * max(float(s[0]), 1e-300):
        left, s, right = svd(matrix)
        return left[:, :kept], s, right[:, :kept]
    top = vectors[:, :kept]
    if tall:
        return matrix @ top / s[:kept], s, top
    return top, s, matrix.T @ top / s[:kept]


def split(left: torch.Tensor, s: torch.Tensor, right: torch.Tensor, rank: int) -> Refactored:
    """U S V^T kept at rank: A = A_ROW_NORM V^T, B = U S / A_ROW_NORM (module docstring)."""
    kept = max(1, min(rank, s.shape[0]))
    pair = LoraPair(
        a=(right[:, :kept].T * A_ROW_NORM).to(torch.float32).contiguous(),
        b=(left[:, :kept] * (s[:kept] / A_ROW_NORM)).to(torch.float32).contiguous(),
    )
    return Refactored(pair=pair, singular_values=s, dropped_energy=float(s[kept:].pow(2).sum()))


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, V (not V^T) of a matrix; a tall or wide one goes through QR first, several times faster in
    LAPACK than the SVD of the rectangle itself."""
    rows, cols = matrix.shape
    if rows > cols:
        q, r = torch.linalg.qr(matrix)
        u, s, vh = torch.linalg.svd(r)
        return q @ u, s, vh.T
    if cols > rows:
        v, s, u = svd(matrix.T)
        return u, s, v
    u, s, vh = torch.linalg.svd(matrix)
    return u, s, vh.T


def inner(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], pair: LoraPair) -> float:
    """<sum_k bs[k] @ as_[k], B A> (Frobenius) at cost O((d_out + d_in) K r)."""
    b, a = stack(bs, as_)
    return float(((b.T @ pair.b.to(torch.float64)) * (a @ pair.a.to(torch.float64).T)).sum())


def energy(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor]) -> float:
    """||sum_k bs[k] @ as_[k]||_F^2 from K x K Gram matrices."""
    b = torch.cat([x.to(torch.float64) for x in bs], dim=1)
    a = torch.cat([x.to(torch.float64) for x in as_], dim=0)
    return float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0))


def product_norm(pair: LoraPair) -> float:
    """||B A||_F without forming B A."""
    return math.sqrt(energy([pair.b], [pair.a]))

"""Ferret's projection (METHOD.md 4c): a block's update as coefficients on shared random directions.

A block is one weight matrix, flattened to d values. Its update delta is sent as K_g coefficients
c_k = (d / K_g) <delta, v_k> on directions v_k with E[v v^T] = I / d, so that sum_k c_k v_k is an unbiased
estimate of delta: E[(d / K_g) sum_k <delta, v_k> v_k] = (d / K_g) K_g E[v v^T] delta = delta.

The directions are shared randomness: every side regenerates v_k from seed(run seed, round, block, k) with
its own CPU torch.Generator in float32, one direction at a time (memory O(d), never O(d K)), fresh every
round. CUDA generators give other numbers on other GPU models and than the CPU's, so they are never used.
Bases:

- gaussian:   v ~ N(0, I / d), drawn with Tensor.normal_ (the Ferret paper's choice, without its truncation
              to +-d^-1/2, whose variance 1/(3d) makes the reconstruction about delta / 3);
- rademacher: v with entries +-d^-1/2, eight signs per byte from torch.randint: integer draws, so the same
              bits on every CPU (a float normal sampler may take another vector path on another CPU), and
              about twice to four times as fast here. Equally unbiased; slightly lower variance.

Reconstruction adds c_k v_k in a fixed order with one elementwise operation per direction, so two
processes with the same coefficients and the same torch build produce the same bits; a digest of the
weights on both sides confirms it, and a mismatch is healed by a full download.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping

import torch

BASES = ("gaussian", "rademacher")
MIN_DIRECTIONS = 2  # per block, as the Ferret code does


def direction_seed(run_seed: int, round_: int, block: str, index: int) -> int:
    """The seed of one direction: a 63-bit hash of (run seed, round, block name, index)."""
    key = f"ferret|{run_seed}|{round_}|{block}|{index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


_BYTE_SIGNS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).to(torch.float32) * 2 - 1  # (256, 8)


def direction(
    seed: int,
    size: int,
    basis: str = "gaussian",
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One direction of `size` values in float32 on the CPU, with E[v v^T] = I / size (written into `out`
    when given, which is then returned)."""
    generator = generator or torch.Generator()
    generator.manual_seed(seed)
    scale = 1.0 / math.sqrt(size)
    if basis == "gaussian":
        out = out if out is not None else torch.empty(size, dtype=torch.float32)
        return out.normal_(generator=generator).mul_(scale)
    if basis == "rademacher":
        # Eight signs per random byte, through a table: integer draws, so the same bits on every CPU.
        index = torch.randint(0, 256, (-(-size // 8),), generator=generator, dtype=torch.int64)
        signs = _BYTE_SIGNS[index].reshape(-1)[:size]
        if out is None:
            return signs.mul_(scale)
        return torch.mul(signs, scale, out=out)
    raise ValueError(f"unknown basis {basis!r}; choose one of {list(BASES)}")


def directions(run_seed: int, round_: int, block: str, count: int, size: int, basis: str) -> Iterator[torch.Tensor]:
    """The block's first `count` directions of a round, one at a time in one buffer (each is valid until the
    next is drawn): memory O(size) whatever the count."""
    generator = torch.Generator()
    buffer = torch.empty(size, dtype=torch.float32)
    for index in range(count):
        yield direction(direction_seed(run_seed, round_, block, index), size, basis, generator, buffer)


def project_on(delta: torch.Tensor, basis: Iterable[torch.Tensor], count: int) -> torch.Tensor:
    """(d / count) <delta, v_k> for the first `count` directions of basis (float32)."""
    flat = delta.detach().reshape(-1).to("cpu", torch.float32)
    scale = flat.numel() / count
    out = torch.empty(count, dtype=torch.float32)
    for index, v in zip(range(count), basis, strict=False):
        out[index] = float(torch.dot(flat, v)) * scale
    return out


def reconstruct_from(coefficients: torch.Tensor, basis: Iterable[torch.Tensor], size: int) -> torch.Tensor:
    """sum_k c_k v_k over the basis, in order, one elementwise step per direction (float32, CPU)."""
    acc = torch.zeros(size, dtype=torch.float32)
    for value, v in zip(coefficients.to(torch.float32).tolist(), basis, strict=False):
        if value != 0.0:
            acc.add_(v, alpha=value)
    return acc


def project(
    delta: torch.Tensor, run_seed: int, round_: int, block: str, count: int, basis: str = "gaussian"
) -> torch.Tensor:
    """The coefficients c_k = (d / count) <delta, v_k>, k < count, of a block's update on the round's shared
    directions (float32)."""
    return project_on(delta, directions(run_seed, round_, block, count, delta.numel(), basis), count)


def reconstruct(
    coefficients: torch.Tensor, shape: tuple[int, ...], run_seed: int, round_: int, block: str, basis: str = "gaussian"
) -> torch.Tensor:
    """sum_k c_k v_k on the round's shared directions, shaped as the block (float32, CPU)."""
    size = math.prod(shape)
    basis_ = directions(run_seed, round_, block, coefficients.numel(), size, basis)
    return reconstruct_from(coefficients, basis_, size).reshape(shape)


def allot(
    norms: Mapping[str, float], sizes: Mapping[str, int], budget: int, minimum: int = MIN_DIRECTIONS
) -> dict[str, int]:
    """Directions per block out of a round's budget: at least `minimum` each, the rest shared in proportion to
    the blocks' update norms (largest remainders, ties by name), and never more than a block has values
    (more directions than values add variance, not information)."""
    blocks = sorted(norms)
    if not blocks:
        return {}
    rest = max(0, budget - minimum * len(blocks))
    total = sum(max(norms[b], 0.0) for b in blocks)
    shares = {b: rest * (max(norms[b], 0.0) / total if total > 0 else 1 / len(blocks)) for b in blocks}
    counts = {b: math.floor(shares[b]) for b in blocks}
    for b in sorted(blocks, key=lambda b: (-(shares[b] - counts[b]), b))[: rest - sum(counts.values())]:
        counts[b] += 1
    return {b: min(minimum + counts[b], sizes[b]) for b in blocks}


def weights_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes in sorted name order: the same weights, the same digest."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()

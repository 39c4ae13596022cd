"""What one rank of a data-parallel agent does inside a training step: its share of a batch, the gradient
average, and agreeing with the other ranks (torch.distributed: gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Collective:
    """This process's place in the agent's process group (the default group of torch.distributed)."""

    rank: int
    world: int
    device: torch.device  # where this rank's tensors live (NCCL reduces on the GPU)

    def share(self, batch: Sequence[T]) -> list[T]:
        """This rank's samples of a batch every rank drew alike: every world-th from its rank, so the shares
        differ by at most one sample and a short last batch still spreads over the ranks."""
        return list(batch[self.rank :: self.world])

    def agree(self, stop: bool) -> bool:
        """Rank 0's decision, on every rank: all ranks must run the same number of steps or the next
        all-reduce would wait forever."""
        flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item() > 0)

    def average(self, params: Sequence[torch.Tensor], loss: float, own: int, total: int) -> float:
        """Replace every trainable tensor's gradient by the whole batch's (each rank's mean gradient weighted by
        its share of the samples, summed in one all-reduce), and return the whole batch's mean loss."""
        weight = own / total if total else 0.0
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads] + [torch.tensor([loss], device=self.device)])
        flat.mul_(weight)
        dist.all_reduce(flat)
        offset = 0
        for param, grad in zip(params, grads, strict=True):
            size = grad.numel()
            param.grad = flat[offset : offset + size].view_as(grad).to(grad.dtype)
            offset += size
        return float(flat[-1].item())

    def largest(self, value: int) -> int:
        """The largest of every rank's value (the peak memory a device reached)."""
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

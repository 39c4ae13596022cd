"""Server optimizers over the round's aggregated change: FedAvgM, FedAdam and FedYogi (Reddi et al., "Adaptive
Federated Optimization", ICLR 2021), wrapped around any LoRA strategy.

Where the moments live: on the effective weight change dW = B A of each module (dense d_out x d_in, float64)
and on the head tensors, never on the factors A and B. The global is re-factored every round (SVD-ordered,
coordinator/strategy/exact.py), so a factor coordinate has no fixed meaning from one round to the next and a
moment kept on it would average unrelated directions; dW does not change meaning, and it is the space in
which the averaged change is exact. The price is memory, two float64 d_out x d_in tensors per adapted module
(FedAvgM: one), and one dense SVD per module per round to bring G + step back to the global rank: about
2.4 MB per 384 x 384 module, 268 MB per 4096 x 4096 one.

Per module, with the base strategy's new global G' (untruncated) and the old G, the pseudo-gradient is
d = G' - G (Reddi's Delta_t), and

    FedAvgM  m = beta1 m + d                                     G <- G + lr m
    FedAdam  m = beta1 m + (1 - beta1) d,  v = beta2 v + (1 - beta2) d^2        G <- G + lr m / (sqrt(v) + tau)
    FedYogi  m as FedAdam,  v = v - (1 - beta2) d^2 sign(v - d^2)               the same step

with v starting at tau^2 and no bias correction, as in the paper. A module that has state but nobody trained
this round still takes its step (d = 0, the momentum carries it), as every coordinate does in the paper. The
new G is truncated to the global rank (what that drops is reported as a share of the step's energy). Heads
take the same update in their own shapes. The moments are the strategy's state: saved with every
checkpoint, restored on resume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from common.adapters import FoldedUpdate, GlobalAdapter, LoraPair
from common.errors import ConfigError
from coordinator.strategy.lowrank import from_dense
from coordinator.strategy.weighted import delta_norm

KINDS = ("fedavgm", "fedadam", "fedyogi")


@dataclass(frozen=True)
class ServerSettings:
    """One server optimizer and its hyperparameters."""

    kind: str
    lr: float
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    global_rank: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"aggregation.server_optimizer: unknown {self.kind!r}; choose one of {list(KINDS)}")


def _dense(pair: LoraPair) -> torch.Tensor:
    """B A in float64."""
    return pair.b.to(torch.float64) @ pair.a.to(torch.float64)


def step(settings: ServerSettings, moments: dict[str, torch.Tensor], key: str, change: torch.Tensor) -> torch.Tensor:
    """The optimizer's step for one tensor's pseudo-gradient, updating its moments in place."""
    m = moments.get(f"m::{key}")
    if m is None:
        m = torch.zeros_like(change)
    if settings.kind == "fedavgm":
        m = settings.beta1 * m + change
        moments[f"m::{key}"] = m
        return settings.lr * m
    v = moments.get(f"v::{key}")
    if v is None:
        v = torch.full_like(change, settings.tau**2)
    m = settings.beta1 * m + (1.0 - settings.beta1) * change
    square = change * change
    if settings.kind == "fedadam":
        v = settings.beta2 * v + (1.0 - settings.beta2) * square
    else:  # fedyogi: v moves towards d^2 by at most (1 - beta2) d^2, whichever side it is on
        v = v - (1.0 - settings.beta2) * square * torch.sign(v - square)
    moments[f"m::{key}"], moments[f"v::{key}"] = m, v
    return settings.lr * m / (v.sqrt() + settings.tau)


def optimize(
    settings: ServerSettings,
    moments: dict[str, torch.Tensor],
    global_: GlobalAdapter,
    target: GlobalAdapter,
    trained_ranks: Mapping[str, int],
) -> tuple[GlobalAdapter, dict[str, float]]:
    """The new global from the old, the base strategy's untruncated target and the moments (updated in place)."""
    lora = dict(global_.lora)
    dropped = 0.0
    stepped = 0.0
    worst = 0.0
    prefix = "m::lora::"
    # Modules trained this round, and those whose momentum still moves them; the rest keep their pair.
    modules = sorted(set(trained_ranks) | {key[len(prefix) :] for key in moments if key.startswith(prefix)})
    for module in modules:
        current = global_.lora.get(module)
        new = target.lora.get(module)
        if current is not None:
            before = _dense(current)
        else:
            assert new is not None  # a module with moments was in the global when they were made
            before = torch.zeros(new.b.shape[0], new.a.shape[1], dtype=torch.float64)
        change = _dense(new) - before if new is not None else torch.zeros_like(before)
        delta = step(settings, moments, f"lora::{module}", change)
        rank = settings.global_rank or max(trained_ranks.get(module, 0), current.rank if current is not None else 0)
        refactored = from_dense(before + delta, rank)
        lora[module] = refactored.pair
        dropped += refactored.dropped_energy
        energy = float(delta.pow(2).sum())
        stepped += energy
        if energy > 0:
            worst = max(worst, refactored.dropped_energy / energy)
    heads = dict(global_.heads)
    for name, value in target.heads.items():
        held = global_.heads.get(name)
        before = held.to(torch.float64) if held is not None else torch.zeros_like(value, dtype=torch.float64)
        delta = step(settings, moments, f"head::{name}", value.to(torch.float64) - before)
        heads[name] = (before + delta).to(value.dtype)
    new_global = GlobalAdapter(round=target.round, lora=lora, heads=heads)
    metrics = {
        "max_rank": float(max((pair.rank for pair in lora.values()), default=0)),
        "delta_norm": delta_norm(global_, new_global),
        "truncated_energy_share": dropped / stepped if stepped > 0 else 0.0,
        "truncated_energy_share_max": worst,
    }
    return new_global, metrics


def trained_ranks(updates: Sequence[FoldedUpdate]) -> dict[str, int]:
    """Per module, the largest rank any update trained it at."""
    ranks: dict[str, int] = {}
    for update in updates:
        for module, pair in update.lora.items():
            ranks[module] = max(ranks.get(module, 0), pair.rank)
    return ranks

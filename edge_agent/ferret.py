"""The agent's side of the Ferret mode: full-precision blocks kept in step with the coordinator's global,
trained in full, their update sent as coefficients on the round's shared directions (common.ferret).

In step means the same bits: the agent's blocks and heads hash to the digest its plan names before it
trains. It gets there by applying the last round's combined coefficients to the weights it started that
round from (the coordinator does the same), or by a full download when it holds anything else (it joined
late, restarted, reloaded its base, or its digest disagreed). After training it sets its local result aside:
it projects the change, then writes its starting weights back, so only the aggregate ever moves them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from common.errors import ModelMismatch
from common.ferret import allot, project, reconstruct, weights_digest
from common.modeling import block_weight, write_blocks
from common.types import TrainPlan
from edge_agent.metrics import AgentMetrics
from edge_agent.model import LocalModel

log = logging.getLogger(__name__)

COEF = "::coef"
DELTA = "::delta"  # a block's whole change (a plan of 0 directions: the exact FedAvg reference)


class Downloads(Protocol):
    """What the worker needs of the coordinator client."""

    def download(self, global_round: int, plan_id: str, have_digest: str = "") -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class Projected:
    """What one round's training leaves to upload."""

    tensors: dict[str, torch.Tensor]  # <block>::coef per trained block, and the heads
    base_digest: str  # the weights it trained from
    seconds: float  # projecting the change


class FerretWorker:
    """One agent's Ferret state over its LocalModel."""

    def __init__(self, local: LocalModel, gateway: Downloads, metrics: AgentMetrics) -> None:
        self.local = local
        self.gateway = gateway
        self.metrics = metrics
        self.heads: tuple[str, ...] = ()  # the head tensors the global holds

    def weights(self, model: Any, plan: TrainPlan) -> dict[str, torch.Tensor]:
        """The held blocks and the heads as the digest covers them (float32 copies on the CPU)."""
        params = dict(model.named_parameters())
        tensors = {b: block_weight(model, b).detach().to("cpu", torch.float32) for b in plan.held_modules}
        tensors.update({h: params[h].detach().to("cpu", torch.float32) for h in self.heads})
        return tensors

    def digest(self, model: Any, plan: TrainPlan) -> str:
        """sha256 of the agent's weights as the coordinator computes its global's."""
        return weights_digest(self.weights(model, plan))

    def sync(self, global_round: int, plan: TrainPlan) -> Any:
        """The model, holding exactly the global the plan names (downloading what it takes to get there)."""
        model, fresh = self.local.full_at(plan.quantization, plan.held_modules)
        self.heads = tuple(sorted(n for n, _ in self._head_params(model, plan)))
        have = "" if fresh else self.digest(model, plan)
        if not have:
            log.info(
                "ferret: a full download of the global (%d blocks): the base was just loaded", len(plan.held_modules)
            )
        if have == plan.global_digest:
            log.info("ferret: weights sha256 %s, the global of round %d", have[:16], global_round)
            return model
        self._apply(model, self.gateway.download(global_round, plan.plan_id, have), global_round, plan)
        if self.digest(model, plan) != plan.global_digest:
            log.warning("ferret: weights differ from the global after the round's update; downloading them in full")
            self.metrics.ferret_resyncs.inc()
            self._apply(model, self.gateway.download(global_round, plan.plan_id, ""), global_round, plan)
            mine = self.digest(model, plan)
            if mine != plan.global_digest:
                raise ModelMismatch(
                    f"ferret: a full download gives weights {mine[:12]}, the global is {plan.global_digest[:12]}"
                )
        elif not have:
            self.metrics.ferret_resyncs.inc()
        log.info("ferret: weights sha256 %s, the global of round %d", plan.global_digest[:16], global_round)
        return model

    def _head_params(self, model: Any, plan: TrainPlan) -> list[tuple[str, torch.nn.Parameter]]:
        saved = set(plan.modules_to_save)
        return [(n, p) for n, p in model.named_parameters() if n.rsplit(".", 1)[0] in saved]

    def _apply(self, model: Any, tensors: Mapping[str, torch.Tensor], global_round: int, plan: TrainPlan) -> None:
        """Full blocks and heads written as they are; coefficients reconstructed on the round that made them and
        added to the blocks, in the order and precision the coordinator uses."""
        start = time.perf_counter()
        blocks = {n: t for n, t in tensors.items() if n in plan.held_modules}
        heads = {n: t for n, t in tensors.items() if n in self.heads}
        for name, value in tensors.items():
            if not name.endswith((COEF, DELTA)):
                continue
            block = name.rsplit("::", 1)[0]
            current = block_weight(model, block).detach().to("cpu", torch.float32)
            if name.endswith(DELTA):
                blocks[block] = current + value
                continue
            delta = reconstruct(value, tuple(current.shape), plan.shared_seed, global_round, block, plan.basis)
            blocks[block] = current + delta
        write_blocks(model, blocks, heads)
        if any(n.endswith(COEF) for n in tensors):
            seconds = time.perf_counter() - start
            self.metrics.ferret_reconstruction_seconds.inc(seconds)
            directions = sum(t.numel() for n, t in tensors.items() if n.endswith(COEF))
            log.info("ferret: rebuilt round %d's update (%d directions) in %.2fs", global_round, directions, seconds)

    def prepare_training(self, model: Any, plan: TrainPlan) -> dict[str, torch.Tensor]:
        """Unfreeze the planned blocks and the heads; their starting values (to set the local result aside)."""
        start = {b: block_weight(model, b).detach().clone() for b in plan.target_modules}
        for param in model.parameters():
            param.requires_grad_(False)
        for block in plan.target_modules:
            block_weight(model, block).requires_grad_(True)
        heads = {}
        for name, param in self._head_params(model, plan):
            heads[name] = param.detach().clone()
            param.requires_grad_(True)
        return {**start, **heads}

    def project_and_restore(
        self, model: Any, plan: TrainPlan, round_: int, start: Mapping[str, torch.Tensor]
    ) -> Projected:
        """Each trained block's change as coefficients (directions shared by their norms, or evenly), the trained heads;
        then the model's weights back to where the round started."""
        began = time.perf_counter()
        deltas = {
            b: (block_weight(model, b).detach().to("cpu", torch.float32) - start[b].to("cpu", torch.float32))
            for b in plan.target_modules
        }
        if plan.directions == 0:  # exact: the changes themselves
            exact = {b + DELTA: d for b, d in deltas.items()}
            return self._finish(model, plan, start, exact, began)
        counts = allot(
            {b: 1.0 if plan.even_directions else float(d.norm()) for b, d in deltas.items()},
            {b: d.numel() for b, d in deltas.items()},
            plan.directions,
        )
        tensors = {
            b + COEF: project(deltas[b], plan.shared_seed, round_, b, counts[b], plan.basis)
            for b in plan.target_modules
        }
        return self._finish(model, plan, start, tensors, began)

    def _finish(
        self,
        model: Any,
        plan: TrainPlan,
        start: Mapping[str, torch.Tensor],
        tensors: dict[str, torch.Tensor],
        began: float,
    ) -> Projected:
        """The trained heads beside the blocks' changes, then the model's weights back to the round's start."""
        params = dict(model.named_parameters())
        tensors.update(
            {h: params[h].detach().to("cpu", torch.float32).clone() for h in start if h in params and h in self.heads}
        )
        seconds = time.perf_counter() - began
        base_digest = plan.global_digest
        write_blocks(model, {b: start[b] for b in plan.target_modules}, {h: start[h] for h in start if h in self.heads})
        for param in model.parameters():
            param.requires_grad_(False)
        self.metrics.ferret_projection_seconds.inc(seconds)
        return Projected(tensors, base_digest, seconds)

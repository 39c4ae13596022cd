"""Training modes: what an agent trains, which tensors an upload carries and how they are checked,
aggregated, broadcast, checkpointed, evaluated and exported. Everything outside a mode asks the mode; nothing
tests which mode it is (ARCHITECTURE.md, 16).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from common.types import GlobalState, ModelSpec, TensorInfo, TrainPlan, UpdateMeta

if TYPE_CHECKING:
    from coordinator.strategy import Strategy


@dataclass(frozen=True)
class Contribution:
    """One admitted update as the aggregation sees it: whose, its weight, its tensors and its plan."""

    agent_id: str
    weight: float
    tensors: Mapping[str, torch.Tensor]
    plan: TrainPlan


class Mode(Protocol):
    """The seam one training mode fills (LoraMode, FerretMode)."""

    name: str

    def initial(self, spec: ModelSpec, plans: Mapping[str, TrainPlan], seed: int) -> GlobalState:
        """The round-0 global for these plans."""
        ...

    def extend(self, global_: GlobalState, plans: Mapping[str, TrainPlan], spec: ModelSpec) -> GlobalState:
        """The global with whatever the round's plans train that it still lacks (unchanged otherwise)."""
        ...

    def finalize_plans(self, plans: Mapping[str, TrainPlan], global_: GlobalState) -> dict[str, TrainPlan]:
        """The planner's plans with what the mode adds from the global (Ferret: the held blocks, the digest)."""
        ...

    def selection_rank(self, rank: int) -> int:
        """The rank the selection budget is counted at (0: the matrices are trained in full)."""
        ...

    def planned_bytes(self, plan: TrainPlan, spec: ModelSpec) -> int:
        """The most bytes an upload for this plan may carry."""
        ...

    def check_origin(self, meta: UpdateMeta, plan: TrainPlan) -> None:
        """The upload was trained from what the plan sent (StaleRound otherwise)."""
        ...

    def check_declared(self, infos: Sequence[TensorInfo], plan: TrainPlan, spec: ModelSpec) -> None:
        """An upload header declares exactly what the plan allows (InvalidArgument naming what is off)."""
        ...

    def check_values(self, tensors: Mapping[str, torch.Tensor], bound: float) -> None:
        """Every value finite and within bound (0: finiteness only)."""
        ...

    def download(
        self, global_: GlobalState, plan: TrainPlan, spec: ModelSpec, have_digest: str = ""
    ) -> dict[str, torch.Tensor]:
        """What an agent with this plan downloads (have_digest: the state it says it holds)."""
        ...

    def change_norms(
        self, tensors: Mapping[str, torch.Tensor], global_: GlobalState, plan: TrainPlan, spec: ModelSpec
    ) -> dict[str, float]:
        """Per uploaded tensor, the norm of the change it makes to what the agent was sent."""
        ...

    def scale_change(
        self,
        tensors: Mapping[str, torch.Tensor],
        global_: GlobalState,
        plan: TrainPlan,
        spec: ModelSpec,
        factor: float | Mapping[str, float],
    ) -> dict[str, torch.Tensor]:
        """The upload with its change scaled by factor (one, or one per tensor): clipping."""
        ...

    def aggregate(
        self, global_: GlobalState, contributions: Sequence[Contribution], strategy: Strategy, round_: int
    ) -> tuple[GlobalState, dict[str, float]]:
        """The round's new global (numbered round_) and figures for the log; InvalidArgument when a step left
        the finite range."""
        ...

    def linear_layout(
        self, global_: GlobalState, plans: Mapping[str, TrainPlan], counted: Collection[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """The layout the round's changes are summed in: per named tensor, how many plans (of the `counted`
        agents, when given) cover each coordinate (common.linear)."""
        ...

    def linear_terms(
        self, global_: GlobalState, contribution: Contribution, layout: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """One upload as its change to the global in the layout (float64, zero where its plan trains nothing)."""
        ...

    def apply_linear(
        self,
        global_: GlobalState,
        sums: Mapping[str, torch.Tensor],
        layout: Mapping[str, torch.Tensor],
        strategy: Strategy,
        round_: int,
    ) -> tuple[GlobalState, dict[str, float]]:
        """The new global (numbered round_): the old plus sums / counts, stepped by the strategy's server
        optimizer if it has one; figures for the log."""
        ...

    def check_global(self, global_: GlobalState, bound: float) -> None:
        """A global about to be published: every value finite and within bound (InvalidArgument otherwise)."""
        ...

    def state_tensors(self, global_: GlobalState) -> dict[str, torch.Tensor]:
        """The global as named tensors, bit-exact, for the checkpoint."""
        ...

    def from_state(self, round_: int, tensors: Mapping[str, torch.Tensor]) -> GlobalState:
        """Inverse of state_tensors."""
        ...

    def digest(self, global_: GlobalState) -> str:
        """sha256 of the global's tensors (and round)."""
        ...

    def write_artifact(self, directory: Path, global_: GlobalState, metadata: Mapping[str, str] | None = None) -> None:
        """What a round leaves for people and tools (LoRA: a peft adapter directory), written atomically, with
        `metadata` (the privacy guarantee) in its safetensors metadata."""
        ...

    def trainable_parameters(self, plan: TrainPlan, spec: ModelSpec) -> int:
        """Parameters an agent trains under this plan (for metrics)."""
        ...

    def describe(self, global_: GlobalState) -> str:
        """A few words on the global's size, for log lines."""
        ...

    def evaluation_model(self, holder: Any, global_: GlobalState, template: TrainPlan, spec: ModelSpec) -> Any:
        """A model ready to evaluate the global, built on holder.base (the full-precision base the held-out
        evaluator loaded once; holder.cache keeps what the mode builds around it across rounds)."""
        ...

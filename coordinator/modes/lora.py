"""The LoRA training mode: agents train low-rank adapters (rank padding across agents) and heads in full.

The coordinator keeps the global folded (alpha / r in B, common.adapters), sends each agent the global
truncated to its ranks, checks an upload against the exact tensors its plan asks for, folds it for the
strategy, and writes each round's global as a peft adapter directory.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from common import linear
from common.adapters import (
    GlobalAdapter,
    LoraPair,
    broadcast_tensors,
    change_norms,
    check_values,
    expected_tensors,
    fold_update,
    global_digest,
    global_to_peft,
    head_modules,
    init_global,
    lora_module,
    lora_parameter_count,
    scale_change,
    sent_views,
    with_modules,
)
from common.errors import InvalidArgument
from common.types import GlobalState, ModelSpec, TensorInfo, TrainPlan, UpdateMeta
from coordinator.modes import Contribution
from coordinator.rundir import atomic_dir
from coordinator.strategy.weighted import delta_norm

if TYPE_CHECKING:
    from coordinator.strategy import Strategy


def write_adapter(
    directory: Path,
    global_: GlobalAdapter,
    alpha: float,
    base_path: str,
    modules_to_save: tuple[str, ...],
    task: str,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """A peft adapter directory (adapter_config.json + adapter_model.safetensors, `metadata` among the
    safetensors metadata), written atomically."""
    from common.modeling import write_adapter_config

    with atomic_dir(directory) as tmp:
        save_file(
            global_to_peft(global_, alpha),
            str(tmp / "adapter_model.safetensors"),
            metadata={**(metadata or {}), "format": "pt", "fedpipe_round": str(global_.round)},
        )
        write_adapter_config(tmp, base_path, global_.ranks(), alpha, modules_to_save, task)


def _lora(global_: GlobalState) -> GlobalAdapter:
    if not isinstance(global_, GlobalAdapter):
        raise TypeError(f"the LoRA mode holds a GlobalAdapter, not a {type(global_).__name__}")
    return global_


class SentTensors:
    """What agents were sent of one global (common.adapters.sent_views), each LoRA tensor computed once per
    module, rank and alpha and then shared by every upload screened against that global: B's unfolding writes
    a new tensor, which would otherwise be made again for each upload. A newer global starts afresh.
    Thread-safe; the tensors are for reading."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.global_: GlobalAdapter | None = None  # held, so that its identity cannot be reused meanwhile
        self.tensors: dict[tuple[str, int, float], torch.Tensor] = {}

    def get(
        self, global_: GlobalAdapter, plan: TrainPlan, spec: ModelSpec, names: Iterable[str]
    ) -> dict[str, torch.Tensor]:
        """sent_views(global_, plan, spec, names), from the cache where it can be."""
        with self.lock:
            if self.global_ is not global_:
                self.global_, self.tensors = global_, {}
            cached = self.tensors
        keys = {name: _sent_key(name, plan) for name in names}
        found = {name: cached[key] for name, key in keys.items() if key is not None and key in cached}
        fresh = sent_views(global_, plan, spec, [name for name in keys if name not in found])
        for name, tensor in fresh.items():
            key = keys[name]
            if key is not None:
                cached[key] = tensor
        sent = {**fresh, **found}
        return {name: sent[name] for name in keys if name in sent}  # in the order named, as sent_views


def _sent_key(name: str, plan: TrainPlan) -> tuple[str, int, float] | None:
    """What a sent LoRA tensor depends on besides the global: its name, rank and alpha (None for a head, which
    is the global's own tensor, and for a name the plan does not train)."""
    module = lora_module(name)
    if module is None or module not in plan.rank_pattern:
        return None
    return name, plan.rank_pattern[module], plan.alpha_of(module)


class LoraMode:
    """LoRA adapters, folded on the coordinator, truncated to each agent's ranks."""

    name = "lora"

    def __init__(self, spec: ModelSpec, alpha: float, base_path: str) -> None:
        # Saved adapters unfold the folded global with the configured alpha at each module's own rank; any
        # alpha gives the same dW, so writing them needs no plan.
        self.spec = spec
        self.alpha = alpha
        self.base_path = base_path
        self.modules_to_save = head_modules(spec)
        self.sent = SentTensors()

    def initial(self, spec: ModelSpec, plans: Mapping[str, TrainPlan], seed: int) -> GlobalState:
        """Fresh pairs over the union of the plans' modules at each one's largest rank; heads N(0, 0.02)."""
        return init_global(spec, widest(plans), seed)

    def extend(self, global_: GlobalState, plans: Mapping[str, TrainPlan], spec: ModelSpec) -> GlobalState:
        """The global plus a fresh pair (dW = 0) for every planned module it lacks."""
        return with_modules(_lora(global_), widest(plans).rank_pattern, spec)

    def finalize_plans(self, plans: Mapping[str, TrainPlan], global_: GlobalState) -> dict[str, TrainPlan]:
        """The plans as the planner made them."""
        return dict(plans)

    def selection_rank(self, rank: int) -> int:
        """The configured LoRA rank."""
        return rank

    def planned_bytes(self, plan: TrainPlan, spec: ModelSpec) -> int:
        """The bytes of the exact tensors the plan asks for."""
        return sum(info.nbytes for info in expected_tensors(plan, spec))

    def check_origin(self, meta: UpdateMeta, plan: TrainPlan) -> None:
        """Nothing to check: the plan id already ties a LoRA upload to the global it was sent."""

    def check_declared(self, infos: Sequence[TensorInfo], plan: TrainPlan, spec: ModelSpec) -> None:
        """The header declares exactly the plan's tensors, with their shapes and dtypes."""
        expected = expected_tensors(plan, spec)
        declared = {info.name: info for info in infos}
        for info in expected:
            got = declared.get(info.name)
            if got is None:
                raise InvalidArgument("payload.tensors", f"missing {info.name}")
            if got.shape != info.shape:
                raise InvalidArgument(f"payload.tensors[{info.name}].shape", f"expected {info.shape}, got {got.shape}")
            if got.dtype != info.dtype:
                raise InvalidArgument(f"payload.tensors[{info.name}].dtype", f"expected {info.dtype}, got {got.dtype}")
        extra = sorted(set(declared) - {info.name for info in expected})
        if extra:
            raise InvalidArgument("payload.tensors", f"not in the plan: {extra[:3]}")

    def check_values(self, tensors: Mapping[str, torch.Tensor], bound: float) -> None:
        """Every value of an upload finite and within bound (0: finiteness only)."""
        check_values(tensors, bound)

    def download(
        self, global_: GlobalState, plan: TrainPlan, spec: ModelSpec, have_digest: str = ""
    ) -> dict[str, torch.Tensor]:
        """The global as this plan loads it: truncated to its ranks, unfolded with its alpha."""
        return broadcast_tensors(_lora(global_), plan, spec)

    def change_norms(
        self, tensors: Mapping[str, torch.Tensor], global_: GlobalState, plan: TrainPlan, spec: ModelSpec
    ) -> dict[str, float]:
        """Per tensor given (all of an upload, or the ones screened so far), the norm of its change to what the
        agent was sent."""
        return change_norms(tensors, self.sent.get(_lora(global_), plan, spec, tensors))

    def scale_change(
        self,
        tensors: Mapping[str, torch.Tensor],
        global_: GlobalState,
        plan: TrainPlan,
        spec: ModelSpec,
        factor: float | Mapping[str, float],
    ) -> dict[str, torch.Tensor]:
        """The upload with its change to what it was sent scaled by factor (clipping)."""
        return scale_change(tensors, self.sent.get(_lora(global_), plan, spec, tensors), factor)

    def aggregate(
        self, global_: GlobalState, contributions: Sequence[Contribution], strategy: Strategy, round_: int
    ) -> tuple[GlobalState, dict[str, float]]:
        """Fold every upload (alpha / r into B, checked finite) and let the strategy combine the pairs."""
        folded = []
        for c in contributions:
            update = fold_update(c.agent_id, c.weight, c.tensors, c.plan)
            check_values({f"{m}.lora_B": p.b for m, p in update.lora.items()}, 0.0, f"{c.agent_id}'s folded update")
            folded.append(update)
        new_global, metrics = strategy(_lora(global_), folded)
        return replace(new_global, round=round_), metrics

    def linear_layout(
        self, global_: GlobalState, plans: Mapping[str, TrainPlan], counted: Collection[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Folded A and B padded to the round's largest rank per module, and the heads, with their plan counts."""
        return linear.layout(_lora(global_), plans, self.spec, counted)

    def linear_terms(
        self, global_: GlobalState, contribution: Contribution, layout: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The upload's change to what it was sent, folded (alpha / r into B) and laid out."""
        plan = contribution.plan
        sent = broadcast_tensors(_lora(global_), plan, self.spec)
        return linear.terms(contribution.tensors, sent, plan, linear.shapes(layout))

    def apply_linear(
        self,
        global_: GlobalState,
        sums: Mapping[str, torch.Tensor],
        layout: Mapping[str, torch.Tensor],
        strategy: Strategy,
        round_: int,
    ) -> tuple[GlobalState, dict[str, float]]:
        """The global plus the mean change, then the strategy's server step (none: the mean itself)."""
        current = _lora(global_)
        target = linear.apply_mean(current, sums, dict(layout), self.spec)
        trained = linear.trained(dict(layout))
        new, stepped = strategy.step(current, target, trained)
        metrics = {
            "modules": float(len(trained)),
            "max_rank": float(max((pair.rank for pair in new.lora.values()), default=0)),
            "delta_norm": delta_norm(current, new),
            **stepped,
        }
        return replace(new, round=round_), metrics

    def check_global(self, global_: GlobalState, bound: float) -> None:
        """A global about to be published: every value finite and within bound."""
        lora = _lora(global_)
        named = {f"{m}.lora_A": p.a for m, p in lora.lora.items()}
        named.update({f"{m}.lora_B": p.b for m, p in lora.lora.items()})
        named.update(lora.heads)
        check_values(named, bound, "global")

    def state_tensors(self, global_: GlobalState) -> dict[str, torch.Tensor]:
        """lora::<module>::a / ::b and head::<name>."""
        lora = _lora(global_)
        tensors: dict[str, torch.Tensor] = {}
        for module, pair in lora.lora.items():
            tensors[f"lora::{module}::a"] = pair.a
            tensors[f"lora::{module}::b"] = pair.b
        tensors.update({f"head::{name}": value for name, value in lora.heads.items()})
        return tensors

    def from_state(self, round_: int, tensors: Mapping[str, torch.Tensor]) -> GlobalState:
        """Inverse of state_tensors."""
        lora: dict[str, LoraPair] = {}
        heads: dict[str, torch.Tensor] = {}
        for key in sorted(tensors):
            kind, _, rest = key.partition("::")
            if kind == "head":
                heads[rest] = tensors[key]
            elif rest.endswith("::a"):
                module = rest[: -len("::a")]
                lora[module] = LoraPair(a=tensors[key], b=tensors[f"lora::{module}::b"])
        return GlobalAdapter(round=round_, lora=lora, heads=heads)

    def digest(self, global_: GlobalState) -> str:
        """sha256 over the round and every tensor."""
        return global_digest(_lora(global_))

    def write_artifact(self, directory: Path, global_: GlobalState, metadata: Mapping[str, str] | None = None) -> None:
        """The global as a peft adapter directory at each module's global rank (`metadata` in its safetensors)."""
        lora = _lora(global_)
        write_adapter(directory, lora, self.alpha, self.base_path, self.modules_to_save, self.spec.task, metadata)

    def trainable_parameters(self, plan: TrainPlan, spec: ModelSpec) -> int:
        """LoRA parameters of the plan's ranks."""
        return lora_parameter_count(plan.rank_pattern, spec)

    def describe(self, global_: GlobalState) -> str:
        """How many matrices carry an adapter."""
        return f"{len(_lora(global_).lora)} adapted matrices"

    def evaluation_model(self, holder: Any, global_: GlobalState, template: TrainPlan, spec: ModelSpec) -> Any:
        """The base wrapped with the global adapter at its own ranks (the wrapper kept across rounds)."""
        from common.modeling import AdaptedModel
        from common.types import Quantization

        lora = _lora(global_)
        adapted = holder.cache.get("adapted")
        if adapted is None:
            adapted = holder.cache["adapted"] = AdaptedModel(holder.base, spec.task)
        ranks = lora.ranks()
        plan = replace(
            template, target_modules=tuple(ranks), rank_pattern=ranks, lora_dropout=0.0, quantization=Quantization.NONE
        )
        adapted.ensure(plan)
        adapted.load(broadcast_tensors(lora, plan, spec))
        return adapted.model


def widest(plans: Mapping[str, TrainPlan]) -> TrainPlan:
    """A plan over the union of modules at each module's largest planned rank (the round-0 global's layout)."""
    first = next(iter(plans.values()))
    ranks: dict[str, int] = {}
    for plan in plans.values():
        for module, rank in plan.rank_pattern.items():
            ranks[module] = max(rank, ranks.get(module, 0))
    return replace(first, target_modules=tuple(ranks), rank_pattern=ranks)

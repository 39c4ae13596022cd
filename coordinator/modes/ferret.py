"""The Ferret training mode (METHOD.md 4c): agents train whole weight matrices ("blocks") with first-order
steps and send each block's update as coefficients on shared random directions (common.ferret).

The coordinator keeps the trained weights of every block any round trained, in float32, and the heads. An
upload holds, per planned block, its K_g coefficients (`<block>::coef`) and the heads in full (with a budget
of 0 directions, each block's whole change `<block>::delta` instead: plain full-weight FedAvg of the same
blocks, the reference Ferret approximates, through the same code); the round's
new global is the old one plus the reconstruction of the (strategy-)combined coefficients, which every
agent rebuilds the same way from the same seeds. What travels down is therefore one of: nothing (the agent
holds the current global), the last round's combined coefficients and heads (it holds the one before), or
every block and head in full (it joined late, restarted, or its digest disagreed: a resync).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from common import linear
from common.adapters import check_values, init_heads, scale_change
from common.errors import InvalidArgument, StaleRound
from common.ferret import MIN_DIRECTIONS, allot, reconstruct, weights_digest
from common.types import GlobalState, ModelSpec, TensorInfo, TrainPlan, UpdateMeta
from coordinator.modes import Contribution
from coordinator.rundir import atomic_dir, write_json

if TYPE_CHECKING:
    from coordinator.strategy import Strategy

log = logging.getLogger(__name__)

COEF = "::coef"  # suffix of a block's coefficient tensor on the wire
DELTA = "::delta"  # suffix of a block's whole change (directions 0: exact, the FedAvg reference)
WEIGHTS_FILE = "weights.safetensors"
ARTEFACT_FILE = "fedpipe_ferret.json"


@dataclass(frozen=True)
class FerretGlobal(GlobalState):
    """The Ferret mode's global: the trained blocks (weights in the model's own layout, float32) and heads,
    and what takes an agent from the previous global to this one."""

    blocks: Mapping[str, torch.Tensor]  # module name -> its weight
    heads: Mapping[str, torch.Tensor]
    coefficients: Mapping[str, torch.Tensor] = field(default_factory=dict)  # the last round's, combined
    previous_digest: str = ""  # the digest those coefficients start from


def _ferret(global_: GlobalState) -> FerretGlobal:
    if not isinstance(global_, FerretGlobal):
        raise TypeError(f"the Ferret mode holds a FerretGlobal, not a {type(global_).__name__}")
    return global_


def block_size(spec: ModelSpec, block: str) -> int:
    """Values in a block's weight."""
    shape = spec.candidate(block)
    return shape.in_features * shape.out_features


def direction_limit(plan: TrainPlan, blocks: int) -> int:
    """The most directions an upload of this plan may use in all: the budget, or 2 a block if that is more."""
    return max(plan.directions, MIN_DIRECTIONS * blocks)


class FerretMode:
    """Full-weight blocks, exchanged as random-projection coefficients."""

    name = "ferret"

    def __init__(
        self,
        spec: ModelSpec,
        base_path: str,
        run_seed: int,
        basis: str,
        weights: BaseWeights,
        even_directions: bool = False,
    ) -> None:
        self.spec = spec
        self.even_directions = even_directions  # privacy: the split among blocks must not depend on the data
        self.base_path = base_path
        self.run_seed = run_seed
        self.basis = basis
        self.weights = weights  # the base model's block weights, read on first use
        self.reconstruction_seconds = 0.0  # of the last aggregation
        self.shapes: dict[str, tuple[int, ...]] = {}  # each held block's weight shape, for exact uploads

    def _held(self, global_: FerretGlobal) -> FerretGlobal:
        self.shapes.update({name: tuple(value.shape) for name, value in global_.blocks.items()})
        return global_

    # ------------------------------------------------------------------ the global

    def initial(self, spec: ModelSpec, plans: Mapping[str, TrainPlan], seed: int) -> GlobalState:
        """The base's weights of every planned block, and fresh heads."""
        blocks = {b: self.weights.block(b) for b in sorted({m for p in plans.values() for m in p.target_modules})}
        saved = {m for p in plans.values() for m in p.modules_to_save}
        return self._held(FerretGlobal(round=0, blocks=blocks, heads=init_heads(spec, saved, seed)))

    def extend(self, global_: GlobalState, plans: Mapping[str, TrainPlan], spec: ModelSpec) -> GlobalState:
        """The global plus the base's weights of every planned block it lacks; blocks it has stay as trained."""
        current = _ferret(global_)
        wanted = {m for p in plans.values() for m in p.target_modules} - set(current.blocks)
        if not wanted:
            return current
        blocks = dict(current.blocks)
        blocks.update({b: self.weights.block(b) for b in sorted(wanted)})
        # The agents' route from the previous global now passes a full download of the new blocks.
        return self._held(replace(current, blocks=blocks, coefficients={}, previous_digest=""))

    def finalize_plans(self, plans: Mapping[str, TrainPlan], global_: GlobalState) -> dict[str, TrainPlan]:
        """Every plan names the blocks the global holds and the digest an agent must reach before training."""
        current = _ferret(global_)
        held = tuple(sorted(current.blocks))
        digest = self.digest(current)
        even = self.even_directions
        return {a: replace(p, held_modules=held, global_digest=digest, even_directions=even) for a, p in plans.items()}

    # ------------------------------------------------------------------ uploads

    def selection_rank(self, rank: int) -> int:
        """0: a selected block is trained in full."""
        return 0

    def planned_bytes(self, plan: TrainPlan, spec: ModelSpec) -> int:
        """Coefficients up to the plan's direction budget, and the heads."""
        heads = sum(math.prod(shape) for name, shape in spec.heads if name.rsplit(".", 1)[0] in plan.modules_to_save)
        if plan.directions == 0:
            return 4 * (sum(block_size(spec, b) for b in plan.target_modules) + heads)
        return 4 * (direction_limit(plan, len(plan.target_modules)) + heads)

    def check_origin(self, meta: UpdateMeta, plan: TrainPlan) -> None:
        """The agent trained from the round's global: its base digest is the one the plan named."""
        if meta.base_digest != plan.global_digest:
            raise StaleRound(
                f"base_digest {meta.base_digest[:12] or '(none)'} is not the digest of the round's global "
                f"({plan.global_digest[:12]}): the update was trained from other weights"
            )

    def check_declared(self, infos: Sequence[TensorInfo], plan: TrainPlan, spec: ModelSpec) -> None:
        """Per planned block one float32 vector of 2..min(d, budget) coefficients, at most the budget in all,
        the heads in full, nothing else."""
        declared = {info.name: info for info in infos}
        heads = {name: shape for name, shape in spec.heads if name.rsplit(".", 1)[0] in plan.modules_to_save}
        limit = direction_limit(plan, len(plan.target_modules))
        even = self.even_counts(plan) if plan.even_directions and plan.directions else {}
        total = 0
        for block in plan.target_modules:
            if plan.directions == 0:
                self._check_delta(declared.get(block + DELTA), block)
                continue
            info = declared.get(block + COEF)
            if info is None:
                raise InvalidArgument("payload.tensors", f"missing {block + COEF}")
            if info.dtype != "float32" or len(info.shape) != 1:
                raise InvalidArgument(f"payload.tensors[{block + COEF}]", "must be a float32 vector")
            count = info.shape[0]
            if not MIN_DIRECTIONS <= count <= min(block_size(spec, block), limit):
                raise InvalidArgument(
                    f"payload.tensors[{block + COEF}]",
                    f"{count} coefficients, out of range [{MIN_DIRECTIONS}, {min(block_size(spec, block), limit)}]",
                )
            if even and count != even[block]:
                raise InvalidArgument(
                    f"payload.tensors[{block + COEF}]",
                    f"{count} coefficients; the plan shares them evenly: {even[block]}",
                )
            total += count
        if total > limit:
            raise InvalidArgument("payload.tensors", f"{total} coefficients in all, over the plan's {limit}")
        for name, shape in heads.items():
            info = declared.get(name)
            if info is None:
                raise InvalidArgument("payload.tensors", f"missing {name}")
            if info.shape != shape or info.dtype != "float32":
                raise InvalidArgument(
                    f"payload.tensors[{name}]", f"expected float32 {shape}, got {info.dtype} {info.shape}"
                )
        suffix = DELTA if plan.directions == 0 else COEF
        known = {b + suffix for b in plan.target_modules} | set(heads)
        extra = sorted(set(declared) - known)
        if extra:
            raise InvalidArgument("payload.tensors", f"unknown blocks or tensors: {extra[:3]}")

    def _check_delta(self, info: TensorInfo | None, block: str) -> None:
        if info is None:
            raise InvalidArgument("payload.tensors", f"missing {block + DELTA}")
        shape = self.shapes.get(block)
        if info.dtype != "float32" or info.shape != shape:
            raise InvalidArgument(
                f"payload.tensors[{block + DELTA}]", f"expected float32 {shape}, got {info.dtype} {info.shape}"
            )

    def check_values(self, tensors: Mapping[str, torch.Tensor], bound: float) -> None:
        """Coefficients finite (their scale grows with sqrt(d / K); the norm bounds judge their size), heads
        finite and within bound."""
        check_values({n: t for n, t in tensors.items() if n.endswith(COEF)}, 0.0)
        check_values({n: t for n, t in tensors.items() if not n.endswith(COEF)}, bound)  # heads and deltas

    def change_norms(
        self, tensors: Mapping[str, torch.Tensor], global_: GlobalState, plan: TrainPlan, spec: ModelSpec
    ) -> dict[str, float]:
        """Per block the change its coefficients stand for (|c| sqrt(K / d), since E|c|^2 = (d / K)|delta|^2),
        per head the change to the global's."""
        current = _ferret(global_)
        norms: dict[str, float] = {}
        for name, value in tensors.items():
            if name.endswith(COEF):
                size = block_size(spec, name[: -len(COEF)])
                norms[name] = float(value.double().norm()) * math.sqrt(value.numel() / size)
            elif name.endswith(DELTA):
                norms[name] = float(value.double().norm())
            else:
                norms[name] = float((value.double() - current.heads[name].double()).norm())
        return norms

    def scale_change(
        self,
        tensors: Mapping[str, torch.Tensor],
        global_: GlobalState,
        plan: TrainPlan,
        spec: ModelSpec,
        factor: float | Mapping[str, float],
    ) -> dict[str, torch.Tensor]:
        """Coefficients times the factor; heads moved that share of the way from the global's."""
        factors = factor if isinstance(factor, Mapping) else dict.fromkeys(tensors, factor)
        current = _ferret(global_)
        changes = {n for n in tensors if n.endswith((COEF, DELTA))}
        heads = {n: t for n, t in tensors.items() if n not in changes}
        out = scale_change(heads, {n: current.heads[n] for n in heads}, factors)
        out.update({n: tensors[n] * factors.get(n, 1.0) for n in changes})
        return out

    # ------------------------------------------------------------------ aggregation

    def aggregate(
        self, global_: GlobalState, contributions: Sequence[Contribution], strategy: Strategy, round_: int
    ) -> tuple[GlobalState, dict[str, float]]:
        """Per block, over the agents that trained it: their coefficients, zero-padded to the longest, combined
        by the strategy (weighted: the weighted mean of their reconstructions, so still unbiased), then
        reconstructed on the round's directions and added to the block. Heads combined as they are."""
        current = _ferret(global_)
        combined: dict[str, torch.Tensor] = {}
        blocks = dict(current.blocks)
        start = time.perf_counter()
        for block in sorted({b for c in contributions for b in c.plan.target_modules}):
            holders = [c for c in contributions if block in c.plan.target_modules]
            if all(block + DELTA in c.tensors for c in holders):  # exact: the changes themselves
                delta = strategy.combine([c.tensors[block + DELTA] for c in holders], [c.weight for c in holders])
                check_values({block + DELTA: delta}, 0.0, "combined change")
                blocks[block] = current.blocks[block] + delta.to(torch.float32)
                combined[block + DELTA] = delta.to(torch.float32)
                continue
            longest = max(c.tensors[block + COEF].numel() for c in holders)
            padded = [
                torch.nn.functional.pad(c.tensors[block + COEF], (0, longest - c.tensors[block + COEF].numel()))
                for c in holders
            ]
            coefficients = strategy.combine(padded, [c.weight for c in holders]).to(torch.float32)
            check_values({block + COEF: coefficients}, 0.0, "combined coefficients")
            shape = tuple(current.blocks[block].shape)
            delta = reconstruct(coefficients, shape, self.run_seed, round_, block, self.basis)
            blocks[block] = current.blocks[block] + delta
            combined[block + COEF] = coefficients
        self.reconstruction_seconds = time.perf_counter() - start
        heads = dict(current.heads)
        for name in sorted({n for c in contributions for n in c.tensors if not n.endswith((COEF, DELTA))}):
            holders = [c for c in contributions if name in c.tensors]
            heads[name] = strategy.combine([c.tensors[name] for c in holders], [c.weight for c in holders])
        return self._publish(current, blocks, heads, combined, round_, len(contributions))

    def _publish(
        self,
        current: FerretGlobal,
        blocks: dict[str, torch.Tensor],
        heads: dict[str, torch.Tensor],
        combined: dict[str, torch.Tensor],
        round_: int,
        updates: int,
    ) -> tuple[GlobalState, dict[str, float]]:
        """The new global (what takes an agent from the current one: the combined coefficients or changes) and the
        round's figures."""
        new = FerretGlobal(
            round=round_, blocks=blocks, heads=heads, coefficients=combined, previous_digest=self.digest(current)
        )
        moved = {n.rsplit("::", 1)[0] for n in combined}
        squared = sum(float((blocks[b] - current.blocks[b]).double().pow(2).sum()) for b in moved)
        squared += sum(float((heads[h] - current.heads[h]).double().pow(2).sum()) for h in heads if h in current.heads)
        metrics = {
            "updates": float(updates),
            "delta_norm": math.sqrt(squared),
            "directions": float(sum(c.numel() for n, c in combined.items() if n.endswith(COEF))),
            "reconstruction_seconds": self.reconstruction_seconds,
        }
        return new, metrics

    # ------------------------------------------------------------------ the linear path (privacy)

    def even_counts(self, plan: TrainPlan) -> dict[str, int]:
        """Directions per block when they are shared evenly (plan.even_directions): what the agent allots."""
        sizes = {b: block_size(self.spec, b) for b in plan.target_modules}
        return allot(dict.fromkeys(plan.target_modules, 1.0), sizes, plan.directions)

    def linear_layout(
        self, global_: GlobalState, plans: Mapping[str, TrainPlan], counted: Collection[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Per block its coefficients (the longest even share among the plans, shorter ones zero-padded: a zero
        coefficient moves nothing) or its whole change (directions 0), and the heads; each coordinate counted
        once per plan (of the counted agents) that trains the block or head."""
        current = _ferret(global_)
        shapes: dict[str, tuple[int, ...]] = {}
        for plan in plans.values():
            if plan.directions == 0:
                shapes.update({b + DELTA: tuple(current.blocks[b].shape) for b in plan.target_modules})
                continue
            for block, count in self.even_counts(plan).items():
                shapes[block + COEF] = (max(count, shapes.get(block + COEF, (0,))[0]),)
        for plan in plans.values():
            saved = set(plan.modules_to_save)
            shapes.update({h: tuple(v.shape) for h, v in current.heads.items() if h.rsplit(".", 1)[0] in saved})
        counts = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}
        chosen = set(plans) if counted is None else set(counted)
        for agent, plan in sorted(plans.items()):
            if agent not in chosen:
                continue
            saved = set(plan.modules_to_save)
            for name in counts:
                owner = name.rsplit("::", 1)[0] if name.endswith((COEF, DELTA)) else None
                if (owner in plan.target_modules) if owner is not None else name.rsplit(".", 1)[0] in saved:
                    counts[name] += 1.0
        return counts

    def linear_terms(
        self, global_: GlobalState, contribution: Contribution, layout: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The coefficients (or whole changes) as they are, zero-padded; the heads less the global's."""
        current = _ferret(global_)
        return linear.terms(contribution.tensors, dict(current.heads), contribution.plan, linear.shapes(layout))

    def apply_linear(
        self,
        global_: GlobalState,
        sums: Mapping[str, torch.Tensor],
        layout: Mapping[str, torch.Tensor],
        strategy: Strategy,
        round_: int,
    ) -> tuple[GlobalState, dict[str, float]]:
        """The mean coefficients rebuilt on the round's directions (the mean of the agents' reconstructions),
        the mean whole changes and head changes added; broadcast as the round's combined coefficients."""
        current = _ferret(global_)
        start = time.perf_counter()
        blocks, heads = dict(current.blocks), dict(current.heads)
        combined: dict[str, torch.Tensor] = {}
        for name in sorted(layout):
            mean = linear.mean_change(sums[name], layout[name])
            if name.endswith(COEF):
                block = name[: -len(COEF)]
                coefficients = mean.to(torch.float32)
                check_values({name: coefficients}, 0.0, "combined coefficients")
                shape = tuple(current.blocks[block].shape)
                blocks[block] = current.blocks[block] + reconstruct(
                    coefficients, shape, self.run_seed, round_, block, self.basis
                )
                combined[name] = coefficients
            elif name.endswith(DELTA):
                block = name[: -len(DELTA)]
                blocks[block] = current.blocks[block] + mean.to(torch.float32)
                combined[name] = mean.to(torch.float32)
            else:
                heads[name] = (current.heads[name].double() + mean).to(current.heads[name].dtype)
        self.reconstruction_seconds = time.perf_counter() - start
        updates = int(max((float(c.max()) for c in layout.values() if c.numel()), default=0.0))
        return self._publish(current, blocks, heads, combined, round_, updates)

    def check_global(self, global_: GlobalState, bound: float) -> None:
        """Every block and head finite and within bound."""
        current = _ferret(global_)
        check_values({**current.blocks, **current.heads}, bound, "global")

    # ------------------------------------------------------------------ what travels down

    def download(
        self, global_: GlobalState, plan: TrainPlan, spec: ModelSpec, have_digest: str = ""
    ) -> dict[str, torch.Tensor]:
        """Nothing for an agent that holds the global; the last round's combined coefficients and the heads for
        one that holds the previous global; every block and head otherwise (a resync)."""
        current = _ferret(global_)
        if have_digest and have_digest == self.digest(current):
            return {}
        if have_digest and current.coefficients and have_digest == current.previous_digest:
            delta = dict(current.coefficients)  # <block>::coef (or ::delta) of the last round
            delta.update(current.heads)
            return delta
        return {**current.blocks, **current.heads}

    # ------------------------------------------------------------------ persistence

    def state_tensors(self, global_: GlobalState) -> dict[str, torch.Tensor]:
        """block::, head:: and coef:: tensors, and the previous digest as 32 bytes."""
        current = _ferret(global_)
        tensors = {f"block::{n}": t for n, t in current.blocks.items()}
        tensors.update({f"head::{n}": t for n, t in current.heads.items()})
        tensors.update({f"coef::{n}": t for n, t in current.coefficients.items()})
        if current.previous_digest:
            tensors["meta::previous_digest"] = torch.tensor(
                list(bytes.fromhex(current.previous_digest)), dtype=torch.uint8
            )
        return tensors

    def from_state(self, round_: int, tensors: Mapping[str, torch.Tensor]) -> GlobalState:
        """Inverse of state_tensors."""
        parts: dict[str, dict[str, torch.Tensor]] = {"block": {}, "head": {}, "coef": {}}
        previous = ""
        for key, value in tensors.items():
            kind, _, name = key.partition("::")
            if kind == "meta":
                previous = bytes(value.tolist()).hex()
            else:
                parts[kind][name] = value
        return self._held(FerretGlobal(round_, parts["block"], parts["head"], parts["coef"], previous))

    def digest(self, global_: GlobalState) -> str:
        """sha256 over the blocks' and heads' names and bytes: what an agent computes over its own weights."""
        current = _ferret(global_)
        return weights_digest({**current.blocks, **current.heads})

    def write_artifact(self, directory: Path, global_: GlobalState, metadata: Mapping[str, str] | None = None) -> None:
        """weights.safetensors (the trained blocks as <module>.weight, and the heads; `metadata` among its
        metadata) and fedpipe_ferret.json; `fedpipe-export` turns them into a full model."""
        current = _ferret(global_)
        tensors = {f"{n}.weight": t.contiguous() for n, t in current.blocks.items()}
        tensors.update({n: t.contiguous() for n, t in current.heads.items()})
        with atomic_dir(directory) as tmp:
            save_file(
                tensors,
                str(tmp / WEIGHTS_FILE),
                metadata={**(metadata or {}), "format": "pt", "fedpipe_round": str(current.round)},
            )
            write_json(
                tmp / ARTEFACT_FILE,
                {"mode": "ferret", "round": current.round, "base_model": self.base_path, "task": self.spec.task,
                 "labels": list(self.spec.labels), "blocks": sorted(current.blocks), "heads": sorted(current.heads)},
            )  # fmt: skip

    # ------------------------------------------------------------------ the rest

    def trainable_parameters(self, plan: TrainPlan, spec: ModelSpec) -> int:
        """The planned blocks' weights and the heads."""
        heads = sum(math.prod(shape) for name, shape in spec.heads if name.rsplit(".", 1)[0] in plan.modules_to_save)
        return sum(block_size(spec, b) for b in plan.target_modules) + heads

    def describe(self, global_: GlobalState) -> str:
        """How many blocks the global holds."""
        return f"{len(_ferret(global_).blocks)} blocks trained in full"

    def evaluation_model(self, holder: Any, global_: GlobalState, template: TrainPlan, spec: ModelSpec) -> Any:
        """The base with the global's blocks and heads written into it."""
        current = _ferret(global_)
        from common.modeling import write_blocks

        model = holder.base
        write_blocks(model, current.blocks, current.heads)
        return model


class BaseWeights:
    """The base model's block weights in float32, read from the checkpoint once (transformers, on the CPU)."""

    def __init__(self, path: str, spec: ModelSpec) -> None:
        self.path = path
        self.spec = spec
        self._weights: dict[str, torch.Tensor] | None = None

    def block(self, name: str) -> torch.Tensor:
        """One block's weight, float32, a copy."""
        if self._weights is None:
            from common.modeling import block_weight, load_base
            from common.types import Quantization

            model = load_base(self.path, self.spec.labels, Quantization.NONE, torch.device("cpu"), self.spec.task)
            candidates = sorted(m.name for m in self.spec.candidates)
            self._weights = {n: block_weight(model, n).detach().to(torch.float32).clone() for n in candidates}
            del model
        return self._weights[name].clone()

"""Pure torch adapter arithmetic: canonical names, LoRA scaling, rank padding and truncation.

Scaling convention. peft applies a LoRA pair as  dW = (alpha / r) * B @ A  with A of shape (r, d_in) and
B of shape (d_out, r). FedPipe keeps the global adapter *folded*: the factor alpha / r is multiplied into
B, so dW = B_folded @ A whatever the rank. Updates are folded with their own plan's alpha and rank before
they are padded and averaged, and the broadcast is unfolded with the receiving agent's alpha and rank, so
agents with different ranks (or alphas) always exchange the same dW scale.

Canonical tensor names on the wire and in checkpoints: "<module>.lora_A", "<module>.lora_B" for a LoRA
pair on the weight matrix at module path <module>, and the plain parameter name ("classifier.weight")
for heads trained in full.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from common.errors import InvalidArgument
from common.types import GlobalState, ModelSpec, TensorInfo, TrainPlan

PEFT_PREFIX = "base_model.model."
LORA_A = ".lora_A"
LORA_B = ".lora_B"
HEAD_INIT_STD = 0.02  # transformers' default initializer_range for new heads


@dataclass(frozen=True)
class LoraPair:
    """One module's LoRA factors in folded form: dW = b @ a."""

    a: torch.Tensor  # (rank, d_in)
    b: torch.Tensor  # (d_out, rank), alpha / rank already multiplied in

    @property
    def rank(self) -> int:
        """Rank of the pair (rows of A)."""
        return int(self.a.shape[0])


@dataclass(frozen=True)
class GlobalAdapter(GlobalState):
    """The LoRA mode's global state: folded LoRA pairs at the largest rank seen, and full heads."""

    lora: Mapping[str, LoraPair]
    heads: Mapping[str, torch.Tensor]

    def ranks(self) -> dict[str, int]:
        """Rank of each module's global pair."""
        return {name: pair.rank for name, pair in self.lora.items()}


@dataclass(frozen=True)
class FoldedUpdate:
    """An agent's update brought to the folded convention, with its aggregation weight."""

    agent_id: str
    weight: float  # samples processed this round
    lora: Mapping[str, LoraPair]
    heads: Mapping[str, torch.Tensor]


def global_digest(global_: GlobalAdapter) -> str:
    """sha256 over the round and every tensor's name, dtype, shape and bytes, in sorted name order."""
    named: dict[str, torch.Tensor] = {f"head::{n}": t for n, t in global_.heads.items()}
    for module, pair in global_.lora.items():
        named[f"lora::{module}::a"], named[f"lora::{module}::b"] = pair.a, pair.b
    digest = hashlib.sha256(f"round {global_.round}".encode())
    for name in sorted(named):
        tensor = named[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def scaling(alpha: float, rank: int) -> float:
    """peft's LoRA scale factor (non-rslora)."""
    return alpha / rank


def fold(a: torch.Tensor, b: torch.Tensor, alpha: float) -> LoraPair:
    """Multiply peft's alpha / r into B so the pair's product is dW itself."""
    return LoraPair(a=a, b=b * scaling(alpha, int(a.shape[0])))


def unfold(pair: LoraPair, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of fold for a peft adapter with this alpha at the pair's rank: returns (A, B)."""
    return pair.a, pair.b / scaling(alpha, pair.rank)


def pad_rank(pair: LoraPair, rank: int) -> LoraPair:
    """Zero-pad A's rows and B's columns up to rank; dW is unchanged."""
    extra = rank - pair.rank
    if extra < 0:
        raise ValueError(f"cannot pad rank {pair.rank} down to {rank}")
    if extra == 0:
        return pair
    a = torch.cat([pair.a, pair.a.new_zeros(extra, pair.a.shape[1])], dim=0)
    b = torch.cat([pair.b, pair.b.new_zeros(pair.b.shape[0], extra)], dim=1)
    return LoraPair(a=a, b=b)


def truncate_rank(pair: LoraPair, rank: int) -> LoraPair:
    """Keep the first rank slots: A[:rank], B[:, :rank]."""
    if rank > pair.rank:
        raise ValueError(f"cannot truncate rank {pair.rank} up to {rank}")
    return LoraPair(a=pair.a[:rank].clone(), b=pair.b[:, :rank].clone())


_LAYER = re.compile(r"\.(\d+)\.")


@functools.lru_cache(maxsize=65536)
def layer_index(module: str) -> int | None:
    """The transformer layer a module name sits in (the first dotted number: "...layer.3.attention..." is 3,
    "model.layers.3.self_attn.q_proj" 3, "transformer.h.0.attn.c_attn" 0); None when the name has none."""
    match = _LAYER.search(module)
    return int(match.group(1)) if match else None


def layer_count(spec: ModelSpec) -> int:
    """Transformer layers of a spec's candidates (1 + the largest layer index; 0 when none has one)."""
    indices = [i for i in (layer_index(m.name) for m in spec.candidates) if i is not None]
    return 1 + max(indices) if indices else 0


def last_layer_modules(spec: ModelSpec) -> tuple[str, ...]:
    """The candidates of the last transformer layer (what a shallow calibration run trains)."""
    last = layer_count(spec) - 1
    return tuple(m.name for m in spec.candidates if layer_index(m.name) == last)


def backward_layers(spec: ModelSpec, modules: Iterable[str]) -> int:
    """Layers the backward pass runs through when these modules train: from the earliest of them to the top
    (autograd keeps no activations below the first tensor that needs a gradient). All layers when a module
    has no layer index or the spec has none."""
    total = layer_count(spec)
    indices = [layer_index(m) for m in modules]
    if total == 0 or not indices or any(i is None for i in indices):
        return total
    return total - min(i for i in indices if i is not None)


def lora_names(module: str) -> tuple[str, str]:
    """Canonical names of a module's A and B tensors."""
    return module + LORA_A, module + LORA_B


def lora_module(name: str) -> str | None:
    """The module whose A or B tensor this canonical name is (lora_names' inverse); None for any other name."""
    for suffix in (LORA_A, LORA_B):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return None


def to_peft_key(name: str) -> str:
    """Canonical name -> key in peft's adapter state dict (get_peft_model_state_dict)."""
    if name.endswith(LORA_A) or name.endswith(LORA_B):
        return f"{PEFT_PREFIX}{name}.weight"
    return PEFT_PREFIX + name


def from_peft_key(key: str) -> str:
    """Key in peft's adapter state dict -> canonical name; drops the adapter name if present."""
    if not key.startswith(PEFT_PREFIX):
        raise ValueError(f"not a peft adapter key: {key!r}")
    name = key[len(PEFT_PREFIX) :]
    # The longer pattern first: replacing ".default." first would leave "classifier.modules_to_save.weight".
    for part in (".modules_to_save.default.", ".default."):
        name = name.replace(part, ".")
    if name.endswith(".lora_A.weight") or name.endswith(".lora_B.weight"):
        return name[: -len(".weight")]
    return name


def head_modules(spec: ModelSpec) -> tuple[str, ...]:
    """Module names of the spec's heads, for peft's modules_to_save."""
    names: list[str] = []
    for tensor_name, _ in spec.heads:
        module = tensor_name.rsplit(".", 1)[0]
        if module not in names:
            names.append(module)
    return tuple(names)


def expected_tensors(plan: TrainPlan, spec: ModelSpec) -> list[TensorInfo]:
    """The exact tensors (names, shapes, fp32) an agent must upload for this plan, in wire order."""
    infos: list[TensorInfo] = []
    for module in plan.target_modules:
        shape = spec.candidate(module)
        rank = plan.rank_pattern[module]
        a_name, b_name = lora_names(module)
        infos.append(TensorInfo(a_name, (rank, shape.in_features), "float32"))
        infos.append(TensorInfo(b_name, (shape.out_features, rank), "float32"))
    saved = set(plan.modules_to_save)
    for name, head_shape in spec.heads:
        if name.rsplit(".", 1)[0] in saved:
            infos.append(TensorInfo(name, head_shape, "float32"))
    return infos


def fresh_pair(in_features: int, out_features: int, rank: int, generator: torch.Generator) -> LoraPair:
    """A new pair as peft initialises one: A Kaiming-uniform, B = 0, so dW = 0."""
    # kaiming_uniform_(a=sqrt(5)) on (rank, d_in) is U(-1/sqrt(d_in), 1/sqrt(d_in)), as in peft.
    bound = 1.0 / math.sqrt(in_features)
    a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
    return LoraPair(a=a, b=torch.zeros(out_features, rank))


def init_global(spec: ModelSpec, plan: TrainPlan, seed: int) -> GlobalAdapter:
    """Round-0 global adapter: fresh pairs at the plan's ranks, heads N(0, 0.02) with zero bias.

    Every module and head draws from its own generator (seed and name), so the head, and each module's
    leading rank slots, start the same whatever the planner chose for the other modules.
    """
    lora: dict[str, LoraPair] = {}
    for module in plan.target_modules:
        shape = spec.candidate(module)
        generator = named_generator(seed, module)
        lora[module] = fresh_pair(shape.in_features, shape.out_features, plan.rank_pattern[module], generator)
    return GlobalAdapter(round=0, lora=lora, heads=init_heads(spec, plan.modules_to_save, seed))


def init_heads(spec: ModelSpec, modules_to_save: Iterable[str], seed: int) -> dict[str, torch.Tensor]:
    """Round-0 heads of the saved head modules: weights N(0, 0.02) from their own generator, biases zero."""
    heads: dict[str, torch.Tensor] = {}
    saved = set(modules_to_save)
    for name, head_shape in spec.heads:
        if name.rsplit(".", 1)[0] not in saved:
            continue
        if len(head_shape) >= 2:
            heads[name] = torch.randn(*head_shape, generator=named_generator(seed, name)) * HEAD_INIT_STD
        else:
            heads[name] = torch.zeros(*head_shape)
    return heads


def named_generator(seed: int, name: str) -> torch.Generator:
    """A generator for one tensor: the seed and the tensor's name, independent of every other draw."""
    return torch.Generator().manual_seed((zlib.crc32(name.encode()) << 20) ^ seed)


def slot_generator(global_round: int, module: str) -> torch.Generator:
    """Seed for fresh slots of one module at one global round: equal on every agent, so all start alike."""
    return named_generator(global_round, module)


def with_modules(global_: GlobalAdapter, ranks: Mapping[str, int], spec: ModelSpec) -> GlobalAdapter:
    """The global adapter plus a fresh pair (A random, B = 0, so dW = 0) for each module it lacks."""
    lora = dict(global_.lora)
    for module, rank in ranks.items():
        if module not in lora:
            shape = spec.candidate(module)
            lora[module] = fresh_pair(
                shape.in_features, shape.out_features, rank, slot_generator(global_.round, module)
            )
    return GlobalAdapter(round=global_.round, lora=lora, heads=global_.heads)


def extended_pair(global_: GlobalAdapter, module: str, rank: int, spec: ModelSpec) -> LoraPair:
    """The global's folded pair for module with slots past its rank (or all, for a module it lacks) as peft
    starts them, A random and B = 0, drawn from a seed of the global round and module: what every agent
    training the module at up to `rank` is sent (broadcast_tensors), before truncation."""
    shape = spec.candidate(module)
    pair = global_.lora.get(module)
    generator = slot_generator(global_.round, module)
    if pair is None:
        return fresh_pair(shape.in_features, shape.out_features, rank, generator)
    if rank <= pair.rank:
        return pair
    # Draw the full rank and keep the tail, so an agent at rank 8 and one at 16 share slots 5..8.
    fresh = fresh_pair(shape.in_features, shape.out_features, rank, generator)
    return LoraPair(a=torch.cat([pair.a, fresh.a[pair.rank :]]), b=torch.cat([pair.b, fresh.b[:, pair.rank :]], dim=1))


def broadcast_tensors(global_: GlobalAdapter, plan: TrainPlan, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The global adapter as one agent must load it: truncated to its ranks, unfolded with its alpha.

    A module the global adapter lacks, or rank slots beyond the global rank, start as peft would start
    them, A random and B = 0 (dW unchanged; zero A and zero B would never move), drawn from a seed of the
    global round and module, so every agent that receives them gets the same values.
    """
    names = [name for module in plan.target_modules for name in lora_names(module)] + list(global_.heads)
    return {name: view.clone() for name, view in sent_views(global_, plan, spec, names).items()}


def sent_views(
    global_: GlobalAdapter, plan: TrainPlan, spec: ModelSpec, names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """The named tensors of broadcast_tensors(global_, plan, spec), in the order named, as views of the global
    where they can be (rank truncation is a slice; only B's unfolding writes a new tensor): for reading, as the
    upload screening does, never for keeping. A name the plan does not send is absent."""
    views: dict[str, torch.Tensor] = {}
    pairs: dict[str, LoraPair] = {}  # a module's A and B come from one extended pair (its new slots drawn once)
    targets, saved = set(plan.target_modules), set(plan.modules_to_save)
    for name in names:
        module = lora_module(name)
        if module is not None and module in targets:
            rank = plan.rank_pattern[module]
            if module not in pairs:
                pairs[module] = extended_pair(global_, module, rank, spec)
            pair = pairs[module]
            is_a = name.endswith(LORA_A)
            views[name] = pair.a[:rank] if is_a else pair.b[:, :rank] / scaling(plan.alpha_of(module), rank)
        elif name in global_.heads and name.rsplit(".", 1)[0] in saved:
            views[name] = global_.heads[name]
    return views


def fold_update(agent_id: str, weight: float, tensors: Mapping[str, torch.Tensor], plan: TrainPlan) -> FoldedUpdate:
    """An agent's uploaded tensors (canonical names, plan's ranks) in the folded convention."""
    lora: dict[str, LoraPair] = {}
    for module in plan.target_modules:
        a_name, b_name = lora_names(module)
        a = tensors[a_name].to(torch.float32)
        b = tensors[b_name].to(torch.float32)
        lora[module] = fold(a, b, plan.alpha_of(module))
    heads = {
        name: value.to(torch.float32)
        for name, value in tensors.items()
        if not (name.endswith(LORA_A) or name.endswith(LORA_B))
    }
    return FoldedUpdate(agent_id=agent_id, weight=weight, lora=lora, heads=heads)


def check_tensors(tensors: Mapping[str, torch.Tensor], expected: Iterable[TensorInfo], finite: bool = True) -> None:
    """Raise InvalidArgument naming the first tensor whose name, shape or dtype is off, or (finite) non-finite."""
    wanted = {info.name: info for info in expected}
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise InvalidArgument("tensors", f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    extra = sorted(set(tensors) - set(wanted))
    if extra:
        raise InvalidArgument("tensors", f"not in the plan: {extra[:3]}{' ...' if len(extra) > 3 else ''}")
    for name, info in wanted.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != info.shape:
            raise InvalidArgument(f"tensors[{name}].shape", f"expected {info.shape}, got {tuple(tensor.shape)}")
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype != info.dtype:
            raise InvalidArgument(f"tensors[{name}].dtype", f"expected {info.dtype}, got {dtype}")
        if finite and not bool(torch.isfinite(tensor).all()):
            raise InvalidArgument(f"tensors[{name}]", "holds NaN or Inf values")


def check_values(tensors: Mapping[str, torch.Tensor], bound: float, what: str = "tensors") -> None:
    """Every value finite and, with bound > 0, |value| <= bound; InvalidArgument names the first tensor off."""
    for name, tensor in tensors.items():
        if not tensor.numel():
            continue
        # One pass that allocates nothing: min and max propagate NaN, and an Inf is the min or the max.
        low, high = (float(v) for v in torch.aminmax(tensor))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise InvalidArgument(f"{what}[{name}]", "holds NaN or Inf values")
        peak = max(-low, high)
        if bound > 0 and peak > bound:
            raise InvalidArgument(f"{what}[{name}]", f"holds |value| {peak:.4g} over updates.max_abs_value {bound:g}")


def global_to_peft(global_: GlobalAdapter, alpha: float) -> dict[str, torch.Tensor]:
    """The global adapter as a peft state dict at each module's global rank (for safetensors)."""
    state: dict[str, torch.Tensor] = {}
    for module, pair in global_.lora.items():
        a, b = unfold(pair, alpha)
        a_name, b_name = lora_names(module)
        state[to_peft_key(a_name)] = a.contiguous()
        state[to_peft_key(b_name)] = b.contiguous()
    for name, value in global_.heads.items():
        state[to_peft_key(name)] = value.contiguous()
    return state


def lora_parameter_count(ranks: Mapping[str, int], spec: ModelSpec) -> int:
    """Trainable LoRA parameters for these module ranks: r * (d_in + d_out) each."""
    total = 0
    for module, rank in ranks.items():
        shape = spec.candidate(module)
        total += rank * (shape.in_features + shape.out_features)
    return total


def change_norms(tensors: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor, the L2 norm of the change from what an agent was sent to what it returned, summed in float64."""
    return {name: _difference_norm(tensors[name], before) for name, before in sent.items()}


def _difference_norm(after: torch.Tensor, before: torch.Tensor) -> float:
    # A float32 (or float64) difference is correctly rounded, within 2^-24 of each element's own change, so the
    # subtraction may stay in the tensors' dtype and only the sum of squares needs float64: half the passes of
    # converting both sides first. Narrower dtypes (bf16, fp16) would round the change itself: float64 first.
    if after.dtype in (torch.float32, torch.float64) and after.dtype == before.dtype:
        return float((after - before).double().norm())
    return float((after.double() - before.double()).norm())


def change_norm(tensors: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of the change from the tensors an agent was sent to the ones it returned, in float64."""
    return math.sqrt(sum(norm * norm for norm in change_norms(tensors, sent).values()))


def scale_change(
    tensors: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor], factor: float | Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """sent + factor * (tensors - sent), per tensor (one factor, or one per tensor name, default 1), in each
    tensor's own dtype."""
    factors = factor if isinstance(factor, Mapping) else dict.fromkeys(sent, factor)
    return {
        name: (before.double() + factors.get(name, 1.0) * (tensors[name].double() - before.double())).to(
            tensors[name].dtype
        )
        for name, before in sent.items()
    }

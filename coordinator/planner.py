"""Per-agent plans: profiles + model spec + mask in, one TrainPlan per agent out. Pure functions.

`uniform` gives every agent the same configuration; it stays as the baseline the paper compares with.
`fedpipe` (METHOD.md section 2) gives each agent its own batch size, LoRA rank, base precision and mask
subset from its measured profile: every feasible configuration is priced by the cost model, the round
time T is the smallest (bisection) at which the data-weighted under-training rate is within the allowed
bound, and at that T one configuration per agent is chosen exactly by a MILP over one-hot binaries
(coordinator.solver): least under-training first, then rank capacity, then precision. Each agent then
trains for about T: faster agents process more samples (aggregation weighs them by samples).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from common.adapters import head_modules
from common.errors import ConfigError
from common.types import DeviceProfile, ModelSpec, Quantization, TrainPlan
from coordinator import costmodel, solver
from coordinator import ranks as rank_allocation


@dataclass(frozen=True)
class PlanOptions:
    """Run-wide settings the planner turns into plans."""

    targets: tuple[str, ...]  # module suffixes, or ("all",)
    rank: int
    alpha: float
    dropout: float
    batch_size: int
    local_epochs: int
    max_steps: int
    learning_rate: float
    weight_decay: float
    max_seq_len: int
    quantization: Quantization
    deadline_s: float
    seed: int
    search: SearchSpace = field(default_factory=lambda: SearchSpace())
    mode: str = "lora"  # training mode: "lora" or "ferret" (the mask trained in full)
    optimizer: str = "adamw"  # local optimizer
    directions: int = 0  # ferret: the round's projection budget per agent
    basis: str = "rademacher"  # ferret: the directions' distribution
    proximal_mu: float = 0.0  # FedProx's proximal weight, passed to every plan
    agent_ranks: Mapping[str, int] = field(default_factory=dict)  # uniform planner: a fixed rank per agent
    track_importance: bool = False  # agents score their trained matrices while training (re-selection)
    scores: Mapping[str, float] = field(default_factory=dict)  # importance per mask module, for subsets
    corrections: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # agent -> (time, memory)


@dataclass(frozen=True)
class SearchSpace:
    """The fedpipe planner's discrete choices and limits."""

    ranks: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    quantizations: tuple[Quantization, ...] = (Quantization.NONE, Quantization.INT8, Quantization.NF4)
    mask_fractions: tuple[float, ...] = (1.0, 0.5)  # a weak agent may train the top half of the mask
    max_under_training: float = 0.0  # allowed data-weighted under-training rate at the chosen T
    max_local_epochs: int = 4  # a fast agent trains at most this many epochs in T
    round_time_slack: float = 0.1  # T is this much above the shortest feasible, room for richer configurations
    memory_headroom: float = 0.1  # plan to (1 - headroom) of the usable memory
    bandwidth_bytes_per_s: float = 12.5e6  # assumed link speed for transfer time (100 Mbit/s)
    max_round_upload_bytes: int = 0  # bound on the round's total upload (0 = none): couples the agents
    rank_allocation: str = "uniform"  # "per-matrix": the chosen budget spread over the mask by importance
    matrix_ranks: tuple[int, ...] = ()  # ranks the per-matrix allocation may give (empty: `ranks`)


@dataclass(frozen=True)
class Prediction:
    """What the cost model expects of one agent's plan, and what limits it."""

    peak_memory_bytes: int
    usable_memory_bytes: int
    step_seconds: float
    steps: int
    samples: int
    round_seconds: float  # training plus transfer
    under_training: float
    binding: str  # "memory", "deadline" or "none"


@dataclass(frozen=True)
class PlanSet:
    """The planner's answer for one round."""

    plans: dict[str, TrainPlan]
    predictions: dict[str, Prediction] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)  # agent -> the reason it was left out
    round_seconds: float = 0.0  # T, the training time every planned agent is sized to


def resolve_targets(spec: ModelSpec, targets: tuple[str, ...]) -> tuple[str, ...]:
    """Full module names of the candidates matching the suffixes, in model order; ConfigError if none match."""
    if targets == ("all",):
        return tuple(m.name for m in spec.candidates)
    chosen = tuple(m.name for m in spec.candidates if any(m.name == t or m.name.endswith("." + t) for t in targets))
    unmatched = [t for t in targets if not any(m == t or m.endswith("." + t) for m in chosen)]
    if unmatched:
        kinds = sorted({m.name.split(".")[-1] for m in spec.candidates})
        raise ConfigError(f"lora.targets: {unmatched} match no candidate of {spec.model_type} (ends: {kinds})")
    return chosen


def plan_id(round_: int, agent_id: str, fields: Mapping[str, object]) -> str:
    """A short stable id for a plan: round, agent and a hash of its contents."""
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"r{round_}-{agent_id}-{digest}"


def _make_plan(
    options: PlanOptions,
    round_: int,
    agent_id: str,
    index: int,
    spec: ModelSpec,
    modules: tuple[str, ...],
    rank: int,
    batch_size: int,
    quantization: Quantization,
    local_epochs: int,
    max_steps: int,
    ranks: Mapping[str, int] | None = None,
    placement: str = costmodel.REPLICAS,
) -> TrainPlan:
    """ranks: a rank per module (per-matrix allocation); else `rank` on every module."""
    ferret = options.mode == "ferret"
    pattern = {} if ferret else dict(ranks) if ranks else dict.fromkeys(modules, rank)
    top = max(pattern.values(), default=rank)
    # Alpha grows with the rank (alpha / r stays the configured scale), so ranks share one update scale; the
    # plan's alpha is at its largest rank and TrainPlan.alpha_of scales it down for smaller ones.
    alpha = options.alpha * top / options.rank
    fields = {
        "modules": modules,
        "rank": rank,
        "ranks": sorted(pattern.items()),
        "alpha": alpha,
        "batch": batch_size,
        "quant": quantization.value,
        "lr": options.learning_rate,
        "epochs": local_epochs,
        "steps": max_steps,
        "mode": options.mode,
        "optimizer": options.optimizer,
        "directions": options.directions,
        "placement": placement,
    }
    return TrainPlan(
        plan_id=plan_id(round_, agent_id, fields),
        target_modules=modules,
        rank_pattern=pattern,
        lora_alpha=alpha,
        lora_dropout=options.dropout,
        modules_to_save=head_modules(spec),
        batch_size=batch_size,
        local_epochs=local_epochs,
        max_steps=max_steps,
        learning_rate=options.learning_rate,
        weight_decay=options.weight_decay,
        quantization=quantization,
        max_seq_len=options.max_seq_len,
        deadline_s=options.deadline_s,
        seed=options.seed * 1_000_003 + round_ * 1_009 + index,
        mode=options.mode,
        optimizer=options.optimizer,
        directions=options.directions if ferret else 0,
        basis=options.basis,
        shared_seed=options.seed,
        proximal_mu=options.proximal_mu,
        track_importance=options.track_importance and not ferret,
        placement=placement,
    )


def _price(
    profile: DeviceProfile,
    spec: ModelSpec,
    options: PlanOptions,
    agent_id: str,
    config: costmodel.Config,
    coefficients: costmodel.Fit | None = None,
) -> costmodel.Cost:
    time_scale, memory_scale = options.corrections.get(agent_id, (1.0, 1.0))
    return costmodel.predict(
        profile,
        spec,
        coefficients or costmodel.fit(profile, spec),
        config,
        options.max_seq_len,
        options.search.bandwidth_bytes_per_s,
        time_scale,
        memory_scale,
    )


def _config(
    options: PlanOptions,
    batch_size: int,
    rank: int,
    quantization: Quantization,
    modules: tuple[str, ...],
    placement: str = costmodel.REPLICAS,
) -> costmodel.Config:
    return costmodel.Config(
        batch_size, rank, quantization, modules, options.mode, options.optimizer, options.directions,
        dropout=options.dropout, placement=placement,
    )  # fmt: skip


def _layouts(profile: DeviceProfile, search: SearchSpace, mode: str) -> frozenset[tuple[str, int]]:
    """The (placement, batch size) an agent may get. REPLICAS at planning.batch_sizes per device, so a
    data-parallel agent's (LoRA) batch is that times its devices, each device taking an equal share; a LoRA agent
    of several GPUs may also get LAYERS at planning.batch_sizes (its base split over them, every batch through
    all of them). CPU worker processes share one memory, which a split would not divide."""
    world = profile.world if mode == "lora" else 1
    layouts = {(costmodel.REPLICAS, b * world) for b in search.batch_sizes}
    if _splittable(profile, mode):
        layouts |= {(costmodel.LAYERS, b) for b in search.batch_sizes}
    return frozenset(layouts)


def _splittable(profile: DeviceProfile, mode: str) -> bool:
    """Whether a base may be split by layers over the agent's devices: LoRA on two GPUs or more."""
    return mode == "lora" and profile.can_split


def _layout(config: costmodel.Config) -> tuple[str, int]:
    return config.placement, config.batch_size


def _usable(profile: DeviceProfile, search: SearchSpace) -> int:
    return int(profile.total_memory_bytes * (1 - search.memory_headroom))


def uniform_plan(profiles: Mapping[str, DeviceProfile], spec: ModelSpec, options: PlanOptions, round_: int) -> PlanSet:
    """The same configuration for every agent (seeds differ per agent so dropout and order differ)."""
    modules = resolve_targets(spec, options.targets)
    plans: dict[str, TrainPlan] = {}
    predictions: dict[str, Prediction] = {}
    per_matrix = options.search.rank_allocation == "per-matrix" and options.mode == "lora"
    for index, agent_id in enumerate(sorted(profiles)):
        rank = options.agent_ranks.get(agent_id, options.rank)
        config = _config(options, options.batch_size, rank, options.quantization, modules)
        if per_matrix:
            config = _spread(config, modules, spec, options)
        profile = profiles[agent_id]
        cost = _price(profile, spec, options, agent_id, config)
        if _splittable(profile, options.mode) and cost.peak_memory_bytes > _usable(profile, options.search):
            # The base does not fit beside the batch on one device: split it over them, if that fits.
            split = replace(config, placement=costmodel.LAYERS)
            split_cost = _price(profile, spec, options, agent_id, split)
            if split_cost.peak_memory_bytes <= _usable(profile, options.search):
                config, cost = split, split_cost
        plan = _make_plan(
            options,
            round_,
            agent_id,
            index,
            spec,
            config.modules,
            rank,
            options.batch_size,
            options.quantization,
            options.local_epochs,
            options.max_steps,
            dict(config.rank_pattern) or None,
            config.placement,
        )
        plans[agent_id] = plan
        steps = plan.steps_for(profile.num_train_samples)
        predictions[agent_id] = Prediction(
            peak_memory_bytes=round(cost.peak_memory_bytes),
            usable_memory_bytes=_usable(profile, options.search),
            step_seconds=cost.step_seconds,
            steps=steps,
            samples=min(steps * plan.batch_size, plan.local_epochs * profile.num_train_samples),
            round_seconds=steps * cost.step_seconds + cost.transfer_seconds,
            under_training=0.0,
            binding="none",
        )
    return PlanSet(plans=plans, predictions=predictions)


PRECISION = {Quantization.NONE: 1.0, Quantization.INT8: 0.5, Quantization.NF4: 0.25}
W_UNDER, W_CAPACITY, W_PRECISION = 1e7, 1e2, 1.0  # lexicographic: under-training, then rank, then precision
W_LAYERS = 1e-3  # below every other term: between equals, replicas (they also run the batch n times faster)
BISECTION_STEPS = 30


@dataclass(frozen=True)
class _Choice:
    config: costmodel.Config
    cost: costmodel.Cost


def mask_subsets(
    modules: tuple[str, ...], scores: Mapping[str, float], fractions: tuple[float, ...]
) -> list[tuple[str, ...]]:
    """The mask and its top fractions by importance (model order kept), without duplicates."""
    ranked = sorted(modules, key=lambda m: (-scores.get(m, 0.0), modules.index(m)))
    subsets: list[tuple[str, ...]] = []
    for fraction in sorted(fractions, reverse=True):
        keep = set(ranked[: max(1, math.ceil(fraction * len(modules)))])
        subset = tuple(m for m in modules if m in keep)
        if subset not in subsets:
            subsets.append(subset)
    return subsets


@functools.lru_cache(maxsize=4096)  # asked per agent and choice while the round time is searched
def capacity(config: costmodel.Config) -> int:
    """What a configuration trains: rank slots over its matrices (LoRA), or its matrices (trained in full)."""
    if config.mode != "lora":
        return len(config.modules)
    return sum(r for _, r in config.module_ranks())


def steps_within(cost: costmodel.Cost, seconds: float) -> int:
    """Whole steps that fit in `seconds` after the transfer."""
    return max(0, math.floor((seconds - cost.transfer_seconds) / cost.step_seconds))


def under_training(cost: costmodel.Cost, batch_size: int, target: int, seconds: float) -> float:
    """u = max(0, 1 - samples done in `seconds` / target)."""
    return max(0.0, 1.0 - min(steps_within(cost, seconds) * batch_size, target) / target)


def fedpipe_plan(profiles: Mapping[str, DeviceProfile], spec: ModelSpec, options: PlanOptions, round_: int) -> PlanSet:
    """Per-agent batch, rank, precision and mask subset from measured profiles (module docstring)."""
    search = options.search
    modules = resolve_targets(spec, options.targets)
    subsets = mask_subsets(modules, options.scores, search.mask_fractions)
    ranks = (0,) if options.mode == "ferret" else search.ranks  # Ferret trains its blocks in full
    batches = {a: _layouts(profiles[a], search, options.mode) for a in profiles}
    every_layout = sorted(set().union(*batches.values()))
    configs = [
        _config(options, b, r, q, subset, placement)
        for subset in subsets
        for q in search.quantizations
        for r in ranks
        for placement, b in every_layout
    ]
    max_capacity = max(1, max(ranks) * len(modules)) if options.mode == "lora" else len(modules)
    feasible: dict[str, list[_Choice]] = {}
    excluded: dict[str, str] = {}
    statics: dict[int, list[costmodel.Static]] = {}  # per compute width, per configuration: shared by all agents
    for agent_id in sorted(profiles):
        profile = profiles[agent_id]
        usable = _usable(profile, search)
        try:
            coefficients = costmodel.fit(profile, spec)
            element = costmodel.compute_bytes(profile)
            if element not in statics:
                statics[element] = [costmodel.static_cost(spec, c, element) for c in configs]
            time_scale, memory_scale = options.corrections.get(agent_id, (1.0, 1.0))
            costs = costmodel.predict_many(
                profile, spec, coefficients, configs, statics[element], options.max_seq_len,
                search.bandwidth_bytes_per_s, time_scale, memory_scale,
            )  # fmt: skip
            allowed = batches[agent_id]
            priced = [_Choice(c, cost) for c, cost in zip(configs, costs, strict=True) if _layout(c) in allowed]
        except (ArithmeticError, ValueError) as err:  # profiles are bounded at registration; this is the backstop
            excluded[agent_id] = f"its profile cannot be priced ({err})"
            continue
        # A figure no arithmetic should give (NaN, Inf) makes a configuration unusable, not the planner fail.
        priced = [
            ch for ch in priced if math.isfinite(ch.cost.peak_memory_bytes) and math.isfinite(ch.cost.step_seconds)
        ]
        if not priced:
            excluded[agent_id] = "its profile prices no configuration to a finite memory and step time"
            continue
        fits = [choice for choice in priced if choice.cost.peak_memory_bytes <= usable]
        if not fits:
            smallest = min(priced, key=lambda ch: ch.cost.peak_memory_bytes)
            excluded[agent_id] = (
                f"needs {smallest.cost.peak_memory_bytes / 2**30:.2f} GiB at its smallest configuration (batch "
                f"{smallest.config.batch_size}, rank {smallest.config.rank}, {smallest.config.quantization.value}, "
                f"{len(smallest.config.modules)} matrices), has {usable / 2**30:.2f} GiB usable"
            )
        else:
            feasible[agent_id] = fits
    if not feasible:
        return PlanSet(plans={}, excluded=excluded)
    targets = {a: max(1, options.local_epochs * profiles[a].num_train_samples) for a in feasible}

    def target(agent_id: str, batch_size: int) -> int:
        # training.max_steps caps the work asked of a round, so the round time shrinks with it.
        full = targets[agent_id]
        return min(full, options.max_steps * batch_size) if options.max_steps > 0 else full

    total = sum(profiles[a].num_train_samples for a in feasible) or 1
    weights = {a: profiles[a].num_train_samples / total for a in feasible}

    # Every agent's options laid end to end, and what of their objective does not depend on the round time T:
    # the bisection over T then prices all options at once.
    agents = list(feasible)
    sizes = [len(feasible[a]) for a in agents]
    flat = [choice for a in agents for choice in feasible[a]]
    step = np.array([ch.cost.step_seconds for ch in flat])
    transfer = np.array([ch.cost.transfer_seconds for ch in flat])
    batch = np.array([ch.config.batch_size for ch in flat], dtype=float)
    wanted = np.array([target(a, ch.config.batch_size) for a in agents for ch in feasible[a]], dtype=float)
    weight = np.repeat([weights[a] for a in agents], sizes)
    richness = {
        id(c): W_CAPACITY * capacity(c) / max_capacity
        + W_PRECISION * PRECISION[c.quantization]
        - W_LAYERS * (c.placement == costmodel.LAYERS)
        for c in configs
    }
    static = np.array([richness[id(choice.config)] for choice in flat])
    uploads = np.array([ch.cost.payload_bytes for ch in flat], dtype=float)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)

    def weighted_under(seconds: float) -> tuple[list[int], float]:
        # under_training, vectorised: u = max(0, 1 - min(steps within T x batch, target) / target)
        steps = np.maximum(0.0, np.floor((seconds - transfer) / step))
        under = np.maximum(0.0, 1.0 - np.minimum(steps * batch, wanted) / wanted)
        costs = W_UNDER * weight * under - static
        chosen = solver.solve_flat(costs, sizes, uploads, search.max_round_upload_bytes)
        picked = starts + np.array(chosen, dtype=int)
        return chosen, float(np.sum(weight[picked] * under[picked]))

    high = options.deadline_s
    chosen, u_high = weighted_under(high)
    seconds = high
    if u_high <= search.max_under_training + 1e-12:
        low = 0.0
        for _ in range(BISECTION_STEPS):  # u(T) never increases with T, so bisection finds the smallest T
            middle = (low + high) / 2
            if weighted_under(middle)[1] <= search.max_under_training + 1e-12:
                high = middle
            else:
                low = middle
        # A little more than the shortest T lets slow agents afford richer configurations (rank, precision).
        seconds = min(options.deadline_s, high * (1 + search.round_time_slack))
        chosen, _ = weighted_under(seconds)
    plans: dict[str, TrainPlan] = {}
    predictions: dict[str, Prediction] = {}
    keys = [(id(c), _richness(c), _layout(c)) for c in configs]
    for index, (agent_id, pick) in enumerate(zip(feasible, chosen, strict=True)):
        choice = feasible[agent_id][pick]
        if search.rank_allocation == "per-matrix" and options.mode == "lora":
            choice = _per_matrix(choice, modules, spec, options, profiles[agent_id], agent_id)
        config, cost = choice.config, choice.cost
        n = profiles[agent_id].num_train_samples
        epoch_steps = max(1, math.ceil(n / config.batch_size))
        steps = max(1, min(steps_within(cost, seconds), search.max_local_epochs * epoch_steps))
        if options.max_steps > 0:
            steps = min(steps, options.max_steps)
        plans[agent_id] = _make_plan(
            options,
            round_,
            agent_id,
            index,
            spec,
            config.modules,
            config.rank,
            config.batch_size,
            config.quantization,
            search.max_local_epochs,
            steps,
            dict(config.rank_pattern) or None,
            config.placement,
        )
        u = under_training(cost, config.batch_size, target(agent_id, config.batch_size), seconds)
        predictions[agent_id] = Prediction(
            peak_memory_bytes=round(cost.peak_memory_bytes),
            usable_memory_bytes=_usable(profiles[agent_id], search),
            step_seconds=cost.step_seconds,
            steps=steps,
            samples=steps * config.batch_size,
            round_seconds=steps * cost.step_seconds + cost.transfer_seconds,
            under_training=u,
            binding=_binding(choice, feasible[agent_id], [k[:2] for k in keys if k[2] in batches[agent_id]], u),
        )
    return PlanSet(plans=plans, predictions=predictions, excluded=excluded, round_seconds=seconds)


def _per_matrix(
    choice: _Choice,
    modules: tuple[str, ...],
    spec: ModelSpec,
    options: PlanOptions,
    profile: DeviceProfile,
    agent_id: str,
) -> _Choice:
    """The chosen configuration with its LoRA parameter budget spread over the whole mask (_spread), priced
    again at the ranks given: the same or fewer parameters, so memory, step time and upload stay within
    what was planned."""
    per_matrix = _spread(choice.config, modules, spec, options)
    return _Choice(per_matrix, _price(profile, spec, options, agent_id, per_matrix))


def _spread(
    config: costmodel.Config, modules: tuple[str, ...], spec: ModelSpec, options: PlanOptions
) -> costmodel.Config:
    """A configuration's LoRA parameters (its rank on its matrices) spread over `modules` by importance
    (coordinator.ranks), at planning.matrix_ranks (else planning.ranks)."""
    budget = costmodel.lora_parameters(spec, config)
    widths = {m: spec.candidate(m).in_features + spec.candidate(m).out_features for m in modules}
    search = options.search
    allocated = rank_allocation.allocate(modules, widths, options.scores, search.matrix_ranks or search.ranks, budget)
    pattern = tuple((m, allocated[m]) for m in modules if m in allocated)
    chosen = tuple(m for m, _ in pattern)
    return replace(config, modules=chosen, rank=max(r for _, r in pattern), rank_pattern=pattern)


def _richness(config: costmodel.Config) -> tuple[int, float, int]:
    """What a configuration gives: rank capacity, precision, batch (more of each is better)."""
    return capacity(config), PRECISION[config.quantization], config.batch_size


def _binding(choice: _Choice, fits: list[_Choice], keys: list[tuple[int, tuple[int, float, int]]], u: float) -> str:
    """What kept the agent from a better configuration (more rank capacity, precision or batch): "deadline"
    when its share does not fit the round or a better one fits memory but would not finish in T; "memory"
    when every better one exceeds its memory; "none" when nothing better exists in the search space.
    keys: (id, _richness) of every configuration of the search."""
    if u > 0:
        return "deadline"
    mine = _richness(choice.config)
    better = [ident for ident, key in keys if all(x >= y for x, y in zip(key, mine, strict=True)) and key != mine]
    fitting = {id(ch.config) for ch in fits}
    if any(ident in fitting for ident in better):
        return "deadline"
    return "memory" if better else "none"


Planner = Callable[[Mapping[str, DeviceProfile], ModelSpec, PlanOptions, int], PlanSet]

PLANNERS: dict[str, Planner] = {"uniform": uniform_plan, "fedpipe": fedpipe_plan}

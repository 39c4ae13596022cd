"""Memory and time of one agent's configuration, fitted to its calibration runs. Pure functions.

Memory (bytes) = frozen base at the chosen precision + trainable tensors x 16 (fp32 weight, gradient and
two AdamW moments) + activations, linear in the tokens of a batch + fixed overhead (runtime, tokenizer,
allocator). The activation slope and the overhead are fitted to the agent's two calibration runs; the
base follows from the parameter counts:

- 16-bit ("none"): every base parameter in the compute dtype (fp32 on CPU, bf16 on GPU);
- int8 (LLM.int8): Linear weights at 1 byte plus one fp32 scale per output row; the rest in compute dtype;
- NF4 with double quantization: Linear weights at 4 bits, an 8-bit absmax per block of 64 and an fp32
  second-level scale per 256 blocks: 0.5 + 1/64 + 4/16384 bytes per weight; the rest in compute dtype.

Time (seconds per step) = (t0 + k * tokens) fitted to the calibration runs, scaled by the FLOP ratio of the
LoRA rank against the calibration rank (a frozen base costs ~4 FLOPs per weight and token: forward and the
input gradient; a trainable adapter ~6) and by a per-precision factor (dequantization on the fly).
Without calibration both fall back to formulas over the measured FLOP/s. A per-agent correction factor,
refitted from measured rounds, multiplies both predictions (the closed loop).

Several devices (a data-parallel agent): a step's batch is split over them, so memory and step time are priced
at the per-device share (ceil(batch / devices)), and each step adds a ring all-reduce of the trainable
gradients, 2 (n - 1) / n x their fp32 bytes at the agent's measured bus bandwidth ("replicas": a copy of the
base per device). A base too large for one device is split instead ("layers": its layers divided among the
devices in one process, accelerate's balanced device map): every device holds 1/n of the weights and of the
saved activations of the whole batch, plus one layer's share more (a layer is not split, so the division is
uneven by up to a layer); a step runs the devices one after another, so it costs what one device's step at the
whole batch costs, plus the hidden states handed across the n - 1 boundaries forward and backward at the bus
bandwidth. Only GPUs are split: CPU worker processes share one memory. The Ferret mode trains on one device.

Depth: autograd keeps activations, and computes input gradients, only from the earliest module that trains
up to the top. A mask of the top layers therefore needs much less activation memory, and a shorter
backward, than the calibration runs with LoRA on every candidate (measured in the demo: 1.05 GiB at batch
32 with the last two of six layers trained against 1.38 GiB with layers 1-5). Agents calibrate a third,
shallow run (LoRA on the last layer only); the per-token figures between it and the full depth are
interpolated in the number of layers the backward runs through.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from common.adapters import backward_layers, last_layer_modules, layer_count, lora_parameter_count
from common.types import DeviceProfile, ModelSpec, Quantization

REPLICAS, LAYERS = "replicas", "layers"  # TrainPlan.placement
MIN_STEP_SECONDS = 1e-6  # a spec with no weights to price (hand-made) still gets a finite step count
ADAM_BYTES_PER_PARAM = 16  # fp32 weight, gradient, AdamW exp_avg and exp_avg_sq
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit code, 8-bit absmax per 64, fp32 per 256 blocks
INT8_BYTES_PER_WEIGHT = 1.0
# Per-precision step-time factors before any measurement: bitsandbytes dequantizes on the fly. CPU NF4 was
# measured at 1.07x fp32 (STACK.md); the others are priors the closed loop corrects per agent.
TIME_FACTORS = {
    "cpu": {Quantization.NONE: 1.0, Quantization.INT8: 1.5, Quantization.NF4: 1.1},
    "cuda": {Quantization.NONE: 1.0, Quantization.INT8: 1.8, Quantization.NF4: 1.3},
}
CALIBRATION_DROPOUT = 0.05  # edge_agent.calibrate.DROPOUT: the LoRA dropout the calibration runs train with
FALLBACK_OVERHEAD_BYTES = 400 * 2**20  # runtime, tokenizer and allocator slack when nothing was measured
FALLBACK_EFFICIENCY = 0.25  # share of matmul FLOP/s a training step reaches when nothing was measured


def device_kind(profile: DeviceProfile) -> str:
    """ "cuda" or "cpu", for the per-precision factors."""
    return "cuda" if profile.device.startswith("cuda") else "cpu"


def compute_bytes(profile: DeviceProfile) -> int:
    """Bytes per element of the agent's compute dtype."""
    return 2 if profile.compute_dtype in ("bfloat16", "float16") else 4


def mean_in_features(spec: ModelSpec) -> float:
    """Average input width of the candidates: sets int8's per-row scale overhead."""
    return sum(m.in_features for m in spec.candidates) / len(spec.candidates)


def base_bytes(spec: ModelSpec, quantization: Quantization, element_bytes: int) -> int:
    """Bytes of the frozen base at a precision (see the module docstring for the layouts)."""
    other = spec.base_parameters - spec.linear_parameters
    if quantization is Quantization.NONE:
        return spec.base_parameters * element_bytes
    if quantization is Quantization.INT8:
        per_weight = INT8_BYTES_PER_WEIGHT + 4 / mean_in_features(spec)  # one fp32 scale per output row
    else:
        per_weight = NF4_BYTES_PER_WEIGHT
    return round(spec.linear_parameters * per_weight) + other * element_bytes


def head_parameters(spec: ModelSpec) -> int:
    """Parameters of the heads trained in full."""
    return spec.head_elements


def step_flops_per_token(spec: ModelSpec, lora_parameters: int, full_parameters: int = 0) -> float:
    """FLOPs of one training step per token: frozen base ~4 per weight (forward and input gradient), trainable
    adapter and heads ~6, a weight trained in full ~2 more than a frozen one (its weight gradient)."""
    return 4.0 * spec.linear_parameters + 6.0 * (lora_parameters + head_parameters(spec)) + 2.0 * full_parameters


@dataclass(frozen=True)
class Fit:
    """An agent's fitted coefficients; the per-token ones at full depth (the backward through every layer),
    and, where a calibration run trained only the top layers, at that depth too. Calibrated activation
    figures are the base model's: LoRA's own saved tensors are priced per configuration
    (lora_activation_bytes_per_token)."""

    activation_bytes_per_token: float
    overhead_bytes: float
    step_seconds_fixed: float  # t0: per-step cost independent of the batch
    step_seconds_per_token: float  # k
    calibration_lora_parameters: int  # trainable LoRA parameters during calibration
    calibrated: bool  # False: formulas only
    layers: int = 0  # transformer layers of the model (0: unknown, depth is not modelled)
    shallow_layers: int = 0  # depth of the shallow calibration run (0: none; formulas scale by depth)
    shallow_activation_bytes_per_token: float = 0.0
    shallow_step_seconds_per_token: float = 0.0

    def per_token(self, depth: int) -> tuple[float, float]:
        """(activation bytes, step seconds) per token when the backward runs through `depth` layers: linear
        in the layers between the shallow run's depth and the full depth (each layer the backward reaches
        keeps its activations and computes its input gradients); the shallow run's own figures at or below
        its depth; the full-depth figures when nothing shallower was measured (formulas: activations scaled
        by depth, as the formula counts them per layer)."""
        full = (self.activation_bytes_per_token, self.step_seconds_per_token)
        if self.layers <= 0 or depth <= 0 or depth >= self.layers:
            return full
        if not 0 < self.shallow_layers < self.layers:
            return full if self.calibrated else (full[0] * depth / self.layers, full[1])
        shallow = (self.shallow_activation_bytes_per_token, self.shallow_step_seconds_per_token)
        if depth <= self.shallow_layers:
            return shallow
        share = (depth - self.shallow_layers) / (self.layers - self.shallow_layers)
        return (shallow[0] + share * (full[0] - shallow[0]), shallow[1] + share * (full[1] - shallow[1]))


def fit(profile: DeviceProfile, spec: ModelSpec) -> Fit:
    """Fit activation slope, overhead and step-time line to the full-depth calibration runs, and the
    per-token figures at the shallow run's depth when there is one (or use formulas)."""
    layers = layer_count(spec)
    full_depth = [p for p in profile.calibration if p.layers in (0, layers)]
    points = sorted(full_depth, key=lambda p: p.batch_size * p.seq_len)
    element = compute_bytes(profile)
    if len(points) >= 2 and points[-1].batch_size * points[-1].seq_len > points[0].batch_size * points[0].seq_len:
        low, high = points[0], points[-1]
        tokens_low, tokens_high = low.batch_size * low.seq_len, high.batch_size * high.seq_len
        slope = max(0.0, (high.peak_memory_bytes - low.peak_memory_bytes) / (tokens_high - tokens_low))
        intercept = low.peak_memory_bytes - slope * tokens_low
        lora = max(0, low.trainable_parameters - head_parameters(spec))
        fixed_memory = base_bytes(spec, low.quantization, element) + low.trainable_parameters * ADAM_BYTES_PER_PARAM
        per_token = max(0.0, (high.step_seconds - low.step_seconds) / (tokens_high - tokens_low))
        t0 = max(0.0, low.step_seconds - per_token * tokens_low)
        overhead = max(0.0, intercept - fixed_memory)
        # The slopes kept are the base model's: what LoRA added in the calibration runs comes off, and
        # predict() adds back what the configuration's own modules and ranks add.
        everywhere = tuple((m.name, low.rank) for m in spec.candidates)
        slope = max(0.0, slope - lora_activation_bytes_per_token(spec, everywhere, CALIBRATION_DROPOUT, element))
        shallow = [p for p in profile.calibration if 0 < p.layers < layers and p.batch_size * p.seq_len > 0]
        if not shallow:
            return Fit(slope, overhead, t0, per_token, lora, True, layers)
        point = max(shallow, key=lambda p: p.batch_size * p.seq_len)
        tokens = point.batch_size * point.seq_len
        # Its own fixed memory (fewer trainable tensors) comes off, the overhead is the full runs'.
        point_fixed = base_bytes(spec, point.quantization, element) + point.trainable_parameters * ADAM_BYTES_PER_PARAM
        top = tuple((m, point.rank) for m in last_layer_modules(spec))
        shallow_memory = max(
            0.0,
            (point.peak_memory_bytes - point_fixed - overhead) / tokens
            - lora_activation_bytes_per_token(spec, top, CALIBRATION_DROPOUT, element),
        )
        # Its step on the full runs' FLOP scale (it trains fewer LoRA parameters), as predict() rescales.
        full_flops = step_flops_per_token(spec, lora)
        own_flops = step_flops_per_token(spec, max(0, point.trainable_parameters - head_parameters(spec)))
        ratio = own_flops / full_flops if full_flops > 0 else 1.0
        shallow_time = max(0.0, (point.step_seconds / ratio - t0) / tokens)
        return Fit(slope, overhead, t0, per_token, lora, True, layers, point.layers, shallow_memory, shallow_time)
    # Formulas: ~34 bytes of activations per token and hidden unit per layer at 16 bits (Korthikanti et al.
    # 2022), scaled to the compute dtype; time from the matmul benchmark at a typical training efficiency.
    hidden = spec.candidates[0].in_features
    layers = max(1, len({m.name.rsplit(".", 3)[0] for m in spec.candidates}))
    slope = 34.0 * hidden * layers * element / 2
    per_token = step_flops_per_token(spec, 0) / (profile.flops_per_s * FALLBACK_EFFICIENCY)
    return Fit(slope, FALLBACK_OVERHEAD_BYTES, 0.0, per_token, 0, False, layer_count(spec))


@dataclass(frozen=True)
class Config:
    """One candidate configuration of an agent."""

    batch_size: int
    rank: int  # LoRA rank (0 in the Ferret mode: the modules are trained in full)
    quantization: Quantization
    modules: tuple[str, ...]  # the (possibly reduced) mask
    mode: str = "lora"
    optimizer: str = "adamw"
    directions: int = 0  # ferret: the round's projection budget
    rank_pattern: tuple[tuple[str, int], ...] = ()  # a rank per module, overriding `rank` (per-matrix allocation)
    dropout: float = CALIBRATION_DROPOUT  # LoRA dropout (its masks are activations too)
    placement: str = "replicas"  # a several-device agent's: REPLICAS (data-parallel) or LAYERS (the base split)

    def module_ranks(self) -> tuple[tuple[str, int], ...]:
        """(module, rank) of every trained module: the rank pattern, else `rank` on each module."""
        return self.rank_pattern or tuple((m, self.rank) for m in self.modules)


class Cost(NamedTuple):
    """Predicted cost of one configuration on one agent (a named tuple: the planner makes one per agent and
    configuration, hundreds of thousands for a thousand agents, and a tuple is the cheapest immutable record)."""

    peak_memory_bytes: float
    step_seconds: float
    transfer_seconds: float  # download + upload of the adapter (ferret: and projecting, reconstructing)
    payload_bytes: int  # one direction


def lora_parameters(spec: ModelSpec, config: Config) -> int:
    """LoRA parameters of a configuration's modules at their ranks."""
    return lora_parameter_count(dict(config.module_ranks()), spec)


def lora_activation_bytes_per_token(
    spec: ModelSpec, ranks: Iterable[tuple[str, int]], dropout: float, element_bytes: int
) -> float:
    """What peft's LoRA adds to the saved activations per token: per module lora_A's input (the dropout
    output, in the compute dtype), dropout's mask (1 byte per value, when dropout > 0) and lora_B's input
    (rank values)."""
    total = 0.0
    for module, rank in ranks:
        d_in = spec.candidate(module).in_features
        total += d_in * element_bytes + (d_in if dropout > 0 else 0) + rank * element_bytes
    return total


# Ferret: bytes per parameter trained in full, beyond the frozen base: fp32 weight, gradient, the round's
# starting copy (kept to apply the aggregate to), and the optimizer's state (AdamW two moments, SGD none).
FULL_BYTES = {"adamw": 4 + 4 + 4 + 8, "sgd": 4 + 4 + 4}
GENERATION_VALUES_PER_S = 1e8  # direction values drawn per second before anything was measured (CPU, one thread)


def full_parameters(spec: ModelSpec, modules: tuple[str, ...]) -> int:
    """Weights of these modules."""
    return sum(spec.candidate(m).in_features * spec.candidate(m).out_features for m in modules)


@dataclass(frozen=True)
class Static:
    """The parts of a configuration's cost that depend on the model and the configuration only (and on the
    width of the agent's compute dtype), not on the agent: worked out once per planning, not once per agent."""

    lora: int  # LoRA parameters
    weights: float  # frozen base, trained weights and their optimizer state, bytes
    payload: int  # one direction, bytes
    projection: float  # ferret: seconds to project and reconstruct
    depth: int  # layers the backward pass runs through
    extra_activation_per_token: float  # what the trained weights add to the saved activations (calibrated fits)
    flops_per_token: float
    time_factors: tuple[float, float]  # its precision's step-time factor on (cpu, cuda)
    layers: int  # transformer layers the base splits into (LAYERS placement)


def static_cost(spec: ModelSpec, config: Config, element: int) -> Static:
    """A configuration's agent-independent cost figures for a compute dtype of `element` bytes."""
    if config.mode == "ferret":
        full = full_parameters(spec, config.modules)
        lora, trainable = 0, head_parameters(spec)
        # The trained blocks are held in fp32 whatever the base's precision; the rest of the base as planned.
        quantized = max(
            0.0,
            base_bytes(spec, config.quantization, element) - _linear_bytes(spec, config.quantization, element) * full,
        )
        weights = quantized + full * FULL_BYTES.get(config.optimizer, FULL_BYTES["adamw"])
        weights += trainable * ADAM_BYTES_PER_PARAM  # the heads, trained with AdamW state as in LoRA
        largest = max(
            (spec.candidate(m).in_features * spec.candidate(m).out_features for m in config.modules), default=0
        )
        weights += 4 * largest  # one direction at a time
        payload = 4 * (max(config.directions, 2 * len(config.modules)) + trainable)
        projection = 2 * config.directions * (full / max(1, len(config.modules))) / GENERATION_VALUES_PER_S
        # A weight trained in full keeps its input for its gradient, in the compute dtype.
        extra = float(sum(spec.candidate(m).in_features * element for m in config.modules))
    else:
        full = 0
        lora = lora_parameters(spec, config)
        trainable = lora + head_parameters(spec)
        weights = base_bytes(spec, config.quantization, element) + trainable * ADAM_BYTES_PER_PARAM
        payload = trainable * 4
        projection = 0.0
        extra = lora_activation_bytes_per_token(spec, config.module_ranks(), config.dropout, element)
    return Static(
        lora=lora,
        weights=weights,
        payload=payload,
        projection=projection,
        depth=backward_layers(spec, config.modules),
        extra_activation_per_token=extra,
        flops_per_token=step_flops_per_token(spec, lora, full),
        time_factors=(TIME_FACTORS["cpu"][config.quantization], TIME_FACTORS["cuda"][config.quantization]),
        layers=layer_count(spec),
    )


def predict(
    profile: DeviceProfile,
    spec: ModelSpec,
    coefficients: Fit,
    config: Config,
    seq_len: int,
    bandwidth_bytes_per_s: float,
    time_scale: float = 1.0,
    memory_scale: float = 1.0,
) -> Cost:
    """Memory and time of a configuration; the scales are the closed loop's corrections (many configurations of
    one agent at once: predict_many)."""
    fixed = static_cost(spec, config, compute_bytes(profile))
    return predict_many(
        profile, spec, coefficients, [config], [fixed], seq_len, bandwidth_bytes_per_s, time_scale, memory_scale
    )[0]


def predict_many(
    profile: DeviceProfile,
    spec: ModelSpec,
    coefficients: Fit,
    configs: Sequence[Config],
    statics: Sequence[Static],
    seq_len: int,
    bandwidth_bytes_per_s: float,
    time_scale: float = 1.0,
    memory_scale: float = 1.0,
) -> list[Cost]:
    """predict for many configurations of one agent (statics: theirs, at its compute width), with what
    depends on the agent alone worked out once."""
    calibrated = step_flops_per_token(spec, coefficients.calibration_lora_parameters)
    kind = 1 if device_kind(profile) == "cuda" else 0
    hidden = hidden_size(spec)
    element = compute_bytes(profile)
    per_depth: dict[int, tuple[float, float]] = {}
    costs: list[Cost] = []
    for config, fixed in zip(configs, statics, strict=True):
        world = profile.world if config.mode == "lora" else 1
        split = world > 1 and config.placement == LAYERS
        tokens = -(-config.batch_size // (1 if split else world)) * seq_len  # the largest per-device share
        if fixed.depth not in per_depth:
            per_depth[fixed.depth] = coefficients.per_token(fixed.depth)
        activation_per_token, seconds_per_token = per_depth[fixed.depth]
        if coefficients.calibrated:
            activation_per_token += fixed.extra_activation_per_token
        memory = fixed.weights + activation_per_token * tokens
        if split:
            memory = memory / world + memory / max(1, fixed.layers)
        memory += coefficients.overhead_bytes
        # A spec without linear weights or calibration (hand-made, or an unknown layout) gives no ratio to scale by.
        flop_ratio = fixed.flops_per_token / calibrated if calibrated > 0 else 1.0
        step = (coefficients.step_seconds_fixed + seconds_per_token * tokens) * flop_ratio * fixed.time_factors[kind]
        if split:
            step += handoff_seconds(tokens * hidden * element, world, profile.allreduce_bytes_per_s)
        elif world > 1:
            step += allreduce_seconds(fixed.payload, world, profile.allreduce_bytes_per_s)
        transfer = 2 * fixed.payload / bandwidth_bytes_per_s + fixed.projection
        costs.append(Cost(memory * memory_scale, max(step * time_scale, MIN_STEP_SECONDS), transfer, fixed.payload))
    return costs


def allreduce_seconds(gradient_bytes: int, world: int, bytes_per_s: float) -> float:
    """One ring all-reduce of gradient_bytes over world devices: each sends and receives 2 (n - 1) / n of them."""
    if world <= 1 or gradient_bytes <= 0:
        return 0.0
    return 2 * (world - 1) / world * gradient_bytes / max(bytes_per_s, 1.0)


def hidden_size(spec: ModelSpec) -> int:
    """Values per token that cross a layer boundary: the most common input width of the candidates (the MLP's
    down projection is the one that reads a wider input)."""
    widths = Counter(c.in_features for c in spec.candidates)
    return max(widths, key=lambda w: (widths[w], w)) if widths else 0


def handoff_seconds(boundary_bytes: int, world: int, bytes_per_s: float) -> float:
    """A LAYERS step's transfers: the hidden states (boundary_bytes) across each of the world - 1 device
    boundaries, forward and their gradients backward."""
    if world <= 1 or boundary_bytes <= 0:
        return 0.0
    return 2 * (world - 1) * boundary_bytes / max(bytes_per_s, 1.0)


def _linear_bytes(spec: ModelSpec, quantization: Quantization, element_bytes: int) -> float:
    """Bytes one Linear weight takes at a precision (the layouts in the module docstring)."""
    if quantization is Quantization.NONE:
        return float(element_bytes)
    if quantization is Quantization.INT8:
        return INT8_BYTES_PER_WEIGHT + 4 / mean_in_features(spec)
    return NF4_BYTES_PER_WEIGHT

"""Domain types shared by coordinator and agents: frozen dataclasses, no grpc, no torch models."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import torch

from common import scores


class Quantization(enum.Enum):
    """Precision of the frozen base weights on an agent."""

    NONE = "none"  # full precision (fp32 on CPU, the checkpoint dtype on GPU)
    INT8 = "int8"  # bitsandbytes LLM.int8
    NF4 = "nf4"  # bitsandbytes NormalFloat4 with double quantization

    @property
    def bits(self) -> int:
        """Bits per base weight, for memory figures and metrics."""
        return {Quantization.NONE: 16, Quantization.INT8: 8, Quantization.NF4: 4}[self]


class TaskKind(enum.Enum):
    """What the coordinator asks an agent to do next."""

    WAIT = "wait"
    TRAIN = "train"
    EVALUATE = "evaluate"
    FINISHED = "finished"
    PROBE = "probe"
    SECAGG_SHARE = "secagg-share"  # secure aggregation: seal shares of your secrets for these neighbours
    SECAGG_MASK = "secagg-mask"  # open the shares sealed for you, upload your masked change
    SECAGG_UNMASK = "secagg-unmask"  # reveal the shares that remove the survivors' masks


SECAGG_KINDS = (TaskKind.SECAGG_SHARE, TaskKind.SECAGG_MASK, TaskKind.SECAGG_UNMASK)


@dataclass(frozen=True)
class CalibrationPoint:
    """One short measured training run on an agent; the coordinator fits its cost model to these."""

    batch_size: int
    seq_len: int
    rank: int  # LoRA rank on every candidate during the run
    quantization: Quantization
    step_seconds: float  # mean optimizer step time, throttling included
    peak_memory_bytes: int  # process peak (CPU) or CUDA allocator peak during the run
    trainable_parameters: int
    layers: int = 0  # transformer layers the backward ran through (earliest trained one to the top); 0 = all


@dataclass(frozen=True)
class Accelerator:
    """One device of a data-parallel agent."""

    device: str  # "cuda:1", or "cpu" for a CPU worker process
    device_name: str
    total_memory_bytes: int  # after caps
    flops_per_s: float


@dataclass(frozen=True)
class DeviceProfile:
    """Measured facts about an agent's device; caps are already applied to the memory figures."""

    device: str  # "cuda:0" or "cpu"
    device_name: str  # GPU or CPU model name
    total_memory_bytes: int  # usable device memory (host memory on CPU), after caps
    free_memory_bytes: int  # free at measurement time
    host_memory_bytes: int  # total host RAM
    flops_per_s: float  # sustained matmul FLOP/s in compute_dtype
    compute_dtype: str  # dtype the benchmark ran in
    threads: int  # CPU threads torch uses
    num_train_samples: int  # local training samples
    num_val_samples: int  # local validation samples
    memory_cap_bytes: int = 0  # operator cap, 0 = none
    compute_share: float = 1.0  # operator cap on compute, 1.0 = none
    calibration: tuple[CalibrationPoint, ...] = ()  # measured runs at two batch sizes
    # A data-parallel agent's devices (empty: one). The figures above are then the smallest memory and the
    # slowest FLOP/s among them, which is what a synchronous step waits for.
    devices: tuple[Accelerator, ...] = ()
    allreduce_bytes_per_s: float = 0.0  # measured bus bandwidth of its gradient all-reduce (0: one device)

    @property
    def world(self) -> int:
        """Devices one plan trains on at once."""
        return max(1, len(self.devices))

    @property
    def can_split(self) -> bool:
        """Whether a base may be split by layers over its devices: two GPUs or more (CPU worker processes share
        one memory, which a split would not divide)."""
        return len(self.devices) > 1 and all(d.device.startswith("cuda") for d in self.devices)


@dataclass(frozen=True)
class ModuleShape:
    """A weight matrix that can carry a LoRA adapter."""

    name: str  # full module path, e.g. "bert.encoder.layer.0.attention.self.query"
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelSpec:
    """What an agent's base model looks like; every agent of a run must report the same one."""

    fingerprint: str  # hash of the base config, task and labels
    model_type: str  # transformers model_type, e.g. "bert"
    task: str  # "seq-cls"
    labels: tuple[str, ...]  # class names in index order
    candidates: tuple[ModuleShape, ...]  # LoRA candidates, in model order
    heads: tuple[tuple[str, tuple[int, ...]], ...]  # trainable head tensors: (canonical name, shape)
    base_parameters: int  # parameter count of the frozen base
    linear_parameters: int = 0  # weights of the Linear layers bitsandbytes quantizes (no heads, embeddings)

    def candidate(self, name: str) -> ModuleShape:
        """The candidate called name; KeyError when the model has none of that name."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(name) from None

    @cached_property
    def head_elements(self) -> int:
        """Values in the heads (trained in full alongside any adapter)."""
        return sum(math.prod(shape) for _, shape in self.heads)

    @cached_property
    def _by_name(self) -> dict[str, ModuleShape]:
        # Worked out once per spec (a frozen dataclass keeps a cached_property in its __dict__): the planner
        # looks shapes up per module, configuration and agent.
        shapes: dict[str, ModuleShape] = {}
        for module in self.candidates:
            shapes.setdefault(module.name, module)
        return shapes


@dataclass(frozen=True)
class SecureSpec:
    """A secure round as a TrainPlan states it: the agent uploads its change masked, never in the clear."""

    tag: str  # names the round in every key and share (run id and round)
    layout: Mapping[str, tuple[int, ...]]  # the linear layout's tensors (common.linear), summed in name order
    fraction_bits: int  # fixed-point scale 2^f of the masked vector
    clip_norm: float  # the agent clips its change to this L2 norm first; 0 = no clip
    signed: bool = False  # keys signed with each agent's certificate, and every neighbour's checked


@dataclass(frozen=True)
class SecAggStep:
    """What one secure-aggregation task carries (the fields its kind needs; the others stay empty)."""

    participants: tuple[str, ...] = ()  # SHARE: every agent whose keys are in, sorted
    neighbours: int = 0  # SHARE: k of the round's graph
    threshold: int = 0  # SHARE: t, shares needed to rebuild a secret
    keys: Mapping[str, tuple[bytes, bytes]] = field(default_factory=dict)  # SHARE: neighbour -> (share, mask) key
    proofs: Mapping[str, tuple[bytes, bytes]] = field(default_factory=dict)  # SHARE: neighbour -> (cert, signature)
    sealed: Mapping[str, bytes] = field(default_factory=dict)  # MASK: sender -> the share it sealed for you
    noise_std: float = 0.0  # MASK: your share of the DP noise, per coordinate
    survivors: tuple[str, ...] = ()  # UNMASK: agents whose masked vector is in
    dropped: tuple[str, ...] = ()  # UNMASK: agents that shared but sent no masked vector


@dataclass(frozen=True)
class TrainPlan:
    """Everything an agent needs to run one round; agents execute it and never re-plan."""

    plan_id: str  # identifies this plan; uploads must name it
    target_modules: tuple[str, ...]  # the mask: full module names that get LoRA
    rank_pattern: Mapping[str, int]  # LoRA rank per target module
    lora_alpha: float  # alpha at the plan's largest rank; each module's alpha keeps alpha / rank equal (alpha_of)
    lora_dropout: float  # dropout on the LoRA input during training
    modules_to_save: tuple[str, ...]  # heads trained in full (peft modules_to_save)
    batch_size: int  # samples per optimizer step
    local_epochs: int  # passes over the local training split
    max_steps: int  # cap on optimizer steps, 0 = none
    learning_rate: float  # peak AdamW learning rate
    weight_decay: float  # AdamW weight decay
    quantization: Quantization  # precision of the frozen base
    max_seq_len: int  # tokens per sample after truncation
    deadline_s: float  # seconds from task start until the upload must be done
    seed: int  # seeds dropout and data order, so a round is reproducible
    mode: str = "lora"  # training mode: "lora" adapters, or "ferret" (target_modules trained in full)
    optimizer: str = "adamw"  # local optimizer: "adamw" or "sgd"
    directions: int = 0  # ferret: the round's budget of projection directions
    basis: str = "rademacher"  # ferret: the directions' distribution (common.ferret)
    shared_seed: int = 0  # ferret: the run seed every side derives the directions from
    global_digest: str = ""  # ferret: sha256 of the weights the agent must hold before it trains
    held_modules: tuple[str, ...] = ()  # ferret: every block the global holds (kept in full precision)
    proximal_mu: float = 0.0  # FedProx: weight of (mu / 2) ||w - w_start||^2 added to the local loss
    track_importance: bool = False  # score the trained matrices while training (UpdateMeta.importance)
    secure: SecureSpec | None = None  # secure aggregation: mask the change and take part in the key steps
    even_directions: bool = False  # ferret: directions shared evenly among the blocks, not by update norm
    # A several-device agent: "replicas" trains data-parallel with a base per device, "layers" splits the base's
    # layers over its devices in one process (a base too large for one device)
    placement: str = "replicas"

    def alpha_of(self, module: str) -> float:
        """peft's lora_alpha for one module: lora_alpha x its rank / the plan's largest rank, so every module's
        update is scaled by the same alpha / rank however the ranks differ (equal ranks: lora_alpha)."""
        top = max(self.rank_pattern.values(), default=0)
        rank = self.rank_pattern.get(module, top)
        return self.lora_alpha * rank / top if top > 0 else self.lora_alpha

    def alpha_pattern(self) -> dict[str, float]:
        """peft's alpha_pattern: the modules whose alpha differs from lora_alpha."""
        return {m: self.alpha_of(m) for m in self.target_modules if self.alpha_of(m) != self.lora_alpha}

    def steps_for(self, num_examples: int) -> int:
        """Optimizer steps this plan asks for on num_examples: local epochs, capped by max_steps."""
        steps = self.local_epochs * -(-num_examples // self.batch_size)
        return min(steps, self.max_steps) if self.max_steps > 0 else steps


@dataclass(frozen=True)
class ProbePlan:
    """An importance probe: AdaLoRA (SVD-form) adapters of a small rank on every candidate matrix."""

    probe_id: str  # reports must name it
    candidates: tuple[str, ...]  # full module names to score
    rank: int  # probe rank r0
    steps: int  # probe steps on local data
    batch_size: int
    learning_rate: float
    max_seq_len: int
    quantization: Quantization  # precision of the base during the probe
    seed: int  # seeds the head, data order: equal on all agents of a probe
    deadline_s: float  # seconds from task start until the report must be in


@dataclass(frozen=True)
class ImportanceReport:
    """One agent's probe result."""

    probe_id: str
    scores: Mapping[str, float]  # candidate module -> importance
    samples: int  # samples the probe saw; the weight when combining agents
    steps: int
    seconds: float


@dataclass(frozen=True)
class Task:
    """The answer to an agent's poll."""

    kind: TaskKind
    round: int = 0  # TRAIN: the round being trained; EVALUATE: the global's round
    global_round: int = 0  # the global adapter to download before acting
    plan: TrainPlan | None = None
    probe: ProbePlan | None = None
    retry_after_s: float = 1.0
    message: str = ""
    secagg: SecAggStep | None = None  # SECAGG_* tasks


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of one tensor on the wire."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32", "float16" or "bfloat16"

    @property
    def nbytes(self) -> int:
        """Payload size of this tensor."""
        count = 1
        for dim in self.shape:
            count *= dim
        return count * DTYPE_SIZES[self.dtype]


DTYPE_SIZES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8}  # int64: masked vectors
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}


@dataclass(frozen=True)
class UpdateMeta:
    """Header of an upload: who trained what, and how much work it holds."""

    agent_id: str
    round: int
    plan_id: str
    samples: int  # samples actually processed; the aggregation weight
    steps: int
    train_seconds: float
    train_loss: float
    peak_memory_bytes: int
    base_digest: str = ""  # ferret: sha256 of the weights the agent trained from
    projection_seconds: float = 0.0  # ferret: time spent projecting the update
    importance: Mapping[str, float] = field(default_factory=dict)  # track_importance: score per trained matrix


@dataclass(frozen=True)
class AdapterUpdate:
    """An agent's trained tensors for one round, in canonical names (see common.adapters)."""

    meta: UpdateMeta
    tensors: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class GlobalState:
    """What a run aggregates into, in any training mode: its round; each mode adds its tensors."""

    round: int


@dataclass(frozen=True)
class Evaluation:
    """Loss and accuracy of one global adapter on some data; for a classifier also its confusion matrix
    (rows true class, columns predicted; weighted counts when agents' reports are combined), from which
    common.scores derives per-class recall and macro-F1."""

    loss: float
    accuracy: float
    samples: int
    confusion: tuple[tuple[float, ...], ...] = ()

    @property
    def macro_f1(self) -> float | None:
        """Macro-F1 from the confusion matrix; None without one."""
        return scores.macro_f1(self.confusion)

    @property
    def class_recall(self) -> tuple[float | None, ...]:
        """Recall per class (None for a class absent from the data); () without a confusion matrix."""
        return scores.class_recall(self.confusion)


@dataclass(frozen=True)
class RoundResult:
    """What one round produced, for logs, metrics and the run summary."""

    round: int
    agents: tuple[str, ...]  # agents whose updates were aggregated
    seconds: float
    samples: int
    heldout: Evaluation | None = None
    agents_eval: Evaluation | None = None  # size-weighted over agents' validation splits
    train_loss: float | None = None  # sample-weighted mean of the agents' training loss
    dropped: tuple[str, ...] = field(default_factory=tuple)  # planned agents without an accepted update
    refused: tuple[str, ...] = field(default_factory=tuple)  # accepted updates left out when the round closed
    failure: str | None = None  # why the round was not aggregated (no quorum, a non-finite aggregate), or None
    aggregation_seconds: float = 0.0  # the strategy's time (Ferret: rebuilding the blocks from coefficients)
    truncated_energy_share: float | None = None  # SVD-ordered strategies: share of the update the global rank dropped
    opened_s: float = 0.0  # when the round opened, in seconds since this coordinator started the run
    heldout_seconds: float = 0.0  # how long the held-out evaluation of its global took (overlapped or not)
    epsilon: float | None = None  # privacy.dp: the run's epsilon once this round's global was published

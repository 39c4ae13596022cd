"""fedpipe-coordinator's one config class: flags > FEDPIPE_COORDINATOR_* env > --config YAML > defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.data import EMBEDDED_LABEL_COLUMN, EMBEDDED_LABELS, EMBEDDED_TEXT_COLUMN
from common.settings import Labels, ModelSection, Section
from coordinator.tracking import TrackingSection

# Per training mode, the strategies whose result is a mean of the changes, per coordinate (Ferret's rank-padding
# and fedavg both combine coefficients by the weighted mean).
LINEAR_STRATEGIES = {"lora": ("slot-average", "fedavg"), "ferret": ("fedavg", "rank-padding")}


class ServerSection(Section):
    """The gRPC endpoint agents connect to."""

    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    workers: int = Field(
        64,
        ge=4,
        description="threads that compute uploads and downloads and run registrations and reports (task polls, "
        "heartbeats and the streams' waits are coroutines of the asyncio server and hold none)",
    )
    max_upload_bytes: int = Field(256 * 2**20, ge=1024, description="largest update payload accepted")
    max_chunk_bytes: int = Field(
        4 * 2**20 - 4096,
        ge=1024,
        le=4 * 2**20 - 1024,
        description="largest chunk accepted (under gRPC's 4 MiB message limit)",
    )
    chunk_bytes: int = Field(2 * 2**20, ge=1024, description="chunk size of downloads, and asked of uploads")
    max_calls_per_agent: int = Field(
        8, ge=2, description="calls and streams one agent (or one unauthenticated peer) may have open at once"
    )
    calls_per_second_per_agent: float = Field(
        50.0, gt=0, description="sustained rate of calls one agent may make (bursts of twice that are fine)"
    )
    max_health_watches: int = Field(4, ge=0, description="health Watch streams open at once, over all callers")

    @model_validator(mode="after")
    def _chunks_fit(self) -> ServerSection:
        if self.chunk_bytes > self.max_chunk_bytes:
            raise ValueError(f"chunk_bytes {self.chunk_bytes} exceeds max_chunk_bytes {self.max_chunk_bytes}")
        if 2 * self.max_calls_per_agent > self.workers:
            # Otherwise one agent's open calls could hold most of the worker threads.
            raise ValueError(f"max_calls_per_agent {self.max_calls_per_agent} is over half of workers {self.workers}")
        return self


class TlsSection(Section):
    """Transport security: TLS with client certificates (mTLS) unless the run is started --insecure."""

    cert: Path | None = Field(None, description="the coordinator's certificate (PEM)")
    key: Path | None = Field(None, description="the coordinator's private key (PEM)")
    auth: Literal["mtls", "token"] = Field(
        "mtls", description="mtls: an agent is its certificate's common name; token: a per-agent bearer token"
    )
    client_ca: Path | None = Field(None, description="CA certificate that signs agent certificates (mtls)")
    tokens: Path | None = Field(
        None, description="YAML/JSON map of agent id to the sha256 hex digest of its token (token auth)"
    )


class AdminSection(Section):
    """Who may use the admin API (submit, runs, status, cancel, logs); it shares the agents' port."""

    names: list[str] = Field(
        [],
        description="mtls: the admins allowed (an admin certificate names admin:NAME, made with `fedpipe-coordinator "
        "certs --admin NAME`); empty = any admin certificate the CA signed",
    )
    tokens: Path | None = Field(
        None, description="token auth: YAML/JSON map of admin name to the sha256 hex digest of its token"
    )


class ServiceSection(Section):
    """fedpipe-coordinator serve: a coordinator that stays up and runs submitted runs one after another."""

    state_dir: Path = Field(
        Path("runs/service"), description="the run queue (queue.json) and each run's directory (runs/<id>)"
    )


# What a submitted run may not set: the serving coordinator's own, shared by every run (tracking too: its
# paths and servers are the host's, which a submission must not choose).
SERVICE_KEYS = ("server", "tls", "metrics", "admin", "service", "insecure", "log_format", "tracking")


class UpdatesSection(Section):
    """Bounds on what one agent's update may do to the global adapter (robust aggregation)."""

    max_norm: float = Field(
        0.0, ge=0, description="bound on the L2 norm of an update's change to its adapter tensors; 0 = none"
    )
    norm_multiple: float = Field(
        10.0,
        ge=0,
        description="relative bound: an update's change norm may be at most this multiple of the round's median "
        "(rounds of 3 or more updates); 0 = none",
    )
    norm_action: Literal["reject", "clip"] = Field(
        "reject",
        description="reject: leave out an update over a norm bound (its agent sits the round out); "
        "clip: scale its change down to the bound",
    )
    max_abs_value: float = Field(
        1e4, ge=0, description="bound on every value of an update and of the global state; 0 = finiteness only"
    )
    max_weight_ratio: float = Field(
        3.0,
        ge=0,
        description="an agent's aggregation weight, and the data size the planner counts for it, is at most this "
        "multiple of the round's median; 0 = none",
    )


class LimitsSection(Section):
    """Ceilings and floors on what an agent may report about itself; a profile outside them is refused."""

    max_train_samples: int = Field(10_000_000, ge=1, description="local training (and validation) samples")
    max_flops_per_s: float = Field(1e17, gt=0, description="measured FLOP/s (an H200 does about 1e15 in bf16)")
    min_flops_per_s: float = Field(1e6, gt=0, description="measured FLOP/s below this is not a working device")
    max_memory_bytes: int = Field(2**44, ge=2**20, description="device or host memory (16 TiB)")
    min_memory_bytes: int = Field(64 * 2**20, ge=0, description="usable device memory below this cannot train")
    max_calibration_points: int = Field(8, ge=2, description="calibration runs in one profile")
    max_step_seconds: float = Field(3600.0, gt=0, description="longest calibration step")


class MetricsSection(Section):
    """Prometheus exposition."""

    host: str = Field("127.0.0.1", description="address of the metrics HTTP server")
    port: int = Field(9400, ge=-1, le=65535, description="metrics port; 0 picks a free one, -1 turns it off")


class RunSection(Section):
    """The round loop."""

    rounds: int = Field(5, ge=1, description="rounds to train")
    min_agents: int = Field(2, ge=1, description="agents needed to start a round and to aggregate it")
    round_deadline_s: float = Field(600.0, gt=0, description="seconds an agent has to train and upload")
    eval_deadline_s: float = Field(120.0, gt=0, description="seconds agents have to evaluate a global adapter")
    registration_timeout_s: float = Field(600.0, gt=0, description="how long to wait for min_agents")
    heartbeat_interval_s: float = Field(5.0, gt=0, description="how often agents beat")
    agent_timeout_s: float = Field(30.0, gt=0, description="an agent silent this long counts as dead")
    run_dir: Path = Field(Path("runs/latest"), description="where rounds, plans and the final adapter go")
    seed: int = Field(0, description="seed of the round-0 adapter and of every plan")
    dataset: str = Field(
        "",
        description="the data set agents train on, by a name of their `datasets` (their paths stay theirs); '' = "
        "each agent's own `data`",
    )
    finish_grace_s: float = Field(15.0, ge=0, description="how long to keep serving FINISHED to agents")
    quorum: int = Field(0, ge=0, description="updates needed to aggregate a round; 0 = min_agents")
    quorum_fraction: float = Field(
        0.0, ge=0, le=1, description="share of a round's planned agents whose updates are needed to aggregate"
    )
    on_no_quorum: Literal["skip", "extend"] = Field(
        "skip", description="when the deadline passes without quorum: skip the round, or extend its deadline"
    )
    max_extensions: int = Field(1, ge=0, description="deadline extensions of one round before it is skipped")
    sample_fraction: float = Field(
        1.0, gt=0, le=1, description="share of the alive agents drawn to train each round (seeded by run.seed)"
    )
    sample_count: int = Field(0, ge=0, description="agents drawn to train each round; 0 = use sample_fraction")


class LoraSection(Section):
    """The LoRA configuration the uniform planner gives every agent."""

    rank: int = Field(8, ge=1, le=1024, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale alpha / rank)")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    targets: list[str] = Field(
        ["all"],
        description="candidate matrices: module name suffixes (e.g. query, v_proj) or 'all' for the model's table; "
        "with selection.mode=all every candidate gets LoRA, with importance the probe picks among them",
    )

    @field_validator("targets")
    @classmethod
    def _nonempty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one module suffix")
        return value


class SelectionSection(Section):
    """Which candidate matrices get LoRA (METHOD.md section 1)."""

    mode: Literal["importance", "all", "random"] = Field(
        "importance",
        description="importance: probe and keep the top matrices; all: every candidate; "
        "random: a seeded random mask under the same budget (a baseline for comparisons)",
    )
    budget: float = Field(
        0.34, gt=0, description="trainable LoRA parameters: a fraction (<= 1) of all candidates, or a count (> 1)"
    )
    probe_rank: int = Field(4, ge=1, le=64, description="rank of the AdaLoRA probe adapters")
    probe_steps: int = Field(20, ge=1, description="probe steps on each agent's data")
    probe_batch_size: int = Field(16, ge=1, description="samples per probe step")
    probe_learning_rate: float = Field(1e-3, gt=0, description="AdamW learning rate of the probe")
    probe_deadline_s: float = Field(300.0, gt=0, description="seconds agents have to report their scores")
    reselect_every: int = Field(0, ge=0, description="re-select every N rounds; 0 = select once")
    rescore: Literal["training", "probe"] = Field(
        "training",
        description="how re-selection scores the mask (reselect_every > 0): training: from the sensitivity x "
        "uncertainty the agents accumulate over their adapters while they train (no extra probe); probe: a new "
        "probe of the base with a fresh head",
    )

    @property
    def scores_training(self) -> bool:
        """Whether plans ask agents to score their matrices while training (for re-selection)."""
        return self.mode == "importance" and self.reselect_every > 0 and self.rescore == "training"


class PlanningSection(Section):
    """The fedpipe planner's search space and limits (METHOD.md section 2)."""

    ranks: list[int] = Field([2, 4, 8, 16, 32, 64], description="LoRA ranks to choose from")
    batch_sizes: list[int] = Field([1, 2, 4, 8, 16, 32], description="batch sizes to choose from")
    quantizations: list[Literal["none", "int8", "nf4"]] = Field(
        ["none", "int8", "nf4"], description="base precisions to choose from"
    )
    mask_fractions: list[float] = Field([1.0, 0.5], description="shares of the mask a weak agent may train")
    max_under_training: float = Field(0.0, ge=0, lt=1, description="allowed data-weighted under-training rate")
    max_local_epochs: int = Field(4, ge=1, description="epochs a fast agent may train within the round time")
    round_time_slack: float = Field(
        0.1, ge=0, description="round time above the shortest feasible, so slow agents afford richer configurations"
    )
    memory_headroom: float = Field(0.1, ge=0, lt=1, description="share of usable memory kept free")
    bandwidth_bytes_per_s: float = Field(12.5e6, gt=0, description="assumed link speed for transfer time")
    max_round_upload_bytes: int = Field(0, ge=0, description="bound on a round's total upload bytes, 0 = none")
    refit_threshold: float = Field(0.1, gt=0, description="relative prediction error that triggers a refit")
    rank_allocation: Literal["uniform", "per-matrix"] = Field(
        "uniform",
        description="one rank on all of an agent's matrices, or a rank for each matrix (0 = not trained) "
        "spreading the LoRA parameters the planner gave the agent by importance (coordinator/ranks.py)",
    )
    matrix_ranks: list[int] = Field(
        [], description="ranks the per-matrix allocation may give a matrix; empty = planning.ranks"
    )
    agent_ranks: dict[str, int] = Field(
        {}, description="uniform planner: a fixed LoRA rank per agent id (experiments with unequal ranks)"
    )

    @field_validator("agent_ranks")
    @classmethod
    def _positive_ranks(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {agent: rank for agent, rank in value.items() if not 1 <= rank <= 1024}
        if bad:
            raise ValueError(f"ranks must be in 1..1024: {bad}")
        return value

    @field_validator("matrix_ranks")
    @classmethod
    def _matrix_ranks(cls, value: list[int]) -> list[int]:
        bad = [rank for rank in value if not 1 <= rank <= 1024]
        if bad:
            raise ValueError(f"ranks must be in 1..1024: {bad}")
        return value

    @field_validator("ranks", "batch_sizes", "quantizations", "mask_fractions")
    @classmethod
    def _nonempty(cls, value: list[object]) -> list[object]:
        if not value:
            raise ValueError("needs at least one value")
        return value


class TrainingSection(Section):
    """Local work per round."""

    mode: Literal["lora", "ferret"] = Field(
        "lora",
        description="lora: LoRA adapters, rank-padded; ferret: the selected matrices trained in full and sent as "
        "random-projection coefficients (Ferret)",
    )
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="the agents' local optimizer")
    batch_size: int = Field(16, ge=1, description="samples per optimizer step")
    local_epochs: int = Field(1, ge=1, description="passes over the local data per round")
    max_steps: int = Field(0, ge=0, description="cap on steps per round, 0 = none")
    learning_rate: float = Field(1e-3, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    proximal_mu: float = Field(
        0.0, ge=0, lt=1e6, description="FedProx: agents add (mu / 2) ||w - w_start||^2 over the trained tensors"
    )
    max_seq_len: int = Field(64, ge=8, description="tokens per sample")
    quantization: Literal["none", "int8", "nf4"] = Field("none", description="precision of the frozen base")


class EvaluationSection(Section):
    """Evaluation of each global adapter."""

    agents: bool = Field(True, description="ask agents to evaluate each global on their validation split")
    heldout: str | None = Field(None, description="held-out CSV/JSONL, 'embedded' for the 1,000 reserved tweets")
    text_column: str = Field(EMBEDDED_TEXT_COLUMN, description="text column of the held-out file")
    label_column: str = Field(EMBEDDED_LABEL_COLUMN, description="label column of the held-out file")
    prompt_column: str = Field("prompt", description="causal-lm: prompt column of the held-out file")
    response_column: str = Field("response", description="causal-lm: response column of the held-out file")
    max_samples: int = Field(0, ge=0, description="cap on held-out samples, 0 = all")
    initial: bool = Field(True, description="also evaluate the untrained round-0 adapter")
    overlap: bool = Field(
        True,
        description="held-out: evaluate round t while the agents train round t+1, its result reported when ready "
        "(false: the next round waits for it)",
    )


class FerretSection(Section):
    """The Ferret mode's projection (training.mode ferret)."""

    directions: int = Field(
        1000,
        ge=0,
        description="directions per agent and round (K), shared among the blocks by their update norms; 0 sends "
        "each block's whole change (plain full-weight FedAvg of the same blocks, the reference Ferret approximates)",
    )
    basis: Literal["rademacher", "gaussian"] = Field(
        "rademacher",
        description="rademacher: +-1/sqrt(d) from integer draws (the same bits on every CPU); gaussian: N(0, I/d)",
    )


class AggregationSection(Section):
    """Settings of the aggregation strategies."""

    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="trimmed-mean: share of the updates dropped at each end, per coordinate"
    )
    global_rank: int = Field(
        0,
        ge=0,
        le=4096,
        description="rank-padding and flexlora: rank the SVD-ordered global keeps per module "
        "(0: the largest of its current rank and the ranks trained that round)",
    )
    server_optimizer: Literal["none", "fedavgm", "fedadam", "fedyogi"] = Field(
        "none",
        description="a server optimizer over the round's averaged change (Reddi et al.): moments on each module's "
        "dW and the heads, saved with every checkpoint (LoRA mode only)",
    )
    server_lr: float | None = Field(
        None, gt=0, le=100, description="server learning rate (default 1.0 for fedavgm, 0.01 for fedadam and fedyogi)"
    )
    server_beta1: float = Field(0.9, ge=0, lt=1, description="server momentum / first-moment decay")
    server_beta2: float = Field(0.99, ge=0, lt=1, description="fedadam, fedyogi: second-moment decay")
    server_tau: float = Field(1e-3, gt=0, le=1, description="fedadam, fedyogi: adaptivity (v starts at tau^2)")


class DpSection(Section):
    """Client-level differential privacy (DP-FedAvg): each update clipped, Gaussian noise on the round's sum."""

    enabled: bool = Field(False, description="clip every update and add noise; the run reports its epsilon")
    clip_norm: float = Field(
        1.0,
        gt=0,
        description="C: bound on the L2 norm of an update's change (the folded factors and heads it trains)",
    )
    noise_multiplier: float = Field(
        0.0,
        ge=0,
        description="z: the noise on the round's sum has standard deviation z x clip_norm; 0 = derive it from "
        "target_epsilon before the first round",
    )
    target_epsilon: float = Field(
        0.0,
        ge=0,
        description="the budget: with noise_multiplier 0 the noise is derived to meet it over run.rounds; "
        "either way the run stops before a round that would spend more; 0 = no budget",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) guarantee")


class SecureAggregationSection(Section):
    """SecAgg+ (Bell et al. 2020): the coordinator learns only the sum of a round's changes."""

    enabled: bool = Field(False, description="agents upload their change masked; the coordinator unmasks the sum")
    neighbours: int = Field(
        0, ge=0, description="k: agents each one masks with and shares its secrets among; 0 = about 3 log2 n"
    )
    threshold: float = Field(
        0.5,
        gt=0,
        description="t: shares needed to rebuild a secret; a fraction of k (t = floor(fraction x k) + 1, at most "
        "k) or, from 1 up, a count",
    )
    fraction_bits: int = Field(24, ge=8, le=40, description="fixed point: values are sent as round(x 2^f) mod 2^62")
    clip_norm: float = Field(
        0.0,
        ge=0,
        description="agents clip their change to this L2 norm before masking (privacy.dp.clip_norm when DP is on); "
        "0 = no clip: then nothing bounds one agent's share of the sum",
    )
    step_deadline_s: float = Field(60.0, gt=0, description="seconds each key, share, masking and unmask step waits")
    signed_keys: bool = Field(
        True,
        description="agents sign their keys with their mTLS certificate and check every neighbour's, so a "
        "coordinator that swaps keys is caught; needs tls.auth mtls (false: an honest-but-curious coordinator only)",
    )

    def threshold_for(self, neighbours: int) -> int:
        """t for a graph of degree k."""
        if self.threshold < 1:
            return min(neighbours, int(self.threshold * neighbours) + 1)
        return min(neighbours, int(self.threshold))


class PrivacySection(Section):
    """What the run's published globals reveal about any one agent's data."""

    dp: DpSection = DpSection()
    secure_aggregation: SecureAggregationSection = SecureAggregationSection()


class CoordinatorConfig(BaseSettings):
    """Everything fedpipe-coordinator reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="FEDPIPE_COORDINATOR_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    labels: Labels = Field(list(EMBEDDED_LABELS), description="class names; agents must report the same")
    planner: Literal["fedpipe", "uniform"] = Field(
        "fedpipe", description="fedpipe: per-agent plans from measured resources; uniform: one plan for all"
    )
    strategy: Literal[
        "rank-padding", "slot-average", "flexlora", "hetlora", "fedavg", "coordinate-median", "trimmed-mean"
    ] = Field(
        "rank-padding",
        description="aggregation: rank-padding (exact weighted mean of the changes, SVD-ordered), slot-average "
        "(per rank slot, the old baseline), flexlora, hetlora, fedavg (equal ranks), or the robust "
        "coordinate-median and trimmed-mean (unweighted, per coordinate)",
    )
    log_format: Literal["text", "json"] = Field("text", description="log line format")
    insecure: bool = Field(False, description="serve plaintext gRPC without authentication (tests, trusted hosts)")
    tls: TlsSection = TlsSection()
    admin: AdminSection = AdminSection()
    service: ServiceSection = ServiceSection()
    model: ModelSection = ModelSection()
    updates: UpdatesSection = UpdatesSection()
    aggregation: AggregationSection = AggregationSection()
    ferret: FerretSection = FerretSection()
    limits: LimitsSection = LimitsSection()
    server: ServerSection = ServerSection()
    metrics: MetricsSection = MetricsSection()
    run: RunSection = RunSection()
    lora: LoraSection = LoraSection()
    tracking: TrackingSection = TrackingSection()
    selection: SelectionSection = SelectionSection()
    planning: PlanningSection = PlanningSection()
    training: TrainingSection = TrainingSection()
    evaluation: EvaluationSection = EvaluationSection()
    privacy: PrivacySection = PrivacySection()

    @model_validator(mode="after")
    def _privacy_fits(self) -> CoordinatorConfig:
        dp, secure = self.privacy.dp, self.privacy.secure_aggregation
        if dp.enabled and dp.noise_multiplier == 0 and dp.target_epsilon == 0:
            raise ValueError("privacy.dp: set noise_multiplier, or target_epsilon to derive it from")
        for name, on in (("privacy.dp", dp.enabled), ("privacy.secure_aggregation", secure.enabled)):
            if not on:
                continue
            linear = LINEAR_STRATEGIES.get(self.training.mode, ())
            if self.strategy not in linear:
                # DP's noise is calibrated to one agent's pull on a sum, and secure aggregation yields only the
                # sum; an SVD-ordered or robust aggregate is no sum.
                raise ValueError(
                    f"{name} needs a strategy that sums the updates ({' or '.join(linear)} in the "
                    f"{self.training.mode} mode), not {self.strategy}"
                )
        if secure.enabled and secure.signed_keys and (self.insecure or self.tls.auth != "mtls"):
            raise ValueError(
                "privacy.secure_aggregation.signed_keys needs agent certificates (tls.auth mtls, not --insecure); "
                "set it false to trust the coordinator to relay keys unchanged"
            )
        if secure.enabled and self.run.min_agents < 2:
            raise ValueError("privacy.secure_aggregation needs run.min_agents of 2 or more: one agent's sum is its own")
        return self

    @model_validator(mode="after")
    def _server_optimizer_fits(self) -> CoordinatorConfig:
        if self.training.mode == "ferret" and self.strategy in ("slot-average", "flexlora", "hetlora"):
            # These are about LoRA factors; Ferret combines coefficients per coordinate, where they would
            # quietly become a plain weighted mean.
            raise ValueError(
                f"strategy {self.strategy} combines LoRA factors; the ferret mode takes rank-padding or fedavg "
                "(the weighted mean), coordinate-median or trimmed-mean"
            )
        if self.aggregation.server_optimizer != "none" and self.training.mode == "ferret":
            # Ferret broadcasts the averaged coefficients and every agent applies them itself; a server step
            # would make the coordinator's weights differ from every agent's.
            raise ValueError(
                f"aggregation.server_optimizer {self.aggregation.server_optimizer} needs training.mode lora: "
                "the ferret mode broadcasts coefficients, not the coordinator's weights"
            )
        if self.planning.rank_allocation == "per-matrix" and self.training.mode != "lora":
            raise ValueError(
                "planning.rank_allocation per-matrix spreads LoRA parameters over matrices: it needs training.mode "
                f"lora (the {self.training.mode} mode trains its matrices in full)"
            )
        return self

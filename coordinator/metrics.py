"""Every Prometheus metric fedpipe-coordinator exports, declared once on its own registry (docs/metrics.md).

Names are fedpipe_*, units are in the names, labels are bounded: agent ids of registered agents, reason,
method, code, source and matrix enums, the class names of the run's model; never a round number.
fedpipe_agent_* metrics here are the coordinator's view of each agent; the agents' own metrics are
fedpipe_edge_* (edge_agent.metrics).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SECAGG_STAGES = ("shares", "masking", "unmask", "unmasking")  # a secure round's stages, in order
ROUND_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
FAST_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class CoordinatorMetrics:
    """Metrics of fedpipe-coordinator."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rounds_completed = Counter("fedpipe_rounds_completed", "Rounds aggregated", registry=r)
        self.rounds_failed = Counter(
            "fedpipe_rounds_failed", "Rounds closed without aggregation", ["reason"], registry=r
        )
        for reason in ("no_quorum", "non_finite", "secure_aggregation"):
            self.rounds_failed.labels(reason)
        self.current_round = Gauge("fedpipe_current_round", "Round in progress (0 before the first)", registry=r)
        self.run_rounds = Gauge("fedpipe_run_rounds", "Rounds the run is configured for", registry=r)
        self.run_finished = Gauge("fedpipe_run_finished", "1 once the run completed its last round", registry=r)
        self.round_duration = Histogram(
            "fedpipe_round_duration_seconds",
            "Wall time of a round, tasks out to global saved",
            buckets=ROUND_BUCKETS,
            registry=r,
        )
        self.heldout_duration = Histogram(
            "fedpipe_heldout_evaluation_seconds",
            "Wall time of a global's held-out evaluation (off the critical path with evaluation.overlap)",
            buckets=ROUND_BUCKETS,
            registry=r,
        )
        self.aggregation_duration = Histogram(
            "fedpipe_aggregation_duration_seconds",
            "Time in the aggregation strategy",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.ferret_reconstruction_seconds = Gauge(
            "fedpipe_ferret_reconstruction_seconds",
            "Ferret: seconds the last aggregation spent rebuilding blocks from coefficients",
            registry=r,
        )
        self.ferret_directions = Gauge(
            "fedpipe_ferret_directions", "Ferret: directions of the last round's combined update", registry=r
        )
        self.sampled_agents = Gauge(
            "fedpipe_round_sampled_agents", "Agents drawn to train the current round (client sampling)", registry=r
        )
        self.truncated_energy_share = Gauge(
            "fedpipe_aggregation_truncated_energy_share",
            "Share of the last round's update energy that truncation to the global rank dropped",
            registry=r,
        )
        self.dp_epsilon = Gauge(
            "fedpipe_dp_epsilon",
            "privacy.dp: epsilon (at the configured delta) the published globals carry",
            registry=r,
        )
        self.dp_noise_multiplier = Gauge(
            "fedpipe_dp_noise_multiplier", "privacy.dp: noise standard deviation on the sum / clip_norm", registry=r
        )
        self.dp_updates_clipped = Counter(
            "fedpipe_dp_updates_clipped",
            "privacy.dp: updates scaled down to privacy.dp.clip_norm",
            ["agent"],
            registry=r,
        )
        self.secagg_participants = Gauge(
            "fedpipe_secagg_participants",
            "Secure aggregation: agents whose keys opened the last secure round",
            registry=r,
        )
        self.secagg_step_seconds = Gauge(
            "fedpipe_secagg_step_seconds",
            "Secure aggregation: seconds each step of the last secure round took",
            ["stage"],
            registry=r,
        )
        for stage in SECAGG_STAGES:
            self.secagg_step_seconds.labels(stage)
        self.secagg_missed = Counter(
            "fedpipe_secagg_missed",
            "Secure aggregation: steps an agent did not complete by its deadline",
            ["agent", "stage"],
            registry=r,
        )
        self.agents_registered = Gauge("fedpipe_agents_registered", "Agents known to the registry", registry=r)
        self.agents_alive = Gauge("fedpipe_agents_alive", "Agents with a recent heartbeat", registry=r)
        self.agent_up = Gauge(
            "fedpipe_agent_up", "1 while the agent beats, 0 once it missed heartbeats", ["agent"], registry=r
        )
        self.round_started = Gauge(
            "fedpipe_round_started_timestamp_seconds", "Unix time the current round's tasks went out", registry=r
        )
        self.round_completed = Gauge(
            "fedpipe_round_completed_timestamp_seconds", "Unix time the last round was aggregated", registry=r
        )
        self.updates_accepted = Counter("fedpipe_updates_accepted", "Uploads aggregated", ["agent"], registry=r)
        self.updates_rejected = Counter(
            "fedpipe_updates_rejected", "Uploads refused, by reason", ["reason"], registry=r
        )
        self.updates_replayed = Counter(
            "fedpipe_updates_replayed",
            "Identical re-sends of an accepted update, acknowledged and ignored",
            ["agent"],
            registry=r,
        )
        self.updates_clipped = Counter(
            "fedpipe_updates_clipped", "Updates scaled down to a norm bound", ["agent"], registry=r
        )
        self.updates_screened = Counter(
            "fedpipe_updates_screened",
            "Updates over a norm bound (updates.max_norm, or norm_multiple x the round's median), by action",
            ["agent", "action"],
            registry=r,
        )
        self.weights_capped = Counter(
            "fedpipe_weights_capped",
            "Rounds in which the agent's aggregation weight was cut to max_weight_ratio x the median",
            ["agent"],
            registry=r,
        )
        self.agent_weight_share = Gauge(
            "fedpipe_agent_weight_share",
            "The agent's share of the last aggregated round's total weight",
            ["agent"],
            registry=r,
        )
        self.calls_refused = Counter(
            "fedpipe_calls_refused",
            "Calls refused before they reached a handler, by reason (limit, rate, unauthenticated, watches)",
            ["reason"],
            registry=r,
        )
        for reason in ("limit", "rate", "unauthenticated", "watches"):
            self.calls_refused.labels(reason)
        self.update_norm = Gauge(
            "fedpipe_agent_update_norm",
            "L2 norm of the agent's last update's change to its tensors",
            ["agent"],
            registry=r,
        )
        self.round_extensions = Counter(
            "fedpipe_round_extensions", "Round deadlines extended for want of quorum", registry=r
        )
        self.agents_dead = Counter(
            "fedpipe_agent_deaths", "Times an agent stopped beating and was marked dead", ["agent"], registry=r
        )
        self.resumed_round = Gauge(
            "fedpipe_resumed_from_round", "Round the coordinator resumed after (0 = a fresh run)", registry=r
        )
        self.stragglers = Counter(
            "fedpipe_stragglers", "Planned agents with no update when the round closed", ["agent"], registry=r
        )
        self.upload_bytes = Counter("fedpipe_upload_bytes", "Update bytes received", ["agent"], registry=r)
        self.download_bytes = Counter("fedpipe_download_bytes", "Global bytes sent", ["agent"], registry=r)
        self.upload_seconds = Counter(
            "fedpipe_upload_seconds", "Time receiving and checking uploads", ["agent"], registry=r
        )
        self.download_seconds = Counter(
            "fedpipe_download_seconds", "Time streaming the global adapter", ["agent"], registry=r
        )
        self.agent_train_seconds = Gauge(
            "fedpipe_agent_train_seconds",
            "Local training time of the agent's last update",
            ["agent"],
            registry=r,
        )
        self.agent_samples = Gauge("fedpipe_agent_samples", "Samples in the agent's last update", ["agent"], registry=r)
        self.agent_samples_per_second = Gauge(
            "fedpipe_agent_samples_per_second",
            "Training throughput of the agent's last update",
            ["agent"],
            registry=r,
        )
        self.agent_peak_memory = Gauge(
            "fedpipe_agent_peak_memory_bytes",
            "Measured peak memory the agent reported",
            ["agent"],
            registry=r,
        )
        self.agent_flops = Gauge(
            "fedpipe_agent_flops_per_second",
            "Measured sustained FLOP/s from the agent's profile",
            ["agent"],
            registry=r,
        )
        self.agent_devices = Gauge(
            "fedpipe_agent_devices",
            "Devices the agent trains each plan on (data-parallel processes; 1 for most agents)",
            ["agent"],
            registry=r,
        )
        self.agent_memory = Gauge(
            "fedpipe_agent_memory_bytes",
            "Usable device memory from the agent's profile",
            ["agent"],
            registry=r,
        )
        self.plan_rank = Gauge("fedpipe_plan_max_rank", "Largest LoRA rank in the agent's plan", ["agent"], registry=r)
        self.plan_batch = Gauge("fedpipe_plan_batch_size", "Batch size in the agent's plan", ["agent"], registry=r)
        self.plan_bits = Gauge(
            "fedpipe_plan_quantization_level",
            "Bits per frozen base weight in the agent's plan: 16, 8 (int8) or 4 (nf4)",
            ["agent"],
            registry=r,
        )
        self.plan_split = Gauge(
            "fedpipe_plan_split_devices",
            "Devices the agent's base is split over by layers in its plan; 1 = each device holds all of it",
            ["agent"],
            registry=r,
        )
        self.plan_trainable = Gauge(
            "fedpipe_plan_trainable_parameters",
            "Trainable parameters in the agent's plan",
            ["agent"],
            registry=r,
        )
        self.plan_memory = Gauge(
            "fedpipe_plan_predicted_memory_bytes",
            "Peak memory the cost model predicts for the plan",
            ["agent"],
            registry=r,
        )
        self.plan_step_seconds = Gauge(
            "fedpipe_plan_predicted_step_seconds",
            "Step time the cost model predicts for the plan",
            ["agent"],
            registry=r,
        )
        self.plan_round_seconds = Gauge(
            "fedpipe_plan_round_seconds", "Training time per round the planner sized every agent to", registry=r
        )
        self.agent_step_seconds = Gauge(
            "fedpipe_agent_step_seconds", "Measured step time of the agent's last update", ["agent"], registry=r
        )
        self.agent_excluded = Gauge(
            "fedpipe_agent_excluded",
            "1 when the planner left the agent out (it fits no configuration)",
            ["agent"],
            registry=r,
        )
        self.global_accuracy = Gauge(
            "fedpipe_global_accuracy", "Accuracy of the latest global adapter", ["source"], registry=r
        )
        self.global_loss = Gauge("fedpipe_global_loss", "Loss of the latest global adapter", ["source"], registry=r)
        self.global_macro_f1 = Gauge(
            "fedpipe_global_macro_f1", "Macro-F1 of the latest global adapter (classifiers)", ["source"], registry=r
        )
        self.global_class_recall = Gauge(
            "fedpipe_global_class_recall",
            "Recall of each class by the latest global adapter (classifiers; one series per class of the run)",
            ["source", "label"],
            registry=r,
        )
        self.global_predicted_classes = Gauge(
            "fedpipe_global_predicted_classes",
            "Classes the latest global adapter predicts for at least one example (1: it predicts one class for all)",
            ["source"],
            registry=r,
        )
        self.mask_size = Gauge("fedpipe_selection_mask_size", "Weight matrices in the current LoRA mask", registry=r)
        self.mask_parameters = Gauge(
            "fedpipe_selection_trainable_parameters", "LoRA parameters of the mask at the planned rank", registry=r
        )
        self.selection_score = Gauge(
            "fedpipe_selection_score", "Combined importance of each selected matrix", ["matrix"], registry=r
        )
        self.probe_seconds = Gauge(
            "fedpipe_agent_probe_seconds", "Duration of the agent's last importance probe", ["agent"], registry=r
        )
        self.rpc_duration = Histogram(
            "fedpipe_rpc_duration_seconds",
            "Server-side RPC latency",
            ["method", "code"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.polls_open = Gauge("fedpipe_task_polls_open", "Task polls waiting on the server now", registry=r)
        self.loop_lag = Gauge(
            "fedpipe_event_loop_lag_seconds",
            "How late the server's event loop ran a 1 s timer, the worst over the last 10 s",
            registry=r,
        )

        self.run_info = Gauge(
            "fedpipe_run",
            "1 for the run being served; one series, the current (or last) run's",
            ["run_id"],
            registry=r,
        )
        self.runs = Gauge("fedpipe_runs", "Runs of a serving coordinator by state", ["state"], registry=r)

    def begin_run(self, run_id: str) -> None:
        """A serving coordinator's next run: its id on fedpipe_run, and the run-wide figures of the run before
        cleared. Per-agent series stay (bounded by the fleet, and the same agents usually serve the next run)."""
        self.run_info.clear()
        self.run_info.labels(run_id).set(1)
        for gauge in (self.run_finished, self.current_round, self.resumed_round, self.mask_size, self.mask_parameters):
            gauge.set(0)
        for labelled in (
            self.selection_score,
            self.global_class_recall,
            self.global_accuracy,
            self.global_loss,
            self.global_macro_f1,
            self.global_predicted_classes,
        ):
            labelled.clear()

    def start_agent(self, agent: str) -> None:
        """Create an agent's counters at 0, so rates and alerts see them before its first event."""
        for counter in (
            self.updates_accepted,
            self.updates_replayed,
            self.updates_clipped,
            self.weights_capped,
            self.agents_dead,
            self.stragglers,
            self.upload_bytes,
            self.download_bytes,
            self.upload_seconds,
            self.download_seconds,
            self.dp_updates_clipped,
        ):
            counter.labels(agent)
        for action in ("rejected", "clipped"):
            self.updates_screened.labels(agent, action)
        for stage in SECAGG_STAGES[:3]:  # those that wait on agents
            self.secagg_missed.labels(agent, stage)

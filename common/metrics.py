"""Every Prometheus metric FedPipe exports, declared once per side on its own registry.

Names are fedpipe_*, units are in the names, labels are bounded: agent ids of registered agents, reason
and kind enums; never a round number.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

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
        self.current_round = Gauge("fedpipe_current_round", "Round in progress (0 before the first)", registry=r)
        self.round_duration = Histogram(
            "fedpipe_round_duration_seconds",
            "Wall time of a round, tasks out to global saved",
            buckets=ROUND_BUCKETS,
            registry=r,
        )
        self.aggregation_duration = Histogram(
            "fedpipe_aggregation_duration_seconds",
            "Time in the aggregation strategy",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.agents_registered = Gauge("fedpipe_agents_registered", "Agents known to the registry", registry=r)
        self.agents_alive = Gauge("fedpipe_agents_alive", "Agents with a recent heartbeat", registry=r)
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
            "fedpipe_updates_clipped", "Updates scaled down to updates.max_norm", ["agent"], registry=r
        )
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
        self.agent_memory = Gauge(
            "fedpipe_agent_memory_bytes",
            "Usable device memory from the agent's profile",
            ["agent"],
            registry=r,
        )
        self.plan_rank = Gauge("fedpipe_plan_max_rank", "Largest LoRA rank in the agent's plan", ["agent"], registry=r)
        self.plan_batch = Gauge("fedpipe_plan_batch_size", "Batch size in the agent's plan", ["agent"], registry=r)
        self.plan_bits = Gauge(
            "fedpipe_plan_base_bits", "Bits per frozen base weight in the agent's plan", ["agent"], registry=r
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


class AgentMetrics:
    """Metrics of fedpipe-agent."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rounds = Counter("fedpipe_agent_rounds", "Training tasks completed", registry=r)
        self.steps = Counter("fedpipe_agent_steps", "Optimizer steps", registry=r)
        self.samples = Counter("fedpipe_agent_samples", "Training samples processed", registry=r)
        self.samples_per_second = Gauge("fedpipe_agent_samples_per_second", "Throughput of the last round", registry=r)
        self.loss = Gauge("fedpipe_agent_train_loss", "Mean training loss of the last round", registry=r)
        self.train_seconds = Gauge("fedpipe_agent_train_seconds", "Training time of the last round", registry=r)
        self.eval_accuracy = Gauge(
            "fedpipe_agent_eval_accuracy",
            "Accuracy of the last global on the local validation split",
            registry=r,
        )
        self.device_memory = Gauge("fedpipe_agent_device_memory_bytes", "Device memory in use (RSS on CPU)", registry=r)
        self.peak_memory = Gauge("fedpipe_agent_peak_memory_bytes", "Peak memory of the last round", registry=r)
        self.upload_bytes = Counter("fedpipe_agent_upload_bytes", "Update bytes sent", registry=r)
        self.upload_seconds = Counter("fedpipe_agent_upload_seconds", "Time spent uploading", registry=r)
        self.download_bytes = Counter("fedpipe_agent_download_bytes", "Global bytes received", registry=r)
        self.download_seconds = Counter("fedpipe_agent_download_seconds", "Time spent downloading", registry=r)
        self.rpc_retries = Counter("fedpipe_agent_rpc_retries", "RPC attempts retried", ["method"], registry=r)
        self.ready = Gauge("fedpipe_agent_ready", "1 once registered with the coordinator", registry=r)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds would flood the log
        pass


Probe = Callable[[], tuple[bool, str]]


def serve(registry: CollectorRegistry, host: str, port: int, ready: Probe | None = None) -> int:
    """Serve /metrics, /healthz (the process answers) and /readyz (ready() holds); port 0 picks one.

    Returns the bound port.
    """
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok, reason = ready() if path == "/readyz" and ready is not None else (True, "ok")
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [f"{reason}\n".encode()]
        result: Iterable[bytes] = metrics_app(environ, start_response)
        return result

    httpd = make_server(host, port, app, _Server, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return int(httpd.server_port)

"""Every Prometheus metric fedpipe-agent exports, declared once on its own registry (docs/metrics.md).

Names are fedpipe_edge_* (the coordinator's view of agents is fedpipe_agent_*{agent}); the agent id is
in fedpipe_edge_info and in the scrape's labels, not on every series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class AgentMetrics:
    """Metrics of fedpipe-agent."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rounds = Counter("fedpipe_edge_rounds", "Training tasks completed", registry=r)
        self.steps = Counter("fedpipe_edge_steps", "Optimizer steps", registry=r)
        self.samples = Counter("fedpipe_edge_samples", "Training samples processed", registry=r)
        self.samples_per_second = Gauge("fedpipe_edge_samples_per_second", "Throughput of the last round", registry=r)
        self.loss = Gauge("fedpipe_edge_train_loss", "Mean training loss of the last round", registry=r)
        self.train_seconds = Gauge("fedpipe_edge_train_seconds", "Training time of the last round", registry=r)
        self.eval_accuracy = Gauge(
            "fedpipe_edge_eval_accuracy",
            "Accuracy of the last global on the local validation split",
            registry=r,
        )
        self.device_memory = Gauge("fedpipe_edge_device_memory_bytes", "Device memory in use (RSS on CPU)", registry=r)
        self.peak_memory = Gauge("fedpipe_edge_peak_memory_bytes", "Peak memory of the last round", registry=r)
        self.upload_bytes = Counter("fedpipe_edge_upload_bytes", "Update bytes sent", registry=r)
        self.upload_seconds = Counter("fedpipe_edge_upload_seconds", "Time spent uploading", registry=r)
        self.download_bytes = Counter("fedpipe_edge_download_bytes", "Global bytes received", registry=r)
        self.download_seconds = Counter("fedpipe_edge_download_seconds", "Time spent downloading", registry=r)
        self.rpc_retries = Counter("fedpipe_edge_rpc_retries", "RPC attempts retried", ["method"], registry=r)
        self.ready = Gauge("fedpipe_edge_ready", "1 once registered with the coordinator", registry=r)
        self.ferret_projection_seconds = Counter(
            "fedpipe_edge_ferret_projection_seconds", "Ferret: time projecting updates onto directions", registry=r
        )
        self.ferret_reconstruction_seconds = Counter(
            "fedpipe_edge_ferret_reconstruction_seconds",
            "Ferret: time rebuilding the round's aggregate from coefficients",
            registry=r,
        )
        self.ferret_resyncs = Counter(
            "fedpipe_edge_ferret_resyncs", "Ferret: full downloads of the global weights", registry=r
        )
        self.devices = Gauge("fedpipe_edge_devices", "Devices (processes) each plan trains on", registry=r)
        self.group_failures = Counter(
            "fedpipe_edge_group_failures",
            "Training tasks lost to a failed rank of the agent's process group",
            registry=r,
        )
        self.info = Info("fedpipe_edge", "The agent's id, version and device", registry=r)
        self.step_seconds = Histogram(
            "fedpipe_edge_step_duration_seconds", "Wall time of one optimizer step", buckets=STEP_BUCKETS, registry=r
        )

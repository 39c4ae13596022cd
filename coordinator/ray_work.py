"""Virtual agents' tasks as Ray tasks (`simulation.executor: ray`), for a fleet one host cannot train.

The coordinator side stays in the simulating process: it downloads a task's global through the in-memory
gateway, sends the task, the global and the agent's data to a Ray worker, and replays what the worker's
agent sent (the upload, the evaluation or the importance report) through that same gateway, so admission,
screening and aggregation see exactly what a real agent would have sent. A Ray worker runs the real agent
task code (edge_agent.agent.Agent.execute) on a base model it loads once and keeps for later tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from common.errors import ConfigError
from common.types import DeviceProfile, Evaluation, ImportanceReport, ModelSpec, Task, UpdateMeta

log = logging.getLogger(__name__)


@dataclass
class Recorded:
    """What a worker's agent sent, to be replayed to the coordinator in order."""

    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)


class RecordingGateway:
    """edge_agent.agent.Gateway inside a Ray worker: downloads answer with the global the driver sent, and
    what the agent sends is recorded."""

    def __init__(self, run_id: str, downloads: Mapping[tuple[int, str], dict[str, torch.Tensor]]) -> None:
        self.last_answer = 0.0
        self.run_id = run_id
        self.downloads = downloads
        self.recorded = Recorded()

    def describe_run(self) -> None:
        return None

    def register(self, profile: DeviceProfile, spec: ModelSpec, version: str) -> float:
        raise ConfigError("a Ray worker's agent does not register; the simulating process does")

    def heartbeat(self, state: str) -> bool:
        return True

    def get_task(self, wait_s: float) -> Task:
        raise ConfigError("a Ray worker's agent is handed its task")

    def download(self, global_round: int, plan_id: str, have_digest: str = "") -> dict[str, torch.Tensor]:
        return self.downloads[(global_round, plan_id)]

    def upload(self, meta: UpdateMeta, tensors: Mapping[str, torch.Tensor]) -> str:
        self.recorded.calls.append(("upload", (meta, dict(tensors))))
        return "recorded in the Ray worker"

    def report_evaluation(self, global_round: int, evaluation: Evaluation) -> None:
        self.recorded.calls.append(("report_evaluation", (global_round, evaluation)))

    def report_importance(self, report: ImportanceReport) -> None:
        self.recorded.calls.append(("report_importance", (report,)))

    # Secure aggregation keeps per-agent secrets between tasks, which a Ray task does not: simulate refuses the
    # combination, and these only record.
    def advertise_keys(
        self, round_: int, plan_id: str, keys: tuple[bytes, bytes], proof: tuple[bytes, bytes] | None = None
    ) -> None:
        self.recorded.calls.append(("advertise_keys", (round_, plan_id, keys, proof)))

    def share_keys(self, round_: int, sealed: Mapping[str, bytes]) -> None:
        self.recorded.calls.append(("share_keys", (round_, dict(sealed))))

    def unmask(self, round_: int, revealed: Mapping[str, tuple[str, int]]) -> None:
        self.recorded.calls.append(("unmask", (round_, dict(revealed))))


_MODELS: dict[tuple[str, str], Any] = {}  # in each Ray worker process: base path, task -> LocalModel


def run_task(
    base_path: str,
    spec: ModelSpec,
    agent_id: str,
    profile: DeviceProfile,
    train: list[Any],
    val: list[Any],
    task: Task,
    downloads: Mapping[tuple[int, str], dict[str, torch.Tensor]],
    run_id: str,
) -> Recorded:
    """One virtual agent's task in a Ray worker; what it sent, for the driver to replay."""
    from edge_agent.agent import Agent
    from edge_agent.data import LocalData
    from edge_agent.metrics import AgentMetrics
    from edge_agent.model import LocalModel

    key = (base_path, spec.task)
    if key not in _MODELS:
        torch.set_num_threads(1)  # one task per Ray CPU
        _MODELS[key] = LocalModel(base_path, spec.labels, torch.device("cpu"), spec.task)
    gateway = RecordingGateway(run_id, downloads)
    worker = Agent(
        agent_id, gateway, _MODELS[key], LocalData(train, val), profile, spec, AgentMetrics(), progress="off"
    )
    worker.execute(task)
    return gateway.recorded


class RayExecutor:
    """Sends virtual agents' tasks to Ray: a local Ray started here (address ''), or a cluster's."""

    def __init__(self, address: str, cpus: int) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("simulation.executor ray: install the extra, pip install 'fedpipe[ray]'") from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
                self.started = True
        self.remote = ray.remote(num_cpus=1, max_retries=0)(run_task)
        resources = ray.cluster_resources()  # type: ignore[no-untyped-call]  # ray ships no annotations here
        log.info("Ray: %s, %.0f CPUs", address or "a local cluster started here", resources.get("CPU", 0))

    def run(self, *args: Any) -> Recorded:
        """run_task(*args) on a Ray worker, waited for."""
        result: Recorded = self.ray.get(self.remote.remote(*args))
        return result

    def close(self) -> None:
        """Stop the local Ray this executor started (a cluster's stays)."""
        if self.started:
            self.ray.shutdown()

"""fedpipe-coordinator simulate: the real coordinator with N virtual agents in this one process.

The coordinator is the one `fedpipe-coordinator` runs (coordinator.cli.assemble: admission, planner, strategy,
checkpoints, held-out evaluation) without its gRPC server: virtual agents reach its Admission through an
in-memory gateway, the very seam the gRPC servicer calls. A virtual agent's task runs the real agent code
(edge_agent.agent.Agent.execute: download, peft training on its own data, upload) on the base model of a
worker thread, which every agent that worker serves shares; `simulation.work: noise` replaces the training by
seeded noise on the download, for load tests of the coordinator. Profiles and data come from the
heterogeneity spec (coordinator.population). Writes <run_dir>/simulation.json.
"""

from __future__ import annotations

import functools
import logging
import resource
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from common import transfer
from common.errors import ConfigError, FedPipeError
from common.settings import dump
from common.types import (
    SECAGG_KINDS,
    DeviceProfile,
    Evaluation,
    ImportanceReport,
    ModelSpec,
    Task,
    TaskKind,
    UpdateMeta,
)
from coordinator.admission import Admission
from coordinator.config import CoordinatorConfig
from coordinator.planner import Planner, PlanOptions, PlanSet
from coordinator.population import SimulationSection, VirtualAgent, draw_population

if TYPE_CHECKING:
    from coordinator.ray_work import RayExecutor

log = logging.getLogger("fedpipe.simulate")

POLL_S = 0.5  # the dispatcher's longest sleep between looks at the round state
BEAT_S = 2.0  # heartbeats of agents whose task is queued or running


class SimulationConfig(CoordinatorConfig):
    """A coordinator's settings plus the simulated population."""

    simulation: SimulationSection = Field(SimulationSection(), description="the virtual agents")


class InMemoryGateway:
    """edge_agent.agent.Gateway over the coordinator's Admission: the calls an agent makes over gRPC, made
    directly. Uploads are hashed as on the wire, so replays are recognised as they are over gRPC."""

    def __init__(self, admission: Admission, agent_id: str) -> None:
        self.admission = admission
        self.agent_id = agent_id
        self.last_answer = time.monotonic()
        self.run_id = ""

    def _answered(self) -> None:
        self.last_answer = time.monotonic()

    def describe_run(self) -> None:
        """Virtual agents share the simulation's one base and data: nothing to describe."""
        return None

    def register(self, profile: DeviceProfile, spec: ModelSpec, version: str) -> float:
        info = self.admission.register(self.agent_id, profile, spec)
        self.run_id = info.run_id
        self._answered()
        return info.heartbeat_interval_s

    def heartbeat(self, state: str) -> bool:
        known, _ = self.admission.heartbeat(self.agent_id, state)
        self._answered()
        return known

    def get_task(self, wait_s: float) -> Task:
        task = self.admission.get_task(self.agent_id, wait_s)
        self._answered()
        return task

    def download(self, global_round: int, plan_id: str, have_digest: str = "") -> dict[str, torch.Tensor]:
        # The copy shared by every agent of this plan; agents load it into their own parameters.
        tensors = self.admission.download(self.agent_id, global_round, plan_id, dict, have_digest)
        self._answered()
        return tensors

    def upload(self, meta: UpdateMeta, tensors: Mapping[str, torch.Tensor]) -> str:
        owned = {name: tensor.detach().clone() for name, tensor in tensors.items()}
        header, _ = transfer.encode_payload(owned)
        answer = self.admission.admit_update(
            meta, transfer.tensor_infos(header), transfer.checksum_key(header), lambda: owned
        )
        self._answered()
        return answer.message

    def report_evaluation(self, global_round: int, evaluation: Evaluation) -> None:
        self.admission.report_evaluation(self.agent_id, global_round, evaluation)
        self._answered()

    def report_importance(self, report: ImportanceReport) -> None:
        self.admission.report_importance(self.agent_id, report)
        self._answered()

    def advertise_keys(
        self, round_: int, plan_id: str, keys: tuple[bytes, bytes], proof: tuple[bytes, bytes] | None = None
    ) -> None:
        self.admission.advertise_keys(self.agent_id, round_, plan_id, keys, proof)
        self._answered()

    def share_keys(self, round_: int, sealed: Mapping[str, bytes]) -> None:
        self.admission.share_keys(self.agent_id, round_, sealed)
        self._answered()

    def unmask(self, round_: int, revealed: Mapping[str, tuple[str, int]]) -> None:
        self.admission.unmask(self.agent_id, round_, revealed)
        self._answered()


class TimedPlanner:
    """A planner whose calls are timed (the simulation reports planning time per round)."""

    def __init__(self, planner: Planner) -> None:
        self.planner = planner
        self.calls: list[dict[str, float]] = []

    def __call__(
        self, profiles: Mapping[str, DeviceProfile], spec: ModelSpec, options: PlanOptions, round_: int
    ) -> PlanSet:
        start = time.perf_counter()
        planned = self.planner(profiles, spec, options, round_)
        self.calls.append({"round": round_, "agents": len(profiles), "seconds": time.perf_counter() - start})
        return planned


class Simulation:
    """One simulated run: the coordinator's run loop in a thread, the virtual agents driven by a dispatcher."""

    def __init__(self, config: SimulationConfig) -> None:
        section = config.simulation
        if config.training.mode == "ferret":
            raise ConfigError("simulate: training.mode ferret keeps full weights per agent; simulate LoRA runs")
        if section.work == "noise" and config.evaluation.agents:
            raise ConfigError("simulate: noise work has no model to evaluate with; set evaluation.agents false")
        if section.work == "noise" and config.selection.mode != "all":
            raise ConfigError("simulate: noise work has no model to probe with; set selection.mode all")
        if section.work == "noise" and section.executor == "ray":
            raise ConfigError("simulate: noise work trains nothing to send to Ray; use simulation.executor threads")
        if config.privacy.secure_aggregation.enabled and config.privacy.secure_aggregation.signed_keys:
            raise ConfigError(
                "simulate: virtual agents hold no certificates to sign their keys with; set "
                "privacy.secure_aggregation.signed_keys false"
            )
        if config.privacy.secure_aggregation.enabled and section.executor == "ray":
            raise ConfigError(
                "simulate: secure aggregation keeps each agent's secrets between its tasks, which Ray tasks do not; "
                "use simulation.executor threads"
            )
        if config.run.min_agents > section.agents:
            raise ConfigError(f"run.min_agents {config.run.min_agents} exceeds simulation.agents {section.agents}")
        from coordinator.cli import assemble
        from coordinator.planner import PLANNERS

        self.config = config
        self.section = section
        self.planner = TimedPlanner(PLANNERS[config.planner])
        assembled = assemble(config, self.planner)
        self.orchestrator = assembled.orchestrator
        self.base_path, self.spec = assembled.base_path, assembled.spec
        self.agents = draw_population(section, self._pool(), len(self.spec.labels))
        self.gateways = {a.agent_id: InMemoryGateway(self.orchestrator.admission, a.agent_id) for a in self.agents}
        from edge_agent.secagg import SecureWork  # the agent's own code, as every virtual agent's work is

        self.secure_work = {a.agent_id: SecureWork(a.agent_id) for a in self.agents}  # secure rounds' secrets
        self.local = threading.local()  # each worker's base model (train work)
        self.counts = {"train": 0, "evaluate": 0, "probe": 0, "failed": 0}  # secure steps join when they run
        self.uploads: dict[int, list[str]] = {}  # round -> agents whose update was accepted
        self.lock = threading.Lock()
        self.ray: RayExecutor | None = None
        if section.executor == "ray":
            from coordinator.ray_work import RayExecutor

            self.ray = RayExecutor(section.ray_address, section.workers)

    def _pool(self) -> list[Any]:
        from common.data import DataSource, embedded_split

        source = DataSource("embedded", labels=self.spec.labels, task=self.spec.task)
        return embedded_split(source)[0]  # the held-out tweets stay out of every agent's data

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        """Register the population, serve its tasks until the run ends; returns the summary and the figures."""
        start = time.perf_counter()
        outcome: dict[str, Any] = {}

        def drive() -> None:
            try:
                outcome["summary"] = self.orchestrator.run()
            except BaseException as err:  # reported by run()
                outcome["error"] = err

        runner = threading.Thread(target=drive, name="coordinator-run", daemon=True)
        runner.start()
        for agent in self.agents:
            self.gateways[agent.agent_id].register(agent.profile, self.spec, "simulated")
        log.info("%d virtual agents registered (%s work, %d workers)", len(self.agents), self.section.work,
                 self.section.workers)  # fmt: skip
        try:
            # With Ray, each pool thread waits on one Ray task: `workers` bounds the tasks in flight.
            with ThreadPoolExecutor(self.section.workers, thread_name_prefix="virtual-agent") as pool:
                self._dispatch(pool, runner)
        finally:
            if self.ray is not None:
                self.ray.close()
        if "error" in outcome:
            raise outcome["error"]
        summary: dict[str, Any] = outcome["summary"]
        figures = {
            "agents": len(self.agents),
            "work": self.section.work,
            "workers": self.section.workers,
            "executor": self.section.executor,
            "wall_seconds": time.perf_counter() - start,
            "tasks": dict(self.counts),
            "accepted_per_round": {r: len(a) for r, a in sorted(self.uploads.items())},
            "aggregated_per_round": {r["round"]: len(r["agents"]) for r in summary["rounds"] if r["round"] > 0},
            "planning": self.planner.calls,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        result = {"summary": summary, "simulation": figures}
        self.orchestrator.rundir.write_simulation({**figures, "config": dump(self.config)})
        return result

    def _dispatch(self, pool: ThreadPoolExecutor, runner: threading.Thread) -> None:
        """Hand every virtual agent's tasks to the pool, once each, and keep queued and busy agents beating."""
        state = self.orchestrator.state
        busy: dict[str, float] = {}  # agent -> last heartbeat
        seen: dict[str, set[tuple[Any, ...]]] = {a.agent_id: set() for a in self.agents}
        by_id = {a.agent_id: a for a in self.agents}
        while runner.is_alive():
            with state.cond:
                state.cond.wait(POLL_S)
            now = time.monotonic()
            for agent_id, gateway in self.gateways.items():
                if agent_id in busy:
                    if now - busy[agent_id] >= BEAT_S:
                        gateway.heartbeat("busy")
                        busy[agent_id] = now
                    continue
                task = gateway.get_task(0.0)
                if task.kind in (TaskKind.WAIT, TaskKind.FINISHED):
                    continue
                key = (task.kind, task.round, task.global_round, task.plan.plan_id if task.plan else task.probe)
                if key in seen[agent_id]:
                    continue
                seen[agent_id].add(key)
                busy[agent_id] = now
                future = pool.submit(self._execute, by_id[agent_id], task)
                future.add_done_callback(functools.partial(self._finished, agent_id=agent_id, busy=busy))

    def _finished(self, done: Future[None], *, agent_id: str, busy: dict[str, float]) -> None:
        busy.pop(agent_id, None)
        with self.orchestrator.state.cond:
            self.orchestrator.state.notify()

    def _execute(self, agent: VirtualAgent, task: Task) -> None:
        kind = task.kind.value
        try:
            if self.section.work == "noise":
                self._noise(agent, task)
            elif self.ray is not None:
                self._train_on_ray(agent, task)
            else:
                self._train(agent, task)
            with self.lock:
                self.counts[kind] = self.counts.get(kind, 0) + 1
        except FedPipeError as err:  # refused (a closed round, a stale plan): the work is lost, the agent is not
            log.warning("%s: %s task of round %d refused: %s", agent.agent_id, kind, task.round, err)
            with self.lock:
                self.counts["failed"] += 1
        except Exception:
            log.exception("%s: %s task of round %d failed", agent.agent_id, kind, task.round)
            with self.lock:
                self.counts["failed"] += 1

    def _accepted(self, task: Task, agent_id: str) -> None:
        with self.lock:
            self.uploads.setdefault(task.round, []).append(agent_id)

    def _train(self, agent: VirtualAgent, task: Task) -> None:
        from edge_agent.agent import Agent
        from edge_agent.data import LocalData
        from edge_agent.metrics import AgentMetrics
        from edge_agent.model import LocalModel

        model: LocalModel | None = getattr(self.local, "model", None)
        if model is None:
            torch.set_num_threads(1)
            model = self.local.model = LocalModel(self.base_path, self.spec.labels, torch.device("cpu"), self.spec.task)
            self.local.metrics = AgentMetrics()
        worker = Agent(
            agent.agent_id, self.gateways[agent.agent_id], model, LocalData(agent.train, agent.val), agent.profile,
            self.spec, self.local.metrics, progress="off", secure_work=self.secure_work[agent.agent_id],
        )  # fmt: skip
        worker.execute(task)
        if task.kind is TaskKind.TRAIN:
            self._accepted(task, agent.agent_id)

    def _train_on_ray(self, agent: VirtualAgent, task: Task) -> None:
        """The task on a Ray worker: the global goes with it, what its agent sent comes back and is replayed."""
        assert self.ray is not None
        gateway = self.gateways[agent.agent_id]
        downloads = {}
        if task.plan is not None and task.kind in (TaskKind.TRAIN, TaskKind.EVALUATE):
            key = (task.global_round, task.plan.plan_id)
            downloads[key] = gateway.download(*key)
        recorded = self.ray.run(
            self.base_path, self.spec, agent.agent_id, agent.profile, agent.train, agent.val, task, downloads,
            self.orchestrator.run_id,
        )  # fmt: skip
        for name, args in recorded.calls:
            getattr(gateway, name)(*args)
        if task.kind is TaskKind.TRAIN:
            self._accepted(task, agent.agent_id)

    def _noise(self, agent: VirtualAgent, task: Task) -> None:
        if task.kind in SECAGG_KINDS:
            self.secure_work[agent.agent_id].step(self.gateways[agent.agent_id], task)
            return
        if task.kind is not TaskKind.TRAIN or task.plan is None:
            raise ConfigError(f"noise work cannot run a {task.kind.value} task")
        gateway = self.gateways[agent.agent_id]
        sent = gateway.download(task.global_round, task.plan.plan_id)
        generator = torch.Generator().manual_seed(zlib.crc32(f"{agent.agent_id}:{task.round}".encode()))
        scale = self.section.noise_scale
        tensors = {n: t + scale * torch.randn(t.shape, generator=generator, dtype=t.dtype) for n, t in sent.items()}
        plan, count = task.plan, agent.profile.num_train_samples
        # What training on its data would process, within what the coordinator counts for it (its weight cap).
        samples = min(count * plan.local_epochs, plan.steps_for(count) * plan.batch_size)
        samples = min(samples, self.orchestrator.state.allowed.get(agent.agent_id, samples))
        meta = UpdateMeta(agent.agent_id, task.round, task.plan.plan_id, samples, 0, 0.0, 0.0, 0)
        if plan.secure is not None:
            self.secure_work[agent.agent_id].trained(gateway, plan, meta, sent, tensors)
        else:
            gateway.upload(meta, tensors)
        self._accepted(task, agent.agent_id)


def main(argv: Sequence[str]) -> int:
    """`fedpipe-coordinator simulate [--agents N] [coordinator and simulation.* flags]`."""
    args = list(argv)
    if "--agents" in args:  # the short form of --simulation.agents
        args[args.index("--agents")] = "--simulation.agents"
    from coordinator.cli import launch

    return launch(SimulationConfig, args, "fedpipe-coordinator simulate", simulate)


def simulate(config: SimulationConfig) -> int:
    """Run the simulation and log its figures."""
    result = Simulation(config).run()
    figures = result["simulation"]
    planning = max((call["seconds"] for call in figures["planning"]), default=0.0)
    log.info(
        "simulated %d agents in %.1fs: accepted per round %s, aggregated per round %s, slowest planning %.3fs, "
        "peak RSS %.0f MiB; figures in %s",
        figures["agents"],
        figures["wall_seconds"],
        figures["accepted_per_round"],
        figures["aggregated_per_round"],
        planning,
        figures["peak_rss_bytes"] / 2**20,
        config.run.run_dir / "simulation.json",
    )
    return 0

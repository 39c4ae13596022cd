"""The round loop, and the domain calls the gRPC servicer delegates to.

One run: wait for agents -> round-0 global -> per round: plan, hand out TRAIN tasks, collect uploads
until all arrived or the deadline, aggregate, checkpoint, hand out EVALUATE tasks -> finish.
Agents only ever see tasks; every decision is taken here.
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from common.adapters import (
    GlobalAdapter,
    broadcast_tensors,
    check_tensors,
    expected_tensors,
    fold_update,
    head_modules,
    lora_parameter_count,
    with_modules,
)
from common.adapters import init_global as make_initial
from common.data import CAUSAL_LM
from common.errors import AlreadyUploaded, InvalidArgument, NotReady, StaleRound, UnknownAgent
from common.types import (
    AdapterUpdate,
    DeviceProfile,
    Evaluation,
    ImportanceReport,
    ModelSpec,
    ModuleShape,
    ProbePlan,
    RoundResult,
    Task,
    TaskKind,
    TensorInfo,
    TrainPlan,
    UpdateMeta,
)
from coordinator.checkpoint import STATE_FILE, Checkpoint, plan_record, write_json
from coordinator.config import CoordinatorConfig
from coordinator.evaluation import Evaluator
from coordinator.explain import AGENTS_FILE, from_snapshot, snapshot
from coordinator.metrics import CoordinatorMetrics
from coordinator.planner import Planner, PlanOptions, PlanSet, Prediction, resolve_targets
from coordinator.registry import AgentRecord, Registry
from coordinator.selection import combine, resolve_budget, select
from coordinator.strategy import Strategy

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often waiting loops re-check liveness


class RunAborted(Exception):
    """The run cannot go on (too few agents); the message says why."""


@dataclass(frozen=True)
class RegisterInfo:
    """What a registering agent is told."""

    run_id: str
    heartbeat_interval_s: float
    chunk_bytes: int


def weighted_evaluation(reports: Mapping[str, Evaluation]) -> Evaluation | None:
    """Size-weighted mean of agents' evaluations; None when no agent reported any sample."""
    total = sum(r.samples for r in reports.values())
    if total == 0:
        return None
    return Evaluation(
        loss=sum(r.loss * r.samples for r in reports.values()) / total,
        accuracy=sum(r.accuracy * r.samples for r in reports.values()) / total,
        samples=total,
    )


class Orchestrator:
    """Owns the run state; thread-safe. The servicer calls the public methods, run() drives rounds."""

    def __init__(
        self,
        config: CoordinatorConfig,
        registry: Registry,
        planner: Planner,
        options: PlanOptions,
        strategy: Strategy,
        metrics: CoordinatorMetrics,
        base_path: str,
        evaluator: Evaluator | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.planner = planner
        self.options = options
        self.strategy = strategy
        self.metrics = metrics
        self.base_path = base_path
        self.evaluator = evaluator
        self.run_id = uuid.uuid4().hex[:12]
        self.cond = threading.Condition()
        self.phase = "registering"  # registering | probing | training | aggregating | evaluating | finished
        self.round = 0
        self.global_: GlobalAdapter | None = None
        self.plans: dict[str, TrainPlan] = {}  # the open training round's plans
        self.updates: dict[str, AdapterUpdate] = {}
        # payload checksum of each accepted update by (agent, round), this round and the last (replays)
        self.update_sha256: dict[tuple[str, int], bytes] = {}
        self.withdrawn: set[str] = set()  # planned agents that restarted mid-round
        self.dead: set[str] = set()  # agents marked dead (missed heartbeats), until they call again
        self.eval_plans: dict[str, TrainPlan] = {}  # plans of agents asked to evaluate the global
        self.eval_reports: dict[str, Evaluation] = {}
        self.finished_seen: set[str] = set()
        self.probe: ProbePlan | None = None  # the open importance probe
        self.probe_agents: set[str] = set()
        self.importance: dict[str, ImportanceReport] = {}
        self.mask: tuple[str, ...] | None = None  # selected modules; None = every candidate
        self.mask_scores: dict[str, float] = {}  # combined importance of the candidates
        self.excluded: dict[str, str] = {}  # agents the planner left out this round, with the reason
        self.corrections: dict[str, tuple[float, float]] = {}  # agent -> (time, memory) scale from measurements
        self.predictions: dict[str, Prediction] = {}
        self.results: list[RoundResult] = []
        self.checkpoint: Checkpoint | None = None
        self.stopping = threading.Event()
        self.eval_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heldout-eval")

    # ------------------------------------------------------------------ calls from agents

    def register(self, agent_id: str, profile: DeviceProfile, spec: ModelSpec) -> RegisterInfo:
        """Add an agent (ModelMismatch if its model differs); it joins the next round."""
        new = self.registry.register(agent_id, profile, spec)
        count = len(self.registry.all())
        self.metrics.agents_registered.set(count)
        if new:
            self.metrics.start_agent(agent_id)
        if new and count == self.config.server.workers - 4:
            # Each agent's long poll holds a server thread; past this, calls queue and rounds slow down.
            log.warning("%d agents and server.workers %d: raise server.workers above the agent count", count, count + 4)
        self.metrics.agent_flops.labels(agent_id).set(profile.flops_per_s)
        self.metrics.agent_memory.labels(agent_id).set(profile.total_memory_bytes)
        self.metrics.agent_up.labels(agent_id).set(1)
        log.info(
            "agent %s %s: %s, %.1f GiB, %.2f GFLOP/s, %d samples",
            agent_id,
            "registered" if new else "re-registered",
            profile.device,
            profile.total_memory_bytes / 2**30,
            profile.flops_per_s / 1e9,
            profile.num_train_samples,
        )
        with self.cond:
            if self.phase == "training" and agent_id in self.plans and agent_id not in self.updates:
                # It lost its work (a restart): the round stops waiting for it, and it joins the next one.
                self.withdrawn.add(agent_id)
                log.warning(
                    "round %d: %s registered again mid-round; it joins round %d", self.round, agent_id, self.round + 1
                )
            self.cond.notify_all()
        return RegisterInfo(self.run_id, self.config.run.heartbeat_interval_s, self.config.server.chunk_bytes)

    def heartbeat(self, agent_id: str, state: str) -> tuple[bool, int]:
        """(known, current round); an unknown agent is told to register again."""
        try:
            self.registry.heartbeat(agent_id, state)
        except UnknownAgent:
            return False, self.round
        return True, self.round

    def get_task(self, agent_id: str, wait_s: float) -> Task:
        """The agent's next task, waiting up to wait_s (capped at 30 s) while there is none."""
        self.registry.touch(agent_id)
        end = time.monotonic() + min(max(wait_s, 0.0), 30.0)
        with self.cond:
            while True:
                task = self._task_for(agent_id)
                remaining = end - time.monotonic()
                if task.kind is not TaskKind.WAIT or remaining <= 0:
                    if task.kind is TaskKind.FINISHED:
                        self.finished_seen.add(agent_id)
                        self.cond.notify_all()
                    return task
                self.cond.wait(remaining)

    def _task_for(self, agent_id: str) -> Task:
        if self.phase == "finished":
            return Task(TaskKind.FINISHED, round=self.round, message="the run is complete")
        if (
            self.phase == "training"
            and agent_id in self.plans
            and agent_id not in self.updates
            and agent_id not in self.withdrawn
        ):
            assert self.global_ is not None
            return Task(TaskKind.TRAIN, round=self.round, global_round=self.global_.round, plan=self.plans[agent_id])
        if self.phase == "evaluating" and agent_id in self.eval_plans and agent_id not in self.eval_reports:
            assert self.global_ is not None
            return Task(
                TaskKind.EVALUATE,
                round=self.global_.round,
                global_round=self.global_.round,
                plan=self.eval_plans[agent_id],
            )
        if self.phase == "probing" and agent_id in self.probe_agents and agent_id not in self.importance:
            return Task(TaskKind.PROBE, round=self.round, probe=self.probe)
        if agent_id in self.excluded:
            message = f"left out of round {self.round}: {self.excluded[agent_id]}"
            return Task(TaskKind.WAIT, round=self.round, retry_after_s=0.0, message=message)
        return Task(TaskKind.WAIT, round=self.round, retry_after_s=0.0, message=f"phase {self.phase}")

    def global_for(self, agent_id: str, global_round: int, plan_id: str) -> dict[str, torch.Tensor]:
        """The global adapter truncated to the agent's plan; StaleRound when it is not the current one."""
        self.registry.touch(agent_id)
        with self.cond:
            global_ = self.global_
            plan = self._plan_of(agent_id, plan_id)
            spec = self.registry.spec
        if global_ is None or spec is None:
            raise NotReady("no global adapter yet")
        if global_round != global_.round:
            raise StaleRound(f"global round {global_round} is gone; the current one is {global_.round}")
        tensors = broadcast_tensors(global_, plan, spec)
        self.metrics.download_bytes.labels(agent_id).inc(sum(t.numel() * t.element_size() for t in tensors.values()))
        return tensors

    def _plan_of(self, agent_id: str, plan_id: str) -> TrainPlan:
        for plans in (self.plans, self.eval_plans):
            plan = plans.get(agent_id)
            if plan is not None and plan.plan_id == plan_id:
                return plan
        raise StaleRound(f"plan {plan_id!r} is not current for agent {agent_id}")

    def check_upload(self, meta: UpdateMeta, infos: list[TensorInfo], sha256: bytes = b"") -> bool:
        """Refuse an upload from its header alone, before its payload is read.

        True for a replay: the same payload (by checksum) as the agent's accepted update of that round
        (the open one or the one before), acknowledged and ignored so that a retried upload is idempotent.
        """
        self.registry.get(meta.agent_id)
        with self.cond:
            if sha256 and self.update_sha256.get((meta.agent_id, meta.round)) == sha256:
                self.metrics.updates_replayed.labels(meta.agent_id).inc()
                log.info("round %d: replayed update from %s ignored", meta.round, meta.agent_id)
                return True
            self._check_open(meta)
            plan = self.plans[meta.agent_id]
            spec = self.registry.spec
        assert spec is not None
        expected = expected_tensors(plan, spec)
        declared = {info.name: info for info in infos}
        for info in expected:
            got = declared.get(info.name)
            if got is None:
                raise InvalidArgument("payload.tensors", f"missing {info.name}")
            if got.shape != info.shape:
                raise InvalidArgument(f"payload.tensors[{info.name}].shape", f"expected {info.shape}, got {got.shape}")
            if got.dtype != info.dtype:
                raise InvalidArgument(f"payload.tensors[{info.name}].dtype", f"expected {info.dtype}, got {got.dtype}")
        extra = sorted(set(declared) - {info.name for info in expected})
        if extra:
            raise InvalidArgument("payload.tensors", f"not in the plan: {extra[:3]}")
        return False

    def _check_open(self, meta: UpdateMeta) -> None:
        if self.phase != "training" or meta.round != self.round:
            open_round = self.round if self.phase == "training" else None
            raise StaleRound(f"round {meta.round} is not open for uploads (open round: {open_round})")
        if meta.agent_id not in self.plans:
            raise StaleRound(f"agent {meta.agent_id} has no plan in round {self.round}; it joins the next")
        if meta.agent_id in self.withdrawn:
            raise StaleRound(f"agent {meta.agent_id} registered again during round {self.round}; it joins the next")
        if meta.plan_id != self.plans[meta.agent_id].plan_id:
            raise InvalidArgument("plan_id", f"{meta.plan_id!r} is not this round's plan for {meta.agent_id}")
        if meta.agent_id in self.updates:
            raise AlreadyUploaded(
                f"agent {meta.agent_id} already uploaded round {self.round}, with a different payload"
            )
        if meta.samples == 0:
            raise InvalidArgument("samples", "must be positive: an update with no samples has no weight")
        # The weight of an update is its sample count: bound it by the work the plan allows on the
        # data the agent reported, so one agent cannot claim to outweigh the others.
        plan = self.plans[meta.agent_id]
        limit = plan.steps_for(self.registry.get(meta.agent_id).profile.num_train_samples) * plan.batch_size
        if meta.samples > limit:
            raise InvalidArgument("samples", f"{meta.samples} exceeds the {limit} this plan allows on the agent's data")

    def accept_update(self, update: AdapterUpdate, sha256: bytes = b"") -> str:
        """Validate every tensor against the plan, bound its norm, keep it for this round's aggregation."""
        with self.cond:
            self._check_open(update.meta)
            plan = self.plans[update.meta.agent_id]
            spec = self.registry.spec
            global_ = self.global_
        assert spec is not None and global_ is not None
        check_tensors(update.tensors, expected_tensors(plan, spec))
        update = self._bound_norm(update, broadcast_tensors(global_, plan, spec))
        with self.cond:
            self._check_open(update.meta)  # the round may have closed while tensors were checked
            self.updates[update.meta.agent_id] = update
            self.update_sha256[(update.meta.agent_id, update.meta.round)] = sha256
            count, planned = len(self.updates), len(self.plans)
            self.cond.notify_all()
        agent = update.meta.agent_id
        nbytes = sum(t.numel() * t.element_size() for t in update.tensors.values())
        self.metrics.updates_accepted.labels(agent).inc()
        self.metrics.upload_bytes.labels(agent).inc(nbytes)
        self.metrics.agent_train_seconds.labels(agent).set(update.meta.train_seconds)
        self.metrics.agent_samples.labels(agent).set(update.meta.samples)
        self.metrics.agent_samples_per_second.labels(agent).set(
            update.meta.samples / max(update.meta.train_seconds, 1e-9)
        )
        self.metrics.agent_peak_memory.labels(agent).set(update.meta.peak_memory_bytes)
        log.info(
            "round %d: update from %s accepted (%d samples, %.1fs, loss %.4f) [%d/%d]",
            update.meta.round,
            agent,
            update.meta.samples,
            update.meta.train_seconds,
            update.meta.train_loss,
            count,
            planned,
        )
        return f"accepted for round {update.meta.round} ({count}/{planned})"

    def _bound_norm(self, update: AdapterUpdate, sent: Mapping[str, torch.Tensor]) -> AdapterUpdate:
        """updates.max_norm: refuse, or scale down, an update whose change to what it was sent is too large."""
        agent = update.meta.agent_id
        delta = {name: update.tensors[name].double() - sent[name].double() for name in sent}
        norm = math.sqrt(sum(float(d.pow(2).sum()) for d in delta.values()))
        self.metrics.update_norm.labels(agent).set(norm)
        bound = self.config.updates.max_norm
        if bound <= 0 or norm <= bound:
            return update
        if self.config.updates.norm_action == "reject":
            raise InvalidArgument("update norm", f"{norm:.4g} exceeds updates.max_norm {bound:g}")
        factor = bound / norm
        self.metrics.updates_clipped.labels(agent).inc()
        log.warning("round %d: update from %s clipped from norm %.4g to %g", update.meta.round, agent, norm, bound)
        tensors = {name: (sent[name].double() + factor * d).to(update.tensors[name].dtype) for name, d in delta.items()}
        return replace(update, tensors=tensors)

    def report_evaluation(self, agent_id: str, global_round: int, evaluation: Evaluation) -> None:
        """Keep an agent's evaluation of the current global adapter."""
        self.registry.touch(agent_id)
        with self.cond:
            if self.phase != "evaluating" or self.global_ is None or global_round != self.global_.round:
                raise StaleRound(f"no evaluation of global round {global_round} is open")
            if agent_id not in self.eval_plans:
                raise StaleRound(f"agent {agent_id} was not asked to evaluate round {global_round}")
            self.eval_reports[agent_id] = evaluation
            self.cond.notify_all()

    def report_importance(self, agent_id: str, report: ImportanceReport) -> None:
        """Keep an agent's probe scores; every candidate of the probe must be scored, nothing else."""
        self.registry.touch(agent_id)
        with self.cond:
            probe = self.probe
            if self.phase != "probing" or probe is None or report.probe_id != probe.probe_id:
                raise StaleRound(f"probe {report.probe_id!r} is not open")
            if agent_id not in self.probe_agents:
                raise StaleRound(f"agent {agent_id} was not asked to take part in probe {probe.probe_id}")
            if agent_id in self.importance:
                raise AlreadyUploaded(f"agent {agent_id} already reported probe {probe.probe_id}")
        missing = sorted(set(probe.candidates) - set(report.scores))
        extra = sorted(set(report.scores) - set(probe.candidates))
        if missing or extra:
            raise InvalidArgument("scores", f"missing {missing[:3]}, not candidates {extra[:3]}")
        with self.cond:
            self.importance[agent_id] = report
            self.cond.notify_all()
        self.metrics.probe_seconds.labels(agent_id).set(report.seconds)
        log.info(
            "probe %s: scores from %s (%d samples, %.1fs)", report.probe_id, agent_id, report.samples, report.seconds
        )

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        """Drive every round to the end (resuming a run directory that holds state); returns the summary."""
        try:
            return self._run()
        finally:
            self.eval_pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> dict[str, Any]:
        cfg = self.config.run
        self.metrics.run_rounds.set(cfg.rounds)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        saved = self._restore_registry()
        log.info("waiting for %d agents (up to %.0fs)", cfg.min_agents, cfg.registration_timeout_s)
        alive = self._await_agents()
        spec = self.registry.spec
        assert spec is not None
        # Saved adapters unfold the folded global with the configured alpha at each module's own rank; any
        # alpha gives the same dW, so this needs no plan (planning before selection would be work thrown away).
        self.checkpoint = Checkpoint(cfg.run_dir, self.base_path, self.options.alpha, spec, head_modules(spec))
        resumed = self.checkpoint.load_state() if saved else None
        plans: Mapping[str, TrainPlan] = {}
        if resumed is not None:
            global_, meta = resumed
            self._resume(global_, meta)
        else:
            self._select(0, alive, spec)
            plans = self._plan(alive, spec, 0).plans
            global_ = make_initial(spec, _widest(plans), cfg.seed)
            self.checkpoint.save_state(global_, self._state())
        with self.cond:
            self.global_ = global_
        (cfg.run_dir / "config.json").write_text(json.dumps(self.config.model_dump(mode="json"), indent=2) + "\n")
        if resumed is None and self.config.evaluation.initial:
            self.results.append(self._evaluate(0, plans, RoundResult(0, (), 0.0, 0)))
        for round_ in range(global_.round + 1, cfg.rounds + 1):
            self.results.append(self._train_round(round_))
        return self._finish()

    def _state(self) -> dict[str, Any]:
        """The bookkeeping a restarted coordinator needs besides the global adapter."""
        spec = self.registry.spec
        assert spec is not None
        profiles = {a: r.profile for a, r in self.registry.all().items()}
        return {"run_id": self.run_id, **snapshot(profiles, spec, self.mask, self.mask_scores, self.corrections)}

    def _restore_registry(self) -> bool:
        """When the run directory holds state: the run's model and agents, so they carry on without
        registering again. False for a fresh run."""
        path = self.config.run.run_dir / "state" / STATE_FILE
        if not path.is_file():
            return False
        meta = json.loads(path.read_text())
        if "spec" not in meta:  # state of an older version: agents register again
            return True
        profiles, spec, _, _, _ = from_snapshot(meta)
        self.registry.restore(spec, profiles)
        return True

    def _resume(self, global_: GlobalAdapter, meta: Mapping[str, Any]) -> None:
        """Continue after the last complete round: its global, mask, cost corrections and results."""
        if "spec" in meta:
            _, _, self.mask, self.mask_scores, self.corrections = from_snapshot(meta)
        self.run_id = str(meta.get("run_id", self.run_id))
        rounds = self.config.run.run_dir / "rounds.jsonl"
        if rounds.is_file():
            by_round = {}
            for line in rounds.read_text().splitlines():
                record = json.loads(line)
                if record["round"] <= global_.round:
                    by_round[record["round"]] = result_from_record(record)
            self.results = [by_round[r] for r in sorted(by_round)]
        self.metrics.resumed_round.set(global_.round)
        if self.mask is not None:
            self.metrics.mask_size.set(len(self.mask))
        log.info(
            "resuming run %s after round %d from %s (global sha256 %s, %d matrices in the mask)",
            self.run_id,
            global_.round,
            self.config.run.run_dir,
            meta.get("global_sha256", "?"),
            len(self.mask) if self.mask is not None else len(global_.lora),
        )

    def stop(self) -> None:
        """End the run at the next wait (a signal, or a test's teardown); run() raises RunAborted."""
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
        with self.registry.changed:
            self.registry.changed.notify_all()

    def _check_stop(self) -> None:
        if self.stopping.is_set():
            raise RunAborted("stopped before the run completed")

    def _await_agents(self) -> dict[str, Any]:
        cfg = self.config.run
        alive = self.registry.wait_for(cfg.min_agents, cfg.registration_timeout_s, cfg.agent_timeout_s, self.stopping)
        self._check_stop()
        self.metrics.agents_alive.set(len(alive))
        if len(alive) < cfg.min_agents:
            raise RunAborted(
                f"only {len(alive)} of the {cfg.min_agents} agents needed are alive "
                f"after {cfg.registration_timeout_s:.0f}s"
            )
        return alive

    def _train_round(self, round_: int) -> RoundResult:
        cfg = self.config.run
        alive = self._await_agents()
        spec = self.registry.spec
        assert spec is not None and self.global_ is not None and self.checkpoint is not None
        every = self.config.selection.reselect_every
        if every and round_ > 1 and (round_ - 1) % every == 0:
            self._select(round_ - 1, alive, spec)
        planned = self._plan(alive, spec, round_)
        plans = planned.plans
        self._check_payload_limit(plans, spec)
        with self.cond:
            # Matrices entering the mask start in the global adapter (A random, B = 0), alike for every agent.
            self.global_ = with_modules(self.global_, _widest(plans).rank_pattern, spec)
        for agent, prediction in planned.predictions.items():
            self.metrics.plan_memory.labels(agent).set(prediction.peak_memory_bytes)
            self.metrics.plan_step_seconds.labels(agent).set(prediction.step_seconds)
        if planned.round_seconds:
            self.metrics.plan_round_seconds.set(planned.round_seconds)
        for agent, plan in plans.items():
            self.metrics.plan_rank.labels(agent).set(max(plan.rank_pattern.values()))
            self.metrics.plan_batch.labels(agent).set(plan.batch_size)
            self.metrics.plan_bits.labels(agent).set(plan.quantization.bits)
            self.metrics.plan_trainable.labels(agent).set(lora_parameter_count(plan.rank_pattern, spec))
        start = time.monotonic()
        deadline = start + cfg.round_deadline_s
        with self.cond:
            self.phase, self.round, self.plans, self.updates = "training", round_, plans, {}
            # A retry may arrive after its round closed: the last round's checksums stay for one more round.
            self.update_sha256 = {k: v for k, v in self.update_sha256.items() if k[1] == round_ - 1}
            self.withdrawn = set()
            self.cond.notify_all()
        self.metrics.current_round.set(round_)
        self.metrics.round_started.set_to_current_time()
        log.info("round %d/%d: training on %d agents: %s", round_, cfg.rounds, len(plans), ", ".join(sorted(plans)))
        quorum = max(cfg.quorum or cfg.min_agents, math.ceil(cfg.quorum_fraction * len(plans)))

        def received() -> set[str]:
            return set(self.updates) | self.withdrawn

        self._wait_for(plans, received, deadline)
        extensions = 0
        while True:
            self._check_stop()
            with self.cond:
                count = len(self.updates)
                pending = set(plans) - received()
            live = pending & set(self.registry.alive(cfg.agent_timeout_s))
            if count >= quorum or cfg.on_no_quorum != "extend" or extensions >= cfg.max_extensions or not live:
                break
            extensions += 1
            self.metrics.round_extensions.inc()
            log.warning(
                "round %d: %d of %d needed updates by the deadline; extending by %.0fs (%d/%d) for %s",
                round_,
                count,
                quorum,
                cfg.round_deadline_s,
                extensions,
                cfg.max_extensions,
                ", ".join(sorted(live)),
            )
            self._wait_for(plans, received, time.monotonic() + cfg.round_deadline_s)
        with self.cond:
            self.phase = "aggregating"
            updates = dict(self.updates)
        dropped = tuple(sorted(set(plans) - set(updates)))
        for agent in dropped:
            self.metrics.stragglers.labels(agent).inc()
        if dropped:
            log.warning("round %d: closing without %s", round_, ", ".join(dropped))
        if len(updates) < quorum:
            self.metrics.rounds_failed.labels("no_quorum").inc()
            log.error(
                "round %d: only %d of the %d updates needed (quorum) arrived; round skipped, global unchanged "
                "(missing %s)",
                round_,
                len(updates),
                quorum,
                ", ".join(dropped),
            )
            return RoundResult(round_, tuple(sorted(updates)), time.monotonic() - start, 0, dropped=dropped)
        folded = [fold_update(a, float(u.meta.samples), u.tensors, plans[a]) for a, u in sorted(updates.items())]
        agg_start = time.perf_counter()
        new_global, agg_metrics = self.strategy(self.global_, folded)
        agg_seconds = time.perf_counter() - agg_start
        self.metrics.aggregation_duration.observe(agg_seconds)
        new_global = replace(new_global, round=round_)
        report: dict[str, dict[str, Any]] = {
            a: {"predicted": asdict(p)} for a, p in planned.predictions.items() if a in plans
        }
        for a, u in updates.items():
            report.setdefault(a, {})["measured"] = {
                "samples": u.meta.samples,
                "steps": u.meta.steps,
                "train_seconds": u.meta.train_seconds,
                "step_seconds": u.meta.train_seconds / max(u.meta.steps, 1),
                "train_loss": u.meta.train_loss,
                "peak_memory_bytes": u.meta.peak_memory_bytes,
            }
        self._refit(updates, planned.predictions)
        self.checkpoint.save_round(new_global, plans, report, self._state())
        with self.cond:
            self.global_ = new_global
        seconds = time.monotonic() - start
        self.metrics.round_duration.observe(seconds)
        self.metrics.rounds_completed.inc()
        self.metrics.round_completed.set_to_current_time()
        samples = sum(u.meta.samples for u in updates.values())
        train_loss = sum(u.meta.train_loss * u.meta.samples for u in updates.values()) / samples
        log.info(
            "round %d: aggregated %d updates (%d samples, |dW| change %.4f) in %.2fs",
            round_,
            len(updates),
            samples,
            agg_metrics["delta_norm"],
            agg_seconds,
        )
        result = RoundResult(round_, tuple(sorted(updates)), seconds, samples, train_loss=train_loss, dropped=dropped)
        return self._evaluate(round_, plans, result)

    def _plan(self, alive: Mapping[str, AgentRecord], spec: ModelSpec, round_: int) -> PlanSet:
        """Plans for the alive agents over the current mask; agents that fit nowhere are left out, loudly."""
        options = replace(self.options, scores=self.mask_scores, corrections=dict(self.corrections))
        if self.mask is not None:
            options = replace(options, targets=self.mask)
        profiles = {a: r.profile for a, r in alive.items()}
        write_json(
            self.config.run.run_dir / AGENTS_FILE,
            snapshot(profiles, spec, self.mask, self.mask_scores, self.corrections),
        )
        planned = self.planner(profiles, spec, options, round_)
        for agent in alive:
            self.metrics.agent_excluded.labels(agent).set(1 if agent in planned.excluded else 0)
        for agent, reason in planned.excluded.items():
            log.warning("round %d: %s left out: %s", round_, agent, reason)
        with self.cond:
            self.excluded = dict(planned.excluded)
            self.predictions = dict(planned.predictions)
        if len(planned.plans) < self.config.run.min_agents:
            reasons = "; ".join(f"{a}: {r}" for a, r in planned.excluded.items())
            raise RunAborted(
                f"only {len(planned.plans)} agents can be planned, {self.config.run.min_agents} needed"
                + (f" ({reasons})" if reasons else "")
            )
        if planned.round_seconds:
            log.info("round %d: planned %.1fs of training per agent", round_, planned.round_seconds)
        return planned

    def _select(self, after_round: int, alive: Mapping[str, AgentRecord], spec: ModelSpec) -> None:
        """Probe the candidates on the alive agents and set the mask from their combined scores."""
        sel = self.config.selection
        if sel.mode == "all":
            return
        candidates = resolve_targets(spec, self.options.targets)
        shapes = [spec.candidate(name) for name in candidates]
        if sel.mode == "random":
            generator = random.Random(self.options.seed * 7919 + after_round)
            self._apply_selection(after_round, {name: generator.random() for name in candidates}, shapes, {}, "random")
            return
        probe = ProbePlan(
            probe_id=f"p{after_round}-{uuid.uuid4().hex[:8]}",
            candidates=candidates,
            rank=sel.probe_rank,
            steps=sel.probe_steps,
            batch_size=sel.probe_batch_size,
            learning_rate=sel.probe_learning_rate,
            max_seq_len=self.options.max_seq_len,
            quantization=self.options.quantization,
            seed=self.options.seed * 7919 + after_round,
            deadline_s=sel.probe_deadline_s,
        )
        with self.cond:
            self.phase, self.probe, self.probe_agents, self.importance = "probing", probe, set(alive), {}
            self.cond.notify_all()
        log.info("probe %s: scoring %d candidates on %d agents", probe.probe_id, len(candidates), len(alive))
        self._wait_for(self.probe_agents, lambda: self.importance, time.monotonic() + sel.probe_deadline_s)
        self._check_stop()
        with self.cond:
            reports = dict(self.importance)
            self.phase, self.probe = "aggregating", None
        if not reports:
            raise RunAborted(f"no agent reported importance scores within {sel.probe_deadline_s:.0f}s")
        self._apply_selection(after_round, combine(reports, candidates), shapes, reports, probe.probe_id)

    def _apply_selection(
        self,
        after_round: int,
        scores: Mapping[str, float],
        shapes: list[ModuleShape],
        reports: Mapping[str, ImportanceReport],
        source: str,
    ) -> None:
        """Choose the mask from combined scores under the budget; metrics, log and selection/NNNN.json."""
        sel = self.config.selection
        candidates = [m.name for m in shapes]
        selection = select(scores, shapes, self.options.rank, resolve_budget(sel.budget, shapes, self.options.rank))
        previous, self.mask = self.mask, selection.mask
        self.mask_scores = dict(scores)
        self.metrics.mask_size.set(len(selection.mask))
        self.metrics.mask_parameters.set(selection.used)
        self.metrics.selection_score.clear()
        for name in selection.mask:
            self.metrics.selection_score.labels(name).set(scores[name])
        top = ", ".join(f"{name} {scores[name]:.3f}" for name in sorted(selection.mask, key=lambda n: -scores[n])[:3])
        log.info(
            "selection: %d of %d matrices, %d of %d LoRA parameters; top: %s",
            len(selection.mask),
            len(candidates),
            selection.used,
            selection.budget,
            top,
        )
        if previous is not None and previous != selection.mask:
            log.info(
                "selection: entering %s; leaving %s (their learned update stays in the global adapter)",
                sorted(set(selection.mask) - set(previous)),
                sorted(set(previous) - set(selection.mask)),
            )
        record = {
            "probe": source,
            "after_round": after_round,
            "mask": list(selection.mask),
            "budget": selection.budget,
            "used": selection.used,
            "combined": scores,
            "agents": {
                a: {"samples": r.samples, "seconds": r.seconds, "scores": dict(r.scores)} for a, r in reports.items()
            },
        }
        directory = self.config.run.run_dir / "selection"
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / f"{after_round:04d}.json", record)

    def _refit(self, updates: Mapping[str, AdapterUpdate], predictions: Mapping[str, Prediction]) -> None:
        """Closed loop: when an agent's measured step time or peak memory is off the prediction by more than
        planning.refit_threshold, scale that agent's cost model by the measured ratio for the next plans."""
        threshold = self.config.planning.refit_threshold
        for agent, update in updates.items():
            predicted = predictions.get(agent)
            if predicted is None or update.meta.steps == 0:
                continue
            step = update.meta.train_seconds / update.meta.steps
            self.metrics.agent_step_seconds.labels(agent).set(step)
            time_ratio = step / predicted.step_seconds if predicted.step_seconds > 0 else 1.0
            memory_ratio = (
                update.meta.peak_memory_bytes / predicted.peak_memory_bytes if predicted.peak_memory_bytes > 0 else 1.0
            )
            time_scale, memory_scale = self.corrections.get(agent, (1.0, 1.0))
            refit = False
            if abs(time_ratio - 1) > threshold:
                time_scale, refit = time_scale * time_ratio, True
            if update.meta.peak_memory_bytes and abs(memory_ratio - 1) > threshold:
                memory_scale, refit = memory_scale * memory_ratio, True
            if refit:
                self.corrections[agent] = (time_scale, memory_scale)
                log.info(
                    "refit %s: step %.3fs measured vs %.3fs predicted, peak %.0f vs %.0f MiB; scales now %.2f, %.2f",
                    agent,
                    step,
                    predicted.step_seconds,
                    update.meta.peak_memory_bytes / 2**20,
                    predicted.peak_memory_bytes / 2**20,
                    time_scale,
                    memory_scale,
                )

    def _check_payload_limit(self, plans: Mapping[str, TrainPlan], spec: ModelSpec) -> None:
        """Abort before a round whose planned updates could never be accepted."""
        limit = self.config.server.max_upload_bytes
        for agent, plan in plans.items():
            size = sum(info.nbytes for info in expected_tensors(plan, spec))
            if size > limit:
                raise RunAborted(f"{agent}'s planned update is {size} bytes, over server.max_upload_bytes {limit}")

    def _wait_for(self, expected: Collection[str], received: Callable[[], Collection[str]], deadline: float) -> None:
        """Wait until every expected agent delivered, the deadline passed, or every outstanding agent is dead."""
        with self.cond:
            while True:
                pending = set(expected) - set(received())
                now = time.monotonic()
                if not pending or now >= deadline or self.stopping.is_set():
                    return
                if not pending & self._liveness():
                    log.warning("agents %s stopped beating; not waiting for them", ", ".join(sorted(pending)))
                    return
                self.cond.wait(min(POLL_S, deadline - now))

    def _liveness(self) -> set[str]:
        """The alive agents; logs and counts each agent that goes silent, and each that comes back."""
        alive = set(self.registry.alive(self.config.run.agent_timeout_s))
        known = set(self.registry.all())
        for agent in sorted((known - alive) - self.dead):
            if agent in self.plans or agent in self.eval_plans or agent in self.probe_agents:
                log.warning("agent %s missed heartbeats for %.0fs: marked dead", agent, self.config.run.agent_timeout_s)
                self.metrics.agents_dead.labels(agent).inc()
                self.dead.add(agent)
        for agent in sorted(self.dead & alive):
            log.info("agent %s is back", agent)
            self.dead.discard(agent)
        self.metrics.agents_alive.set(len(alive))
        for agent in known:
            self.metrics.agent_up.labels(agent).set(1 if agent in alive else 0)
        return alive

    def _evaluate(self, round_: int, plans: Mapping[str, TrainPlan], result: RoundResult) -> RoundResult:
        """Score the current global: held-out on this host, and validation splits on the agents."""
        assert self.global_ is not None and self.registry.spec is not None
        global_, spec = self.global_, self.registry.spec
        pending: Future[Evaluation] | None = None
        if self.evaluator is not None:
            # One long-lived worker: a new thread per round would get a fresh malloc arena each time,
            # and resident memory would creep round after round.
            pending = self.eval_pool.submit(self.evaluator, global_, next(iter(plans.values())), spec)
        agents_eval = None
        if self.config.evaluation.agents:
            alive = set(self.registry.alive(self.config.run.agent_timeout_s))
            with self.cond:
                self.phase, self.eval_reports = "evaluating", {}
                self.eval_plans = {a: p for a, p in plans.items() if a in alive}
                self.cond.notify_all()
            self._wait_for(
                self.eval_plans, lambda: self.eval_reports, time.monotonic() + self.config.run.eval_deadline_s
            )
            with self.cond:
                reports = dict(self.eval_reports)
                self.phase = "aggregating"
            agents_eval = weighted_evaluation(reports)
        heldout = pending.result() if pending is not None else None
        result = replace(result, heldout=heldout, agents_eval=agents_eval)
        for source, evaluation in (("heldout", result.heldout), ("agents", agents_eval)):
            if evaluation is not None:
                self.metrics.global_accuracy.labels(source).set(evaluation.accuracy)
                self.metrics.global_loss.labels(source).set(evaluation.loss)
        log.info("%s", round_line(result, self.config.run.rounds, spec.task == CAUSAL_LM))
        self._append_round_record(result)
        return result

    def _append_round_record(self, result: RoundResult) -> None:
        path = self.config.run.run_dir / "rounds.jsonl"
        with path.open("a") as handle:
            handle.write(json.dumps(asdict(result), default=str) + "\n")

    def _finish(self) -> dict[str, Any]:
        assert self.global_ is not None and self.checkpoint is not None
        final_eval = (self.results[-1].heldout or self.results[-1].agents_eval) if self.results else None
        summary = {
            "run_id": self.run_id,
            "rounds": [asdict(r) for r in self.results],
            "final_round": self.global_.round,
            "final_accuracy": final_eval.accuracy if final_eval else None,
            "final_loss": final_eval.loss if final_eval else None,
            "final_source": "heldout" if self.results and self.results[-1].heldout else "agents",
            "plans": {a: plan_record(p) for a, p in self.plans.items()},
        }
        final = self.checkpoint.finalize(self.global_, summary)
        log.info("run complete: final adapter in %s", final)
        self.metrics.run_finished.set(1)
        with self.cond:
            self.phase = "finished"
            self.cond.notify_all()
            # Let agents hear FINISHED before the server goes away.
            end = time.monotonic() + self.config.run.finish_grace_s
            while (
                time.monotonic() < end
                and not set(self.registry.alive(self.config.run.agent_timeout_s)) <= self.finished_seen
            ):
                self.cond.wait(min(POLL_S, end - time.monotonic()))
        return summary


def _widest(plans: Mapping[str, TrainPlan]) -> TrainPlan:
    """A plan over the union of modules at each module's largest planned rank (the round-0 global's layout)."""
    first = next(iter(plans.values()))
    ranks: dict[str, int] = {}
    for plan in plans.values():
        for module, rank in plan.rank_pattern.items():
            ranks[module] = max(rank, ranks.get(module, 0))
    return replace(first, target_modules=tuple(ranks), rank_pattern=ranks)


def result_from_record(record: Mapping[str, Any]) -> RoundResult:
    """A RoundResult from its rounds.jsonl line."""

    def evaluation(raw: Mapping[str, Any] | None) -> Evaluation | None:
        return Evaluation(**raw) if raw else None

    return RoundResult(
        round=record["round"],
        agents=tuple(record["agents"]),
        seconds=record["seconds"],
        samples=record["samples"],
        train_loss=record.get("train_loss"),
        heldout=evaluation(record.get("heldout")),
        agents_eval=evaluation(record.get("agents_eval")),
        dropped=tuple(record.get("dropped", ())),
    )


def round_line(result: RoundResult, rounds: int, causal: bool = False) -> str:
    """The one line per round an operator reads (with perplexity for a causal LM)."""
    parts = [f"round {result.round}/{rounds}", f"agents {len(result.agents)}", f"{result.seconds:.1f}s"]
    if result.heldout is not None:
        held = result.heldout
        quality = f"perplexity {math.exp(min(held.loss, 50.0)):.2f}" if causal else f"loss {held.loss:.4f}"
        parts.append(f"held-out accuracy {held.accuracy:.3f} {quality}")
    if result.agents_eval is not None:
        parts.append(f"agents' validation accuracy {result.agents_eval.accuracy:.3f}")
    if result.dropped:
        parts.append(f"dropped {','.join(result.dropped)}")
    return " | ".join(parts)

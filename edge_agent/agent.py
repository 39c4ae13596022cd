"""The agent's loop: register, then poll for tasks and run them; no gRPC in here (see client.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from common.batching import evaluate
from common.errors import Rejected, ServerUnavailable, Stopped, UnknownAgent
from common.modeling import layer_split
from common.types import (
    SECAGG_KINDS,
    DeviceProfile,
    Evaluation,
    ImportanceReport,
    ModelSpec,
    ProbePlan,
    Task,
    TaskKind,
    TrainPlan,
    UpdateMeta,
)
from edge_agent.caps import Throttle, check_peak
from edge_agent.collective import Collective
from edge_agent.data import LocalData
from edge_agent.ferret import FerretWorker
from edge_agent.metrics import AgentMetrics
from edge_agent.model import LocalModel
from edge_agent.parallel import DeviceGroup, GroupFailed, Job
from edge_agent.profiler import memory_in_use_bytes
from edge_agent.secagg import SecureWork
from edge_agent.trainer import TrainResult, train_local
from edge_agent.workspace import CannotJoin, RunDescription, Workspace

log = logging.getLogger(__name__)

VERSION = "0.1.0"
FATAL = frozenset({"PERMISSION_DENIED", "UNAUTHENTICATED"})  # refusals that retrying cannot fix
UPLOAD_RESERVE_S = 2.0  # stop training this long before the deadline so the upload still makes it


class Gateway(Protocol):
    """What the agent needs from the coordinator; edge_agent.client.CoordinatorClient provides it."""

    last_answer: float  # monotonic time of the coordinator's last answer
    run_id: str  # the run the last registration joined

    def describe_run(self) -> RunDescription | None: ...
    def register(self, profile: DeviceProfile, spec: ModelSpec, version: str) -> float: ...
    def heartbeat(self, state: str) -> bool: ...
    def get_task(self, wait_s: float) -> Task: ...
    def download(self, global_round: int, plan_id: str, have_digest: str = "") -> dict[str, torch.Tensor]: ...
    def upload(self, meta: UpdateMeta, tensors: Mapping[str, torch.Tensor]) -> str: ...
    def report_evaluation(self, global_round: int, evaluation: Evaluation) -> None: ...
    def report_importance(self, report: ImportanceReport) -> None: ...
    def advertise_keys(
        self, round_: int, plan_id: str, keys: tuple[bytes, bytes], proof: tuple[bytes, bytes] | None = None
    ) -> None: ...
    def share_keys(self, round_: int, sealed: Mapping[str, bytes]) -> None: ...
    def unmask(self, round_: int, revealed: Mapping[str, tuple[str, int]]) -> None: ...


class Agent:
    """Runs tasks from the coordinator until it says the run is over."""

    def __init__(
        self,
        agent_id: str,
        gateway: Gateway,
        model: LocalModel,
        data: LocalData,
        profile: DeviceProfile,
        spec: ModelSpec,
        metrics: AgentMetrics,
        poll_wait_s: float = 10.0,
        progress: str = "auto",
        throttle: Throttle | None = None,
        ready_s: float = 60.0,
        stop: threading.Event | None = None,
        after_finish: str = "exit",
        workspace: Workspace | None = None,
        secure_work: SecureWork | None = None,
        group: DeviceGroup | None = None,
    ) -> None:
        """stop: the event a stop request sets (shared with the client's retries); a new one by default.
        after_finish: "exit" returns from run() when the run is finished, "next-run" joins the next one.
        workspace: where the base and data set each run names come from; None = model and data, always.
        secure_work: what secure rounds keep between tasks (a simulation keeps one per virtual agent).
        group: the helper processes of a data-parallel agent (LoRA plans train on all its devices)."""
        self.agent_id = agent_id
        self.gateway = gateway
        self.model = model
        self.data = data
        self.profile = profile
        self.spec = spec
        self.metrics = metrics
        self.poll_wait_s = poll_wait_s
        self.progress = progress
        self.throttle = throttle or Throttle(1.0)  # the operator's compute share, applied to every step
        self.state = "idle"
        self.stop = stop or threading.Event()
        self.heartbeat_s = 5.0
        self.last_notice = ""
        self.registered = False
        self.ready_s = ready_s
        self.after_finish = after_finish
        self.workspace = workspace
        self.run_loaded = ""  # the run the model and data were chosen for
        self.refused_run = ""  # the last run this agent could not take part in (logged once)
        self.waiting = False  # between runs (after_finish next-run), registering every poll_wait_s
        self.described = ""  # the run the current registration is for, as DescribeRun named it
        self.last_step: float | None = None
        self.ferret = FerretWorker(model, gateway, metrics)  # the Ferret mode's state, used by its plans only
        self.secure_work = secure_work or SecureWork(agent_id)
        self.group = group
        self.said_ferret_alone = False
        metrics.devices.set(group.world if group is not None else 1)
        metrics.info.info({"agent": agent_id, "version": VERSION, "device": profile.device})
        metrics.device_memory.set_function(lambda: memory_in_use_bytes(model.device))  # read at each scrape

    def ready(self) -> tuple[bool, str]:
        """Readiness: registered, and the coordinator answered within ready_s."""
        if not self.registered:
            return False, "not registered with the coordinator"
        silent = time.monotonic() - self.gateway.last_answer
        if silent > self.ready_s:
            return False, f"no answer from the coordinator for {silent:.0f}s"
        return True, f"ready ({self.state})"

    def register(self) -> None:
        """Announce this agent, with the base and data set the run names (CannotJoin when it has none by
        those names); retried inside the gateway while the coordinator is unreachable."""
        self.registered = False
        self.metrics.ready.set(0)
        if self.workspace is not None:
            self._load_for_run()
        before = self.gateway.run_id
        self.heartbeat_s = self.gateway.register(self.profile, self.spec, VERSION) or self.heartbeat_s
        self.registered = True
        self.metrics.ready.set(1)
        if self.gateway.run_id == before and self.waiting:
            return  # registered again while waiting for the next run: said once already
        log.info(
            "registered with the coordinator (%d train / %d validation samples, %.2f GFLOP/s)",
            self.profile.num_train_samples,
            self.profile.num_val_samples,
            self.profile.flops_per_s / 1e9,
        )

    def _load_for_run(self) -> None:
        assert self.workspace is not None
        run = self.gateway.describe_run()
        if run is None or not run.run_id:
            return  # an older coordinator, or no run yet
        self.described = run.run_id
        if run.run_id == self.run_loaded:
            return  # what this run needs is loaded
        if run.run_id == self.refused_run:
            raise CannotJoin(run.run_id, f"run {run.run_id}: refused before")  # not loaded again
        try:
            loaded = self.workspace.for_run(run)
        except CannotJoin:
            raise
        except Exception as err:  # a base that does not load here (files, memory): this run goes on without us
            raise CannotJoin(run.run_id, f"run {run.run_id}: loading its model failed: {err}") from err
        if loaded.model is not self.model or loaded.data is not self.data:
            log.info("run %s: model %s, data set %s", run.run_id, loaded.model_name, loaded.dataset or "(data)")
        if self.run_loaded:
            # A new run starts from its own round-0 weights: nothing trained in the run before (the Ferret
            # mode's base, a LoRA model's head) may carry over.
            self.model.release()
        self.model, self.data, self.profile, self.spec = loaded.model, loaded.data, loaded.profile, loaded.spec
        self.ferret = FerretWorker(self.model, self.gateway, self.metrics)
        self.run_loaded = run.run_id

    def _try_register(self) -> str | None:
        """Register; None when a run was joined, else the run id to wait past ("" when there is no run yet)."""
        self.described = ""
        try:
            self.register()
        except CannotJoin as err:
            return self._refused(err.run_id, str(err))
        except Rejected as err:
            # A serving coordinator's run that refuses what this agent has (another base or labels): with
            # after_finish next-run the agent waits for the next run instead of ending.
            if err.status != "FAILED_PRECONDITION" or self.after_finish != "next-run" or not self.described:
                raise
            self.run_loaded = ""  # what was loaded is not this run's
            return self._refused(self.described, f"run {self.described} refused this agent: {err}")
        return None if self.gateway.run_id else ""

    def _refused(self, run_id: str, why: str) -> str:
        if run_id != self.refused_run:
            log.error("%s; waiting for the next run", why)
            self.refused_run = run_id
        return run_id

    def run(self) -> None:
        """Register, then run tasks until FINISHED (with after_finish next-run: until stopped, joining each
        next run); re-registers when the coordinator forgot us."""
        skip = self._try_register()
        if skip is not None:  # no run yet (a serving coordinator), or one this agent cannot take part in
            self._join_next_run(skip)
            if self.stop.is_set():
                return
        beat = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        beat.start()
        try:
            while not self.stop.is_set():
                what = "task poll"
                try:
                    task = self.gateway.get_task(self.poll_wait_s)
                    what = f"{task.kind.name} task of round {task.round}"
                    if task.kind is TaskKind.FINISHED:
                        log.info("the coordinator finished run %s: %s", self.gateway.run_id, task.message or "done")
                        if self.after_finish == "exit":
                            return
                        self._join_next_run(self.gateway.run_id)
                        continue
                    if task.kind is TaskKind.WAIT:
                        if not task.message.startswith("phase ") and task.message != self.last_notice:
                            # why it waits (left out by the planner, an update refused): once per change
                            log.warning("%s", task.message)
                        self.last_notice = task.message
                        if task.retry_after_s > 0:
                            self.stop.wait(min(task.retry_after_s, self.poll_wait_s))
                        continue
                    self.execute(task)
                except UnknownAgent:
                    log.warning("the coordinator does not know this agent; registering again")
                    skip = self._try_register()
                    if skip is not None:
                        self._join_next_run(skip)
                except Rejected as err:
                    if err.status in FATAL:
                        raise
                    # A round that closed (deadline, coordinator restart) or a plan that was replaced: the
                    # work is lost, the agent is not; it asks for its next task.
                    log.warning("%s refused by the coordinator: %s", what, err)
                    self.state = "idle"
                    self.stop.wait(1.0)
        finally:
            self.stop.set()

    def _join_next_run(self, finished: str) -> None:
        """Register again every poll_wait_s, without a time limit, until a coordinator on the same address
        answers for another run than finished (the same process's next run, or a new coordinator's) that this
        agent can take part in."""
        log.info("waiting for the coordinator's %s run", "next" if finished else "first")
        self.state = "idle"
        self.last_notice = ""
        self.waiting = True
        try:
            self._wait_past(finished)
        finally:
            self.waiting = False

    def _wait_past(self, finished: str) -> None:
        while not self.stop.wait(self.poll_wait_s):
            try:
                skip = self._try_register()
            except ServerUnavailable:
                continue  # nobody answered within reconnect_s: keep waiting
            except Stopped:
                return
            if skip:
                finished = skip  # a run this agent cannot join: wait past it
            elif skip is None and self.gateway.run_id != finished:
                log.info("joined run %s", self.gateway.run_id)
                return

    def execute(self, task: Task) -> None:
        """Run one TRAIN, EVALUATE, PROBE or secure-aggregation task."""
        if task.kind in SECAGG_KINDS:
            self.state = "securing"
            self.secure_work.step(self.gateway, task)
            self.state = "idle"
            return
        if task.kind is TaskKind.PROBE:
            assert task.probe is not None
            self.probe(task.probe)
            return
        assert task.plan is not None
        plan = task.plan
        received = time.monotonic()
        self.state = "loading"
        ferret = plan.mode == "ferret"
        sent: dict[str, torch.Tensor] = {}
        split = self._split(plan)
        if split is not None and self.group is not None:
            try:
                freed = self.group.release()  # their copies of the base hold the memory the split needs
            except GroupFailed as err:
                self._group_failed(task.round, err)
                return
            if freed:
                log.info(
                    "round %d: the base trains split by layers over %d devices; %d helper copies of it freed",
                    task.round,
                    len(self.profile.devices),
                    freed,
                )
        if ferret:
            model = self.ferret.sync(task.global_round, plan)
        else:
            adapted = self.model.prepare(plan, split)
            sent = self.gateway.download(task.global_round, plan.plan_id)
            adapted.load(sent)
            model = adapted.model
        if task.kind is TaskKind.EVALUATE:
            self.state = "evaluating"
            result = evaluate(
                model,
                self.model.tokenizer,
                self.data.val,
                plan.max_seq_len,
                self.model.device,
                task=self.spec.task,
            )
            self.gateway.report_evaluation(task.global_round, result)
            self.metrics.eval_accuracy.set(result.accuracy)
            log.info(
                "round %d global: validation loss %.4f accuracy %.3f%s on %d samples",
                task.global_round,
                result.loss,
                result.accuracy,
                f" macro-F1 {result.macro_f1:.3f}" if result.macro_f1 is not None else "",
                result.samples,
            )
            self.state = "idle"
            return
        self.state = "training"
        self.last_step = None  # step time is measured between steps, within one task
        deadline = received + plan.deadline_s - UPLOAD_RESERVE_S
        start = self.ferret.prepare_training(model, plan) if ferret else {}

        def train(group: Collective | None = None) -> TrainResult:
            return train_local(
                model,
                self.model.tokenizer,
                self.data.train,
                plan,
                self.model.device,
                deadline,
                self.progress,
                on_step=self._count_step,
                throttle=self.throttle,
                task=self.spec.task,
                group=group,
            )

        if self.group is not None and ferret and not self.said_ferret_alone:
            log.info("Ferret plans train on %s alone (data-parallel training covers LoRA plans)", self.model.device)
            self.said_ferret_alone = True
        if self.group is not None and not ferret and split is None:
            try:
                trained = self.group.train(self._job(plan, sent), self.data.train, train)
            except GroupFailed as err:
                self._group_failed(task.round, err)
                return
        else:
            trained = train()
        base_digest, projection_seconds = "", 0.0
        if ferret:
            projected = self.ferret.project_and_restore(model, plan, task.round, start)
            tensors, base_digest, projection_seconds = projected.tensors, projected.base_digest, projected.seconds
        else:
            tensors = adapted.extract()
        meta = UpdateMeta(
            agent_id=self.agent_id,
            round=task.round,
            plan_id=plan.plan_id,
            samples=trained.samples,
            steps=trained.steps,
            train_seconds=trained.seconds,
            train_loss=trained.mean_loss,
            peak_memory_bytes=trained.peak_memory_bytes,
            base_digest=base_digest,
            projection_seconds=projection_seconds,
            importance=trained.importance,
        )
        self.state = "uploading"
        if plan.secure is not None:  # the change goes up masked, in the SECAGG_* tasks that follow
            # what it trained from: the download (LoRA), or the weights and heads it started the round with (Ferret)
            self.secure_work.trained(self.gateway, plan, meta, start if ferret else sent, tensors)
            message = "keys advertised for secure aggregation"
        else:
            message = self.gateway.upload(meta, tensors)
        self.metrics.rounds.inc()
        self.metrics.loss.set(trained.mean_loss)
        self.metrics.train_seconds.set(trained.seconds)
        self.metrics.samples_per_second.set(trained.samples / max(trained.seconds, 1e-9))
        self.metrics.peak_memory.set(trained.peak_memory_bytes)
        check_peak(trained.peak_memory_bytes, self.profile.memory_cap_bytes, f"round {task.round}")
        log.info(
            "round %d: trained %d steps / %d samples in %.1fs, loss %.4f, peak %.0f MiB; %s",
            task.round,
            trained.steps,
            trained.samples,
            trained.seconds,
            trained.mean_loss,
            trained.peak_memory_bytes / 2**20,
            message,
        )
        self.state = "idle"

    def _split(self, plan: TrainPlan) -> dict[str, Any] | None:
        """Where a "layers" plan puts the base: over this agent's devices (None: one device, as every other plan)."""
        devices = self.profile.devices
        if plan.placement != "layers" or plan.mode != "lora" or len(devices) < 2:
            return None
        return layer_split([torch.device(d.device) for d in devices], [d.total_memory_bytes for d in devices])

    def _group_failed(self, round_: int, err: GroupFailed) -> None:
        self.metrics.group_failures.inc()
        log.error("round %d: %s; the round goes on without this agent, which restarts its group", round_, err)
        self.state = "idle"
        self.register()  # registering mid-round withdraws it: the coordinator stops waiting for it

    def _job(self, plan: TrainPlan, sent: Mapping[str, torch.Tensor]) -> Job:
        """A TRAIN task as the group's helpers take it."""
        from safetensors.torch import save

        tensors = save({name: tensor.detach().cpu().contiguous().clone() for name, tensor in sent.items()})
        base = (self.model.path, tuple(self.model.labels), self.model.task)
        return Job(base, id(self.data.train), plan, tensors, self.spec.task)

    def probe(self, probe: ProbePlan) -> None:
        """Score every candidate matrix on the local training data and report the scores."""
        from edge_agent.probe import run_probe

        received = time.monotonic()
        self.state = "probing"
        adapted = self.model.base_at(probe.quantization, self.model.split)  # a split base stays split
        result = run_probe(
            adapted,
            self.model.tokenizer,
            self.data.train,
            probe.candidates,
            probe.rank,
            probe.steps,
            probe.batch_size,
            probe.learning_rate,
            probe.max_seq_len,
            probe.seed,
            self.model.device,
            received + probe.deadline_s - UPLOAD_RESERVE_S,
            self.throttle,
        )
        report = ImportanceReport(probe.probe_id, result.scores, result.samples, result.steps, result.seconds)
        self.gateway.report_importance(report)
        self.state = "idle"

    def _count_step(self, samples: int, loss: float) -> None:
        now = time.monotonic()
        if self.last_step is not None:
            self.metrics.step_seconds.observe(now - self.last_step)
        self.last_step = now
        self.metrics.steps.inc()
        self.metrics.samples.inc(samples)

    def _heartbeats(self) -> None:
        failing = False
        unknown = False
        while not self.stop.wait(self.heartbeat_s):
            try:
                known = self.gateway.heartbeat(self.state)
                if not known and not unknown and not self.waiting:  # once per change; expected between runs
                    log.warning("heartbeat: the coordinator does not know this agent")
                unknown = not known
                if failing:
                    log.info("heartbeats answered again")
                failing = False
            except Exception as err:  # a missed beat is logged once per outage, never fatal
                if not failing:
                    log.warning("heartbeat failed (%s); retrying every %.0fs", err, self.heartbeat_s)
                failing = True

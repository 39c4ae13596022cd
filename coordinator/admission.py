"""The agent-call handlers: what the servicer delegates to, as methods over the round state and the registry.

Every call from an agent lands here after the transport checked who is calling. A handler validates what
the agent sent against the round state and the coordinator's own figures, records it under the round
state's lock, and answers; nothing an agent sends reaches the global state except through admit_update,
which checks an upload completely before it enters the inbox.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar, cast

import torch

from common.data import CAUSAL_LM
from common.errors import AlreadyUploaded, ConfigError, InvalidArgument, NotReady, StaleRound, UnknownAgent
from common.secagg import MASKED, load_public, verify_keys
from common.types import (
    AdapterUpdate,
    DeviceProfile,
    Evaluation,
    GlobalState,
    ImportanceReport,
    ModelSpec,
    Task,
    TaskKind,
    TensorInfo,
    TrainPlan,
    UpdateMeta,
)
from coordinator.bounds import check_evaluation, check_importance, check_meta, check_profile, check_wait
from coordinator.config import CoordinatorConfig
from coordinator.metrics import CoordinatorMetrics
from coordinator.modes import Mode
from coordinator.registry import Registry
from coordinator.round_state import POLL_S, Admitted, Phase, RoundState
from coordinator.secagg import SecAggServer
from coordinator.secure_round import SecureRound

log = logging.getLogger(__name__)

MAX_POLL_S = 30.0  # longest a task poll is held
E = TypeVar("E")


@dataclass(frozen=True)
class RegisterInfo:
    """What a registering agent is told."""

    run_id: str
    heartbeat_interval_s: float
    chunk_bytes: int


@dataclass(frozen=True)
class OpenUpdate:
    """An upload that passed its header's checks; its payload is read next."""

    meta: UpdateMeta
    checksum: bytes
    plan: TrainPlan
    global_: GlobalState


class ArrivalScreening:
    """An opened upload's values checked and change norms taken tensor by tensor while the rest of it arrives
    (transfer.PayloadReader's on_tensor), so that little is left once its last byte is in. What it finds counts
    only after the payload's checksum holds: finish_update raises a refusal it recorded, never earlier. (The checks
    at the round's close, against the other agents' updates, are coordinator.screening's.)"""

    def __init__(self, mode: Mode, opened: OpenUpdate, spec: ModelSpec, bound: float) -> None:
        self.mode, self.opened, self.spec, self.bound = mode, opened, spec, bound
        self.seen: set[str] = set()
        self.norms: dict[str, float] = {}
        self.error: InvalidArgument | None = None

    def tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Check one tensor whose bytes are all in (after a refusal, the rest are not looked at)."""
        if self.error is not None:
            return
        one = {name: tensor}
        try:
            self.mode.check_values(one, self.bound)
            self.norms.update(self.mode.change_norms(one, self.opened.global_, self.opened.plan, self.spec))
        except InvalidArgument as err:
            self.error = err
        self.seen.add(name)

    def covers(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Whether every tensor of the payload was screened."""
        return self.error is not None or self.seen == set(tensors)


@dataclass(frozen=True)
class UploadAnswer:
    """The coordinator's answer to an upload."""

    message: str
    replay: bool = False  # the same bytes as an update already accepted: acknowledged, not counted again


class Admission:
    """Handlers of every agent call, over one run's round state and registry."""

    def __init__(
        self,
        state: RoundState,
        registry: Registry,
        config: CoordinatorConfig,
        metrics: CoordinatorMetrics,
        mode: Mode,
    ) -> None:
        self.state = state
        self.registry = registry
        self.config = config
        self.metrics = metrics
        self.mode = mode
        self.client_ca: bytes | None = None  # tls.client_ca, read when a signed secure round first needs it

    @property
    def spec(self) -> ModelSpec:
        """The run's model, as the coordinator knows it."""
        return self.registry.spec

    # ------------------------------------------------------------------ membership

    def register(self, agent_id: str, profile: DeviceProfile, spec: ModelSpec) -> RegisterInfo:
        """Add an agent (InvalidArgument for a profile outside the limits, ModelMismatch if its model differs
        from the run's); it joins the next round."""
        check_profile(profile, self.spec, self.config.limits)
        new = self.registry.register(agent_id, profile, spec)
        count = len(self.registry.all())
        self.metrics.agents_registered.set(count)
        if new:
            self.metrics.start_agent(agent_id)
        self.metrics.agent_flops.labels(agent_id).set(profile.flops_per_s)
        self.metrics.agent_memory.labels(agent_id).set(profile.total_memory_bytes)
        self.metrics.agent_devices.labels(agent_id).set(profile.world)
        self.metrics.agent_up.labels(agent_id).set(1)
        log.info(
            "agent %s %s: %s, %.1f GiB, %.2f GFLOP/s, %d samples%s",
            agent_id,
            "registered" if new else "re-registered",
            profile.device,
            profile.total_memory_bytes / 2**30,
            profile.flops_per_s / 1e9,
            profile.num_train_samples,
            f"; {profile.world} devices, all-reduce {profile.allreduce_bytes_per_s / 1e9:.2f} GB/s"
            if profile.devices
            else "",
        )
        state = self.state
        with state.cond:
            if state.phase is Phase.TRAINING and agent_id in state.plans and agent_id not in state.inbox:
                # It lost its work (a restart): the round stops waiting for it, and it joins the next one.
                state.withdrawn.add(agent_id)
                log.warning(
                    "round %d: %s registered again mid-round; it joins round %d", state.round, agent_id, state.round + 1
                )
            state.notify()
        return RegisterInfo(state.run_id, self.config.run.heartbeat_interval_s, self.config.server.chunk_bytes)

    def heartbeat(self, agent_id: str, state: str) -> tuple[bool, int]:
        """(known, current round); an unknown agent is told to register again."""
        try:
            self.registry.heartbeat(agent_id, state)
        except UnknownAgent:
            return False, self.state.round
        return True, self.state.round

    # ------------------------------------------------------------------ tasks and the global

    def get_task(self, agent_id: str, wait_s: float) -> Task:
        """The agent's next task, waiting up to wait_s (capped) while there is none (a blocking poll)."""
        end = self.open_poll(agent_id, wait_s)
        state = self.state
        with state.cond:
            while True:
                remaining = end - state.clock()
                task = self.next_task(agent_id, final=remaining <= 0)
                if task is not None:
                    return task
                state.cond.wait(min(remaining, POLL_S))

    def open_poll(self, agent_id: str, wait_s: float) -> float:
        """Start a task poll: checks wait_s and returns when (on the state's clock) it must be answered."""
        check_wait(wait_s)
        self.registry.touch(agent_id)
        return self.state.clock() + min(wait_s, MAX_POLL_S)

    def next_task(self, agent_id: str, final: bool) -> Task | None:
        """The agent's task now; None while it has none to do and the poll is not final (then it waits).

        Takes the state's lock; a caller that must not block can take it first (state.cond.acquire(False)).
        """
        state = self.state
        with state.cond:
            task = self._task_for(agent_id)
            if task.kind is TaskKind.WAIT and not final:
                return None
            if task.kind is TaskKind.FINISHED:
                state.finished_seen.add(agent_id)
                state.notify()
            return task

    def _task_for(self, agent_id: str) -> Task:
        state = self.state
        if state.phase is Phase.FINISHED:
            return Task(TaskKind.FINISHED, round=state.round, message=state.end_message)
        if state.phase is Phase.TRAINING and agent_id in state.sat_out:
            message = f"sitting out round {state.round}: {state.sat_out[agent_id]}"
            return Task(TaskKind.WAIT, round=state.round, retry_after_s=0.0, message=message)
        secure = state.secure if state.phase is Phase.TRAINING else None
        if secure is not None and agent_id in secure.keys:
            due = secure.task_for(agent_id)
            if due is not None:
                kind, step = due
                return Task(kind, round=state.round, secagg=step, retry_after_s=0.0)
            message = f"secure round {state.round}: step {secure.step}"
            return Task(TaskKind.WAIT, round=state.round, retry_after_s=0.0, message=message)
        if secure is not None and secure.step != "keys" and agent_id in state.plans:
            # Its keys would come too late to take part: training now would be lost work.
            message = f"secure round {state.round} closed its keys without yours; you join the next round"
            return Task(TaskKind.WAIT, round=state.round, retry_after_s=0.0, message=message)
        if (
            state.phase is Phase.TRAINING
            and agent_id in state.plans
            and agent_id not in state.inbox
            and agent_id not in state.withdrawn  # (sat_out is answered above) not state.delivered(): O(1) per poll
        ):
            assert state.global_ is not None
            return Task(TaskKind.TRAIN, round=state.round, global_round=state.global_.round, plan=state.plans[agent_id])
        if state.phase is Phase.EVALUATING and agent_id in state.eval_plans and agent_id not in state.eval_reports:
            assert state.global_ is not None
            return Task(
                TaskKind.EVALUATE,
                round=state.global_.round,
                global_round=state.global_.round,
                plan=state.eval_plans[agent_id],
            )
        if state.phase is Phase.PROBING and agent_id in state.probe_agents and agent_id not in state.importance:
            return Task(TaskKind.PROBE, round=state.round, probe=state.probe)
        if agent_id in state.excluded:
            message = f"left out of round {state.round}: {state.excluded[agent_id]}"
            return Task(TaskKind.WAIT, round=state.round, retry_after_s=0.0, message=message)
        if agent_id in state.notices:
            return Task(TaskKind.WAIT, round=state.round, retry_after_s=0.0, message=state.notices[agent_id])
        return Task(TaskKind.WAIT, round=state.round, retry_after_s=0.0, message=f"phase {state.phase.value}")

    def download(
        self,
        agent_id: str,
        global_round: int,
        plan_id: str,
        encode: Callable[[dict[str, torch.Tensor]], E],
        have_digest: str = "",
    ) -> E:
        """The global as the agent's plan loads it, encoded by the transport; StaleRound when it is not current.

        The encoded copy is kept per (global round, plan) until the global changes, so however many downloads
        an agent opens, and however slowly it reads them, they share one copy.
        """
        self.registry.touch(agent_id)
        state = self.state
        with state.cond:
            global_ = state.global_
            plan = self._plan_of(agent_id, plan_id)
            cached = state.downloads.get((global_round, plan_id, have_digest))
        if global_ is None:
            raise NotReady("no global adapter yet")
        if global_round != global_.round:
            raise StaleRound(f"global round {global_round} is gone; the current one is {global_.round}")
        if cached is None:
            tensors = self.mode.download(global_, plan, self.spec, have_digest)
            cached = (encode(tensors), sum(t.numel() * t.element_size() for t in tensors.values()))
            with state.cond:
                if state.global_ is global_:
                    state.downloads[(global_round, plan_id, have_digest)] = cached
        encoded, nbytes = cached
        self.metrics.download_bytes.labels(agent_id).inc(nbytes)
        with state.cond:
            state.downloaded[agent_id] = state.downloaded.get(agent_id, 0) + nbytes
        return cast(E, encoded)

    def _plan_of(self, agent_id: str, plan_id: str) -> TrainPlan:
        for plans in (self.state.plans, self.state.eval_plans):
            plan = plans.get(agent_id)
            if plan is not None and plan.plan_id == plan_id:
                return plan
        raise StaleRound(f"plan {plan_id!r} is not current for agent {agent_id}")

    # ------------------------------------------------------------------ uploads

    def admit_update(
        self,
        meta: UpdateMeta,
        infos: list[TensorInfo],
        checksum: bytes,
        read_payload: Callable[[], Mapping[str, torch.Tensor]],
    ) -> UploadAnswer:
        """Check an upload completely and keep it for this round's aggregation: open_update, then
        read_payload (which verifies sizes and checksum), then finish_update."""
        opened = self.open_update(meta, infos, checksum)
        if isinstance(opened, UploadAnswer):
            return opened
        return self.finish_update(opened, read_payload())

    def open_update(self, meta: UpdateMeta, infos: list[TensorInfo], checksum: bytes) -> OpenUpdate | UploadAnswer:
        """An upload's checks from its header alone, before its payload is read: identity, round, plan, the
        figures it claims (samples within what the plan allows on the agent's counted data) and the exact
        tensors the plan asks for. A replay (the same payload by checksum as the agent's accepted update of the
        open round or the one before) is answered at once, and its payload need not be read."""
        self.registry.get(meta.agent_id)
        state = self.state
        with state.cond:
            if checksum and state.digests.get((meta.agent_id, meta.round)) == checksum:
                self.metrics.updates_replayed.labels(meta.agent_id).inc()
                log.info("round %d: replayed update from %s ignored", meta.round, meta.agent_id)
                return UploadAnswer(f"replay of the update already accepted for round {meta.round}; ignored", True)
            plan = self._open_plan(meta)
            global_ = state.global_
            secure = state.secure
            if secure is not None:
                secure.check_masked(meta.agent_id, infos)
        assert global_ is not None
        if secure is None:
            self.mode.check_origin(meta, plan)
            self.mode.check_declared(infos, plan, self.spec)
        return OpenUpdate(meta, checksum, plan, global_)

    def screening(self, opened: OpenUpdate) -> ArrivalScreening | None:
        """A screening for the opened upload's tensors as they arrive; None in a secure round, whose masked
        values say nothing."""
        if self.state.secure is not None:
            return None
        return ArrivalScreening(self.mode, opened, self.spec, self.config.updates.max_abs_value)

    def finish_update(
        self, opened: OpenUpdate, tensors: Mapping[str, torch.Tensor], screened: ArrivalScreening | None = None
    ) -> UploadAnswer:
        """The checks of an opened upload's verified payload, then its place in the inbox: the values (finite,
        within updates.max_abs_value), then the absolute norm bound; what `screened` already found as the
        payload arrived is not checked again. An update refused for its values or norm is not retrained: its
        agent sits the round out and is told so. The round may have closed meanwhile, so the commit checks
        again under the lock."""
        meta, checksum, plan, global_ = opened.meta, opened.checksum, opened.plan, opened.global_
        state = self.state
        if state.secure is not None:
            return self._finish_masked(opened, tensors)
        try:
            if screened is not None and screened.covers(tensors):
                if screened.error is not None:
                    raise screened.error
                norms: dict[str, float] | None = screened.norms
            else:
                self.mode.check_values(tensors, self.config.updates.max_abs_value)
                norms = None
            tensors, norms, raw_norm = self._bound_norm(meta, tensors, global_, plan, norms)
        except InvalidArgument as err:
            self._sit_out(meta, str(err))
            raise
        update = AdapterUpdate(meta=meta, tensors=tensors)
        with state.cond:
            self._open_plan(meta)  # the round may have closed while the payload was read
            state.inbox[meta.agent_id] = Admitted(update, checksum, _total(norms), raw_norm, norms)
            state.digests[(meta.agent_id, meta.round)] = checksum
            count, planned = len(state.inbox), len(state.plans)
            state.notify()
        self._accepted_metrics(update)
        log.info(
            "round %d: update from %s accepted (%d samples, %.1fs, loss %.4f) [%d/%d]",
            meta.round,
            meta.agent_id,
            meta.samples,
            meta.train_seconds,
            meta.train_loss,
            count,
            planned,
        )
        return UploadAnswer(f"accepted for round {meta.round} ({count}/{planned})")

    def _finish_masked(self, opened: OpenUpdate, tensors: Mapping[str, torch.Tensor]) -> UploadAnswer:
        """A secure round's masked upload: it joins the masked sum; its values say nothing and are not read."""
        meta, state = opened.meta, self.state
        with state.cond:
            self._open_plan(meta)
            secure = state.secure
            if secure is None or secure.server is None:
                raise StaleRound(f"secure round {meta.round} is over")
            secure.server.masked(meta.agent_id, tensors[MASKED])
            update = AdapterUpdate(meta=meta, tensors={})
            state.inbox[meta.agent_id] = Admitted(update, opened.checksum, 0.0, 0.0, {})
            state.digests[(meta.agent_id, meta.round)] = opened.checksum
            count, due = len(state.inbox), len(secure.server.sealed)
            state.notify()
        self._accepted_metrics(update)
        self.metrics.upload_bytes.labels(meta.agent_id).inc(sum(t.numel() * t.element_size() for t in tensors.values()))
        log.info("round %d: masked update from %s accepted [%d/%d]", meta.round, meta.agent_id, count, due)
        return UploadAnswer(f"masked update accepted for round {meta.round} ({count}/{due})")

    # ------------------------------------------------------------------ secure aggregation's key steps

    def _secure(self, agent_id: str, round_: int) -> SecureRound:
        """The open secure round (call with cond held); StaleRound when round_ is not one."""
        state = self.state
        if state.phase is not Phase.TRAINING or state.round != round_ or state.secure is None:
            raise StaleRound(f"no secure round {round_} is open")
        if agent_id not in state.plans:
            raise StaleRound(f"agent {agent_id} has no plan in round {state.round}")
        return state.secure

    def advertise_keys(
        self,
        agent_id: str,
        round_: int,
        plan_id: str,
        keys: tuple[bytes, bytes],
        proof: tuple[bytes, bytes] | None = None,
    ) -> None:
        """An agent that trained its plan: its two public keys (once; the training wait counts it done), signed
        with its certificate in a signed round (checked here too, so a bad one is refused at once)."""
        self.registry.touch(agent_id)
        state = self.state
        with state.cond:
            secure = self._secure(agent_id, round_)
            if state.plans[agent_id].plan_id != plan_id:
                raise InvalidArgument("plan_id", f"{plan_id!r} is not this round's plan for {agent_id}")
            if secure.step != "keys":
                raise StaleRound(f"secure round {round_} took its keys already (step {secure.step})")
            if agent_id in secure.keys:
                if secure.keys[agent_id] == keys:
                    return
                raise AlreadyUploaded(f"agent {agent_id} already advertised other keys for round {round_}")
            for name, key in zip(("keys.share_key", "keys.mask_key"), keys, strict=True):
                load_public(key, name)
            if secure.spec.signed:
                if proof is None or not proof[0]:
                    raise InvalidArgument("keys.signature", f"round {round_} takes signed keys; {agent_id}'s are not")
                verify_keys(self._client_ca(), proof[0], proof[1], secure.spec.tag, agent_id, keys)
                secure.proofs[agent_id] = proof
            secure.keys[agent_id] = keys
            count = len(secure.keys)
            state.notify()
        log.info("round %d: %s trained and advertised its keys [%d/%d]", round_, agent_id, count, len(state.plans))

    def _client_ca(self) -> bytes:
        """The CA that signs agent certificates (tls.client_ca), read on first use."""
        if self.client_ca is None:
            path = self.config.tls.client_ca
            if path is None:
                raise ConfigError("tls.client_ca: needed to check the agents' signed secure-aggregation keys")
            self.client_ca = path.read_bytes()
        return self.client_ca

    def _relay(self, agent_id: str, round_: int, step: str) -> SecAggServer:
        """The open secure round's relay when it is at `step` (call with cond held); StaleRound otherwise."""
        secure = self._secure(agent_id, round_)
        if secure.step != step or secure.server is None:
            raise StaleRound(f"secure round {round_} is at step {secure.step}, not {step}")
        return secure.server

    def share_keys(self, agent_id: str, round_: int, sealed: Mapping[str, bytes]) -> None:
        """An agent's sealed shares, one per neighbour whose keys it was sent."""
        self.registry.touch(agent_id)
        with self.state.cond:
            self._relay(agent_id, round_, "shares").share(agent_id, sealed)
            self.state.notify()

    def unmask(self, agent_id: str, round_: int, revealed: Mapping[str, tuple[str, int]]) -> None:
        """A survivor's unmasking shares."""
        self.registry.touch(agent_id)
        with self.state.cond:
            self._relay(agent_id, round_, "unmask").unmask(agent_id, revealed)
            self.state.notify()

    def _open_plan(self, meta: UpdateMeta) -> TrainPlan:
        """The agent's plan of the open round; refuses what does not belong to it (call with cond held)."""
        state = self.state
        if state.phase is not Phase.TRAINING or meta.round != state.round:
            open_round = state.round if state.phase is Phase.TRAINING else None
            raise StaleRound(f"round {meta.round} is not open for uploads (open round: {open_round})")
        if meta.agent_id not in state.plans:
            raise StaleRound(f"agent {meta.agent_id} has no plan in round {state.round}; it joins the next")
        if meta.agent_id in state.withdrawn:
            raise StaleRound(f"agent {meta.agent_id} registered again during round {state.round}; it joins the next")
        if meta.agent_id in state.sat_out:
            raise StaleRound(f"agent {meta.agent_id} sits out round {state.round}: {state.sat_out[meta.agent_id]}")
        plan = state.plans[meta.agent_id]
        if meta.plan_id != plan.plan_id:
            raise InvalidArgument("plan_id", f"{meta.plan_id!r} is not this round's plan for {meta.agent_id}")
        if meta.agent_id in state.inbox:
            raise AlreadyUploaded(
                f"agent {meta.agent_id} already uploaded round {state.round}, with a different payload"
            )
        # The weight of an update is its sample count: bounded by the work the plan allows on the data the
        # coordinator counts for the agent, so one agent cannot claim to outweigh the others.
        check_meta(meta, plan, state.allowed[meta.agent_id], self.config.limits)
        return plan

    def _sit_out(self, meta: UpdateMeta, reason: str) -> None:
        """The agent's update was refused for what it holds: the round stops waiting for it."""
        with self.state.cond:
            if self.state.phase is Phase.TRAINING and meta.round == self.state.round:
                self.state.sat_out[meta.agent_id] = f"update refused: {reason}"
                self.state.notify()
        log.warning("round %d: update from %s refused, it sits the round out: %s", meta.round, meta.agent_id, reason)

    def _bound_norm(
        self,
        meta: UpdateMeta,
        tensors: Mapping[str, torch.Tensor],
        global_: GlobalState,
        plan: TrainPlan,
        norms: dict[str, float] | None = None,
    ) -> tuple[Mapping[str, torch.Tensor], dict[str, float], float]:
        """updates.max_norm: refuse, or scale down, an update whose change to what it was sent is too large
        (norms: its per-tensor change norms when already taken). Returns the tensors kept, their per-tensor change
        norms and the update's norm before any clipping."""
        if norms is None:
            norms = self.mode.change_norms(tensors, global_, plan, self.spec)
        norm = _total(norms)
        self.metrics.update_norm.labels(meta.agent_id).set(norm)
        bound = self.config.updates.max_norm
        if bound <= 0 or norm <= bound:
            return tensors, norms, norm
        if self.config.updates.norm_action == "reject":
            self.metrics.updates_screened.labels(meta.agent_id, "rejected").inc()
            raise InvalidArgument("update norm", f"{norm:.4g} exceeds updates.max_norm {bound:g}")
        self.metrics.updates_clipped.labels(meta.agent_id).inc()
        log.warning("round %d: update from %s clipped from norm %.4g to %g", meta.round, meta.agent_id, norm, bound)
        factor = bound / norm
        scaled = self.mode.scale_change(tensors, global_, plan, self.spec, factor)
        return scaled, {n: v * factor for n, v in norms.items()}, norm

    def _accepted_metrics(self, update: AdapterUpdate) -> None:
        agent, meta = update.meta.agent_id, update.meta
        nbytes = sum(t.numel() * t.element_size() for t in update.tensors.values())
        self.metrics.updates_accepted.labels(agent).inc()
        self.metrics.upload_bytes.labels(agent).inc(nbytes)
        self.metrics.agent_train_seconds.labels(agent).set(meta.train_seconds)
        self.metrics.agent_samples.labels(agent).set(meta.samples)
        self.metrics.agent_samples_per_second.labels(agent).set(meta.samples / max(meta.train_seconds, 1e-9))
        self.metrics.agent_peak_memory.labels(agent).set(meta.peak_memory_bytes)

    # ------------------------------------------------------------------ reports

    def report_evaluation(self, agent_id: str, global_round: int, evaluation: Evaluation) -> None:
        """Keep an agent's evaluation of the current global adapter: one per agent and round (an identical
        re-send is fine), figures within range and at most the agent's validation samples."""
        record = self.registry.touch(agent_id)
        spec = self.registry.spec
        classes = 0 if spec.task == CAUSAL_LM else len(spec.labels)  # a causal LM's reports carry no matrix
        check_evaluation(evaluation, record.profile.num_val_samples, classes)
        state = self.state
        with state.cond:
            if state.phase is not Phase.EVALUATING or state.global_ is None or global_round != state.global_.round:
                raise StaleRound(f"no evaluation of global round {global_round} is open")
            if agent_id not in state.eval_plans:
                raise StaleRound(f"agent {agent_id} was not asked to evaluate round {global_round}")
            earlier = state.eval_reports.get(agent_id)
            if earlier is not None and earlier != evaluation:
                raise AlreadyUploaded(f"agent {agent_id} already reported its evaluation of round {global_round}")
            state.eval_reports[agent_id] = evaluation
            state.notify()

    def report_importance(self, agent_id: str, report: ImportanceReport) -> None:
        """Keep an agent's probe scores: every candidate scored, nothing else, figures within the probe's."""
        self.registry.touch(agent_id)
        state = self.state
        with state.cond:
            probe = state.probe
            if state.phase is not Phase.PROBING or probe is None or report.probe_id != probe.probe_id:
                raise StaleRound(f"probe {report.probe_id!r} is not open")
            if agent_id not in state.probe_agents:
                raise StaleRound(f"agent {agent_id} was not asked to take part in probe {probe.probe_id}")
            if agent_id in state.importance:
                raise AlreadyUploaded(f"agent {agent_id} already reported probe {probe.probe_id}")
        check_importance(report, probe)
        with state.cond:
            if agent_id in state.importance:
                raise AlreadyUploaded(f"agent {agent_id} already reported probe {probe.probe_id}")
            state.importance[agent_id] = report
            state.notify()
        self.metrics.probe_seconds.labels(agent_id).set(report.seconds)
        log.info(
            "probe %s: scores from %s (%d samples, %.1fs)", report.probe_id, agent_id, report.samples, report.seconds
        )


def _total(norms: Mapping[str, float]) -> float:
    """The L2 norm of an update from its per-tensor norms."""
    return math.sqrt(sum(norm * norm for norm in norms.values()))

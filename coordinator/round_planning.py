"""Each round's plans: the alive agents drawn and their data counted, planned over the current mask with the
closed loop's per-agent corrections; the plan's metrics, and the corrections refitted from what the round
measured (coordinator.closed_loop)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace

from common.types import DeviceProfile, ModelSpec, TrainPlan
from coordinator.bounds import counted_profiles
from coordinator.closed_loop import Measured, Scales
from coordinator.closed_loop import refit as refit_scales
from coordinator.config import CoordinatorConfig
from coordinator.masks import Masks
from coordinator.metrics import CoordinatorMetrics
from coordinator.modes import Mode
from coordinator.planner import Planner, PlanOptions, PlanSet, Prediction
from coordinator.registry import AgentRecord
from coordinator.round_state import Admitted, RoundState, RunAborted
from coordinator.rundir import RunDir, snapshot
from coordinator.sampling import draw, sample_size, sit_outs

log = logging.getLogger(__name__)


class RoundPlanning:
    """The planner as the round loop uses it; `corrections` is the closed loop's state (saved with the run)."""

    def __init__(
        self,
        config: CoordinatorConfig,
        planner: Planner,
        options: PlanOptions,
        mode: Mode,
        metrics: CoordinatorMetrics,
        rundir: RunDir,
        state: RoundState,
        masks: Masks,
    ) -> None:
        self.config = config
        self.planner = planner
        self.options = options
        self.mode = mode
        self.metrics = metrics
        self.rundir = rundir
        self.state = state
        self.masks = masks
        self.corrections: dict[str, Scales] = {}  # agent -> (time, memory) scale from measurements

    def publish(self, planned: PlanSet, spec: ModelSpec, profiles: Mapping[str, DeviceProfile]) -> None:
        """The plan's figures per agent as metrics (profiles: the ones planned from)."""
        for agent, prediction in planned.predictions.items():
            self.metrics.plan_memory.labels(agent).set(prediction.peak_memory_bytes)
            self.metrics.plan_step_seconds.labels(agent).set(prediction.step_seconds)
        if planned.round_seconds:
            self.metrics.plan_round_seconds.set(planned.round_seconds)
        for agent, plan in planned.plans.items():
            self.metrics.plan_rank.labels(agent).set(max(plan.rank_pattern.values(), default=0))
            self.metrics.plan_batch.labels(agent).set(plan.batch_size)
            self.metrics.plan_bits.labels(agent).set(plan.quantization.bits)
            self.metrics.plan_split.labels(agent).set(profiles[agent].world if plan.placement == "layers" else 1)
            self.metrics.plan_trainable.labels(agent).set(self.mode.trainable_parameters(plan, spec))

    def plan(
        self, alive: Mapping[str, AgentRecord], spec: ModelSpec, round_: int
    ) -> tuple[PlanSet, dict[str, DeviceProfile]]:
        """Plans for the alive agents over the current mask, and the profiles planned from (data sizes as
        counted: capped at updates.max_weight_ratio x the median); agents that fit nowhere are left out, loudly."""
        options = replace(self.options, scores=self.masks.scores, corrections=dict(self.corrections))
        if self.masks.mask is not None:
            options = replace(options, targets=self.masks.mask)
        profiles = {a: r.profile for a, r in alive.items()}
        self.rundir.write_agents(snapshot(profiles, spec, self.masks.mask, self.masks.scores, self.corrections))
        run = self.config.run
        size = sample_size(len(profiles), run.sample_fraction, run.sample_count, run.min_agents)
        sampled = draw(profiles, size, run.seed, round_)
        unsampled = sit_outs(profiles, sampled)
        self.metrics.sampled_agents.set(len(sampled))
        if unsampled:
            log.info("round %d: drew %d of %d agents: %s", round_, size, len(profiles), ", ".join(sampled))
        profiles = {a: profiles[a] for a in sampled}
        counted = counted_profiles(profiles, self.config.updates.max_weight_ratio)
        for agent in sorted(profiles):
            if counted[agent].num_train_samples < profiles[agent].num_train_samples:
                log.warning(
                    "round %d: %s reports %d training samples; planned as %d (%g x the median)",
                    round_,
                    agent,
                    profiles[agent].num_train_samples,
                    counted[agent].num_train_samples,
                    self.config.updates.max_weight_ratio,
                )
        planned = self.planner(counted, spec, options, round_)
        for agent in alive:
            self.metrics.agent_excluded.labels(agent).set(1 if agent in planned.excluded else 0)
        for agent, reason in planned.excluded.items():
            log.warning("round %d: %s left out: %s", round_, agent, reason)
        with self.state.cond:
            # Agents not drawn keep polling and hear why they wait.
            self.state.excluded = {**unsampled, **planned.excluded}
        if len(planned.plans) < self.config.run.min_agents:
            reasons = "; ".join(f"{a}: {r}" for a, r in planned.excluded.items())
            raise RunAborted(
                f"only {len(planned.plans)} agents can be planned, {self.config.run.min_agents} needed"
                + (f" ({reasons})" if reasons else "")
            )
        if planned.round_seconds:
            log.info("round %d: planned %.1fs of training per agent", round_, planned.round_seconds)
        return planned, counted

    def sampling_rate(self, alive: int) -> float:
        """Each alive agent's chance to be drawn this round (coordinator.sampling)."""
        run = self.config.run
        return sample_size(alive, run.sample_fraction, run.sample_count, run.min_agents) / max(alive, 1)

    def check_payload_limit(self, plans: Mapping[str, TrainPlan], spec: ModelSpec) -> None:
        """Abort before a round whose planned updates could never be accepted."""
        limit = self.config.server.max_upload_bytes
        for agent, plan in plans.items():
            size = self.mode.planned_bytes(plan, spec)
            if size > limit:
                raise RunAborted(f"{agent}'s planned update is {size} bytes, over server.max_upload_bytes {limit}")

    def refit(self, inbox: Mapping[str, Admitted], predictions: Mapping[str, Prediction]) -> None:
        """Closed loop (coordinator.closed_loop): an agent whose measured step time or peak memory is off the
        prediction by more than planning.refit_threshold gets its cost model scaled for the next plans."""
        for agent, admitted in inbox.items():
            meta = admitted.update.meta
            predicted = predictions.get(agent)
            if predicted is None or meta.steps == 0:
                continue
            measured = Measured(meta.steps, meta.train_seconds, meta.peak_memory_bytes)
            self.metrics.agent_step_seconds.labels(agent).set(measured.step_seconds)
            scales = refit_scales(
                self.corrections.get(agent, (1.0, 1.0)), measured, predicted, self.config.planning.refit_threshold
            )
            if scales is not None:
                self.corrections[agent] = scales
                log.info(
                    "refit %s: step %.3fs measured vs %.3fs predicted, peak %.0f vs %.0f MiB; scales now %.2f, %.2f",
                    agent,
                    measured.step_seconds,
                    predicted.step_seconds,
                    meta.peak_memory_bytes / 2**20,
                    predicted.peak_memory_bytes / 2**20,
                    *scales,
                )

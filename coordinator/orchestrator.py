"""The round loop: what the coordinator does between agent calls, round after round.

One run: wait for agents -> round-0 global -> per round: plan, open the round, wait for uploads until all
arrived or the deadline, aggregate, save, evaluate -> finish. Agents are reached only through the round
state, whose phase and plans the agent-call handlers (coordinator.admission) answer from.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from common.errors import ConfigError
from common.types import (
    Evaluation,
    GlobalState,
    RoundResult,
    TrainPlan,
)
from coordinator.admission import Admission
from coordinator.aggregation import Aggregation
from coordinator.bounds import allowed_samples
from coordinator.config import CoordinatorConfig
from coordinator.dp import DpAggregation
from coordinator.evaluation import Evaluator
from coordinator.masks import Masks
from coordinator.metrics import CoordinatorMetrics
from coordinator.modes import Mode
from coordinator.modes.lora import LoraMode
from coordinator.planner import Planner, PlanOptions
from coordinator.registry import AgentRecord, Registry
from coordinator.reporting import Recorder, round_report, weighted_evaluation
from coordinator.round_planning import RoundPlanning
from coordinator.round_state import Phase, RoundState, RunAborted
from coordinator.rundir import RunDir, from_snapshot, plan_record, result_record, saved_state, snapshot
from coordinator.screening import Screening
from coordinator.secure_round import SecureOutcome, SecureRound, SecureSteps
from coordinator.strategy import Strategy
from coordinator.tracking import Tracking

log = logging.getLogger(__name__)


class BudgetSpent(Exception):
    """The next round would spend more privacy than privacy.dp.target_epsilon allows: the run ends early."""


class Orchestrator:
    """Drives one run's rounds; agent calls go to `admission`, which shares `state` with the loop."""

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
        mode: Mode | None = None,
        tracking: Tracking | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.strategy = strategy
        self.metrics = metrics
        self.base_path = base_path
        self.evaluator = evaluator
        self.tracking = tracking or Tracking([])
        self.spec = registry.spec
        self.mode: Mode = mode or LoraMode(self.spec, options.alpha, base_path)
        self.state = RoundState()
        self.admission = Admission(self.state, registry, config, metrics, self.mode)
        dp = config.privacy.dp
        self.dp = DpAggregation(dp, config.run.rounds, metrics) if dp.enabled else None
        secure = config.privacy.secure_aggregation
        self.secure = (
            SecureSteps(secure, metrics, self.state.cond, self._wait_for, self.state.clock) if secure.enabled else None
        )
        self.aggregation = Aggregation(config, self.mode, strategy, metrics, self.dp)
        # Under privacy.dp the clip bounds every agent's pull, and the relative bounds would make one agent's
        # inclusion depend on the others' updates, which the noise is not calibrated for; under secure
        # aggregation there are no single updates to compare.
        self.screening = Screening(
            config.updates, self.mode, self.spec, metrics, relative=self.dp is None and self.secure is None
        )
        self.dead: set[str] = set()  # agents marked dead (missed heartbeats), until they call again
        self.rundir = RunDir(config.run.run_dir, self.spec, self.mode)
        self.recorder = Recorder(metrics, self.rundir, self.tracking, self.spec, config.run.rounds)
        self.masks = Masks(
            config, options, self.mode, metrics, self.rundir, self.state, self._wait_for, self._check_stop
        )
        self.planning = RoundPlanning(config, planner, options, self.mode, metrics, self.rundir, self.state, self.masks)
        self.eval_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heldout-eval")
        # A round whose held-out evaluation still runs (evaluation.overlap): its result, less the held-out figures.
        self.deferred: tuple[RoundResult, Future[tuple[Evaluation, float]]] | None = None
        self.started = 0.0  # the run's start on the round state's clock
        self.stopped: str | None = None  # why the run ended before run.rounds (the privacy budget), if it did
        self.sampling_rate = 1.0  # the current round's: drawn agents / alive agents

    @property
    def results(self) -> list[RoundResult]:
        """The rounds recorded so far, in order."""
        return self.recorder.results

    @results.setter
    def results(self, results: list[RoundResult]) -> None:
        self.recorder.results = results

    @property
    def mask(self) -> tuple[str, ...] | None:
        """The selected matrices; None = every candidate."""
        return self.masks.mask

    @property
    def run_id(self) -> str:
        """This run's id (kept across a coordinator restart)."""
        return self.state.run_id

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        """Drive every round to the end (resuming a run directory that holds state); returns the summary."""
        try:
            return self._run()
        finally:
            self.eval_pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> dict[str, Any]:
        cfg = self.config.run
        self.started = self.state.clock()
        self.metrics.run_rounds.set(cfg.rounds)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        saved = self._restore_registry()
        log.info("waiting for %d agents (up to %.0fs)", cfg.min_agents, cfg.registration_timeout_s)
        alive = self._await_agents()
        spec = self.spec
        resumed = self.rundir.load_state() if saved else None
        plans: Mapping[str, TrainPlan] = {}
        if resumed is not None:
            global_, strategy_state, meta = resumed
            self.strategy.load_state_dict(strategy_state)
            self._resume(global_, meta)
        else:
            self.masks.choose(0, alive, spec)
            plans = self.planning.plan(alive, spec, 0)[0].plans
            global_ = self.mode.initial(spec, plans, cfg.seed)
            plans = self.mode.finalize_plans(plans, global_)
            self.rundir.save_state(global_, self._bookkeeping(), self.strategy.state_dict())
        self.state.set_global(global_)
        settings = self.config.model_dump(mode="json")
        self.rundir.write_config(settings)
        self.tracking.start(self.run_id, settings)
        if resumed is None and self.config.evaluation.initial:
            self._evaluate(0, plans, RoundResult(0, (), 0.0, 0))
        for round_ in range(global_.round + 1, cfg.rounds + 1):
            try:
                failed = self._train_round(round_)
            except BudgetSpent as spent:
                log.warning("round %d not started: %s; the run ends here", round_, spent)
                self.stopped = str(spent)
                break
            if failed is not None:
                self._settle(wait=True)  # results stay in round order
                self.results.append(failed)
        self._settle(wait=True)
        return self._finish()

    def _bookkeeping(self) -> dict[str, Any]:
        """What a restarted coordinator needs besides the global adapter."""
        profiles = {a: r.profile for a, r in self.registry.all().items()}
        return {
            "run_id": self.run_id,
            **snapshot(profiles, self.spec, self.masks.mask, self.masks.scores, self.planning.corrections),
            **({"privacy": self.dp.state()} if self.dp is not None else {}),
        }

    def _restore_registry(self) -> bool:
        """When the run directory holds state: the run's model and agents, so they carry on without
        registering again. False for a fresh run."""
        meta = saved_state(self.config.run.run_dir)
        if meta is None:
            return False
        if "spec" not in meta:  # state of an older version: agents register again
            return True
        profiles, spec, _, _, _ = from_snapshot(meta)
        if spec != self.spec:
            raise ConfigError(
                f"run.run_dir: {self.config.run.run_dir} holds a run of base model {spec.fingerprint}, this "
                f"coordinator's model.path is {self.spec.fingerprint}; use another run directory"
            )
        self.registry.restore(profiles)
        return True

    def _resume(self, global_: GlobalState, meta: Mapping[str, Any]) -> None:
        """Continue after the last complete round: its global, mask, cost corrections and results."""
        if "spec" in meta:
            _, _, self.masks.mask, self.masks.scores, self.planning.corrections = from_snapshot(meta)
        self.state.run_id = str(meta.get("run_id", self.run_id))
        if self.dp is not None:
            self.dp.load_state(meta.get("privacy", {}))
            self.rundir.metadata = self.dp.metadata()
        self.results = self.rundir.results(global_.round)
        self.metrics.resumed_round.set(global_.round)
        if self.mask is not None:
            self.metrics.mask_size.set(len(self.mask))
        log.info(
            "resuming run %s after round %d from %s (global sha256 %s, strategy state sha256 %s, %s, %s in the mask)",
            self.run_id,
            global_.round,
            self.config.run.run_dir,
            meta.get("global_sha256", "?"),
            meta.get("strategy_sha256", "?"),
            self.mode.describe(global_),
            f"{len(self.mask)} matrices" if self.mask is not None else "every candidate",
        )

    def stop(self) -> None:
        """End the run at the next wait (a signal, or a test's teardown); run() raises RunAborted."""
        self.state.stopping.set()
        with self.state.cond:
            self.state.notify()
        with self.registry.changed:
            self.registry.changed.notify_all()

    def _check_stop(self) -> None:
        if self.state.stopping.is_set():
            raise RunAborted("stopped before the run completed")

    def _await_agents(self) -> dict[str, AgentRecord]:
        cfg = self.config.run
        alive = self.registry.wait_for(
            cfg.min_agents, cfg.registration_timeout_s, cfg.agent_timeout_s, self.state.stopping
        )
        self._check_stop()
        self.metrics.agents_alive.set(len(alive))
        if len(alive) < cfg.min_agents:
            raise RunAborted(
                f"only {len(alive)} of the {cfg.min_agents} agents needed are alive "
                f"after {cfg.registration_timeout_s:.0f}s"
            )
        return alive

    # ------------------------------------------------------------------ one training round

    def _train_round(self, round_: int) -> RoundResult | None:
        """One round; a failed round's result (the caller records it), None when the round published a global
        (recorded by _evaluate, at once or when its held-out evaluation is ready)."""
        cfg = self.config.run
        alive = self._await_agents()
        spec = self.spec
        global_ = self.state.global_
        assert global_ is not None
        self.sampling_rate = self.planning.sampling_rate(len(alive))
        if self.dp is not None:
            if not self.dp.prepared:
                # At the first round this process trains, not at start-up: registration ends at run.min_agents,
                # and a noise multiplier derived from that many agents' sampling rate would be far too large.
                self.dp.prepare(self.sampling_rate)
                self.rundir.metadata = self.dp.metadata()
            spent = self.dp.over_budget(self.sampling_rate)
            if spent is not None:
                raise BudgetSpent(spent)
        every = self.config.selection.reselect_every
        if every and round_ > 1 and (round_ - 1) % every == 0:
            self.masks.choose(round_ - 1, alive, spec)
        planned, counted = self.planning.plan(alive, spec, round_)
        plans = planned.plans
        self.planning.check_payload_limit(plans, spec)
        # Matrices entering the mask start in the global adapter (A random, B = 0), alike for every agent.
        global_ = self.mode.extend(global_, plans, spec)
        plans = self.mode.finalize_plans(plans, global_)
        secure = None
        if self.secure is not None:
            secure = SecureRound.open(
                f"{self.run_id}/{round_}", self.mode.linear_layout(global_, plans), self.config.privacy
            )
            plans = {agent: replace(plan, secure=secure.spec) for agent, plan in plans.items()}
        self.state.set_global(global_)
        self.planning.publish(planned, spec, counted)
        start = self.state.clock()
        opened = start - self.started
        allowed = {a: allowed_samples(p, counted[a]) for a, p in plans.items()}
        self.state.open_training(round_, plans, allowed, secure)
        self.metrics.current_round.set(round_)
        self.metrics.round_started.set_to_current_time()
        log.info("round %d/%d: training on %d agents: %s", round_, cfg.rounds, len(plans), ", ".join(sorted(plans)))
        quorum = max(cfg.quorum or cfg.min_agents, math.ceil(cfg.quorum_fraction * len(plans)))
        self._wait_for(plans, self.state.delivered, start + cfg.round_deadline_s)
        extensions = 0
        while True:
            self._check_stop()
            with self.state.cond:
                count = self.state.trained()
                pending = set(plans) - self.state.delivered()
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
            self._wait_for(plans, self.state.delivered, self.state.clock() + cfg.round_deadline_s)
        outcome: SecureOutcome | str | None = None
        if secure is not None:
            assert self.secure is not None
            noise = self.dp.agent_noise if self.dp is not None else (lambda n: 0.0)
            outcome = self.secure.run(secure, self.state.notify, quorum, noise)
        inbox = self.state.close_training()
        dropped = tuple(sorted(set(plans) - set(inbox)))
        if isinstance(outcome, str):
            self.metrics.rounds_failed.labels("secure_aggregation").inc()
            log.error("round %d: secure aggregation failed, round skipped, global unchanged: %s", round_, outcome)
            return RoundResult(
                round_, tuple(sorted(inbox)), self.state.clock() - start, 0, dropped=dropped, failure=outcome,
                opened_s=opened,
            )  # fmt: skip
        for agent in dropped:
            self.metrics.stragglers.labels(agent).inc()
        if dropped:
            log.warning("round %d: closing without %s", round_, ", ".join(dropped))
        screened = self.screening.screen(round_, inbox, plans, global_)
        inbox, refused = screened.kept, tuple(screened.refused)
        with self.state.cond:
            for agent, reason in screened.refused.items():
                self.state.notices[agent] = f"your round-{round_} update was left out: {reason}"
        if len(inbox) < quorum:
            self.metrics.rounds_failed.labels("no_quorum").inc()
            log.error(
                "round %d: only %d of the %d updates needed (quorum) arrived%s; round skipped, global unchanged "
                "(missing %s)",
                round_,
                len(inbox),
                quorum,
                f" and passed the norm bound (left out {', '.join(refused)})" if refused else "",
                ", ".join(dropped) or "none",
            )
            failure = f"{len(inbox)} of the {quorum} updates needed"
            return RoundResult(
                round_, tuple(sorted(inbox)), self.state.clock() - start, 0, dropped=dropped, refused=refused,
                failure=failure, opened_s=opened,
            )  # fmt: skip
        weights = self.screening.weights(round_, inbox, self.state.allowed)
        if isinstance(outcome, SecureOutcome):
            aggregated = self.aggregation.secure_sum(global_, outcome, plans, round_)
        else:
            aggregated = self.aggregation.updates(global_, inbox, weights, plans, round_)
        if isinstance(aggregated, str):
            self.metrics.rounds_failed.labels("non_finite").inc()
            log.error("round %d: aggregate refused, the round-%d global stays: %s", round_, global_.round, aggregated)
            return RoundResult(
                round_, tuple(sorted(inbox)), self.state.clock() - start, 0, dropped=dropped, refused=refused,
                failure=aggregated, opened_s=opened,
            )  # fmt: skip
        new_global, agg_metrics, agg_seconds = aggregated
        epsilon = None
        if self.dp is not None:
            epsilon = self.dp.published(self.sampling_rate)
            self.rundir.metadata = self.dp.metadata()
        self.planning.refit(inbox, planned.predictions)
        self.masks.keep_training_scores(round_, inbox, weights)
        report = round_report(inbox, weights, planned.predictions, dict(self.state.downloaded))
        self.rundir.save_round(new_global, plans, report, self._bookkeeping(), self.strategy.state_dict())
        self.tracking.agents(round_, report, plans)
        self.state.set_global(new_global)
        seconds = self.state.clock() - start
        self.metrics.round_duration.observe(seconds)
        self.metrics.rounds_completed.inc()
        self.metrics.round_completed.set_to_current_time()
        updates = [admitted.update for admitted in inbox.values()]
        samples = sum(u.meta.samples for u in updates)
        train_loss = sum(u.meta.train_loss * u.meta.samples for u in updates) / samples
        if "directions" in agg_metrics:
            self.metrics.ferret_directions.set(agg_metrics["directions"])
            self.metrics.ferret_reconstruction_seconds.set(agg_metrics["reconstruction_seconds"])
        truncated = agg_metrics.get("truncated_energy_share")
        if truncated is not None:
            self.metrics.truncated_energy_share.set(truncated)
        log.info(
            "round %d: aggregated %d updates (%d samples, |dW| change %.4f) in %.2fs%s%s",
            round_,
            len(updates),
            samples,
            agg_metrics["delta_norm"],
            agg_seconds,
            f", {agg_metrics['directions']:.0f} directions rebuilt in {agg_metrics['reconstruction_seconds']:.2f}s"
            if "directions" in agg_metrics
            else "",
            f", global rank {agg_metrics['max_rank']:.0f} drops {100 * truncated:.2f}% of the update's energy"
            + (
                f" (worst module {100 * agg_metrics['truncated_energy_share_max']:.2f}%)"
                if "truncated_energy_share_max" in agg_metrics
                else ""
            )
            if truncated is not None
            else "",
        )
        result = RoundResult(
            round_, tuple(sorted(inbox)), seconds, samples, train_loss=train_loss, dropped=dropped, refused=refused,
            aggregation_seconds=agg_seconds, truncated_energy_share=truncated, opened_s=opened, epsilon=epsilon,
        )  # fmt: skip
        self._evaluate(round_, plans, result)
        return None

    # ------------------------------------------------------------------ waits and liveness

    def _wait_for(self, expected: Collection[str], received: Callable[[], Collection[str]], deadline: float) -> None:
        """Wait until every expected agent delivered, the deadline passed, or every outstanding agent is dead."""
        outcome = self.state.wait_for(expected, received, deadline, self._between_waits)
        if outcome == "dead":
            with self.state.cond:
                pending = set(expected) - set(received())
            log.warning("agents %s stopped beating; not waiting for them", ", ".join(sorted(pending)))

    def _between_waits(self) -> set[str]:
        """Called as a wait polls: records a held-out evaluation that has finished, then reports liveness."""
        self._settle(wait=False)
        return self._liveness()

    def _liveness(self) -> set[str]:
        """The alive agents; logs and counts each agent that goes silent, and each that comes back."""
        state = self.state
        alive = set(self.registry.alive(self.config.run.agent_timeout_s))
        known = set(self.registry.all())
        for agent in sorted((known - alive) - self.dead):
            if agent in state.plans or agent in state.eval_plans or agent in state.probe_agents:
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

    # ------------------------------------------------------------------ evaluation and the end

    def _evaluate(self, round_: int, plans: Mapping[str, TrainPlan], result: RoundResult) -> None:
        """Score the current global: held-out on this host, and validation splits on the agents; then record the
        round, or (evaluation.overlap, before the last round) leave it to record when the held-out figures are in,
        so the next round trains meanwhile."""
        assert self.state.global_ is not None
        global_ = self.state.global_
        pending: Future[tuple[Evaluation, float]] | None = None
        if self.evaluator is not None:
            # One long-lived worker: a new thread per round would get a fresh malloc arena each time,
            # and resident memory would creep round after round.
            pending = self.eval_pool.submit(self._heldout, global_, next(iter(plans.values())))
            pending.add_done_callback(lambda _: self._wake())
        agents_eval = None
        if self.config.evaluation.agents:
            alive = set(self.registry.alive(self.config.run.agent_timeout_s))
            # The plans as of the global being evaluated (Ferret: its digest, so agents bring their weights up to it).
            chosen = {a: p for a, p in plans.items() if a in alive}
            self.state.open_evaluation(self.mode.finalize_plans(chosen, global_))
            self._wait_for(
                self.state.eval_plans,
                lambda: self.state.eval_reports,
                self.state.clock() + self.config.run.eval_deadline_s,
            )
            agents_eval = weighted_evaluation(self.state.close_evaluation(), self.config.updates.max_weight_ratio)
        result = replace(result, agents_eval=agents_eval)
        self._settle(wait=True)  # the previous round's, before this one's
        if pending is None:
            self.recorder.record(result)
        elif self.config.evaluation.overlap and round_ < self.config.run.rounds:
            self.deferred = (result, pending)
        else:
            self.recorder.record(_with_heldout(result, pending.result()))

    def _heldout(self, global_: GlobalState, plan: TrainPlan) -> tuple[Evaluation, float]:
        assert self.evaluator is not None
        start = time.perf_counter()
        evaluation = self.evaluator(global_, plan, self.spec)
        return evaluation, time.perf_counter() - start

    def _wake(self) -> None:
        with self.state.cond:
            self.state.notify()

    def _settle(self, wait: bool) -> None:
        """Record the deferred round once its held-out evaluation has finished (wait: block until it has)."""
        if self.deferred is None:
            return
        result, pending = self.deferred
        if not (wait or pending.done()):
            return
        self.deferred = None
        self.recorder.record(_with_heldout(result, pending.result()))

    def _finish(self) -> dict[str, Any]:
        state = self.state
        assert state.global_ is not None
        final_eval = (self.results[-1].heldout or self.results[-1].agents_eval) if self.results else None
        summary = {
            "run_id": self.run_id,
            "rounds": [result_record(r, self.spec.labels) for r in self.results],
            "final_round": state.global_.round,
            "final_accuracy": final_eval.accuracy if final_eval else None,
            "final_loss": final_eval.loss if final_eval else None,
            "final_macro_f1": final_eval.macro_f1 if final_eval else None,
            "final_class_recall": dict(zip(self.spec.labels, final_eval.class_recall, strict=False))
            if final_eval and final_eval.confusion
            else None,
            "final_source": "heldout" if self.results and self.results[-1].heldout else "agents",
            "plans": {a: plan_record(p) for a, p in state.plans.items()},
            **({"privacy": self.dp.summary()} if self.dp is not None else {}),
            **({"stopped": self.stopped} if self.stopped is not None else {}),
        }
        final = self.rundir.finalize(state.global_, summary)
        self.tracking.finish(summary, final)
        log.info("run complete: final adapter in %s", final)
        self.metrics.run_finished.set(1)
        with state.cond:
            state.phase = Phase.FINISHED
            state.notify()
            # Let agents hear FINISHED before the server goes away.
            end = state.clock() + self.config.run.finish_grace_s
            while (
                state.clock() < end
                and not set(self.registry.alive(self.config.run.agent_timeout_s)) <= state.finished_seen
            ):
                state.cond.wait(min(1.0, end - state.clock()))
        return summary


def _with_heldout(result: RoundResult, heldout: tuple[Evaluation, float]) -> RoundResult:
    return replace(result, heldout=heldout[0], heldout_seconds=heldout[1])

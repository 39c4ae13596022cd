"""The run's mask: which candidate matrices are trained, and the combined importance scores behind it.

Chosen before round 1 and again every selection.reselect_every rounds: from the last round's training
scores (selection.rescore training), by a random draw (selection.mode random), or by probing the alive
agents, whose reports are combined with each agent's say capped like an update's weight. Each choice
goes to the metrics, the log and the run directory's selection/NNNN.json.
"""

from __future__ import annotations

import logging
import math
import random
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace

from common.types import ImportanceReport, ModelSpec, ModuleShape, ProbePlan
from coordinator.bounds import capped
from coordinator.config import CoordinatorConfig
from coordinator.metrics import CoordinatorMetrics
from coordinator.modes import Mode
from coordinator.planner import PlanOptions, resolve_targets
from coordinator.registry import AgentRecord
from coordinator.round_state import Admitted, RoundState, RunAborted
from coordinator.rundir import RunDir
from coordinator.selection import combine, rescore, resolve_budget, select

log = logging.getLogger(__name__)


class Masks:
    """The mask and its scores over one run; probes go through the round state like any agent task."""

    def __init__(
        self,
        config: CoordinatorConfig,
        options: PlanOptions,
        mode: Mode,
        metrics: CoordinatorMetrics,
        rundir: RunDir,
        state: RoundState,
        wait_for: Callable[[Collection[str], Callable[[], Collection[str]], float], None],
        check_stop: Callable[[], None],
    ) -> None:
        self.config = config
        self.options = options
        self.mode = mode
        self.metrics = metrics
        self.rundir = rundir
        self.state = state
        self.wait_for = wait_for
        self.check_stop = check_stop
        self.mask: tuple[str, ...] | None = None  # selected modules; None = every candidate
        self.scores: dict[str, float] = {}  # combined importance of the candidates
        self.training_scores: dict[str, ImportanceReport] = {}  # the last round's scores from training, per agent

    def keep_training_scores(self, round_: int, inbox: Mapping[str, Admitted], weights: Mapping[str, float]) -> None:
        """The aggregated updates' importance scores (plans with track_importance), each agent's say its
        capped aggregation weight, for the next re-selection."""
        self.training_scores = {
            agent: ImportanceReport(
                f"training-r{round_}",
                dict(x.update.meta.importance),
                max(1, math.floor(weights[agent])),
                x.update.meta.steps,
                x.update.meta.train_seconds,
            )
            for agent, x in inbox.items()
            if x.update.meta.importance and weights.get(agent, 0.0) > 0
        }

    def choose(self, after_round: int, alive: Mapping[str, AgentRecord], spec: ModelSpec) -> None:
        """Set the mask: from the last round's training scores when selection.rescore is training and they
        exist (re-selection), else by probing the candidates on the alive agents."""
        sel = self.config.selection
        if sel.mode == "all":
            return
        candidates = resolve_targets(spec, self.options.targets)
        shapes = [spec.candidate(name) for name in candidates]
        if sel.scores_training and self.training_scores and self.scores:
            trained = sorted({m for r in self.training_scores.values() for m in r.scores})
            scores = rescore(self.scores, combine(self.training_scores, trained))
            log.info(
                "re-selection after round %d from the training scores of %s (no probe)",
                after_round,
                ", ".join(sorted(self.training_scores)),
            )
            self._apply(after_round, scores, shapes, self.training_scores, f"training-r{after_round}")
            return
        if sel.mode == "random":
            generator = random.Random(self.options.seed * 7919 + after_round)
            self._apply(after_round, {name: generator.random() for name in candidates}, shapes, {}, "random")
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
        self.state.open_probe(probe, alive)
        log.info("probe %s: scoring %d candidates on %d agents", probe.probe_id, len(candidates), len(alive))
        self.wait_for(self.state.probe_agents, lambda: self.state.importance, self.state.clock() + sel.probe_deadline_s)
        self.check_stop()
        reports = self.state.close_probe()
        if not reports:
            raise RunAborted(f"no agent reported importance scores within {sel.probe_deadline_s:.0f}s")
        # An agent's say in the mask is its probe's samples, capped like an update's weight.
        weights = capped({a: float(r.samples) for a, r in reports.items()}, self.config.updates.max_weight_ratio)
        bounded = {a: replace(r, samples=max(1, math.floor(weights[a]))) for a, r in reports.items()}
        self._apply(after_round, combine(bounded, candidates), shapes, reports, probe.probe_id)

    def _apply(
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
        rank = self.mode.selection_rank(self.options.rank)
        selection = select(scores, shapes, rank, resolve_budget(sel.budget, shapes, rank))
        previous, self.mask = self.mask, selection.mask
        self.scores = dict(scores)
        self.metrics.mask_size.set(len(selection.mask))
        self.metrics.mask_parameters.set(selection.used)
        self.metrics.selection_score.clear()
        for name in selection.mask:
            self.metrics.selection_score.labels(name).set(scores[name])
        top = ", ".join(f"{name} {scores[name]:.3f}" for name in sorted(selection.mask, key=lambda n: -scores[n])[:3])
        log.info(
            "selection: %d of %d matrices, %d of %d trainable parameters; top: %s",
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
        self.rundir.write_selection(after_round, record)

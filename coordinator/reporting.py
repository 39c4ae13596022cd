"""How a round is reported: the results list, Prometheus figures, the round line, rounds.jsonl and the trackers;
agents' evaluations combined; the per-agent report of plans.json."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from common.data import CAUSAL_LM
from common.scores import combine as combine_confusions
from common.scores import predicted_classes, single_class_warning
from common.types import Evaluation, ModelSpec, RoundResult
from coordinator.bounds import capped
from coordinator.metrics import CoordinatorMetrics
from coordinator.planner import Prediction
from coordinator.round_state import Admitted
from coordinator.rundir import RunDir
from coordinator.tracking import Tracking

log = logging.getLogger("coordinator.orchestrator")  # the run's own log: operators grep one logger


class Recorder:
    """Records each round once it is complete (its held-out figures in, when they are computed)."""

    def __init__(
        self, metrics: CoordinatorMetrics, rundir: RunDir, tracking: Tracking, spec: ModelSpec, rounds: int
    ) -> None:
        self.metrics = metrics
        self.rundir = rundir
        self.tracking = tracking
        self.spec = spec
        self.rounds = rounds
        self.results: list[RoundResult] = []

    def record(self, result: RoundResult) -> None:
        """A round's figures into the results, the metrics, the log, rounds.jsonl and the trackers."""
        spec = self.spec
        if result.heldout is not None:
            self.metrics.heldout_duration.observe(result.heldout_seconds)
        for source, evaluation in (("heldout", result.heldout), ("agents", result.agents_eval)):
            if evaluation is not None:
                self.evaluation_metrics(source, evaluation)
        log.info("%s", round_line(result, self.rounds, spec.task == CAUSAL_LM, spec.labels))
        for source, evaluation in (("held-out", result.heldout), ("agents' validation", result.agents_eval)):
            warning = single_class_warning(evaluation.confusion, spec.labels) if evaluation is not None else None
            if warning is not None:
                log.warning("round %d, %s: %s", result.round, source, warning)
        self.rundir.append_round(result)
        self.results.append(result)
        self.tracking.round(result)

    def evaluation_metrics(self, source: str, evaluation: Evaluation) -> None:
        self.metrics.global_accuracy.labels(source).set(evaluation.accuracy)
        self.metrics.global_loss.labels(source).set(evaluation.loss)
        if not evaluation.confusion:
            return
        self.metrics.global_macro_f1.labels(source).set(evaluation.macro_f1 or 0.0)
        self.metrics.global_predicted_classes.labels(source).set(len(predicted_classes(evaluation.confusion)))
        for label, recall in zip(self.spec.labels, evaluation.class_recall, strict=False):
            if recall is not None:
                self.metrics.global_class_recall.labels(source, label).set(recall)


def weighted_evaluation(reports: Mapping[str, Evaluation], ratio: float = 0.0) -> Evaluation | None:
    """Size-weighted mean of agents' evaluations, each size at most ratio x the median (0: as reported), with
    their confusion matrices combined at the same weights; None when no agent reported any sample."""
    weights = capped({a: float(r.samples) for a, r in reports.items()}, ratio)
    total = sum(weights.values())
    if total == 0:
        return None
    # Every agent's matrix or none: a combination of some would weigh classes by who happened to send one.
    confusions = {a: r.confusion for a, r in reports.items() if r.samples > 0}
    complete = all(confusions.values()) and len({len(c) for c in confusions.values()}) == 1
    return Evaluation(
        loss=sum(r.loss * weights[a] for a, r in reports.items()) / total,
        accuracy=sum(r.accuracy * weights[a] for a, r in reports.items()) / total,
        samples=sum(r.samples for r in reports.values()),
        confusion=combine_confusions(confusions, weights) if complete else (),
    )


def round_report(
    inbox: Mapping[str, Admitted],
    weights: Mapping[str, float],
    predictions: Mapping[str, Prediction],
    downloaded: Mapping[str, int],
) -> dict[str, dict[str, Any]]:
    """Per agent, what the planner predicted, what the agent measured, its weight and the bytes that travelled
    (plans.json)."""
    report: dict[str, dict[str, Any]] = {a: {"predicted": asdict(p)} for a, p in predictions.items()}
    for agent, admitted in inbox.items():
        meta = admitted.update.meta
        report.setdefault(agent, {})["measured"] = {
            "samples": meta.samples,
            "steps": meta.steps,
            "train_seconds": meta.train_seconds,
            "step_seconds": meta.train_seconds / max(meta.steps, 1),
            "train_loss": meta.train_loss,
            "peak_memory_bytes": meta.peak_memory_bytes,
            "projection_seconds": meta.projection_seconds,
            "upload_bytes": sum(t.numel() * t.element_size() for t in admitted.update.tensors.values()),
            "download_bytes": downloaded.get(agent, 0),
            "change_norm": admitted.norm,
            "tensor_change_norms": dict(admitted.tensor_norms),
            "weight": weights.get(agent, 0.0),
        }
    return report


def class_figures(evaluation: Evaluation, labels: tuple[str, ...]) -> str:
    """' macro-F1 0.xxx (recall a 0.xx, b 0.xx)' for an evaluation with a confusion matrix, else ''."""
    if not evaluation.confusion or evaluation.macro_f1 is None:
        return ""
    recall = ", ".join(
        f"{label} {value:.2f}"
        for label, value in zip(labels, evaluation.class_recall, strict=False)
        if value is not None
    )
    return f" macro-F1 {evaluation.macro_f1:.3f} (recall {recall})"


def round_line(result: RoundResult, rounds: int, causal: bool = False, labels: tuple[str, ...] = ()) -> str:
    """The one line per round an operator reads (with perplexity for a causal LM, macro-F1 and per-class
    recall for a classifier)."""
    parts = [f"round {result.round}/{rounds}", f"agents {len(result.agents)}", f"{result.seconds:.1f}s"]
    if result.heldout is not None:
        held = result.heldout
        quality = f"perplexity {math.exp(min(held.loss, 50.0)):.2f}" if causal else f"loss {held.loss:.4f}"
        parts.append(f"held-out accuracy {held.accuracy:.3f}{class_figures(held, labels)} {quality}")
    if result.agents_eval is not None:
        agents = result.agents_eval
        parts.append(f"agents' validation accuracy {agents.accuracy:.3f}{class_figures(agents, labels)}")
    if result.epsilon is not None:
        parts.append(f"privacy epsilon {result.epsilon:.3g}")
    if result.dropped:
        parts.append(f"dropped {','.join(result.dropped)}")
    return " | ".join(parts)

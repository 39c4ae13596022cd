"""Experiment tracking: a run's configuration, per-round figures and final adapter where researchers compare runs.

Prometheus (coordinator.metrics) is for operators watching a run; trackers are for the people comparing runs
afterwards. `tracking.mlflow_uri` logs to MLflow (a tracking server, or offline a local store such as
sqlite:///runs/mlflow.db; artifacts then go beside it), `tracking.tensorboard_dir` writes TensorBoard event
files (no server at all). Both are optional extras (`pip install 'fedpipe[tracking]'`), imported only when
configured. A tracker that fails (a tracking server gone) logs a warning once and is switched off: tracking
never stops a run. A restarted coordinator continues the same MLflow run (its id is kept in the run
directory's tracking.json).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from pydantic import Field

from common.errors import ConfigError
from common.settings import Section
from common.types import Evaluation, RoundResult, TrainPlan

log = logging.getLogger(__name__)

STATE_FILE = "tracking.json"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
AGENT_FIGURES = ("train_seconds", "samples", "step_seconds", "upload_bytes", "download_bytes", "weight")


class TrackingSection(Section):
    """Where a run's figures are logged besides its run directory."""

    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI: http(s)://server, or offline e.g. sqlite:///runs/mlflow.db"
    )
    experiment: str = Field("fedpipe", min_length=1, description="MLflow experiment the runs are logged under")
    tensorboard_dir: Path | None = Field(None, description="directory for TensorBoard event files (one per run)")
    log_adapter: bool = Field(True, description="log the final adapter as an MLflow artifact")
    max_agent_series: int = Field(
        100, ge=0, description="per-agent figures are logged for runs of at most this many agents"
    )


class Tracker(Protocol):
    """One destination of a run's figures."""

    def start(self, run_id: str, config: Mapping[str, Any]) -> None: ...
    def log(self, step: int, figures: Mapping[str, float]) -> None: ...
    def finish(self, summary: Mapping[str, Any], final_dir: Path | None) -> None: ...
    def abort(self, status: str) -> None: ...


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as dotted keys with string values (lists and nulls as JSON), each within MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[name] = text[:MAX_PARAM_CHARS]
    return flat


def evaluation_figures(prefix: str, evaluation: Evaluation | None) -> dict[str, float]:
    """loss, accuracy and (classifiers) macro-F1 of an evaluation under prefix/."""
    if evaluation is None:
        return {}
    figures = {f"{prefix}/loss": evaluation.loss, f"{prefix}/accuracy": evaluation.accuracy}
    if evaluation.macro_f1 is not None:
        figures[f"{prefix}/macro_f1"] = evaluation.macro_f1
    return figures


def round_figures(result: RoundResult) -> dict[str, float]:
    """A round's figures by name: its evaluations, training loss, samples and times."""
    figures = {**evaluation_figures("heldout", result.heldout), **evaluation_figures("agents", result.agents_eval)}
    if result.round > 0:
        figures.update(
            {
                "round/seconds": result.seconds,
                "round/samples": float(result.samples),
                "round/agents": float(len(result.agents)),
                "round/dropped": float(len(result.dropped)),
                "round/aggregation_seconds": result.aggregation_seconds,
            }
        )
    if result.train_loss is not None:
        figures["train/loss"] = result.train_loss
    if result.heldout is not None:
        figures["heldout/seconds"] = result.heldout_seconds
    if result.truncated_energy_share is not None:
        figures["round/truncated_energy_share"] = result.truncated_energy_share
    return figures


def agent_figures(report: Mapping[str, Mapping[str, Any]], plans: Mapping[str, TrainPlan]) -> dict[str, float]:
    """Per agent: what it measured (time, samples, bytes, weight) and what it was planned (rank, batch)."""
    figures: dict[str, float] = {}
    for agent, entry in report.items():
        measured = entry.get("measured", {})
        for key in AGENT_FIGURES:
            if key in measured:
                figures[f"agent/{agent}/{key}"] = float(measured[key])
        plan = plans.get(agent)
        if plan is not None:
            figures[f"agent/{agent}/plan_batch_size"] = float(plan.batch_size)
            figures[f"agent/{agent}/plan_max_rank"] = float(max(plan.rank_pattern.values(), default=0))
    return figures


class MlflowTracker:
    """Logs to MLflow through its client (no process-wide active run, so nothing else in the process is affected)."""

    def __init__(self, uri: str, experiment: str, run_dir: Path, log_adapter: bool) -> None:
        from mlflow.tracking import MlflowClient  # the optional extra

        self.client = MlflowClient(uri)
        self.uri = uri
        self.experiment = experiment
        self.run_dir = run_dir
        self.log_adapter = log_adapter
        self.run_id = ""

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return str(found.experiment_id)
        location = None
        if self.uri.startswith("sqlite:///"):
            # A relative artifact root would land in whatever directory the coordinator was started from.
            location = (Path(self.uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
        return str(self.client.create_experiment(self.experiment, artifact_location=location))

    def start(self, run_id: str, config: Mapping[str, Any]) -> None:
        state = self.run_dir / STATE_FILE
        kept = json.loads(state.read_text()).get("mlflow_run_id") if state.is_file() else None
        if kept:
            self.run_id = str(kept)  # a restarted coordinator: the same run goes on
            log.info("tracking: continuing MLflow run %s at %s", self.run_id, self.uri)
            return
        run = self.client.create_run(self._experiment_id(), run_name=run_id, tags={"fedpipe.run_id": run_id})
        self.run_id = run.info.run_id
        state.write_text(json.dumps({"mlflow_run_id": self.run_id}) + "\n")
        from mlflow.entities import Param

        params = [Param(key, value) for key, value in flatten(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        log.info("tracking: MLflow run %s in experiment %r at %s", self.run_id, self.experiment, self.uri)

    def log(self, step: int, figures: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(key, float(value), stamp, step) for key, value in figures.items()]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def finish(self, summary: Mapping[str, Any], final_dir: Path | None) -> None:
        final = {k: float(v) for k, v in summary.items() if k.startswith("final_") and isinstance(v, int | float)}
        if final:
            self.log(int(summary.get("final_round", 0)), final)
        if self.log_adapter and final_dir is not None and final_dir.is_dir():
            self.client.log_artifacts(self.run_id, str(final_dir), "adapter")
        self.client.set_terminated(self.run_id)

    def abort(self, status: str) -> None:
        """The run ended without finishing (FAILED, KILLED)."""
        if getattr(self, "run_id", None):
            self.client.set_terminated(self.run_id, status=status)


class TensorBoardTracker:
    """TensorBoard event files: a scalar per figure and round, the configuration as text."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.writer: Any = None

    def start(self, run_id: str, config: Mapping[str, Any]) -> None:
        from tensorboardX import SummaryWriter  # the optional extra

        self.writer = SummaryWriter(str(self.directory / run_id))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)
        self.writer.flush()

    def log(self, step: int, figures: Mapping[str, float]) -> None:
        for key, value in figures.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, summary: Mapping[str, Any], final_dir: Path | None) -> None:
        self.writer.close()

    def abort(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


class Tracking:
    """The configured trackers; each failure is logged once and switches that tracker off."""

    def __init__(self, trackers: Iterable[Tracker], max_agent_series: int = 100) -> None:
        self.trackers = list(trackers)
        self.max_agent_series = max_agent_series

    @property
    def active(self) -> bool:
        return bool(self.trackers)

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as err:  # tracking must never stop a run
                log.warning("tracking: %s failed on %s (%s); it logs nothing more", what, type(tracker).__name__, err)
                self.trackers.remove(tracker)

    def start(self, run_id: str, config: Mapping[str, Any]) -> None:
        self._each("start", lambda t: t.start(run_id, config))

    def round(self, result: RoundResult) -> None:
        figures = round_figures(result)
        if figures:
            self._each(f"round {result.round}", lambda t: t.log(result.round, figures))

    def agents(self, round_: int, report: Mapping[str, Mapping[str, Any]], plans: Mapping[str, TrainPlan]) -> None:
        if len(report) > self.max_agent_series:
            return
        figures = agent_figures(report, plans)
        if figures:
            self._each(f"round {round_}'s agents", lambda t: t.log(round_, figures))

    def finish(self, summary: Mapping[str, Any], final_dir: Path | None) -> None:
        self._each("finish", lambda t: t.finish(summary, final_dir))

    def abort(self, status: str) -> None:
        """A serving coordinator's run that failed or was cancelled: close what each tracker holds open."""
        self._each("abort", lambda t: t.abort(status))


def from_section(section: TrackingSection, run_dir: Path) -> Tracking:
    """The trackers a tracking section asks for (none by default)."""
    trackers: list[Tracker] = []
    try:
        if section.mlflow_uri:
            trackers.append(MlflowTracker(section.mlflow_uri, section.experiment, run_dir, section.log_adapter))
        if section.tensorboard_dir is not None:
            import tensorboardX  # noqa: F401  # fail at start-up, not at the first round

            trackers.append(TensorBoardTracker(section.tensorboard_dir))
    except ImportError as err:
        raise ConfigError(
            f"tracking: {err.name or err} is not installed; pip install 'fedpipe[tracking]' (mlflow-skinny, "
            "sqlalchemy, alembic, tensorboardX)"
        ) from None
    return Tracking(trackers, section.max_agent_series)

"""The bases and data sets an agent can train on, loaded when a run names them and kept between runs.

A run names its base and data set (the coordinator's DescribeRun); the agent resolves the names itself:
its own `model` and `data` by default, a key of `models` (name -> directory) or an embedded name for the
base, a key of `datasets` for the data. Paths never leave the agent. What is kept per base: the tokenizer,
the spec and the calibration; a base not in use has its weights freed, so the device memory the planner
was told about belongs to the run in progress.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from common.base_id import KNOWN as KNOWN_BASES
from common.errors import ConfigError, FedPipeError
from common.modeling import configured_model
from common.settings import ModelSection
from common.types import DTYPE_SIZES, CalibrationPoint, DeviceProfile, ModelSpec
from edge_agent.caps import Throttle, check_peak
from edge_agent.config import AgentConfig, DataSection
from edge_agent.data import LocalData, load_local
from edge_agent.model import LocalModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunDescription:
    """What a run trains, by names (fedpipe.v1 DescribeRunResponse)."""

    run_id: str
    model: str
    task: str
    include_mlp: bool
    candidates: tuple[str, ...]
    dataset: str


class CannotJoin(FedPipeError):
    """This agent has nothing by the name a run asks for; it waits for another run."""

    def __init__(self, run_id: str, why: str) -> None:
        super().__init__(why)
        self.run_id = run_id


@dataclass(frozen=True)
class Loaded:
    """A base and a data set ready to train: what an agent registers with."""

    model_name: str
    dataset: str
    model: LocalModel
    data: LocalData
    profile: DeviceProfile
    spec: ModelSpec


@dataclass
class _Base:
    model: LocalModel
    spec: ModelSpec
    calibration: tuple[CalibrationPoint, ...]


class Workspace:
    """Loads (model, data set) pairs on demand; the device is measured once, each base calibrated once."""

    def __init__(self, config: AgentConfig, device: torch.device, measured: DeviceProfile, throttle: Throttle) -> None:
        self.config = config
        self.device = device
        self.measured = measured
        self.throttle = throttle
        self.bases: dict[tuple[object, ...], _Base] = {}
        self.datasets: dict[tuple[str, str], LocalData] = {}
        self.active: Loaded | None = None

    def default(self) -> Loaded:
        """The agent's own model and data (what it registers with when the run names nothing else)."""
        return self._load(self.config.model, self.config.model.name or self.config.model.path, "", self.config.data)

    def for_run(self, run: RunDescription) -> Loaded:
        """What run asks for; CannotJoin when the agent has no data set by its name."""
        own = self.config.model
        if not run.model or run.model in (own.name, own.path):
            section, name = own, run.model or own.path
        elif run.model in self.config.models or run.model in KNOWN_BASES:
            path = self.config.models.get(run.model, run.model)
            candidates = list(run.candidates) or None
            section = ModelSection(path=path, task=run.task, include_mlp=run.include_mlp, candidates=candidates)
            name = run.model
        else:
            # Perhaps the same base under another path on the coordinator's host: the registration's fingerprint
            # check decides.
            log.info("run %s names model %r, which `models` does not hold: offering model.path", run.run_id, run.model)
            section, name = own, own.path
        if run.dataset and run.dataset not in self.config.datasets:
            known = ", ".join(sorted(self.config.datasets)) or "none"
            raise CannotJoin(
                run.run_id, f"run {run.run_id} asks for data set {run.dataset!r}; `datasets` holds {known}"
            )
        data = self.config.datasets[run.dataset] if run.dataset else self.config.data
        try:
            return self._load(section, name, run.dataset, data)
        except ConfigError as err:  # a base or data set that does not load: this run goes on without us
            raise CannotJoin(run.run_id, f"run {run.run_id}: {err}") from None

    def _load(self, section: ModelSection, name: str, dataset: str, data_section: DataSection) -> Loaded:
        labels = tuple(data_section.labels)
        key = (section.path, section.task, section.include_mlp, tuple(section.candidates or ()), labels)
        base = self.bases.get(key)
        if base is None:
            path, spec = configured_model(section.path, section.task, labels, section.include_mlp, section.candidates)
            log.info("model %s: %s %s, fingerprint %s", name, spec.model_type, spec.task, spec.fingerprint)
            base = _Base(LocalModel(path, labels, self.device, spec.task), spec, ())
        data_key = (dataset, base.spec.task)  # a data set reads differently for a classifier and a causal LM
        data = self.datasets.get(data_key) or load_local(data_section, base.spec.task)
        self.datasets[data_key] = data
        if key not in self.bases:  # calibrated once, on the first data set it trains on
            base.calibration = self._calibrate(base.model, base.spec, data)
            self.bases[key] = base
        if self.active is not None and self.active.model is not base.model:
            self.active.model.release()  # the run before's base gives its memory to this one
        profile = dataclasses.replace(
            self.measured,
            num_train_samples=len(data.train),
            num_val_samples=len(data.val),
            calibration=base.calibration,
        )
        loaded = Loaded(name, dataset, base.model, data, profile, base.spec)
        self.active = loaded
        return loaded

    def _calibrate(self, model: LocalModel, spec: ModelSpec, data: LocalData) -> tuple[CalibrationPoint, ...]:
        from edge_agent.calibrate import calibrate

        section = self.config.calibration
        if not section.enabled:
            return ()
        measured = self.measured
        element = DTYPE_SIZES[measured.compute_dtype]
        if measured.can_split and spec.base_parameters * element > measured.total_memory_bytes:
            # Calibration trains the full-precision base on one device, which this one cannot hold: the planner
            # prices from its formulas instead, and the closed loop corrects them from the rounds measured.
            log.info(
                "calibration: skipped, the %.1f GiB base does not fit one %.1f GiB device (it trains split by layers)",
                spec.base_parameters * element / 2**30,
                measured.total_memory_bytes / 2**30,
            )
            return ()
        points = calibrate(
            model,
            data.train,
            spec,
            (section.batch_sizes[0], section.batch_sizes[1]),
            section.seq_len,
            section.rank,
            section.steps,
            self.throttle,
        )
        memory_cap = self.measured.memory_cap_bytes
        for point in points:
            log.info(
                "calibration: batch %d x %d tokens: %.2f s/step, peak %.0f MiB",
                point.batch_size,
                point.seq_len,
                point.step_seconds,
                point.peak_memory_bytes / 2**20,
            )
            check_peak(point.peak_memory_bytes, memory_cap, f"calibration at batch {point.batch_size}")
        return tuple(points)

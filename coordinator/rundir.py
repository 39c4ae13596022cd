"""The run directory: every file a run writes, and what a restarted coordinator reads back.

run_dir/
  state/            state.json (the commit point) + global-NNNN.safetensors: the folded global, bit-exact
  rounds/NNNN/      each round's global adapter in peft format, plans.json (plans, predicted and measured)
  final/            the last global adapter; summary.json the run's figures
  selection/NNNN.json  every probe's scores and the mask; agents.json what the planner last saw
  rounds.jsonl      one record per round; config.json the coordinator's settings; coordinator.port

Everything is written to a temporary name, fsynced and renamed, so a crash leaves either the old or the
new file, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from common.errors import ConfigError
from common.ferret import weights_digest
from common.types import (
    Accelerator,
    CalibrationPoint,
    DeviceProfile,
    Evaluation,
    GlobalState,
    ModelSpec,
    ModuleShape,
    Quantization,
    RoundResult,
    TrainPlan,
)

if TYPE_CHECKING:
    from coordinator.modes import Mode

STATE_FILE = "state.json"
STATE_PREFIX = "global::"  # the mode's tensors in global-NNNN.safetensors
STRATEGY_PREFIX = "strategy::"  # the strategy's state beside them
AGENTS_FILE = "agents.json"  # what the planner saw last: profiles, spec, mask, scores, corrections
LEGACY_GLOBAL_FILE = "global.safetensors"  # state written before the file was named by its round


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def tensor_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """(tensor name -> (dtype, shape), metadata) of a safetensors file, read from its header only."""
    try:
        with safe_open(str(path), "pt") as handle:
            slices = {name: handle.get_slice(name) for name in handle.keys()}  # noqa: SIM118  (not a mapping)
            tensors = {name: (str(t.get_dtype()), tuple(int(d) for d in t.get_shape())) for name, t in slices.items()}
            metadata = handle.metadata() or {}
    except (OSError, SafetensorError) as err:
        raise ConfigError(f"{path} is not a readable safetensors file: {err}") from err
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def plan_record(plan: TrainPlan) -> dict[str, Any]:
    """A plan as JSON-ready data."""
    record = asdict(plan)
    record["quantization"] = plan.quantization.value
    record["rank_pattern"] = dict(plan.rank_pattern)
    return record


@contextmanager
def atomic_dir(directory: Path) -> Iterator[Path]:
    """A scratch folder beside directory to write into; on leaving it, every file is fsynced and the folder
    renamed into directory's place (a crash leaves the old one or the new one, never half)."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    for name in os.listdir(tmp):
        with (tmp / name).open("rb") as handle:
            os.fsync(handle.fileno())
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    _fsync_dir(directory.parent)


class RunDir:
    """One run's directory (see the module docstring); the mode says what its global looks like on disk."""

    def __init__(self, run_dir: Path, spec: ModelSpec, mode: Mode) -> None:
        self.run_dir = run_dir
        self.spec = spec
        self.mode = mode
        self.metadata: dict[str, str] = {}  # written into every artefact's safetensors (the privacy guarantee)
        (run_dir / "rounds").mkdir(parents=True, exist_ok=True)
        (run_dir / "state").mkdir(parents=True, exist_ok=True)

    def round_dir(self, round_: int) -> Path:
        """Folder of one round's artefacts."""
        return self.run_dir / "rounds" / f"{round_:04d}"

    def save_round(
        self,
        global_: GlobalState,
        plans: Mapping[str, TrainPlan],
        report: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
        strategy_state: Mapping[str, torch.Tensor] | None = None,
    ) -> Path:
        """Persist a round: the mode's artefact and plans for people and tools, the global for resume."""
        directory = self.round_dir(global_.round)
        self.mode.write_artifact(directory, global_, self.metadata)
        write_json(
            directory / "plans.json",
            {agent: {"plan": plan_record(plan), **dict(report.get(agent, {}))} for agent, plan in plans.items()},
        )
        self.save_state(global_, extra, strategy_state)
        return directory

    def save_state(
        self,
        global_: GlobalState,
        extra: Mapping[str, Any] | None = None,
        strategy_state: Mapping[str, torch.Tensor] | None = None,
    ) -> str:
        """Persist what a restart needs: the global (bit-exact), the strategy's state and the run's bookkeeping.

        The tensors go to global-NNNN.safetensors first; state.json, renamed into place last, is the commit
        point that names them with their digest, so a crash at any moment leaves one consistent state.
        Returns the global's digest.
        """
        state_dir = self.run_dir / "state"
        tensors = {f"{STATE_PREFIX}{k}": v.contiguous() for k, v in self.mode.state_tensors(global_).items()}
        tensors.update({f"{STRATEGY_PREFIX}{k}": v.contiguous() for k, v in (strategy_state or {}).items()})
        name = f"global-{global_.round:04d}.safetensors"
        tmp = state_dir / (name + ".tmp")
        save_file(tensors, str(tmp), metadata={"round": str(global_.round), "mode": self.mode.name})
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, state_dir / name)
        digest = self.mode.digest(global_)
        record = {**dict(extra or {}), "round": global_.round, "fingerprint": self.spec.fingerprint}
        record["mode"] = self.mode.name
        record["strategy_sha256"] = weights_digest(dict(strategy_state or {}))
        write_json(state_dir / STATE_FILE, {**record, "global_file": name, "global_sha256": digest})
        for old in state_dir.glob("global*.safetensors"):
            if old.name != name:
                old.unlink()  # superseded once the new state.json is durable
        return digest

    def load_state(self) -> tuple[GlobalState, dict[str, torch.Tensor], dict[str, Any]] | None:
        """The last committed global, the strategy's state and the bookkeeping, or None for a fresh run directory.

        Refuses (ConfigError) a state of another base model or mode, whose tensors do not match their digest,
        or that holds non-finite values.
        """
        state_dir = self.run_dir / "state"
        if not (state_dir / STATE_FILE).is_file():
            return None
        meta = json.loads((state_dir / STATE_FILE).read_text())
        if meta.get("fingerprint") != self.spec.fingerprint:
            raise ConfigError(
                f"run.run_dir: {self.run_dir} holds a run of base model {meta.get('fingerprint')}, "
                f"the agents run {self.spec.fingerprint}; use another run directory"
            )
        if meta.get("mode", "lora") != self.mode.name:
            raise ConfigError(
                f"run.run_dir: {self.run_dir} holds a {meta.get('mode', 'lora')} run, this one trains "
                f"{self.mode.name}; use another run directory"
            )
        stored = load_file(str(state_dir / meta.get("global_file", LEGACY_GLOBAL_FILE)))
        for name, tensor in stored.items():
            if not bool(torch.isfinite(tensor).all()):  # written before the finiteness guard existed
                raise ConfigError(f"run.run_dir: {state_dir} holds a non-finite global ({name}); resume from another")
        if any(key.startswith(STATE_PREFIX) for key in stored):
            mine = {k[len(STATE_PREFIX) :]: v for k, v in stored.items() if k.startswith(STATE_PREFIX)}
        else:  # written before the strategy's state was saved beside the global
            mine = {k: v for k, v in stored.items() if not k.startswith(STRATEGY_PREFIX)}
        strategy = {k[len(STRATEGY_PREFIX) :]: v for k, v in stored.items() if k.startswith(STRATEGY_PREFIX)}
        global_ = self.mode.from_state(int(meta["round"]), mine)
        expected = meta.get("global_sha256")
        if expected is not None and self.mode.digest(global_) != expected:
            raise ConfigError(f"run.run_dir: {state_dir} is corrupt: the global does not match its sha256")
        expected_strategy = meta.get("strategy_sha256")
        if expected_strategy is not None and weights_digest(strategy) != expected_strategy:
            raise ConfigError(f"run.run_dir: {state_dir} is corrupt: the strategy's state does not match its sha256")
        return global_, strategy, meta

    def finalize(self, global_: GlobalState, summary: Mapping[str, Any]) -> Path:
        """final/ holds the last global's artefact; summary.json the run's figures."""
        final = self.run_dir / "final"
        self.mode.write_artifact(final, global_, self.metadata)
        write_json(self.run_dir / "summary.json", summary)
        return final

    # ------------------------------------------------------------------ the other files of a run

    def write_config(self, config: Mapping[str, Any]) -> None:
        """config.json: the settings the run was started with."""
        (self.run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    def write_agents(self, snapshot: Mapping[str, Any]) -> None:
        """agents.json: what the planner saw (for `plan --explain`)."""
        write_json(self.run_dir / AGENTS_FILE, snapshot)

    def write_simulation(self, record: Mapping[str, Any]) -> None:
        """simulation.json: a simulated run's population, tasks, planning times and peak memory."""
        write_json(self.run_dir / "simulation.json", record)

    def write_selection(self, after_round: int, record: Mapping[str, Any]) -> None:
        """selection/NNNN.json: a probe's scores per agent, the combined scores and the mask."""
        directory = self.run_dir / "selection"
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / f"{after_round:04d}.json", record)

    def append_round(self, result: RoundResult) -> None:
        """One line of rounds.jsonl."""
        with (self.run_dir / "rounds.jsonl").open("a") as handle:
            handle.write(json.dumps(result_record(result, self.spec.labels), default=str) + "\n")

    def results(self, up_to: int) -> list[RoundResult]:
        """The rounds.jsonl records of rounds 0..up_to (the last of each round wins), in order."""
        path = self.run_dir / "rounds.jsonl"
        if not path.is_file():
            return []
        by_round: dict[int, RoundResult] = {}
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["round"] <= up_to:
                by_round[record["round"]] = result_from_record(record)
        return [by_round[r] for r in sorted(by_round)]


def saved_state(run_dir: Path) -> dict[str, Any] | None:
    """A run directory's state.json as saved, without its tensors; None for a fresh run directory."""
    path = run_dir / "state" / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def evaluation_record(evaluation: Evaluation, labels: tuple[str, ...]) -> dict[str, Any]:
    """An evaluation as JSON, with the figures a reader wants from its confusion matrix: macro-F1 and the
    recall of each class by name (classifiers)."""
    record = asdict(evaluation)
    if evaluation.confusion:
        record["macro_f1"] = evaluation.macro_f1
        record["class_recall"] = dict(zip(labels, evaluation.class_recall, strict=False))
    return record


def result_record(result: RoundResult, labels: tuple[str, ...]) -> dict[str, Any]:
    """A round's line of rounds.jsonl and entry of summary.json."""
    record = asdict(result)
    for key in ("heldout", "agents_eval"):
        evaluation = getattr(result, key)
        if evaluation is not None:
            record[key] = evaluation_record(evaluation, labels)
    return record


def result_from_record(record: Mapping[str, Any]) -> RoundResult:
    """A RoundResult from its rounds.jsonl line."""

    def evaluation(raw: Mapping[str, Any] | None) -> Evaluation | None:
        if not raw:
            return None
        confusion = tuple(tuple(float(v) for v in row) for row in raw.get("confusion", ()))
        return Evaluation(loss=raw["loss"], accuracy=raw["accuracy"], samples=raw["samples"], confusion=confusion)

    return RoundResult(
        round=record["round"],
        agents=tuple(record["agents"]),
        seconds=record["seconds"],
        samples=record["samples"],
        train_loss=record.get("train_loss"),
        heldout=evaluation(record.get("heldout")),
        agents_eval=evaluation(record.get("agents_eval")),
        dropped=tuple(record.get("dropped", ())),
        refused=tuple(record.get("refused", ())),
        failure=record.get("failure"),
        aggregation_seconds=record.get("aggregation_seconds", 0.0),
        truncated_energy_share=record.get("truncated_energy_share"),
        opened_s=record.get("opened_s", 0.0),
        heldout_seconds=record.get("heldout_seconds", 0.0),
        epsilon=record.get("epsilon"),
    )


def snapshot(
    profiles: Mapping[str, DeviceProfile],
    spec: ModelSpec,
    mask: tuple[str, ...] | None,
    scores: Mapping[str, float],
    corrections: Mapping[str, tuple[float, float]],
) -> dict[str, Any]:
    """What the planner saw, as JSON-ready data."""

    def profile_record(profile: DeviceProfile) -> dict[str, Any]:
        record = asdict(profile)
        record["calibration"] = [{**asdict(p), "quantization": p.quantization.value} for p in profile.calibration]
        return record

    return {
        "spec": asdict(spec),
        "profiles": {agent: profile_record(p) for agent, p in profiles.items()},
        "mask": list(mask) if mask is not None else None,
        "scores": dict(scores),
        "corrections": {agent: list(pair) for agent, pair in corrections.items()},
    }


Snapshot = tuple[
    dict[str, DeviceProfile], ModelSpec, tuple[str, ...] | None, dict[str, float], dict[str, tuple[float, float]]
]


def load_snapshot(path: Path) -> Snapshot:
    """Inverse of snapshot, read from a run directory's agents.json."""
    if not path.is_file():
        raise ConfigError(f"--run-dir: {path} not found; a coordinator writes it when it first plans")
    return from_snapshot(json.loads(path.read_text()))


def from_snapshot(data: Mapping[str, Any]) -> Snapshot:
    """Inverse of snapshot: profiles, spec, mask, scores and corrections."""
    raw = data["spec"]
    spec = ModelSpec(
        fingerprint=raw["fingerprint"],
        model_type=raw["model_type"],
        task=raw["task"],
        labels=tuple(raw["labels"]),
        candidates=tuple(ModuleShape(**m) for m in raw["candidates"]),
        heads=tuple((name, tuple(shape)) for name, shape in raw["heads"]),
        base_parameters=raw["base_parameters"],
        linear_parameters=raw.get("linear_parameters", 0),
    )
    profiles = {}
    for agent, record in data["profiles"].items():
        points = tuple(
            CalibrationPoint(**{**p, "quantization": Quantization(p["quantization"])}) for p in record["calibration"]
        )
        devices = tuple(Accelerator(**d) for d in record.get("devices", ()))
        profiles[agent] = DeviceProfile(**{**record, "calibration": points, "devices": devices})
    mask = tuple(data["mask"]) if data.get("mask") else None
    corrections = {agent: (float(t), float(m)) for agent, (t, m) in data.get("corrections", {}).items()}
    return profiles, spec, mask, dict(data.get("scores", {})), corrections

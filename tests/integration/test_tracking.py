"""Experiment tracking against a real coordinator on 127.0.0.1: a run logged to an offline MLflow store (sqlite)
and to TensorBoard event files, the run continued after a restart, and a failing tracker that stops nothing."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from rig import AGENT_A, AGENT_B, SAMPLES_A, SAMPLES_B, launch, register, train_round
from tensorboardX.proto import event_pb2

from common.types import Evaluation, RoundResult
from coordinator.tracking import MlflowTracker, Tracking, TrackingSection, flatten, from_section, round_figures

pytestmark = pytest.mark.integration


def scalars(directory: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value from the TensorBoard event files under directory (TFRecord framing)."""
    found: dict[str, dict[int, float]] = {}
    for path in directory.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    found.setdefault(value.tag, {})[event.step] = value.simple_value
    return found


def test_a_run_is_logged_to_mlflow_and_tensorboard(tmp_path: Path) -> None:
    # Prepare
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    section = TrackingSection(mlflow_uri=uri, experiment="ci", tensorboard_dir=tmp_path / "tb")
    coordinator = launch(run_dir, tracking=from_section(section, run_dir))

    # Execute
    try:
        for agent in (AGENT_A, AGENT_B):
            register(coordinator.stub, agent)
        train_round(coordinator, {AGENT_A: SAMPLES_A, AGENT_B: SAMPLES_B})
        summary = coordinator.finished()
    finally:
        coordinator.stop()

    # Assert: one finished run holding the settings, the round's and each agent's figures, and the adapter
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ci")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == summary["run_id"]
    assert run.data.params["run.rounds"] == "1" and run.data.params["lora.targets"] == '["query", "value"]'
    samples = client.get_metric_history(run.info.run_id, "round/samples")
    assert [(m.step, m.value) for m in samples] == [(1, SAMPLES_A + SAMPLES_B)]
    assert run.data.metrics[f"agent/{AGENT_A}/samples"] == SAMPLES_A
    assert run.data.metrics[f"agent/{AGENT_B}/plan_batch_size"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts
    assert (tmp_path / "mlartifacts").is_dir()  # beside the store, not in the working directory
    board = scalars(tmp_path / "tb")
    assert board["round/samples"] == {1: SAMPLES_A + SAMPLES_B}
    assert board[f"agent/{AGENT_A}/samples"] == {1: SAMPLES_A}


def test_a_restarted_coordinator_continues_its_mlflow_run(tmp_path: Path) -> None:
    # Prepare
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MlflowTracker(uri, "fedpipe", tmp_path, log_adapter=False)
    first.start("run-1", {"run": {"rounds": 3}})
    first.log(1, {"heldout/accuracy": 0.5})

    # Execute: a new process would build a new tracker over the same run directory
    again = MlflowTracker(uri, "fedpipe", tmp_path, log_adapter=False)
    again.start("run-1", {"run": {"rounds": 3}})
    again.log(2, {"heldout/accuracy": 0.75})
    again.finish({"final_accuracy": 0.75, "final_round": 2}, None)

    # Assert
    assert again.run_id == first.run_id
    history = MlflowClient(uri).get_metric_history(first.run_id, "heldout/accuracy")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.75)]


class Recorder:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def start(self, run_id: str, config: Mapping[str, Any]) -> None:
        pass

    def log(self, step: int, figures: Mapping[str, float]) -> None:
        self.logged.append((step, dict(figures)))

    def finish(self, summary: Mapping[str, Any], final_dir: Path | None) -> None:
        pass

    def abort(self, status: str) -> None:
        pass


class Broken(Recorder):
    def log(self, step: int, figures: Mapping[str, float]) -> None:
        raise ConnectionError("tracking server gone")


def test_a_failing_tracker_is_switched_off_and_the_others_go_on(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    recorder, broken = Recorder(), Broken()
    tracking = Tracking([broken, recorder])
    result = RoundResult(1, ("a",), 2.0, 10, heldout=Evaluation(0.5, 0.75, 10))

    # Execute
    tracking.round(result)
    tracking.round(result)

    # Assert
    assert [step for step, _ in recorder.logged] == [1, 1]
    assert recorder.logged[0][1]["heldout/accuracy"] == 0.75
    assert tracking.trackers == [recorder]
    assert sum("tracking server gone" in r.message for r in caplog.records) == 1


def test_settings_flatten_to_dotted_string_params() -> None:
    flat = flatten({"run": {"rounds": 3, "run_dir": "runs/x"}, "labels": ["a", "b"], "tls": {}, "seed": None})
    assert flat == {"run.rounds": "3", "run.run_dir": "runs/x", "labels": '["a", "b"]', "tls": "{}", "seed": "null"}
    assert round_figures(RoundResult(0, (), 0.0, 0)) == {}

"""`fedpipe-coordinator plan --explain` re-plans from a run directory's saved agents."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from common.types import Accelerator, CalibrationPoint, DeviceProfile, ModelSpec, ModuleShape, Quantization
from coordinator.cli import main
from coordinator.rundir import AGENTS_FILE, load_snapshot, snapshot, write_json

SPEC = ModelSpec(
    "fp", "bert", "seq-cls", ("negative", "positive"),
    tuple(ModuleShape(f"enc.{i}.attention.self.{k}", 384, 384) for i in range(6) for k in ("query", "value")),
    (("classifier.weight", (2, 384)), ("classifier.bias", (2,))), 22_713_216, 10_764_288,
)  # fmt: skip
POINTS = (
    CalibrationPoint(2, 64, 8, Quantization.NONE, 0.1, 700 * 2**20, 74_498),
    CalibrationPoint(8, 64, 8, Quantization.NONE, 0.34, 760 * 2**20, 74_498),
)


def profile(gib: float, share: float = 1.0) -> DeviceProfile:
    return DeviceProfile("cpu", "cpu", int(gib * 2**30), int(gib * 2**30), 24 * 2**30, 5e10, "float32", 1, 540, 60,
                         compute_share=share, calibration=POINTS)  # fmt: skip


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    profiles = {"big": profile(8.0), "small": profile(0.8, share=0.5), "tiny": profile(0.3)}
    write_json(tmp_path / AGENTS_FILE, snapshot(profiles, SPEC, None, {}, {"small": (1.5, 1.0)}))
    (tmp_path / "config.json").write_text(json.dumps({"planner": "fedpipe", "run": {"round_deadline_s": 200}}))
    return tmp_path


def test_snapshot_round_trips(run_dir: Path) -> None:
    profiles, spec, mask, scores, corrections = load_snapshot(run_dir / AGENTS_FILE)
    assert spec == SPEC and mask is None and scores == {} and corrections == {"small": (1.5, 1.0)}
    assert profiles["small"] == profile(0.8, share=0.5)


def test_explain_prints_each_agent_with_its_binding_constraint(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", "--explain", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    lines = {line.split(" ", 1)[0]: line for line in out.splitlines()}
    assert "planner fedpipe, 3 agents" in out and out.splitlines()[1].startswith("round time T: ")
    assert "binding: none" in lines["big"] and "predicted peak" in lines["big"]
    assert "binding: memory" in lines["small"] and "compute share 0.5" in lines["small"]
    assert "LEFT OUT: needs" in lines["tiny"]


def test_explain_with_the_uniform_planner_and_a_missing_run(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", "--explain", "--run-dir", str(run_dir), "--planner", "uniform"]) == 0
    assert "batch 16, rank 8 on 12 matrices" in capsys.readouterr().out
    assert main(["plan", "--explain", "--run-dir", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_a_data_parallel_agent_round_trips_and_is_explained_per_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    devices = (Accelerator("cuda:0", "GPU", 8 * 2**30, 5e10), Accelerator("cuda:1", "GPU", 8 * 2**30, 5e10))
    pair = replace(profile(8.0), devices=devices, allreduce_bytes_per_s=2.5e9)
    write_json(tmp_path / AGENTS_FILE, snapshot({"pair": pair, "one": profile(8.0)}, SPEC, None, {}, {}))
    (tmp_path / "config.json").write_text(json.dumps({"planner": "fedpipe", "run": {"round_deadline_s": 200}}))
    assert load_snapshot(tmp_path / AGENTS_FILE)[0]["pair"] == pair
    assert main(["plan", "--explain", "--run-dir", str(tmp_path)]) == 0
    lines = {line.split(" ", 1)[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "2 devices, all-reduce 2.50 GB/s" in lines["pair"] and "devices" not in lines["one"]
    assert "on each device" in lines["pair"] and "on each device" not in lines["one"]

"""`make gpu-check`'s script, run on a CPU at toy sizes (--allow-cpu --quick): the same code a GPU host runs,
kept from rotting between the rare runs on a real GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_the_gpu_check_runs_every_part_and_writes_its_report(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--allow-cpu", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and "tests" not in report  # the gpu tests run on CUDA only
    assert [(v["base"], v["quantization"]) for v in report["precisions"]] == [("tiny", "none"), ("tiny", "nf4")]
    for variant in report["precisions"]:
        assert variant["steps"] == 3 and variant["step_seconds"] > 0 and variant["peak_memory_bytes"] > 0
        assert variant["formula_peak_memory_bytes"] > 0 and variant["final_loss"] == variant["final_loss"]
    (federation,) = report["federations"]
    assert sorted(federation["agents"]) == ["agent-1", "agent-2"]
    for rounds in federation["agents"].values():
        (first,) = rounds
        assert first["planned_peak_bytes"] > 0 and first["measured_peak_bytes"] > 0
        assert first["error"] == pytest.approx(first["planned_peak_bytes"] / first["measured_peak_bytes"] - 1)
    assert set(federation["profiles"]) == {"agent-1", "agent-2"}
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| tiny | nf4 |" in table and "| none | agent-2 | 1 |" in table

"""A real federation: fedpipe-coordinator and two fedpipe-agent processes via the console scripts,
real MiniLM training on the embedded tweets, adapters over gRPC on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HELDOUT = 300


def federation_config(run_dir: Path) -> dict[str, Any]:
    return {
        "coordinator": {
            "run": {
                "rounds": 2,
                "min_agents": 2,
                "run_dir": str(run_dir),
                "round_deadline_s": 240,
                "registration_timeout_s": 120,
                "finish_grace_s": 10,
            },
            "lora": {"rank": 8, "alpha": 16},
            "selection": {"mode": "importance", "budget": 0.34, "probe_steps": 10, "reselect_every": 1},
            "training": {"batch_size": 16, "learning_rate": 0.002, "max_seq_len": 48},
            "evaluation": {"heldout": "embedded", "max_samples": HELDOUT},
        },
        "agents": {"count": 2, "config": {"threads": 1, "data": {"max_samples": 320, "val_fraction": 0.1}}},
    }


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Run the whole federation once for the module; returns the run dir and the launcher output."""
    base = tmp_path_factory.mktemp("federation")
    run_dir = base / "run"
    config = base / "federation.yaml"
    config.write_text(yaml.safe_dump(federation_config(run_dir)))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "local_federation.py"), "--config", str(config), "--timeout", "900"],
        capture_output=True,
        text=True,
        timeout=960,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"federation failed:\n{proc.stdout}\n{proc.stderr}"
    return run_dir, proc.stdout


@pytest.mark.integration
def test_rounds_complete_and_beat_the_untrained_adapter(federation: tuple[Path, str]) -> None:
    run_dir, output = federation
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    untrained, final = records[0]["heldout"]["accuracy"], records[-1]["heldout"]["accuracy"]
    assert final > untrained + 0.05, (untrained, final)
    assert all(sorted(r["agents"]) == ["agent-1", "agent-2"] for r in records[1:])
    assert all(r["agents_eval"]["samples"] > 0 for r in records), "agents evaluated every global on their own data"
    lines = [line for line in output.strip().splitlines() if not line.startswith("warning: ")]
    held = records[-1]["heldout"]
    assert lines[-1] == f"final accuracy: {final:.3f}, macro-F1 {held['macro_f1']:.3f}"
    assert sum(line.startswith("round ") for line in lines) == 3
    # beside accuracy: macro-F1 and each class's recall, held-out and the agents' (their matrices combined)
    for record in records:
        for scored in (record["heldout"], record["agents_eval"]):
            assert len(scored["confusion"]) == 2 and sum(map(sum, scored["confusion"])) > 0
            assert set(scored["class_recall"]) == {"negative", "positive"} and 0 <= scored["macro_f1"] <= 1
        assert sum(map(sum, record["heldout"]["confusion"])) == HELDOUT


@pytest.mark.integration
def test_selection_plans_and_round_adapters_are_written(federation: tuple[Path, str]) -> None:
    run_dir, _ = federation
    masks = {
        1: json.loads((run_dir / "selection" / "0000.json").read_text()),
        2: json.loads((run_dir / "selection" / "0001.json").read_text()),  # re-selected before round 2
    }
    # round 0 probed the base; the re-selection took round 1's training scores instead of probing again:
    # each agent scored the matrices it trained, the untrained candidates kept their probe scores
    assert masks[1]["probe"].startswith("p0-") and masks[2]["probe"] == "training-r1"
    for agent in masks[2]["agents"].values():
        assert set(agent["scores"]) <= set(masks[1]["mask"]) and all(v > 0 for v in agent["scores"].values())
    untrained = set(masks[1]["combined"]) - set(masks[1]["mask"])
    assert {m: masks[2]["combined"][m] for m in untrained} == {m: masks[1]["combined"][m] for m in untrained}
    for round_ in (1, 2):
        selection = masks[round_]
        assert sorted(selection["agents"]) == ["agent-1", "agent-2"] and len(selection["combined"]) == 24
        assert len(selection["mask"]) == 8  # a third of the 24 attention matrices at rank 8
        directory = run_dir / "rounds" / f"{round_:04d}"
        plans = json.loads((directory / "plans.json").read_text())
        assert sorted(plans) == ["agent-1", "agent-2"]
        for entry in plans.values():
            plan, predicted, measured = entry["plan"], entry["predicted"], entry["measured"]
            assert set(plan["target_modules"]) <= set(selection["mask"])  # the planner may give a subset
            assert set(plan["rank_pattern"].values()) <= {2, 4, 8, 16, 32, 64}
            assert measured["samples"] > 0 and measured["train_seconds"] > 0
            assert predicted["peak_memory_bytes"] <= predicted["usable_memory_bytes"]
            assert measured["peak_memory_bytes"] <= predicted["usable_memory_bytes"]
        assert (directory / "adapter_model.safetensors").stat().st_size > 0
    # every matrix ever trained stays in the global adapter, and the saved adapter still loads in peft (below)
    config = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    trained = {
        m
        for r in (1, 2)
        for e in json.loads((run_dir / "rounds" / f"{r:04d}" / "plans.json").read_text()).values()
        for m in e["plan"]["target_modules"]
    }
    assert trained <= set(config["target_modules"]) <= set(masks[1]["mask"]) | set(masks[2]["mask"])
    assert config["modules_to_save"] == ["classifier"]


@pytest.mark.integration
def test_final_adapter_loads_in_peft_and_reproduces_the_reported_accuracy(federation: tuple[Path, str]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from common.batching import evaluate
    from common.data import DataSource, embedded_split
    from common.modeling import load_tokenizer, resolve_model_path

    run_dir, _ = federation
    summary = json.loads((run_dir / "summary.json").read_text())
    path = resolve_model_path("embedded")
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = PeftModel.from_pretrained(base, str(run_dir / "final"))
    held = embedded_split(DataSource("embedded"))[1][:HELDOUT]
    result = evaluate(model, load_tokenizer(path), held, 48, torch.device("cpu"))
    assert result.accuracy == pytest.approx(summary["final_accuracy"], abs=1e-9)
    assert result.macro_f1 == pytest.approx(summary["final_macro_f1"], abs=1e-9)
    assert result.loss == pytest.approx(summary["final_loss"], rel=1e-4)

"""Does the FedPipe method pay off? Importance + a rank per matrix + re-scoring, against its baselines at an
equal trainable-parameter budget, and the defaults against the uniform plan where agents are equal.

Settings (fixed before the first run):

* classifier: MiniLM-L6, 3 agents of the demo's data (600 embedded tweets each, 10% validation), Dirichlet
  label skew 1.0, candidates the 24 attention matrices, alpha / rank 2, lr 1e-3, 5 rounds of at most 20 steps
  of 16 at 64 tokens, the 1,000 held-out tweets; the uniform planner, so every arm's budget is what it says;
* causal: SmolLM2-135M-Instruct, 3 agents (200 embedded instruction pairs each), candidates q/k/v/o_proj of
  the 30 layers, 3 rounds of at most 10 steps of 4 at 64 tokens, 200 held-out pairs, the uniform planner;
* arms (budget: a third of the all-candidates LoRA parameters at rank 8):
  - fedpipe:   selection importance, budget 0.34, rank 8 spread per matrix over ranks 2-32
               (planning.rank_allocation per-matrix), re-selected every 2 rounds from the training scores;
  - random:    selection random, budget 0.34, rank 8;
  - low-rank:  every candidate at rank 3 (the rank closest to the same budget);
  - all:       every candidate at rank 8 (three times the parameters);
* iid (the defaults must not lose where agents are equal): 3 equal agents, IID split, 600 tweets each,
  5 rounds, importance selection at budget 0.34 and rank 8, the fedpipe planner (the defaults) against the
  uniform plan (batch 16, one epoch);
* seeds 1-3 (run.seed: round-0 adapter, probe, random mask, per-agent data order). One thread per agent.

Per run: held-out accuracy (and macro-F1), loss per round, seconds per round, trainable LoRA parameters per
agent and round; the iid case also the seconds to a held-out accuracy of 0.85. Results are kept in
bench/results/method_ablation.json after every run (a later invocation goes on where one stopped; `--fresh`
reruns); `--only classifier|causal|iid`, `--seeds N` and `--arms a,b` narrow it. Every process imports the
code on PYTHONPATH: run it from a copy of the tree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness import ROOT, Ledger, run_section
from hostile import federate

RUNS = ROOT / "runs" / "method-ablation"
RESULT = ROOT / "bench" / "results" / "method_ablation.json"
CASES = {"classifier": ("fedpipe", "random", "low-rank", "all"), "causal": ("fedpipe", "random", "low-rank", "all"),
         "iid": ("defaults", "uniform")}  # fmt: skip
TARGET_ACCURACY = 0.85  # iid: time to this held-out accuracy


def arm_settings(arm: str) -> dict[str, Any]:
    """The coordinator keys an arm changes."""
    importance = {"mode": "importance", "budget": 0.34, "probe_steps": 10}
    if arm == "fedpipe":
        return {
            "selection": {**importance, "reselect_every": 2, "rescore": "training"},
            "lora": {"rank": 8, "alpha": 16},
            "planning": {"rank_allocation": "per-matrix", "matrix_ranks": [2, 4, 8, 16, 32]},
        }
    if arm == "random":
        return {"selection": {"mode": "random", "budget": 0.34}, "lora": {"rank": 8, "alpha": 16}}
    if arm == "low-rank":
        return {"selection": {"mode": "all"}, "lora": {"rank": 3, "alpha": 6}}
    if arm == "all":
        return {"selection": {"mode": "all"}, "lora": {"rank": 8, "alpha": 16}}
    if arm in ("defaults", "uniform"):
        return {"selection": importance, "lora": {"rank": 8, "alpha": 16}}
    raise ValueError(f"unknown arm {arm}")


def spec(case: str, arm: str, run_dir: Path, seed: int) -> dict[str, Any]:
    """The launcher spec of one run."""
    causal = case == "causal"
    settings = arm_settings(arm)
    coordinator: dict[str, Any] = {
        "planner": "fedpipe" if arm == "defaults" else "uniform",
        "run": run_section(run_dir, seed, rounds=3 if causal else 5, min_agents=3),
        "model": {"path": "embedded-llm" if causal else "embedded"},
        "lora": {**settings["lora"], "targets": ["q_proj", "k_proj", "v_proj", "o_proj"] if causal else ["all"]},
        "selection": settings["selection"],
        "training": {
            "batch_size": 4 if causal else 16,
            "max_steps": 10 if causal else (0 if case == "iid" else 20),
            "max_seq_len": 64,
            "learning_rate": 1e-3,
        },
        "evaluation": {"agents": False, "initial": True, "heldout": "embedded", "max_samples": 200 if causal else 0},
    }
    if "planning" in settings:
        coordinator["planning"] = settings["planning"]
    if arm == "defaults":
        coordinator["planning"] = {"max_under_training": 0.2, "max_local_epochs": 2}
    data: dict[str, Any] = {"max_samples": 200 if causal else 600, "val_fraction": 0.1}
    if case == "classifier":
        data["label_skew"] = 1.0
    agent: dict[str, Any] = {"threads": 1, "data": data}
    if arm != "defaults":
        agent["calibration"] = {"enabled": False}  # the uniform planner does not read it
    if causal:
        agent["model"] = {"path": "embedded-llm"}
    return {"coordinator": coordinator, "agents": {"count": 3, "config": agent}}


def run_name(record: Mapping[str, Any]) -> str:
    """A run's name (its directory under RUNS) from its settings."""
    return f"{record['case']}-{record['arm']}-s{record['seed']}"


def measure(run_dir: Path) -> dict[str, Any]:
    """Per-round figures of a finished run and its time to TARGET_ACCURACY."""
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    rounds = []
    elapsed = 0.0
    target_seconds = None
    for record in records:
        if record["round"] == 0:
            continue
        elapsed += record["seconds"]
        plans = json.loads((run_dir / "rounds" / f"{record['round']:04d}" / "plans.json").read_text())
        held = record.get("heldout") or {}
        rounds.append(
            {
                "round": record["round"],
                "accuracy": held.get("accuracy"),
                "macro_f1": held.get("macro_f1"),
                "loss": held.get("loss"),
                "seconds": record["seconds"],
                "ranks": {a: p["plan"]["rank_pattern"] for a, p in plans.items()},
            }
        )
        if target_seconds is None and (held.get("accuracy") or 0.0) >= TARGET_ACCURACY:
            target_seconds = elapsed
    return {
        "round0": next(r["heldout"] for r in records if r["round"] == 0),
        "rounds": rounds,
        "final_accuracy": rounds[-1]["accuracy"] if rounds else None,
        "final_macro_f1": rounds[-1]["macro_f1"] if rounds else None,
        "final_loss": rounds[-1]["loss"] if rounds else None,
        "target_seconds": target_seconds,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per case and arm: seeds, final accuracy mean and spread, final loss, time to target."""
    table: dict[str, Any] = {}
    for case, arm in sorted({(r["case"], r["arm"]) for r in runs}):
        chosen = [r for r in runs if (r["case"], r["arm"]) == (case, arm)]
        finals = [r["final_accuracy"] for r in chosen if r["final_accuracy"] is not None]
        reached = [r["target_seconds"] for r in chosen if r["target_seconds"] is not None]
        table[f"{case}/{arm}"] = {
            "seeds": len(chosen),
            "final_accuracy_mean": statistics.mean(finals) if finals else None,
            "final_accuracy_sd": statistics.stdev(finals) if len(finals) > 1 else None,
            "final_loss_mean": statistics.mean(r["final_loss"] for r in chosen if r["final_loss"] is not None)
            if chosen
            else None,
            "reached_target": len(reached),
            "target_seconds_mean": statistics.mean(reached) if reached else None,
        }
    return table


def main() -> int:
    """Every case, arm and seed, then the summary table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=tuple(CASES), default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arms", default=None, help="comma-separated arms (default: every arm of each case)")
    parser.add_argument("--fresh", action="store_true", help="rerun runs already recorded")
    args = parser.parse_args()
    ledger = Ledger(RESULT, run_name, summarise, args.fresh)
    runs: list[dict[str, Any]] = []
    for case, arms in CASES.items():
        if args.only and case != args.only:
            continue
        for seed in range(1, args.seeds + 1):
            for arm in arms:
                if args.arms and arm not in args.arms.split(","):
                    continue
                name = run_name({"case": case, "arm": arm, "seed": seed})
                run_dir = RUNS / name

                def one(run_dir: Path = run_dir, case: str = case, arm: str = arm, seed: int = seed) -> dict[str, Any]:
                    start = time.monotonic()
                    federate(spec(case, arm, run_dir, seed), run_dir, timeout_s=7200)
                    record: dict[str, Any] = {"case": case, "arm": arm, "seed": seed}
                    record["wall_s"] = round(time.monotonic() - start, 1)
                    record.update(measure(run_dir))
                    return record

                record = ledger.record(name, run_dir, one)
                runs.append(record)
                print(f"{name}: accuracy {[r['accuracy'] for r in record['rounds']]}", flush=True)
    for key, row in summarise(runs).items():
        print(key, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

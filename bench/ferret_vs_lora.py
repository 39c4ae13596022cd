"""Ferret against LoRA and against the full-weight FedAvg it approximates, on the same blocks and rounds.

Settings (fixed before the first run):

* classifier: MiniLM-L6, 3 agents on the demo's data (600 embedded tweets each, Dirichlet label skew 1.0,
  10% validation), the query and value matrices of all 6 layers, uniform planner, 5 rounds of at most 20 steps
  of 16 at 64 tokens, the 1,000 held-out tweets, seeds 1-3;
* causal LM: SmolLM2-135M-Instruct on the embedded instructions, 2 agents (200 pairs each), q_proj and
  v_proj of all 30 layers, 3 rounds of at most 10 steps of 4 at 64 tokens, 200 held-out pairs, seeds 1-2.

Arms, alike but for these keys: lora (rank 8, alpha 16, lr 1e-3, the demo's), ferret-1k and ferret-10k
(training.mode ferret, 1,000 and 10,000 directions per agent and round, Rademacher, AdamW at lr 5e-5 for
MiniLM and 2e-5 for SmolLM2, the usual full fine-tuning rates), and fedavg-full (the same with 0 directions:
every block's whole change travels, plain FedAvg of the same blocks). One thread per agent, no calibration.

From each run directory: held-out accuracy and loss per round (rounds.jsonl), the bytes each agent sent and received
per round, training, projection and peak memory (rounds/NNNN/plans.json), the coordinator's aggregation
seconds (rounds.jsonl) and each agent's reconstruction seconds (its log's "rebuilt ... in Xs" lines).
Every process imports the code on PYTHONPATH: run it from a copy of the tree (BENCHMARKS.md gives the
command). `--only classifier|causal`, `--seeds N` narrow it; a run it finished before (runs/ferret-vs-lora/*/bench.json)
is kept unless `--fresh`. Writes bench/results/ferret_vs_lora.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

from harness import ROOT, kept_run, machine, run_section, write_result
from hostile import federate

RUNS = ROOT / "runs" / "ferret-vs-lora"
REBUILT = re.compile(r"ferret: rebuilt round (\d+)'s update \((\d+) directions\) in ([0-9.]+)s")


def base(task: str, run_dir: Path, seed: int) -> dict[str, Any]:
    """The launcher spec every arm of a task shares."""
    causal = task == "causal"
    coordinator = {
        "planner": "uniform",
        "run": run_section(run_dir, seed, rounds=3 if causal else 5, min_agents=2 if causal else 3),
        "model": {"path": "embedded-llm" if causal else "embedded"},
        "lora": {"rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj"] if causal else ["query", "value"]},
        "selection": {"mode": "all"},
        "training": {"batch_size": 4 if causal else 16, "max_steps": 10 if causal else 20, "max_seq_len": 64},
        "evaluation": {"agents": False, "initial": True, "heldout": "embedded", "max_samples": 200 if causal else 0},
        "server": {"max_upload_bytes": 512 * 2**20},
    }
    data: dict[str, Any] = {"max_samples": 200 if causal else 600, "val_fraction": 0.1}
    if not causal:
        data["label_skew"] = 1.0
    agents: dict[str, Any] = {
        "count": 2 if causal else 3,
        "config": {"threads": 1, "calibration": {"enabled": False}, "data": data},
    }
    if causal:
        agents["config"]["model"] = {"path": "embedded-llm"}
    return {"coordinator": coordinator, "agents": agents}  # fmt: skip


def arm(spec: dict[str, Any], name: str, task: str) -> dict[str, Any]:
    """The spec of one arm."""
    training = spec["coordinator"]["training"]
    if name == "lora":
        training["learning_rate"] = 1e-3
        return spec
    training.update(mode="ferret", learning_rate=2e-5 if task == "causal" else 5e-5)
    directions = {"ferret-1k": 1000, "ferret-10k": 10000, "fedavg-full": 0}[name]
    spec["coordinator"]["ferret"] = {"directions": directions, "basis": "rademacher"}
    return spec


def measure(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Per-round figures of one finished run."""
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    rounds = []
    for record in records:
        if record["round"] == 0:
            continue
        plans = json.loads((run_dir / "rounds" / f"{record['round']:04d}" / "plans.json").read_text())
        measured = [p["measured"] for p in plans.values() if "measured" in p]
        rounds.append({
            "round": record["round"],
            "accuracy": record["heldout"]["accuracy"],
            "loss": record["heldout"]["loss"],
            "seconds": record["seconds"],
            "aggregation_seconds": record.get("aggregation_seconds", 0.0),
            "upload_bytes": sum(m["upload_bytes"] for m in measured),
            "download_bytes": sum(m["download_bytes"] for m in measured),
            "train_seconds_max": max(m["train_seconds"] for m in measured),
            "projection_seconds_max": max(m["projection_seconds"] for m in measured),
            "peak_memory_bytes_max": max(m["peak_memory_bytes"] for m in measured),
        })  # fmt: skip
    rebuilt: dict[int, float] = {}
    for log in (run_dir / "logs").glob("agent-*.log"):
        for round_, _, seconds in REBUILT.findall(log.read_text(errors="replace")):
            rebuilt[int(round_)] = max(rebuilt.get(int(round_), 0.0), float(seconds))
    for entry in rounds:
        entry["agent_reconstruction_seconds_max"] = rebuilt.get(entry["round"] - 1, 0.0)
    zero = next((r["heldout"] for r in records if r["round"] == 0 and r.get("heldout")), None)
    return {
        "round0_accuracy": zero["accuracy"] if zero else None,
        "round0_loss": zero["loss"] if zero else None,
        "rounds": rounds,
        "final_accuracy": summary["final_accuracy"],
        "final_loss": rounds[-1]["loss"] if rounds else None,
    }


def main() -> int:
    """Every arm, task and seed, then the summary table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("classifier", "causal"), default=None)
    parser.add_argument("--seeds", type=int, default=None, help="seeds per task (default: 3 classifier, 2 causal)")
    parser.add_argument("--fresh", action="store_true", help="rerun arms whose run directory holds a finished run")
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    for task in ("classifier", "causal"):
        if args.only and task != args.only:
            continue
        for seed in range(1, (args.seeds or (3 if task == "classifier" else 2)) + 1):
            for name in ("lora", "ferret-1k", "ferret-10k", "fedavg-full"):
                run_dir = RUNS / f"{task}-{name}-s{seed}"

                def one(
                    run_dir: Path = run_dir, name: str = name, task: str = task, seed: int = seed
                ) -> dict[str, Any]:
                    start = time.monotonic()
                    summary = federate(arm(base(task, run_dir, seed), name, task), run_dir, timeout_s=7200)
                    record: dict[str, Any] = {"task": task, "arm": name, "seed": seed}
                    record["wall_s"] = round(time.monotonic() - start, 1)
                    record.update(measure(run_dir, summary))
                    return record

                record = kept_run(run_dir, args.fresh, one)
                runs.append(record)
                print(
                    f"{task} {name} s{seed}: accuracy {[round(r['accuracy'], 3) for r in record['rounds']]}"
                    f" loss {[round(r['loss'], 4) for r in record['rounds']]}",
                    flush=True,
                )
    table: dict[str, dict[str, Any]] = {}
    for key in sorted({(r["task"], r["arm"]) for r in runs}):
        chosen = [r for r in runs if (r["task"], r["arm"]) == key]
        finals = [r["final_accuracy"] for r in chosen]
        losses = [r["final_loss"] for r in chosen]
        rounds = [x for r in chosen for x in r["rounds"]]
        table[f"{key[0]}/{key[1]}"] = {
            "final_mean": statistics.mean(finals),
            "final_min": min(finals),
            "final_max": max(finals),
            "final_loss_mean": statistics.mean(losses),
            "final_loss_min": min(losses),
            "final_loss_max": max(losses),
            "seeds": len(finals),
            "upload_bytes_per_round": statistics.mean(x["upload_bytes"] for x in rounds),
            "download_bytes_per_round": statistics.mean(x["download_bytes"] for x in rounds),
            "round_seconds": statistics.mean(x["seconds"] for x in rounds),
            "train_seconds": statistics.mean(x["train_seconds_max"] for x in rounds),
            "projection_seconds": statistics.mean(x["projection_seconds_max"] for x in rounds),
            "agent_reconstruction_seconds": statistics.mean(x["agent_reconstruction_seconds_max"] for x in rounds),
            "aggregation_seconds": statistics.mean(x["aggregation_seconds"] for x in rounds),
            "peak_memory_bytes": max(x["peak_memory_bytes_max"] for x in rounds),
        }
        row = table[f"{key[0]}/{key[1]}"]
        print(
            f"{key[0]:10s} {key[1]:12s} final {row['final_mean']:.3f} ({row['final_min']:.3f}-{row['final_max']:.3f}) "
            f"loss {row['final_loss_mean']:.4f} ({row['final_loss_min']:.4f}-{row['final_loss_max']:.4f}) "
            f"up {row['upload_bytes_per_round'] / 2**20:.2f} MiB/round, round {row['round_seconds']:.1f}s"
        )
    write_result(
        ROOT / "bench" / "results" / "ferret_vs_lora.json", {"machine": machine(), "table": table, "runs": runs}
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

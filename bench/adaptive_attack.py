"""How far a hostile agent that stays under the bounds can move a run, and what the robust strategies buy.

Settings (fixed before the first run): MiniLM-L6 on the embedded tweets, four honest agents (300 tweets each,
IID shards, one thread each, no calibration) and mallory (bench/hostile.py); uniform planner, LoRA rank 4
on query/value, 3 rounds of 12 steps of 16 at 48 tokens, learning rate 2e-3, 300 held-out tweets; seeds 1-3
(run.seed: round-0 adapter, dropout, data order). Mallory claims as many samples as an honest agent (equal
weight) and puts its whole change on the classifier bias towards "positive", sized from the clean run of
the same seed and round (an attacker who knows what honest changes look like):

* whole:  0.9 x updates.norm_multiple (10) x the honest median of the whole update's change norm
          (passes the whole-update bound; the per-tensor bound should catch it)
* tensor: 0.9 x 10 x the honest median of the bias's own change norm (passes every bound)

Arms per seed: clean/{rank-padding, coordinate-median, trimmed-mean}, whole/rank-padding, and
tensor/{rank-padding, coordinate-median, trimmed-mean}. trimmed-mean drops 1 of the 5 updates at each end per
coordinate (trim_fraction 0.2). Results: held-out accuracy per round and arm (final: mean, min, max over
seeds), mallory's answers, the norms. Every process imports the code on PYTHONPATH: run it from a copy of
the tree (BENCHMARKS.md gives the command) so that edits made meanwhile do not leak into later runs.
Writes bench/results/adaptive_attack.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from harness import ROOT, machine, write_result
from hostile import BIAS, change_norms, federate, heldout_accuracies

RUNS = ROOT / "runs" / "adaptive-attack"
STRATEGIES = ("rank-padding", "coordinate-median", "trimmed-mean")
HONEST = 4
MULTIPLE = 10.0
MARGIN = 0.9


def spec(run_dir: Path, seed: int, strategy: str, attacked: bool) -> dict[str, Any]:
    """The launcher spec of one arm."""
    return {
        "coordinator": {
            "planner": "uniform",
            "strategy": strategy,
            "aggregation": {"trim_fraction": 0.2},
            "run": {
                "rounds": 3,
                "min_agents": HONEST + (1 if attacked else 0),
                "quorum": HONEST,  # a round goes on without mallory's update when a bound leaves it out
                "run_dir": str(run_dir),
                "round_deadline_s": 300,
                "registration_timeout_s": 300,
                "finish_grace_s": 5,
                "seed": seed,
            },
            "lora": {"rank": 4, "alpha": 8, "targets": ["query", "value"]},
            "selection": {"mode": "all"},
            "training": {"batch_size": 16, "max_steps": 12, "max_seq_len": 48, "learning_rate": 0.002},
            "evaluation": {"agents": False, "initial": False, "heldout": "embedded", "max_samples": 300},
            "updates": {"norm_multiple": MULTIPLE},
        },
        "agents": {
            "count": HONEST,
            "config": {
                "threads": 1,
                "calibration": {"enabled": False},
                "data": {"max_samples": 330, "val_fraction": 0.1},
            },
        },
    }


def median_norms(run_dir: Path, tensor: str | None = None) -> dict[int, float]:
    """Round -> median change norm (of one tensor, or whole) of the updates aggregated in that round."""
    return {round_: statistics.median(values) for round_, values in change_norms(run_dir, tensor).items()}


ARMS = (
    ("clean", "rank-padding"),
    ("clean", "coordinate-median"),
    ("clean", "trimmed-mean"),
    ("whole", "rank-padding"),
    ("tensor", "rank-padding"),
    ("tensor", "coordinate-median"),
    ("tensor", "trimmed-mean"),
)


def main() -> int:
    """Run every arm of every seed, then summarise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    for seed in range(1, args.seeds + 1):
        clean_dir = RUNS / f"clean-rank-padding-s{seed}"
        for attack, strategy in ARMS:
            name = f"{attack}-{strategy}-s{seed}"
            run_dir = RUNS / name
            mallory = None
            if attack != "clean":
                honest = median_norms(clean_dir, BIAS if attack == "tensor" else None)
                mallory = {"attack": "scaled", "norm": {r: MARGIN * MULTIPLE * m for r, m in honest.items()}}
            start = time.monotonic()
            summary = federate(spec(run_dir, seed, strategy, mallory is not None), run_dir, mallory)
            record = {
                "arm": f"{attack}/{strategy}",
                "seed": seed,
                "accuracy": heldout_accuracies(summary),
                "wall_s": round(time.monotonic() - start, 1),
                "honest_median_norm": median_norms(run_dir),
                "honest_median_bias_norm": median_norms(run_dir, BIAS),
                "mallory": summary.get("mallory"),
                "attack_norm": mallory["norm"] if mallory else None,
                "refused": [r.get("refused", []) for r in summary["rounds"]],
            }
            print(f"{name}: accuracy {record['accuracy']}, mallory {record['mallory']}", flush=True)
            runs.append(record)
    arms: dict[str, dict[str, Any]] = {}
    for arm in [f"{a}/{s}" for a, s in ARMS]:
        finals = [r["accuracy"][-1] for r in runs if r["arm"] == arm]
        arms[arm] = {
            "final_mean": statistics.mean(finals),
            "final_min": min(finals),
            "final_max": max(finals),
            "seeds": len(finals),
        }
        print(f"{arm:32s} final accuracy {arms[arm]['final_mean']:.3f} ({min(finals):.3f}-{max(finals):.3f})")
    write_result(
        ROOT / "bench" / "results" / "adaptive_attack.json",
        {"machine": machine(), "settings": __doc__, "arms": arms, "runs": runs},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

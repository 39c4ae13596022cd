"""How far a hostile agent that stays under every bound can move a run, and what the robust strategies buy.

Settings (fixed before the first run): MiniLM-L6 on the embedded tweets, four honest agents (300 tweets each,
IID shards, one thread each, no calibration) and mallory (bench/hostile.py); uniform planner, LoRA rank 4
on query/value, 3 rounds of 12 steps of 16 at 48 tokens, learning rate 2e-3, 300 held-out tweets; seeds 1-3
(run.seed: round-0 adapter, dropout, data order). Mallory's "scaled" attack puts a change of norm
0.9 x updates.norm_multiple (10) x the honest median change norm of the same round in the clean run of the
same seed, all of it on the classifier bias towards "positive", so it passes the relative norm bound and
the value bound, and claims as many samples as an honest agent (equal weight). Arms, per seed:

* clean/<strategy>:    the four honest agents alone, strategy rank-padding, coordinate-median, trimmed-mean
* attacked/<strategy>: the same with mallory's scaled attack

trimmed-mean drops 1 of the 5 updates at each end per coordinate (trim_fraction 0.2). Results: final
held-out accuracy per arm (mean, min, max over seeds) and per round, mallory's answers, the norms.
Writes bench/results/adaptive_attack.json; `--seeds 1` for a quick look.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from harness import ROOT, machine, write_result
from hostile import change_norms, federate, heldout_accuracies

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


def median_norms(run_dir: Path) -> dict[int, float]:
    """Round -> median change norm of the honest updates aggregated in that round."""
    norms = change_norms(run_dir)
    rounds = max(len(v) for v in norms.values())
    return {r + 1: statistics.median(v[r] for v in norms.values() if len(v) > r) for r in range(rounds)}


def main() -> int:
    """Run every arm of every seed, then summarise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    for seed in range(1, args.seeds + 1):
        clean_dir = RUNS / f"clean-rank-padding-s{seed}"
        for strategy in STRATEGIES:
            for attacked in (False, True):
                name = f"{'attacked' if attacked else 'clean'}-{strategy}-s{seed}"
                run_dir = RUNS / name
                mallory = None
                if attacked:
                    budget = {r: MARGIN * MULTIPLE * m for r, m in median_norms(clean_dir).items()}
                    mallory = {"attack": "scaled", "norm": budget}
                start = time.monotonic()
                summary = federate(spec(run_dir, seed, strategy, attacked), run_dir, mallory)
                record = {
                    "arm": f"{'attacked' if attacked else 'clean'}/{strategy}",
                    "seed": seed,
                    "accuracy": heldout_accuracies(summary),
                    "wall_s": round(time.monotonic() - start, 1),
                    "honest_median_norm": median_norms(run_dir),
                    "mallory": summary.get("mallory"),
                    "attack_norm": mallory["norm"] if mallory else None,
                }
                print(f"{name}: accuracy {record['accuracy']}, mallory {record['mallory']}", flush=True)
                runs.append(record)
    arms: dict[str, dict[str, Any]] = {}
    for arm in sorted({r["arm"] for r in runs}):
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

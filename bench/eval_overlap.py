"""Held-out evaluation on and off the critical path: a round's cycle against its slowest training.

cycle ratio = (opening of round t+1 - opening of round t) / slowest agent's train_seconds in round t

Settings (fixed before the first run): bench/round_overhead.py's federation (2 agents with 1 torch thread each,
300 embedded tweets per agent, LoRA rank 8 on query and value, uniform planner, held-out evaluation on 300
embedded tweets) for 4 rounds, without the agents' own validation (`evaluation.agents: false`, so the
held-out evaluation is the only one), run twice: `evaluation.overlap: false` (round t+1 waits for round t's
held-out evaluation) and `true` (it runs while round t+1 trains). Openings are rounds.jsonl's `opened_s`,
training seconds the agents' reported `train_seconds` (rounds/NNNN/plans.json), evaluation seconds
`heldout_seconds`. On this host the agents and the coordinator share 2 cores, so an overlapped evaluation
competes with training for CPU, which a coordinator on its own host does not.

Writes bench/results/eval_overlap.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness import machine, write_result
from round_overhead import federation_config, run_config

RESULT = Path(__file__).resolve().parent / "results" / "eval_overlap.json"


def cycles(run_dir: Path) -> list[dict[str, Any]]:
    """Per round with a successor: its cycle, slowest training, wall and held-out seconds."""
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    by_round = {r["round"]: r for r in records if r["round"] > 0}
    rows = []
    for round_, record in sorted(by_round.items()):
        following = by_round.get(round_ + 1)
        if following is None:
            continue
        plans = json.loads((run_dir / "rounds" / f"{round_:04d}" / "plans.json").read_text())
        slowest = max(float(plans[a]["measured"]["train_seconds"]) for a in record["agents"])
        cycle = following["opened_s"] - record["opened_s"]
        rows.append(
            {
                "round": round_,
                "cycle_seconds": cycle,
                "slowest_train_seconds": slowest,
                "round_seconds": record["seconds"],
                "heldout_seconds": record["heldout_seconds"],
                "cycle_over_training": cycle / slowest,
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args()
    result: dict[str, Any] = {"benchmark": "eval_overlap", "machine": machine(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="fedpipe-overlap-") as tmp:
        for overlap in (False, True):
            config = federation_config(agents=2, rounds=4, max_samples=300, eval_samples=300)
            config["coordinator"]["evaluation"].update({"agents": False, "overlap": overlap})
            run_dir = Path(tmp) / f"overlap-{overlap}"
            run_config(config, run_dir, timeout_s=1800)
            rows = cycles(run_dir)
            ratio = statistics.mean(r["cycle_over_training"] for r in rows)
            result["runs"]["on" if overlap else "off"] = {"rows": rows, "mean_cycle_over_training": ratio}
            print(f"overlap {'on ' if overlap else 'off'}: mean cycle / slowest training {ratio:.3f}", flush=True)
            for row in rows:
                print(
                    f"  round {row['round']}: cycle {row['cycle_seconds']:.1f}s, slowest training "
                    f"{row['slowest_train_seconds']:.1f}s, round wall {row['round_seconds']:.1f}s, held-out "
                    f"{row['heldout_seconds']:.1f}s",
                    flush=True,
                )
    write_result(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The coordinator with 10, 100 and 1,000 virtual agents: planning time, a round's aggregation, peak memory.

Settings (fixed before the first run): `fedpipe-coordinator simulate` with noise work (the download plus
seeded noise: no agent model, so what is measured is the coordinator), the fedpipe planner over
planning.ranks [2, 4] on MiniLM's query and value matrices (12), 2 rounds, 4 workers, no evaluation, the
default fleet spec (memory 2-16 GiB, 2-50 GFLOP/s, 40-200 examples, log-uniform; seed 0). Each size runs in a
process of its own, so its peak resident memory (ru_maxrss) is its own; the 10-agent run is the baseline the
others' memory and planning time are divided by.

Per size: each planning call's seconds (round 0's plans, then rounds 1 and 2), the rounds' aggregation seconds
and wall seconds (rounds.jsonl), the updates accepted and aggregated per round, peak RSS. Writes
bench/results/simulation_scale.json. Every process imports the code on PYTHONPATH: run it from a copy of the
tree when the tree may change meanwhile.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness import ROOT, machine, write_result

RESULT = ROOT / "bench" / "results" / "simulation_scale.json"
SIZES = (10, 100, 1000)


def run(agents: int, run_dir: Path) -> dict[str, Any]:
    """One simulation of `agents` virtual agents; its figures and round records."""
    command = [
        str(Path(sys.executable).parent / "fedpipe-coordinator"), "simulate", "--agents", str(agents),
        "--simulation.work", "noise", "--simulation.workers", "4", "--planning.ranks", "[2,4]",
        "--lora.targets", '["query","value"]', "--run.rounds", "2", "--run.min-agents", str(agents),
        "--run.round-deadline-s", "1200", "--run.run-dir", str(run_dir), "--no-evaluation.agents",
        "--no-evaluation.initial", "--selection.mode", "all", "--metrics.port", "-1", "--log-format", "json",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{agents} agents: exit {done.returncode}\n{done.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads((run_dir / "simulation.json").read_text())
    figures.pop("config", None)
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    figures["rounds"] = [
        {"round": r["round"], "seconds": r["seconds"], "aggregation_seconds": r["aggregation_seconds"]} for r in rounds
    ]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    columns = ("agents", "plan s (max)", "aggr s (max)", "round s (max)", "peak RSS MiB", "wall s")
    print(" ".join(f"{c:>{w}}" for c, w in zip(columns, (6, 12, 12, 13, 12, 7), strict=True)))
    with tempfile.TemporaryDirectory(prefix="fedpipe-sim-") as tmp:
        for agents in args.sizes:
            figures = run(agents, Path(tmp) / f"sim-{agents}")
            row = {
                "agents": agents,
                "planning_seconds_max": max(call["seconds"] for call in figures["planning"]),
                "aggregation_seconds_max": max(r["aggregation_seconds"] for r in figures["rounds"]),
                "round_seconds_max": max(r["seconds"] for r in figures["rounds"]),
                **figures,
            }
            rows.append(row)
            print(
                f"{agents:>6} {row['planning_seconds_max']:>12.3f} {row['aggregation_seconds_max']:>12.2f} "
                f"{row['round_seconds_max']:>13.1f} {row['peak_rss_bytes'] / 2**20:>12.0f} {row['wall_seconds']:>7.1f}",
                flush=True,
            )
    base = rows[0]
    for row in rows:
        row["peak_rss_over_first"] = row["peak_rss_bytes"] / base["peak_rss_bytes"]
        row["planning_over_first"] = row["planning_seconds_max"] / max(base["planning_seconds_max"], 1e-9)
    write_result(
        args.output,
        {
            "benchmark": "simulation_scale",
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "machine": machine(),
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

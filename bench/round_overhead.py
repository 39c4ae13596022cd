"""Coordination overhead per round of a real local federation.

overhead ratio = round wall seconds / (slowest agent's train_seconds + its upload + download seconds)

The script writes a small federation config (2 agents, 3 rounds, 300 samples per agent shard cap,
300 held-out samples, 1 torch thread per agent), runs `deploy/local_federation.py` with this Python,
and reads the run's artefacts:

* `rounds.jsonl`: the round's wall time `seconds`, measured by the coordinator from opening the round
  (plans made, TRAIN tasks available) to the new global adapter being checkpointed; evaluation of the
  global happens after that and is not part of it;
* `rounds/NNNN/plans.json`: each agent's plan and its reported `train_seconds` (the training loop
  only: no model preparation, no download, no upload);
* `rounds/NNNN/adapter_model.safetensors`: header only, for module shapes, so that each agent's upload
  size (= its download size) follows from its plan's ranks;
* `logs/coordinator.log`: the "aggregated ... in X s" line of each round, for the breakdown. X is
  measured from the start of the aggregation strategy to after `Checkpoint.save_round`, so it holds
  strategy + checkpoint writing (the strategy-only figure is the fedpipe_aggregation_duration_seconds metric).

Transfer times are not in the artefacts. They are estimated as payload bytes / the throughput that
bench/upload_throughput.py measured over loopback gRPC for the nearest payload size (upload and
download separately); without bench/results/upload_throughput.json they count as 0 and the result
says so. `--analyze-only` re-reads an existing run directory without running anything.

Writes bench/results/round_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from harness import machine, run_federation, write_result

from coordinator.rundir import tensor_header

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PEFT_PREFIX = "base_model.model."
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
AGGREGATED = re.compile(r"round (\d+): aggregated \d+ updates .* in ([0-9.]+)s")


def federation_config(agents: int, rounds: int, max_samples: int, eval_samples: int) -> dict[str, Any]:
    """The deploy/local_federation.py config of the benchmark (demo.yaml, made smaller)."""
    return {
        "coordinator": {
            "run": {
                "rounds": rounds,
                "min_agents": agents,
                "round_deadline_s": 300,
                "registration_timeout_s": 180,
            },
            "lora": {"rank": 8, "alpha": 16, "targets": ["query", "value"]},
            "selection": {"mode": "all"},  # no probe: the figure is the round loop's own overhead
            "planner": "uniform",
            "training": {"batch_size": 16, "local_epochs": 1, "learning_rate": 0.001, "max_seq_len": 64},
            "evaluation": {"heldout": "embedded", "max_samples": eval_samples},
        },
        "agents": {
            "count": agents,
            "config": {
                "threads": 1,
                "data": {"path": "embedded", "max_samples": max_samples, "label_skew": 1.0, "val_fraction": 0.1},
            },
        },
    }


def run_config(config: dict[str, Any], run_dir: Path, timeout_s: float) -> None:
    """Run a launcher config (written to a temporary file) through harness.run_federation."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="round-overhead-", delete=False) as handle:
        yaml.safe_dump(config, handle)
        path = Path(handle.name)
    try:
        run_federation(path, run_dir, timeout_s)
    except RuntimeError as err:
        raise SystemExit(str(err)) from None
    finally:
        path.unlink(missing_ok=True)


def payload_bytes(plan: dict[str, Any], shapes: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    """Bytes of one agent's upload for this plan: fp32 A (r, in) and B (out, r) per module, plus saved heads.

    The download of the global adapter for the same plan has the same tensors (common.adapters
    broadcast_tensors vs expected_tensors), so it is the same size.
    """
    total = 0
    for module, rank in plan["rank_pattern"].items():
        _, a_shape = shapes[f"{PEFT_PREFIX}{module}.lora_A.weight"]
        _, b_shape = shapes[f"{PEFT_PREFIX}{module}.lora_B.weight"]
        total += int(rank) * (a_shape[1] + b_shape[0]) * 4
    saved = tuple(plan["modules_to_save"])
    for key, (dtype, shape) in shapes.items():
        name = key.removeprefix(PEFT_PREFIX)
        if ".lora_" in name or name.rsplit(".", 1)[0] not in saved:
            continue
        total += math.prod(shape) * DTYPE_BYTES[dtype]
    return total


def load_throughput(path: Path) -> list[dict[str, Any]] | None:
    """Rows of bench/upload_throughput.py's results, or None when it has not been run."""
    if not path.is_file():
        return None
    rows: list[dict[str, Any]] = json.loads(path.read_text())["rows"]
    return rows


def nearest(rows: list[dict[str, Any]], nbytes: int) -> dict[str, Any]:
    """The measured row whose payload size is nearest on a log scale."""
    return min(rows, key=lambda row: abs(math.log(row["bytes"] / max(nbytes, 1))))


def aggregation_seconds(log_path: Path) -> dict[int, float]:
    """Round -> seconds from the coordinator log's "aggregated" line: strategy + checkpoint write."""
    if not log_path.is_file():
        return {}
    found: dict[int, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        match = AGGREGATED.search(line)
        if match:
            found[int(match.group(1))] = float(match.group(2))
    return found


def analyze(run_dir: Path, throughput: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """One row per aggregated round."""
    aggregation = aggregation_seconds(run_dir / "logs" / "coordinator.log")
    rows: list[dict[str, Any]] = []
    for line in (run_dir / "rounds.jsonl").read_text().splitlines():
        record = json.loads(line)
        round_ = int(record["round"])
        if round_ == 0 or not record["agents"]:
            continue  # round 0 only evaluates the initial adapter; an empty round aggregated nothing
        round_dir = run_dir / "rounds" / f"{round_:04d}"
        plans = json.loads((round_dir / "plans.json").read_text())
        shapes = tensor_header(round_dir / "adapter_model.safetensors")[0]
        agents: dict[str, dict[str, Any]] = {}
        for agent in record["agents"]:
            entry = plans[agent]
            nbytes = payload_bytes(entry["plan"], shapes)
            upload_s = download_s = 0.0
            measured_at = None
            if throughput:
                row = nearest(throughput, nbytes)
                upload_s = nbytes / (row["upload_mbps"] * 1e6)
                download_s = nbytes / (row["download_mbps"] * 1e6)
                measured_at = row["bytes"]
            measured = entry["measured"]
            agents[agent] = {
                "train_seconds": float(measured["train_seconds"]),
                "steps": int(measured["steps"]),
                "samples": int(measured["samples"]),
                "payload_bytes": nbytes,
                "upload_seconds_est": upload_s,
                "download_seconds_est": download_s,
                "throughput_measured_at_bytes": measured_at,
            }
        slowest = max(
            agents,
            key=lambda a: (
                agents[a]["train_seconds"] + agents[a]["upload_seconds_est"] + agents[a]["download_seconds_est"]
            ),
        )
        s = agents[slowest]
        transfer = s["upload_seconds_est"] + s["download_seconds_est"]
        work = s["train_seconds"] + transfer
        wall = float(record["seconds"])
        rows.append(
            {
                "round": round_,
                "wall_seconds": wall,
                "slowest_agent": slowest,
                "slowest_train_seconds": s["train_seconds"],
                "slowest_transfer_seconds_est": transfer,
                "work_seconds": work,
                "overhead_ratio": wall / work,
                "overhead_seconds": wall - work,
                "aggregate_and_checkpoint_seconds": aggregation.get(round_),
                "agents": agents,
            }
        )
    return rows


def main() -> int:
    """Run the federation (unless --analyze-only), print the table and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "bench-round-overhead")
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-samples", type=int, default=300, help="cap on each agent's shard")
    parser.add_argument("--eval-samples", type=int, default=300, help="held-out samples the coordinator scores")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--throughput", type=Path, default=RESULTS / "upload_throughput.json")
    parser.add_argument("--analyze-only", action="store_true", help="read an existing --run-dir, run nothing")
    parser.add_argument("--output", type=Path, default=RESULTS / "round_overhead.json")
    args = parser.parse_args()
    config = federation_config(args.agents, args.rounds, args.max_samples, args.eval_samples)
    if not args.analyze_only:
        run_config(config, args.run_dir, args.timeout)
    throughput = load_throughput(args.throughput)
    if throughput is None:
        print(f"note: {args.throughput} not found; transfer time counts as 0 (run bench/upload_throughput.py)")
    rows = analyze(args.run_dir, throughput)
    if not rows:
        raise SystemExit(f"no aggregated round in {args.run_dir / 'rounds.jsonl'}")
    print(
        f"{'round':>5} {'wall s':>7} {'slowest':>9} {'train s':>8} {'xfer ms':>8} {'ratio':>6} "
        f"{'overhead s':>10} {'aggr+ckpt s':>11} {'payload KB':>10}"
    )
    for row in rows:
        aggr = row["aggregate_and_checkpoint_seconds"]
        payload = row["agents"][row["slowest_agent"]]["payload_bytes"]
        print(
            f"{row['round']:>5} {row['wall_seconds']:>7.2f} {row['slowest_agent']:>9} "
            f"{row['slowest_train_seconds']:>8.2f} {row['slowest_transfer_seconds_est'] * 1e3:>8.2f} "
            f"{row['overhead_ratio']:>6.3f} {row['overhead_seconds']:>10.2f} "
            f"{'-' if aggr is None else f'{aggr:.2f}':>11} {payload / 1e3:>10.1f}"
        )
    wall = sum(row["wall_seconds"] for row in rows)
    work = sum(row["work_seconds"] for row in rows)
    ratios = [row["overhead_ratio"] for row in rows]
    summary = {
        "rounds": len(rows),
        "mean_overhead_ratio": sum(ratios) / len(ratios),
        "min_overhead_ratio": min(ratios),
        "max_overhead_ratio": max(ratios),
        "pooled_overhead_ratio": wall / work,
        "mean_overhead_seconds": (wall - work) / len(rows),
    }
    print(
        f"overhead ratio: mean {summary['mean_overhead_ratio']:.3f} (min {summary['min_overhead_ratio']:.3f}, "
        f"max {summary['max_overhead_ratio']:.3f}); {summary['mean_overhead_seconds']:.2f}s per round beyond "
        "the slowest agent's training and transfer"
    )
    result = {
        "benchmark": "round_overhead",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "definition": "round wall seconds / (slowest agent's train_seconds + its estimated upload + download)",
        "transfer": (
            f"payload bytes / loopback gRPC throughput from {args.throughput} at the nearest measured size"
            if throughput
            else "not included (no upload_throughput results)"
        ),
        "run_dir": str(args.run_dir),
        "config": config,
        "machine": machine(),
        "summary": summary,
        "rows": rows,
    }
    write_result(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

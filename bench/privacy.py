"""What privacy costs: accuracy under client-level DP (`--part dp`), seconds and bytes under secure aggregation
(`--part secagg`).

DP settings (fixed before the first run):

* `fedpipe-coordinator simulate`: 50 virtual agents drawn by the simulator's defaults (simulation.seed = the run
  seed), 10 of them sampled per round (sampling rate 0.2), 6 rounds of at most 5 local steps, MiniLM-L6 with
  LoRA on every candidate's default (selection.mode all), the fedpipe planner, strategy slot-average (the
  first launch named fedavg, which refuses the planner's unequal ranks; changed before any run had a result),
  the 1,000 embedded held-out tweets;
* DP arms: privacy.dp with clip_norm 1.0 (chosen before any run, from no measurement), delta 1e-5, the noise
  multiplier derived for target epsilon 1, 3 and 8 over the 6 rounds; the no-DP arm is the same run without
  privacy.dp (sample-weighted slot-average, relative norm screening on, as a user would run it);
* seeds 1-3.

Per run: held-out accuracy per round and at the end, epsilon spent, noise multiplier, wall seconds. The first
launch derived the noise from the sampling rate at registration's end, a bug fixed before any result was used
(coordinator.orchestrator now derives it at round 1).

Secure aggregation settings (fixed before the first run): `simulate` with real training, 3, 10 and 50 virtual
agents, all of them training each round, 2 rounds of at most 5 local steps, MiniLM-L6 with LoRA on every
candidate, the fedpipe planner, strategy slot-average, no evaluation; arms plain and
privacy.secure_aggregation (its defaults: neighbours about 3 log2 n, threshold floor(k/2) + 1, 24 fraction bits,
no clip); seed 1. Per run: seconds per round, the coordinator's secure-step times from its log, and the bytes an
agent sends and receives per round, from the protobuf messages of each step at the run's sizes.

Runs finished before are kept (runs/privacy/*/bench.json) unless `--fresh`. Run it from a copy of the tree.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import ROOT, kept_run, machine, write_result

RUNS = ROOT / "runs" / "privacy"
RESULT = ROOT / "bench" / "results" / "privacy.json"
ARMS: dict[str, float | None] = {"no-dp": None, "epsilon-8": 8.0, "epsilon-3": 3.0, "epsilon-1": 1.0}
AGENTS, SAMPLED, ROUNDS, STEPS, CLIP = 50, 10, 6, 5, 1.0


def command(arm: str, seed: int, run_dir: Path) -> list[str]:
    """The simulate command line of one run."""
    line = [
        sys.executable, "-m", "coordinator.cli", "simulate", "--agents", str(AGENTS),
        "--simulation.seed", str(seed), "--run.seed", str(seed), "--run.rounds", str(ROUNDS),
        "--run.min-agents", str(SAMPLED), "--run.sample-count", str(SAMPLED), "--run.run-dir", str(run_dir),
        "--run.round-deadline-s", "3600", "--training.max-steps", str(STEPS), "--strategy", "slot-average",
        "--selection.mode", "all", "--evaluation.heldout", "embedded", "--no-evaluation.agents",
        "--metrics.port", "-1",
    ]  # fmt: skip
    target = ARMS[arm]
    if target is not None:
        line += [
            "--privacy.dp.enabled",
            "--privacy.dp.clip-norm",
            str(CLIP),
            "--privacy.dp.target-epsilon",
            str(target),
        ]
    return line


def simulate(line: list[str], run_dir: Path) -> tuple[dict[str, Any], str, float]:
    """Run one simulate command line into run_dir: its summary, its log and its wall seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(line), flush=True)
    start = time.monotonic()
    with (run_dir / "simulate.log").open("w") as log:
        subprocess.run(line, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.monotonic() - start
    return json.loads((run_dir / "summary.json").read_text()), (run_dir / "simulate.log").read_text(), wall


def run_one(arm: str, seed: int) -> dict[str, Any]:
    """One simulated run and its figures."""
    run_dir = RUNS / f"{arm}-seed{seed}"
    summary, _, wall = simulate(command(arm, seed, run_dir), run_dir)
    privacy = summary.get("privacy") or {}
    return {
        "arm": arm,
        "seed": seed,
        "final_accuracy": summary["final_accuracy"],
        "accuracy_per_round": [(r.get("heldout") or {}).get("accuracy") for r in summary["rounds"]],
        "epsilon": privacy.get("epsilon"),
        "noise_multiplier": privacy.get("noise_multiplier"),
        "wall_s": wall,
    }


SECURE_SIZES = (3, 10, 50)
SECURE_RESULT = ROOT / "bench" / "results" / "secure_aggregation.json"


def secure_command(agents: int, secure: bool, run_dir: Path) -> list[str]:
    """The simulate command line of one secure-aggregation timing run."""
    line = [
        sys.executable, "-m", "coordinator.cli", "simulate", "--agents", str(agents), "--simulation.seed", "1",
        "--run.seed", "1", "--run.rounds", "2", "--run.min-agents", str(agents), "--run.run-dir", str(run_dir),
        "--run.round-deadline-s", "3600", "--training.max-steps", str(STEPS), "--strategy", "slot-average",
        "--selection.mode", "all", "--no-evaluation.agents", "--no-evaluation.initial", "--metrics.port", "-1",
    ]  # fmt: skip
    # Virtual agents hold no certificates: unsigned keys (signing and checking k of them costs an agent ~k ms).
    return line + (
        ["--privacy.secure-aggregation.enabled", "--no-privacy.secure-aggregation.signed-keys"] if secure else []
    )


def step_bytes(agents: int, length: int) -> dict[str, int]:
    """Bytes one agent sends and receives in a secure round's key, share and unmask steps (protobuf sizes)."""
    from fedpipe.v1 import fedpipe_pb2 as pb

    from common import serde
    from common.secagg import SEALED_BYTES, SHARE_BYTES, default_neighbours
    from common.types import SecAggStep, Task, TaskKind

    k = default_neighbours(agents)
    ids = [f"sim-{i:04d}" for i in range(1, agents + 1)]
    peers = ids[1 : k + 1]
    keys = pb.AdvertiseKeysRequest(
        agent_id=ids[0], round=1, plan_id="p" * 16, keys=pb.PeerKeys(share_key=bytes(32), mask_key=bytes(32))
    )
    share = pb.ShareKeysRequest(agent_id=ids[0], round=1, sealed={p: bytes(SEALED_BYTES) for p in peers})
    unmask = serde.revealed_to_pb(ids[0], 1, {p: ("seed", 1 << (8 * SHARE_BYTES - 9)) for p in peers})
    share_task = serde.task_to_pb(
        Task(
            TaskKind.SECAGG_SHARE,
            1,
            secagg=SecAggStep(
                participants=tuple(ids),
                neighbours=k,
                threshold=k // 2 + 1,
                keys={p: (bytes(32), bytes(32)) for p in peers},
            ),
        )
    )
    mask_task = serde.task_to_pb(
        Task(TaskKind.SECAGG_MASK, 1, secagg=SecAggStep(sealed={p: bytes(SEALED_BYTES) for p in peers}))
    )
    unmask_task = serde.task_to_pb(Task(TaskKind.SECAGG_UNMASK, 1, secagg=SecAggStep(survivors=tuple(ids))))
    sent = keys.ByteSize() + share.ByteSize() + unmask.ByteSize()
    received = share_task.ByteSize() + mask_task.ByteSize() + unmask_task.ByteSize()
    return {
        "neighbours": k,
        "key_steps_sent": sent,
        "key_steps_received": received,
        "masked_upload": 8 * length,  # int64 mod 2^62
        "plain_upload_at_layout": 4 * length,  # the same values as float32 (equal ranks: the plain upload)
    }


def secure_one(agents: int, secure: bool) -> dict[str, Any]:
    """One timing run."""
    run_dir = RUNS / f"secagg-{agents}-{'secure' if secure else 'plain'}"
    summary, text, wall = simulate(secure_command(agents, secure, run_dir), run_dir)
    lengths = [int(m) for m in re.findall(r"masked update sent \((\d+) values\)", text)]
    steps = [
        [float(x) for x in m]
        for m in re.findall(
            r"shares ([\d.]+)s, masked uploads ([\d.]+)s, unmask shares ([\d.]+)s, unmasking ([\d.]+)s", text
        )
    ]
    record: dict[str, Any] = {
        "agents": agents,
        "secure": secure,
        "round_seconds": [r["seconds"] for r in summary["rounds"] if r["round"] > 0],
        "failures": [r["failure"] for r in summary["rounds"] if r["failure"]],
        "wall_s": wall,
    }
    if secure and lengths:
        record["layout_values"] = lengths[0]
        record["step_seconds"] = steps
        record["bytes"] = step_bytes(agents, lengths[0])
    return record


def secure_main(fresh: bool) -> None:
    runs = []
    for agents in SECURE_SIZES:
        for secure in (False, True):
            name = f"secagg-{agents}-{'secure' if secure else 'plain'}"
            runs.append(kept_run(RUNS / name, fresh, functools.partial(secure_one, agents, secure)))
            write_result(SECURE_RESULT, {"machine": machine(), "settings": __doc__, "runs": runs})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("dp", "secagg"), default="dp")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    if args.part == "secagg":
        secure_main(args.fresh)
        return
    runs: list[dict[str, Any]] = []
    for seed in range(1, args.seeds + 1):
        for arm in args.arms.split(","):
            runs.append(kept_run(RUNS / f"{arm}-seed{seed}", args.fresh, functools.partial(run_one, arm, seed)))
            arms = {}
            for name in ARMS:
                accuracies = [r["final_accuracy"] for r in runs if r["arm"] == name]
                if accuracies:
                    arms[name] = {
                        "mean": statistics.mean(accuracies),
                        "sd": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                        "seeds": len(accuracies),
                    }
            write_result(RESULT, {"machine": machine(), "settings": __doc__, "arms": arms, "runs": runs})


if __name__ == "__main__":
    main()

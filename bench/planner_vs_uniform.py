"""FedPipe planner vs a uniform configuration on 4 heterogeneous agents (the paper's comparison, small scale).

Two federations run one after the other through `deploy/local_federation.py`, on the embedded task
(MiniLM-L6, tweets, classifier head trained in full), with everything equal but the planner:

* 4 agents, 1 torch thread each, 400 embedded tweets per agent (360 train / 40 validation), Dirichlet label
  skew 1.0, agents' `data.seed` 0 (identical shards in both runs), coordinator `run.seed` 0;
* caps: agent-1 compute_share 1.0 and no memory cap, agent-2 0.6 / 3 GiB, agent-3 0.4 / 1.5 GiB,
  agent-4 0.25 / 1 GiB (a 4x compute spread, unequal memory);
* selection.mode importance, budget 0.34, probe_steps 10; lora.rank 8, alpha 16; learning rate 1e-3,
  max_seq_len 64; held-out evaluation on the first 500 of the 1,000 embedded held-out tweets.

Variants:

* fedpipe: `planner: fedpipe`, planning.max_under_training 0.2, planning.max_local_epochs 2, 6 rounds;
* uniform: `planner: uniform`, batch 8, quantization none, 1 local epoch, 4 rounds. Sized to fit the
  weakest agent (1 GiB): the analysis checks that every agent's measured peak stayed under its cap;
* uniform-long (supplementary, only with --variants): the uniform arm continued to 8 rounds.

From each run directory: `rounds.jsonl` (per-round `seconds`, held-out accuracy), `rounds/NNNN/plans.json`
(per agent: predicted and measured peak memory, measured train seconds) and `logs/coordinator.log`
(HH:MM:SS timestamps: the run's clock from the first agent registration, through the probe, each round
and each evaluation).

To keep concurrent edits of the production code out of the runs, the federations run from a frozen copy of
the repository's git HEAD (`git archive` into /tmp, `PYTHONPATH` and the working directory pointing there);
`--code-root` runs them from another tree instead. `--analyze-only` re-reads existing run directories.
Writes bench/results/planner_vs_uniform.json. `--seed N` sets run.seed and the agents' data.seed of both arms
(other shards, round-0 adapter, probe and data order) and writes planner_vs_uniform_seedN.json;
`--summarize-seeds 1 2 3` puts those side by side in planner_vs_uniform_seeds.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from harness import Variant, machine, merge, run_federation, write_result

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TARGET_ACCURACY = 0.85
LOG_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d) coordinator INFO (.*)$")
ROUND_DONE = re.compile(r"^round (\d+)/\d+ \| ")
AGENT_CAPS: dict[str, dict[str, Any]] = {
    "agent-1": {"compute_share": 1.0},
    "agent-2": {"compute_share": 0.6, "memory_limit": "3GiB"},
    "agent-3": {"compute_share": 0.4, "memory_limit": "1.5GiB"},
    "agent-4": {"compute_share": 0.25, "memory_limit": "1GiB"},
}
GIB = 2**30
CAP_BYTES = {"agent-1": 0, "agent-2": 3 * GIB, "agent-3": int(1.5 * GIB), "agent-4": GIB}


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "fedpipe",
            "fedpipe planner, max_under_training 0.2, max_local_epochs 2, 6 rounds",
            {
                "planner": "fedpipe",
                "run": {"rounds": 6},
                "planning": {"max_under_training": 0.2, "max_local_epochs": 2},
            },
        ),
        Variant(
            "uniform",
            "uniform planner, batch 8, no quantization, 1 local epoch, 4 rounds (sized for the 1 GiB agent)",
            {
                "planner": "uniform",
                "run": {"rounds": 4},
                "training": {"batch_size": 8, "quantization": "none", "local_epochs": 1},
            },
        ),
        Variant(
            "uniform-long",
            "supplementary: the uniform arm continued to 8 rounds, to see when (if) it reaches the target",
            {
                "planner": "uniform",
                "run": {"rounds": 8},
                "training": {"batch_size": 8, "quantization": "none", "local_epochs": 1},
            },
        ),
    )
}
DEFAULT_VARIANTS = ["fedpipe", "uniform"]


def base_config(run_dir: Path, seed: int = 0) -> dict[str, Any]:
    """What both arms share (a local_federation.py spec); seed is both run.seed and the agents' data.seed."""
    return {
        "coordinator": {
            "run": {
                "min_agents": 4,
                "seed": seed,
                "run_dir": str(run_dir),
                "round_deadline_s": 300,
                "registration_timeout_s": 180,
            },
            "lora": {"rank": 8, "alpha": 16, "targets": ["all"]},
            "selection": {"mode": "importance", "budget": 0.34, "probe_steps": 10},
            "training": {"learning_rate": 0.001, "max_seq_len": 64},
            "evaluation": {"heldout": "embedded", "max_samples": 500},
        },
        "agents": {
            "count": len(AGENT_CAPS),
            "config": {
                "threads": 1,
                "data": {"path": "embedded", "max_samples": 400, "label_skew": 1.0, "val_fraction": 0.1, "seed": seed},
            },
            "overrides": copy.deepcopy(AGENT_CAPS),
        },
    }


def federation_config(variant: Variant, run_dir: Path, seed: int = 0) -> dict[str, Any]:
    """The shared base with the variant's coordinator keys."""
    base = base_config(run_dir, seed)
    return merge(base, {"coordinator": variant.coordinator})


def frozen_copy(dest_root: Path) -> Path:
    """`git archive HEAD` of this repository into dest_root/fedpipe-pvu-<sha>; the copy's path."""
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    dest = dest_root / f"fedpipe-pvu-{head}"
    if not (dest / "deploy" / "local_federation.py").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def log_events(log_path: Path) -> list[tuple[float, str]]:
    """(seconds since the first timestamped coordinator line, message) for every INFO line (1 s resolution)."""
    events: list[tuple[float, str]] = []
    first: float | None = None
    previous = 0.0
    day = 0.0
    for line in log_path.read_text(errors="replace").splitlines():
        match = LOG_LINE.match(line)
        if not match:
            continue
        hours, minutes, seconds = (int(g) for g in match.groups()[:3])
        stamp = timedelta(hours=hours, minutes=minutes, seconds=seconds).total_seconds() + day
        if stamp < previous:  # across midnight
            day += 86_400
            stamp += 86_400
        previous = stamp
        if first is None:
            first = stamp
        events.append((stamp - first, match.group(4)))
    return events


def log_clock(events: list[tuple[float, str]]) -> dict[str, Any]:
    """Elapsed seconds on the coordinator's clock, from the last agent registration (the federation is
    complete) to the probe's end and to each round's summary line (after its evaluation)."""
    registered = [t for t, message in events if " registered: " in message]
    start = max(registered) if registered else 0.0
    probe_end = next((t for t, message in events if message.startswith("selection: ")), None)
    rounds: dict[int, float] = {}
    for t, message in events:
        match = ROUND_DONE.match(message)
        if match:
            rounds[int(match.group(1))] = t - start
    return {
        "start_event": "last agent registered",
        "probe_done_seconds": None if probe_end is None else probe_end - start,
        "round_done_seconds": rounds,
    }


def analyze_run(run_dir: Path) -> dict[str, Any]:
    """Per-round timings, held-out accuracy, straggler idle time and memory of one finished run."""
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    config = json.loads((run_dir / "config.json").read_text())
    clock = log_clock(log_events(run_dir / "logs" / "coordinator.log"))
    round0 = next((r for r in records if int(r["round"]) == 0), None)
    rounds: list[dict[str, Any]] = []
    memory: dict[str, list[dict[str, Any]]] = {}
    cumulative = 0.0
    for record in records:
        number = int(record["round"])
        if number == 0 or not record["agents"]:
            continue
        plans = json.loads((run_dir / "rounds" / f"{number:04d}" / "plans.json").read_text())
        seconds = float(record["seconds"])
        cumulative += seconds
        train = {a: float(plans[a]["measured"]["train_seconds"]) for a in record["agents"]}
        slowest = max(train.values())
        agents: dict[str, Any] = {}
        for agent in sorted(record["agents"]):
            entry = plans[agent]
            plan, predicted, measured = entry["plan"], entry["predicted"], entry["measured"]
            planned_peak = int(predicted["peak_memory_bytes"])
            measured_peak = int(measured["peak_memory_bytes"])
            agents[agent] = {
                "batch_size": int(plan["batch_size"]),
                "local_epochs": int(plan["local_epochs"]),
                "max_steps": int(plan["max_steps"]),
                "ranks": sorted({int(r) for r in plan["rank_pattern"].values()}),
                "modules": len(plan["target_modules"]),
                "quantization": plan["quantization"],
                "samples": int(measured["samples"]),
                "steps": int(measured["steps"]),
                "predicted_train_seconds": float(predicted["steps"]) * float(predicted["step_seconds"]),
                "train_seconds": train[agent],
                "idle_vs_round_seconds": seconds - train[agent],
                "idle_vs_slowest_seconds": slowest - train[agent],
                "planned_peak_bytes": planned_peak,
                "measured_peak_bytes": measured_peak,
                "peak_relative_error": (planned_peak - measured_peak) / measured_peak,
                "cap_bytes": CAP_BYTES.get(agent, 0),
                "within_cap": CAP_BYTES.get(agent, 0) <= 0 or measured_peak <= CAP_BYTES[agent],
            }
            memory.setdefault(agent, []).append({"round": number, **agents[agent]})
        held = record.get("heldout") or {}
        rounds.append(
            {
                "round": number,
                "seconds": seconds,
                "cumulative_round_seconds": cumulative,
                "log_elapsed_seconds": clock["round_done_seconds"].get(number),
                "heldout_accuracy": held.get("accuracy"),
                "slowest_train_seconds": slowest,
                "straggler_idle_vs_round_seconds": sum(a["idle_vs_round_seconds"] for a in agents.values()),
                "straggler_idle_vs_slowest_seconds": sum(a["idle_vs_slowest_seconds"] for a in agents.values()),
                "agents": agents,
            }
        )
    if not rounds:
        raise ValueError(f"no trained round in {run_dir / 'rounds.jsonl'}")
    per_agent_memory = {
        agent: {
            "planned_peak_bytes": [e["planned_peak_bytes"] for e in entries],
            "measured_peak_bytes": [e["measured_peak_bytes"] for e in entries],
            "relative_error": [e["peak_relative_error"] for e in entries],
            "max_abs_relative_error": max(abs(e["peak_relative_error"]) for e in entries),
            "last_round_relative_error": entries[-1]["peak_relative_error"],
            "cap_bytes": CAP_BYTES.get(agent, 0),
            "max_measured_peak_bytes": max(e["measured_peak_bytes"] for e in entries),
            "all_within_cap": all(e["within_cap"] for e in entries),
        }
        for agent, entries in sorted(memory.items())
    }
    wall_path = run_dir / "bench_wall.json"
    return {
        "run_dir": str(run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir),
        "planner": config.get("planner"),
        "round0_accuracy": (round0 or {}).get("heldout", {}).get("accuracy") if round0 else None,
        "probe_done_seconds": clock["probe_done_seconds"],
        "rounds": rounds,
        "final_accuracy": rounds[-1]["heldout_accuracy"],
        "total_round_seconds": rounds[-1]["cumulative_round_seconds"],
        "total_log_seconds": rounds[-1]["log_elapsed_seconds"],
        "mean_straggler_idle_vs_round_seconds": statistics.fmean(r["straggler_idle_vs_round_seconds"] for r in rounds),
        "mean_straggler_idle_vs_slowest_seconds": statistics.fmean(
            r["straggler_idle_vs_slowest_seconds"] for r in rounds
        ),
        "mean_round_seconds": statistics.fmean(r["seconds"] for r in rounds),
        "memory": per_agent_memory,
        "bench_wall": json.loads(wall_path.read_text()) if wall_path.is_file() else None,
    }


def time_to(run: dict[str, Any], clock: str, target: float) -> float | None:
    """Elapsed seconds (clock: 'cumulative_round_seconds' or 'log_elapsed_seconds') at the first round whose
    held-out accuracy reaches target; None if no round does."""
    for entry in run["rounds"]:
        if entry["heldout_accuracy"] is not None and entry["heldout_accuracy"] >= target:
            value = entry[clock]
            return None if value is None else float(value)
    return None


def accuracy_at(run: dict[str, Any], clock: str, budget: float) -> tuple[float | None, int]:
    """Held-out accuracy of the last round completed within `budget` seconds on `clock` (round 0 if none)."""
    accuracy, number = run["round0_accuracy"], 0
    for entry in run["rounds"]:
        value = entry[clock]
        if value is not None and value <= budget + 1e-9:
            accuracy, number = entry["heldout_accuracy"], entry["round"]
    return accuracy, number


def compare(runs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The issue's two targets, on both clocks (None unless both arms ran)."""
    if "fedpipe" not in runs or "uniform" not in runs:
        return None
    fed, uni = runs["fedpipe"], runs["uniform"]
    out: dict[str, Any] = {}
    for clock, total in (
        ("cumulative_round_seconds", "total_round_seconds"),
        ("log_elapsed_seconds", "total_log_seconds"),
    ):
        t_fed, t_uni = time_to(fed, clock, TARGET_ACCURACY), time_to(uni, clock, TARGET_ACCURACY)
        budget = float(uni[total])
        acc, number = accuracy_at(fed, clock, budget)
        out[clock] = {
            "fedpipe_time_to_target_seconds": t_fed,
            "uniform_time_to_target_seconds": t_uni,
            "ratio": None if t_fed is None or t_uni is None else t_fed / t_uni,
            "at_most_half": None if t_fed is None or t_uni is None else t_fed <= 0.5 * t_uni,
            "uniform_total_seconds": budget,
            "uniform_final_accuracy": uni["final_accuracy"],
            "fedpipe_accuracy_at_uniform_total": acc,
            "fedpipe_round_at_uniform_total": number,
        }
        if "uniform-long" in runs:  # supplementary: the uniform arm run on past its 4 rounds
            t_long = time_to(runs["uniform-long"], clock, TARGET_ACCURACY)
            out[clock]["uniform_long_time_to_target_seconds"] = t_long
            out[clock]["uniform_long_rounds"] = len(runs["uniform-long"]["rounds"])
            out[clock]["ratio_vs_uniform_long"] = None if t_fed is None or t_long is None else t_fed / t_long
    out["threshold_sensitivity"] = {  # the 0.85 target sits near the uniform arm's plateau: other thresholds
        f"{threshold:.2f}": {
            name: {
                clock: time_to(run, clock, threshold) for clock in ("cumulative_round_seconds", "log_elapsed_seconds")
            }
            for name, run in runs.items()
        }
        for threshold in (0.80, 0.83, 0.85)
    }
    errors = [abs(e) for e in (m["last_round_relative_error"] for m in fed["memory"].values())]
    all_errors = [e for m in fed["memory"].values() for e in (abs(x) for x in m["relative_error"])]
    out["memory"] = {
        "fedpipe_max_abs_relative_error_last_round": max(errors),
        "fedpipe_max_abs_relative_error_any_round": max(all_errors),
        "within_10_percent_last_round": max(errors) <= 0.10,
        "within_10_percent_every_round": max(all_errors) <= 0.10,
        "uniform_fits_every_cap": all(m["all_within_cap"] for m in uni["memory"].values()),
        "fedpipe_fits_every_cap": all(m["all_within_cap"] for m in fed["memory"].values()),
    }
    return out


def fmt(value: float | None, spec: str = ".1f") -> str:
    """A number (spec: a format spec, optionally followed by ' unit'), or 'not reached' for None."""
    if value is None:
        return "not reached"
    number, _, unit = spec.partition(" ")
    return format(value, number) + (f" {unit}" if unit else "")


def print_tables(runs: dict[str, dict[str, Any]], checked: dict[str, Any] | None) -> None:
    """Per-round and per-agent tables on stdout."""
    for name, run in runs.items():
        print(
            f"\n{name}: round-0 held-out {fmt(run['round0_accuracy'], '.3f')}, probe done at "
            f"{fmt(run['probe_done_seconds'])} s after the last registration"
        )
        print(
            f"{'round':>5} {'s':>6} {'cum s':>7} {'log s':>6} {'acc':>6} {'idle/round':>10} {'idle/slowest':>12}  "
            "per agent: train s (batch x epochs, rank, measured steps)"
        )
        for r in run["rounds"]:
            per_agent = ", ".join(
                f"{a[-1]}: {v['train_seconds']:.1f} ({v['batch_size']}x{v['local_epochs']}, "
                f"r{'/'.join(map(str, v['ranks']))}, {v['steps']} steps)"
                for a, v in r["agents"].items()
            )
            print(
                f"{r['round']:>5} {r['seconds']:>6.1f} {r['cumulative_round_seconds']:>7.1f} "
                f"{fmt(r['log_elapsed_seconds'], '.0f'):>6} {fmt(r['heldout_accuracy'], '.3f'):>6} "
                f"{r['straggler_idle_vs_round_seconds']:>10.1f} "
                f"{r['straggler_idle_vs_slowest_seconds']:>12.1f}  {per_agent}"
            )
        print(
            f"{'agent':<8} {'cap':>8} {'planned MiB (per round)':<40} {'measured MiB':<40} "
            f"{'max |err|':>9} {'last err':>9}"
        )
        for agent, m in run["memory"].items():
            planned = "/".join(f"{b / 2**20:.0f}" for b in m["planned_peak_bytes"])
            measured = "/".join(f"{b / 2**20:.0f}" for b in m["measured_peak_bytes"])
            cap = f"{m['cap_bytes'] / 2**30:.1f}GiB" if m["cap_bytes"] else "none"
            print(
                f"{agent:<8} {cap:>8} {planned:<40} {measured:<40} {m['max_abs_relative_error']:>9.1%} "
                f"{m['last_round_relative_error']:>+9.1%}"
            )
    if checked is None:
        return
    print()
    for clock in ("cumulative_round_seconds", "log_elapsed_seconds"):
        c = checked[clock]
        print(
            f"[{clock}] time to {TARGET_ACCURACY}: fedpipe {fmt(c['fedpipe_time_to_target_seconds'], '.1f s')}, "
            "uniform "
            f"{fmt(c['uniform_time_to_target_seconds'], '.1f s')}, ratio {fmt(c['ratio'], '.2f')} "
            f"(<= 0.5: {c['at_most_half']}); at uniform's total {c['uniform_total_seconds']:.0f} s: "
            f"fedpipe {fmt(c['fedpipe_accuracy_at_uniform_total'], '.3f')} "
            f"(round {c['fedpipe_round_at_uniform_total']}) vs uniform {fmt(c['uniform_final_accuracy'], '.3f')}"
        )
        if "uniform_long_rounds" in c:
            print(
                f"[{clock}] uniform continued to {c['uniform_long_rounds']} rounds: time to {TARGET_ACCURACY} "
                f"{fmt(c['uniform_long_time_to_target_seconds'], '.1f s')}, fedpipe / that "
                f"{fmt(c['ratio_vs_uniform_long'], '.2f')}"
            )
    m = checked["memory"]
    print(
        f"fedpipe planned vs measured peak: max |error| {m['fedpipe_max_abs_relative_error_any_round']:.1%} over all "
        f"rounds, {m['fedpipe_max_abs_relative_error_last_round']:.1%} in the last round (<= 10%: "
        f"{m['within_10_percent_every_round']} / {m['within_10_percent_last_round']}); uniform fits every cap: "
        f"{m['uniform_fits_every_cap']}; fedpipe fits every cap: {m['fedpipe_fits_every_cap']}"
    )


def summarize_seeds(seeds: list[int]) -> int:
    """Per seed: time to the target on both clocks and its ratio, final accuracies and the straggler wait; then
    the mean and spread of each over the seeds."""
    rows = []
    for seed in seeds:
        path = RESULTS / ("planner_vs_uniform.json" if seed == 0 else f"planner_vs_uniform_seed{seed}.json")
        result = json.loads(path.read_text())
        comparison = result["comparison"]
        row: dict[str, Any] = {"seed": seed, "code": result.get("code", {}).get("git_head")}
        for clock in ("cumulative_round_seconds", "log_elapsed_seconds"):
            c = comparison[clock]
            row[clock] = {k: c[k] for k in ("fedpipe_time_to_target_seconds", "uniform_time_to_target_seconds",
                                             "ratio", "at_most_half", "fedpipe_accuracy_at_uniform_total",
                                             "uniform_final_accuracy")}  # fmt: skip
        row["threshold_sensitivity"] = comparison["threshold_sensitivity"]
        row["final_accuracy"] = {name: run["final_accuracy"] for name, run in result["runs"].items()}
        row["memory"] = comparison["memory"]
        rows.append(row)
        rc = row["cumulative_round_seconds"]
        fed_t, uni_t = fmt(rc["fedpipe_time_to_target_seconds"]), fmt(rc["uniform_time_to_target_seconds"])
        print(f"seed {seed}: time to {TARGET_ACCURACY} (round clock) fedpipe {fed_t} s, uniform {uni_t} s, ratio "
              f"{fmt(rc['ratio'], '.2f')}; final accuracy {row['final_accuracy']}")  # fmt: skip
    summary: dict[str, Any] = {}
    for name in ("fedpipe", "uniform"):
        finals = [r["final_accuracy"][name] for r in rows if r["final_accuracy"].get(name) is not None]
        summary[f"{name}_final_accuracy_mean"] = statistics.mean(finals) if finals else None
        summary[f"{name}_final_accuracy_sd"] = statistics.stdev(finals) if len(finals) > 1 else None
    ratios = [r["cumulative_round_seconds"]["ratio"] for r in rows]
    summary["ratio_round_clock"] = ratios
    summary["at_most_half_in_every_seed"] = all(r is not None and r <= 0.5 for r in ratios)
    write_result(RESULTS / "planner_vs_uniform_seeds.json", {"benchmark": "planner_vs_uniform, seeds", "seeds": rows,
                 "summary": summary, "machine": machine()})  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


def git_head(root: Path) -> str | None:
    """git HEAD of root, or None outside git."""
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=False, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def main() -> int:
    """Run both arms (unless --analyze-only), print the tables and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "planner_vs_uniform", help="run directories")
    parser.add_argument("--code-root", type=Path, default=None, help="run this tree instead of a frozen git HEAD")
    parser.add_argument("--freeze-into", type=Path, default=Path("/tmp"), help="where the frozen copy goes")
    parser.add_argument("--timeout", type=float, default=900.0, help="per run")
    parser.add_argument("--analyze-only", action="store_true", help="re-read existing run directories, run nothing")
    parser.add_argument("--output", type=Path, default=None, help="default: results/planner_vs_uniform.json (seed 0), "
                        "results/planner_vs_uniform_seedN.json (seed N)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="run.seed and data.seed of both arms")
    parser.add_argument("--summarize-seeds", type=int, nargs="+", default=None,
                        help="run nothing: each seed's results side by side (_seeds.json)")  # fmt: skip
    args = parser.parse_args()
    if args.summarize_seeds:
        return summarize_seeds(args.summarize_seeds)
    if args.output is None:
        args.output = RESULTS / (
            "planner_vs_uniform.json" if args.seed == 0 else f"planner_vs_uniform_seed{args.seed}.json"
        )
    if args.seed and args.root == ROOT / "runs" / "planner_vs_uniform":
        args.root = args.root / f"seed-{args.seed}"
    root = args.root.resolve()
    failed: list[str] = []
    code: dict[str, Any] = {}
    if not args.analyze_only:
        code_root = args.code_root.resolve() if args.code_root else frozen_copy(args.freeze_into)
        code = {"root": str(code_root), "git_head": git_head(ROOT), "frozen": args.code_root is None}
        for name in args.variants:
            run_dir = root / name
            config_path = root / "configs" / f"{name}.yaml"
            config = federation_config(VARIANTS[name], run_dir, args.seed)
            config_path.parent.mkdir(parents=True, exist_ok=True)
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            started = datetime.now().astimezone().isoformat(timespec="seconds")
            try:
                wall = run_federation(config_path, run_dir, args.timeout, code_root)
            except RuntimeError as error:
                print(f"{name}: {error}", file=sys.stderr)
                failed.append(name)
                continue
            record = {"seconds": wall, "started": started, "load_average_before": load, "code": code}
            (run_dir / "bench_wall.json").write_text(json.dumps(record, indent=2) + "\n")
    runs: dict[str, dict[str, Any]] = {}
    configs: dict[str, Any] = {}
    missing: list[str] = []
    for name in args.variants:
        run_dir = root / name
        config_path = root / "configs" / f"{name}.yaml"
        if config_path.is_file():
            configs[name] = yaml.safe_load(config_path.read_text())
        if not (run_dir / "summary.json").is_file():
            missing.append(name)
            continue
        runs[name] = analyze_run(run_dir)
        if not code and runs[name]["bench_wall"]:
            code = runs[name]["bench_wall"].get("code", {})
    if not runs:
        raise SystemExit(f"no finished run under {root}")
    checked = compare(runs)
    print_tables(runs, checked)
    if missing:
        print(f"missing runs (no summary.json): {', '.join(missing)}", file=sys.stderr)
    result = {
        "benchmark": "planner_vs_uniform",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "target_accuracy": TARGET_ACCURACY,
        "definitions": {
            "cumulative_round_seconds": "sum of rounds.jsonl 'seconds' up to the round: round opening to the new "
            "global checkpointed (training, transfers, aggregation); excludes the probe, evaluation and start-up",
            "log_elapsed_seconds": "coordinator log (1 s resolution): from the last agent registration to the "
            "round's summary line, so it includes the importance probe, re-planning and every evaluation "
            "(held-out and agents' validation, round 0 included)",
            "time_to_target": "elapsed seconds at the end of the first round whose held-out accuracy >= "
            f"{TARGET_ACCURACY}",
            "accuracy_at_uniform_total": "held-out accuracy of the last fedpipe round completed within the "
            "uniform run's total on the same clock",
            "straggler_idle_vs_round_seconds": "sum over agents of (round seconds - agent train_seconds)",
            "straggler_idle_vs_slowest_seconds": "sum over agents of (slowest agent's train_seconds - agent's)",
            "peak_relative_error": "(planned - measured) / measured, from plans.json predicted/measured "
            "peak_memory_bytes (measured = the agent process's resident-set high-water mark during training)",
            "heldout": "first 500 of the 1,000 embedded held-out tweets (binomial SE about 1.6 points at 0.85)",
        },
        "code": code,
        "machine": machine(),
        "comparison": checked,
        "missing": missing,
        "failed": failed,
        "configs": configs,
        "runs": runs,
    }
    write_result(args.output, result)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

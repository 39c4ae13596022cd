"""Weight selection ablation on the embedded task: importance mask vs random mask vs all candidates.

Every run is `deploy/demo.yaml` (3 agents, 600 embedded tweets each, Dirichlet label skew 1.0, 5 rounds,
MiniLM-L6, classifier head trained in full, 1,000 held-out embedded tweets) with `planner: uniform` pinned
(every agent trains the same plan), the demo's per-agent caps dropped, and only these coordinator keys changed:

* importance:    selection.mode importance, budget 0.34, lora.rank 8, alpha 16 (the demo itself: the AdaLoRA
                 probe picks 8 of the 24 attention matrices, 49,152 LoRA parameters)
* random:        selection.mode random, budget 0.34, lora.rank 8, alpha 16 (8 matrices drawn from run.seed)
* all-low-rank:  selection.mode all, lora.rank 3, alpha 6 (24 matrices at rank 3 = 55,296 LoRA parameters,
                 the rank closest to the 49,152 budget; alpha/rank = 2 as at rank 8)
* all-same-rank: selection.mode all, lora.rank 8, alpha 16 (24 matrices, 147,456 LoRA parameters)

and `run.seed` (round-0 adapter, probe seed, random mask, per-agent dropout and data order) set to each seed.
The agents' `data.seed` stays 0, so every variant and seed trains on identical shards. Runs go one after
the other through `deploy/local_federation.py` into `runs/ablation/<variant>-s<seed>/`.

From each run directory:

* `summary.json`: final held-out accuracy; `rounds.jsonl`: per-round held-out accuracy and wall seconds
  (coordinator clock, round opening to the new global being checkpointed; evaluation is not in it);
* `rounds/NNNN/plans.json` + the header of `rounds/NNNN/adapter_model.safetensors`: each agent's plan
  (modules, ranks, saved heads) and the matrix shapes, giving trainable parameters
  (sum over modules of r * (d_in + d_out), plus the saved head tensors) and the float32 tensor bytes each
  agent uploads per round (what `common.adapters.expected_tensors` asks for; gRPC framing not counted);
* `selection/0000.json` (agents' probe seconds) and `logs/coordinator.log` (the probe's span on the
  coordinator, 1 s resolution): the importance probe runs once before round 1 and is reported apart.

`--analyze-only` re-reads existing run directories. Writes bench/results/selection_ablation.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
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

from coordinator.rundir import tensor_header

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEMO = ROOT / "deploy" / "demo.yaml"
PEFT_PREFIX = "base_model.model."
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
WIRE_BYTES = 4  # every uploaded tensor is float32 (common.adapters.expected_tensors)
LOG_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d) coordinator ")
PROBE_START = re.compile(r"probe \S+: scoring \d+ candidates")
PROBE_END = re.compile(r"selection: \d+ of \d+ matrices")


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "importance",
            "AdaLoRA probe, top matrices under budget 0.34 at rank 8 (the demo)",
            {"selection": {"mode": "importance", "budget": 0.34}, "lora": {"rank": 8, "alpha": 16}},
        ),
        Variant(
            "random",
            "seeded random mask under budget 0.34 at rank 8",
            {"selection": {"mode": "random", "budget": 0.34}, "lora": {"rank": 8, "alpha": 16}},
        ),
        Variant(
            "all-low-rank",
            "all 24 candidates at rank 3, alpha 6 (closest rank to the budget)",
            {"selection": {"mode": "all"}, "lora": {"rank": 3, "alpha": 6}},
        ),
        Variant(
            "all-same-rank",
            "all 24 candidates at rank 8, alpha 16",
            {"selection": {"mode": "all"}, "lora": {"rank": 8, "alpha": 16}},
        ),
    )
}


def run_name(variant: str, seed: int) -> str:
    """Directory name of one run under the ablation root."""
    return f"{variant}-s{seed}"


def federation_config(demo: dict[str, Any], variant: Variant, seed: int, run_dir: Path) -> dict[str, Any]:
    """demo.yaml with the variant's coordinator keys, run.seed = seed and data.seed 0 on every agent.

    The planner is pinned to `uniform`: every agent gets the variant's rank, batch 16 and one epoch, so the
    trainable-parameter budget is the variant's and nothing else differs between arms. Per-agent overrides
    of the demo (emulated memory and compute caps) are dropped: the agents are alike, as in the demo this
    ablation was first run on.
    """
    override = merge(variant.coordinator, {"planner": "uniform", "run": {"seed": seed, "run_dir": str(run_dir)}})
    base = copy.deepcopy(demo)
    base.get("agents", {}).pop("overrides", None)
    config = merge(base, {"coordinator": override, "agents": {"config": {"data": {"seed": 0}}}})
    return config


def plan_parameters(plan: dict[str, Any], shapes: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[int, int]:
    """(LoRA parameters, head parameters) an agent trains and uploads under this plan.

    LoRA: r * (d_in + d_out) per module, d_in from A (r, d_in) and d_out from B (d_out, r) in the round's
    global adapter. Head: every tensor of the plan's modules_to_save (classifier weight and bias).
    """
    lora = 0
    for module, rank in plan["rank_pattern"].items():
        d_in = shapes[f"{PEFT_PREFIX}{module}.lora_A.weight"][1][1]
        d_out = shapes[f"{PEFT_PREFIX}{module}.lora_B.weight"][1][0]
        lora += int(rank) * (d_in + d_out)
    saved = set(plan["modules_to_save"])
    head = 0
    for key, (_, shape) in shapes.items():
        name = key.removeprefix(PEFT_PREFIX)
        if ".lora_" not in name and name.rsplit(".", 1)[0] in saved:
            head += math.prod(shape)
    return lora, head


def agent_train_seconds(entry: dict[str, Any]) -> float:
    """An agent's reported training seconds from a plans.json entry (under 'measured' in newer runs)."""
    measured: dict[str, Any] = entry.get("measured", entry)
    return float(measured["train_seconds"])


def clock_seconds(line: str) -> float | None:
    """Seconds since midnight of a coordinator log line (HH:MM:SS), or None."""
    match = LOG_TIME.match(line)
    if not match:
        return None
    hours, minutes, seconds = (int(g) for g in match.groups())
    return float(timedelta(hours=hours, minutes=minutes, seconds=seconds).total_seconds())


def probe_span_seconds(log_path: Path) -> float | None:
    """Coordinator-side probe time: from 'probe ...: scoring' to 'selection: ...' (1 s resolution)."""
    if not log_path.is_file():
        return None
    start = end = None
    for line in log_path.read_text(errors="replace").splitlines():
        if start is None and PROBE_START.search(line):
            start = clock_seconds(line)
        elif start is not None and PROBE_END.search(line):
            end = clock_seconds(line)
            break
    if start is None or end is None:
        return None
    return (end - start) % 86_400  # a run across midnight


def analyze_run(run_dir: Path) -> dict[str, Any]:
    """Figures of one finished run."""
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    curve = {int(r["round"]): float(r["heldout"]["accuracy"]) for r in records if r.get("heldout")}
    trained = [r for r in records if int(r["round"]) > 0 and r["agents"]]
    rounds: list[dict[str, Any]] = []
    trainable: set[tuple[int, int]] = set()
    masks: set[tuple[str, ...]] = set()
    ranks: set[int] = set()
    for record in trained:
        round_dir = run_dir / "rounds" / f"{int(record['round']):04d}"
        plans = json.loads((round_dir / "plans.json").read_text())
        shapes = tensor_header(round_dir / "adapter_model.safetensors")[0]
        upload = 0
        for agent in record["agents"]:
            plan = plans[agent]["plan"]
            lora, head = plan_parameters(plan, shapes)
            trainable.add((lora, head))
            masks.add(tuple(plan["target_modules"]))
            ranks.update(int(r) for r in plan["rank_pattern"].values())
            upload += (lora + head) * WIRE_BYTES
        rounds.append(
            {
                "round": int(record["round"]),
                "agents": len(record["agents"]),
                "seconds": float(record["seconds"]),
                "heldout_accuracy": curve.get(int(record["round"])),
                "upload_bytes": upload,
                "max_agent_train_seconds": max(agent_train_seconds(plans[a]) for a in record["agents"]),
            }
        )
    if not rounds:
        raise ValueError(f"no trained round in {run_dir / 'rounds.jsonl'}")
    if len(trainable) != 1 or len(masks) != 1:
        raise ValueError(f"{run_dir}: plans differ between agents or rounds ({sorted(trainable)})")
    (lora, head), (mask,) = next(iter(trainable)), masks
    probe: dict[str, Any] | None = None
    selection_path = run_dir / "selection" / "0000.json"
    if selection_path.is_file():
        selection = json.loads(selection_path.read_text())
        agent_seconds = [float(a["seconds"]) for a in selection["agents"].values()]
        probe = {
            "source": selection["probe"],
            "budget": int(selection["budget"]),
            "used": int(selection["used"]),
            "agent_seconds_max": max(agent_seconds) if agent_seconds else 0.0,
            "agent_seconds_mean": statistics.fmean(agent_seconds) if agent_seconds else 0.0,
            "coordinator_span_seconds": probe_span_seconds(run_dir / "logs" / "coordinator.log"),
        }
    config = json.loads((run_dir / "config.json").read_text())
    if config.get("planner", "uniform") != "uniform":
        raise ValueError(f"{run_dir}: planner {config['planner']!r}, not uniform: not a run of this ablation")
    wall_path = run_dir / "ablation_wall.json"
    wall = json.loads(wall_path.read_text()) if wall_path.is_file() else {}
    return {
        "run_dir": str(run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir),
        "planner": config.get("planner", "uniform"),
        "final_accuracy": float(summary["final_accuracy"]),
        "final_source": summary.get("final_source"),
        "best_accuracy": max(curve[r["round"]] for r in rounds if r["round"] in curve),
        "round0_accuracy": curve.get(0),
        "curve": [curve[k] for k in sorted(curve)],
        "lora_parameters": lora,
        "head_parameters": head,
        "trainable_parameters": lora + head,
        "modules": len(mask),
        "ranks": sorted(ranks),
        "mask": list(mask),
        "upload_bytes_per_agent": (lora + head) * WIRE_BYTES,
        "upload_bytes_per_round": statistics.fmean(r["upload_bytes"] for r in rounds),
        "seconds_per_round": statistics.fmean(r["seconds"] for r in rounds),
        "max_agent_train_seconds_per_round": statistics.fmean(r["max_agent_train_seconds"] for r in rounds),
        "probe": probe,
        "run_wall_seconds": wall.get("seconds"),
        "load_average_before": wall.get("load_average_before"),
        "rounds": rounds,
    }


def heldout_standard_error(accuracy: float, samples: int) -> float:
    """Binomial standard error of an accuracy measured on `samples` held-out examples."""
    return math.sqrt(accuracy * (1 - accuracy) / samples) if samples > 0 else float("nan")


def summarize(variant: Variant, runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per-variant figures over its seeds."""
    seeds = sorted(runs)
    finals = [runs[s]["final_accuracy"] for s in seeds]
    trainable = sorted({runs[s]["trainable_parameters"] for s in seeds})
    probes = [runs[s]["probe"] for s in seeds if runs[s]["probe"] and runs[s]["probe"]["agent_seconds_max"] > 0]
    spans = [p["coordinator_span_seconds"] for p in probes if p["coordinator_span_seconds"] is not None]
    return {
        "description": variant.description,
        "coordinator_overrides": variant.coordinator,
        "seeds": seeds,
        "final_accuracy_mean": statistics.fmean(finals),
        "final_accuracy": {str(s): runs[s]["final_accuracy"] for s in seeds},
        "best_accuracy_mean": statistics.fmean(runs[s]["best_accuracy"] for s in seeds),
        "best_accuracy": {str(s): runs[s]["best_accuracy"] for s in seeds},
        "lora_parameters": sorted({runs[s]["lora_parameters"] for s in seeds}),
        "head_parameters": sorted({runs[s]["head_parameters"] for s in seeds}),
        "trainable_parameters": trainable[0] if len(trainable) == 1 else trainable,
        "modules": sorted({runs[s]["modules"] for s in seeds}),
        "ranks": sorted({r for s in seeds for r in runs[s]["ranks"]}),
        "masks": {str(s): runs[s]["mask"] for s in seeds},
        "upload_bytes_per_round": statistics.fmean(runs[s]["upload_bytes_per_round"] for s in seeds),
        "upload_bytes_per_agent": statistics.fmean(runs[s]["upload_bytes_per_agent"] for s in seeds),
        "seconds_per_round_mean": statistics.fmean(runs[s]["seconds_per_round"] for s in seeds),
        "seconds_per_round": {str(s): runs[s]["seconds_per_round"] for s in seeds},
        "max_agent_train_seconds_per_round": statistics.fmean(
            runs[s]["max_agent_train_seconds_per_round"] for s in seeds
        ),
        "probe_agent_seconds_max_mean": statistics.fmean(p["agent_seconds_max"] for p in probes) if probes else 0.0,
        "probe_coordinator_span_seconds_mean": statistics.fmean(spans) if spans else (None if probes else 0.0),
    }


def verdict(summaries: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The issue's claim, checked on the means over seeds (None unless all three arms it needs ran)."""
    needed = ("importance", "random", "all-same-rank")
    if any(name not in summaries for name in needed):
        return None
    imp, rnd, ref = (summaries[name] for name in needed)
    common_seeds = sorted(set(imp["final_accuracy"]) & set(ref["final_accuracy"]) & set(rnd["final_accuracy"]))
    gap = imp["final_accuracy_mean"] - ref["final_accuracy_mean"]
    ratio = imp["trainable_parameters"] / ref["trainable_parameters"]
    lora_ratio = imp["lora_parameters"][0] / ref["lora_parameters"][0]
    margin = imp["final_accuracy_mean"] - rnd["final_accuracy_mean"]
    within = gap >= -0.01
    half = ratio <= 0.5
    beats = margin > 0
    return {
        "definition": "mean final held-out accuracy over seeds; 'within 1 point' = importance >= all-same-rank - "
        "0.01; parameters include the classifier head; 'beats random' = higher mean final accuracy",
        "importance_minus_all_same_rank_points": 100 * gap,
        "within_1_point_of_all_same_rank": within,
        "per_seed_gap_points": {s: 100 * (imp["final_accuracy"][s] - ref["final_accuracy"][s]) for s in common_seeds},
        "trainable_ratio_vs_all_same_rank": ratio,
        "lora_ratio_vs_all_same_rank": lora_ratio,
        "at_most_half_the_parameters": half,
        "importance_minus_random_points": 100 * margin,
        "per_seed_margin_vs_random_points": {
            s: 100 * (imp["final_accuracy"][s] - rnd["final_accuracy"][s]) for s in common_seeds
        },
        "beats_random": beats,
        "claim_holds": within and half and beats,
    }


def print_table(summaries: dict[str, dict[str, Any]]) -> None:
    """The per-variant table on stdout."""
    ref = summaries.get("all-same-rank")
    print(
        f"{'variant':<14} {'final acc (mean; per seed)':<30} {'best':>6} {'trainable':>10} {'vs all-8':>8} "
        f"{'upload KB/round':>15} {'s/round':>8} {'probe s':>8}"
    )
    for name, s in summaries.items():
        seeds = ", ".join(f"s{k} {v:.3f}" for k, v in s["final_accuracy"].items())
        share = f"{s['trainable_parameters'] / ref['trainable_parameters']:.1%}" if ref else "-"
        print(
            f"{name:<14} {s['final_accuracy_mean']:.3f} ({seeds}){'':<{max(0, 22 - len(seeds))}} "
            f"{s['best_accuracy_mean']:>6.3f} {s['trainable_parameters']:>10,} {share:>8} "
            f"{s['upload_bytes_per_round'] / 1e3:>15.1f} {s['seconds_per_round_mean']:>8.1f} "
            f"{s['probe_agent_seconds_max_mean']:>8.1f}"
        )


def code_version() -> dict[str, Any]:
    """Where the code under test came from: this script's repository root and its git HEAD (None outside git)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False, timeout=10
        )
        head = done.stdout.strip() if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        head = None
    return {"root": str(ROOT), "git_head": head}


def main() -> int:
    """Run the ablation (unless --analyze-only), print the table and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="coordinator run.seed values")
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "ablation", help="run directories go here")
    parser.add_argument("--demo", type=Path, default=DEMO, help="the config every variant is derived from")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per run")
    parser.add_argument("--analyze-only", action="store_true", help="re-read existing run directories, run nothing")
    parser.add_argument("--output", type=Path, default=RESULTS / "selection_ablation.json")
    args = parser.parse_args()
    demo: dict[str, Any] = yaml.safe_load(args.demo.read_text())
    configs: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    for seed in args.seeds:  # seeds outermost: a slow spell on the machine hits every variant alike
        for name in args.variants:
            run_dir = args.root / run_name(name, seed)
            config_path = args.root / "configs" / f"{run_name(name, seed)}.yaml"
            if args.analyze_only:  # what actually ran, when the config file is still there
                if config_path.is_file():
                    configs[run_name(name, seed)] = yaml.safe_load(config_path.read_text())
                continue
            configs[run_name(name, seed)] = config = federation_config(demo, VARIANTS[name], seed, run_dir)
            config_path.parent.mkdir(parents=True, exist_ok=True)
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            started = datetime.now().astimezone().isoformat(timespec="seconds")
            try:
                wall = run_federation(config_path, run_dir, args.timeout)
            except RuntimeError as error:
                print(f"{run_name(name, seed)}: {error}", file=sys.stderr)
                failed.append(run_name(name, seed))
                continue
            record = {"seconds": wall, "started": started, "load_average_before": load}
            (run_dir / "ablation_wall.json").write_text(json.dumps(record, indent=2) + "\n")
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    missing: list[str] = []
    for name in args.variants:
        for seed in args.seeds:
            run_dir = args.root / run_name(name, seed)
            if not (run_dir / "summary.json").is_file():
                missing.append(run_name(name, seed))
                continue
            runs.setdefault(name, {})[seed] = analyze_run(run_dir)
    summaries = {name: summarize(VARIANTS[name], runs[name]) for name in args.variants if name in runs}
    if not summaries:
        raise SystemExit(f"no finished run under {args.root}")
    heldout = int(demo["coordinator"].get("evaluation", {}).get("max_samples", 0) or 1000)
    for summary in summaries.values():
        summary["heldout_standard_error"] = heldout_standard_error(summary["final_accuracy_mean"], heldout)
    if "importance" in summaries and "random" in summaries:
        chosen = summaries["importance"]["masks"]
        summaries["random"]["overlap_with_importance_mask"] = {
            seed: len(set(mask) & set(chosen[seed]))
            for seed, mask in summaries["random"]["masks"].items()
            if seed in chosen
        }
    print_table(summaries)
    checked = verdict(summaries)
    if checked is not None:
        print(
            f"importance - all-same-rank: {checked['importance_minus_all_same_rank_points']:+.1f} points "
            f"(within 1 point: {checked['within_1_point_of_all_same_rank']}); trainable parameters "
            f"{checked['trainable_ratio_vs_all_same_rank']:.1%} of all-same-rank "
            f"(<= half: {checked['at_most_half_the_parameters']}); importance - random: "
            f"{checked['importance_minus_random_points']:+.1f} points (beats random: {checked['beats_random']}); "
            f"claim holds: {checked['claim_holds']}"
        )
    if missing:
        print(f"missing runs (no summary.json): {', '.join(missing)}", file=sys.stderr)
    result = {
        "benchmark": "selection_ablation",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "base_config": str(args.demo.relative_to(ROOT) if args.demo.is_relative_to(ROOT) else args.demo),
        "definitions": {
            "final_accuracy": "summary.json final_accuracy: held-out accuracy of the round-5 global on the "
            f"{heldout} embedded held-out tweets",
            "best_accuracy": "highest held-out accuracy over rounds 1..5",
            "trainable_parameters": "per agent: sum over the plan's modules of r * (d_in + d_out) plus the "
            "classifier head tensors (modules_to_save)",
            "upload_bytes_per_round": "sum over the round's agents of their float32 update tensors (LoRA A, B "
            "and head), as common.adapters.expected_tensors; gRPC header and framing not counted",
            "seconds_per_round": "mean of rounds.jsonl 'seconds' over rounds 1..5: round opening to the new "
            "global checkpointed (local training, transfers, aggregation); evaluation excluded",
            "probe_seconds": "importance only, once before round 1: slowest agent's probe seconds "
            "(selection/0000.json) and the coordinator log span from 'probe ... scoring' to 'selection:'",
        },
        "code": code_version(),
        "machine": machine(),
        "variants": summaries,
        "verdict": checked,
        "missing": missing,
        "failed": failed,
        "configs": configs,
        "runs": {name: {str(seed): figures for seed, figures in per_seed.items()} for name, per_seed in runs.items()},
    }
    write_result(args.output, result)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

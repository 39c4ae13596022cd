"""Resident memory of the coordinator and of each agent over a long run of short rounds.

    .venv/bin/python bench/memory_soak.py

The script builds a small federation in code (uniform planner, LoRA rank 4 on query and value,
2 agents with 1 torch thread each, 200 samples per agent shard, 4 steps of batch 8 at 32 tokens per
round, 20 rounds; the coordinator scores every global adapter on 200 embedded held-out tweets and the
agents evaluate it on their validation split), starts it through `deploy/local_federation.py`'s
`Federation` (mTLS, console scripts, logs in <run_dir>/logs/) and follows `rounds.jsonl`. As soon as a
round's record appears, it reads VmRSS from /proc/<pid>/status of the coordinator and of every agent
`--reads` times, `--gap` seconds apart, and keeps the mean. The record is written after the round's
evaluation, so at that moment the next round is starting (an agent may still be finishing its
evaluation report); every round is sampled at the same point. Besides, every process's VmRSS is traced
every 0.1 s, and each round's floor and peak (lowest and highest traced VmRSS between the previous
round's record and its own) are reported as diagnostics: with rounds this short the post-round sample
lands on varying phases of the next round's work, while a leak would also raise the floor.

Figures per process, over rounds warmup+1..last (rounds 1-2 are warm-up: allocator pools, the first
optimizer, lazy imports):

* spread = (max - min) / min of the RSS series;
* growth = (mean of the last 5 rounds - mean of the first 5 rounds of the window) / the latter;
* slope = least-squares slope of RSS against round, MiB per round.

A process PASSes when the spread and the growth of its per-round peak series (--verdict-series picks
post_round or floor instead) are both within --threshold (5%): the peak is what a round costs at most,
and it does not depend on where in the next round a single reading lands. The same figures of the
other series are reported beside it. Writes
bench/results/memory_soak.json (series, figures, verdicts, settings, date, command).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # deploy/ is a directory of scripts, not an installed package

from harness import machine, write_result  # noqa: E402

from deploy.local_federation import Federation  # noqa: E402

KIB_PER_MIB = 1024
WINDOW = 5  # rounds averaged at each end of the window for the growth figure
POLL_S = 0.1  # how often rounds.jsonl is read and every process's VmRSS traced
SERIES = ("post_round", "floor", "peak")

Trace = list[tuple[float, dict[str, int | None]]]  # (monotonic time, process -> VmRSS KiB)


def federation_spec(rounds: int, agents: int) -> dict[str, Any]:
    """The launcher spec (the deploy/local_federation.py YAML format) of the soak run."""
    return {
        "coordinator": {
            "planner": "uniform",
            "selection": {"mode": "all"},
            "lora": {"rank": 4, "alpha": 8, "targets": ["query", "value"]},
            "run": {
                "rounds": rounds,
                "min_agents": agents,
                "round_deadline_s": 120,
                "registration_timeout_s": 180,
            },
            "training": {"batch_size": 8, "max_steps": 4, "max_seq_len": 32},
            "evaluation": {"heldout": "embedded", "max_samples": 200, "agents": True},
        },
        "agents": {
            "count": agents,
            "config": {
                "threads": 1,
                "data": {"path": "embedded", "max_samples": 200},
                "calibration": {"enabled": False},
            },
        },
    }


def status_kib(pid: int, field: str) -> int | None:
    """A `kB` field (VmRSS, VmHWM) of /proc/<pid>/status; None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None  # a zombie has no Vm* lines


def read_all(pids: dict[str, int]) -> dict[str, int | None]:
    """VmRSS in KiB of every process now."""
    return {name: status_kib(pid, "VmRSS") for name, pid in pids.items()}


def sample(pids: dict[str, int], reads: int, gap_s: float, trace: Trace) -> dict[str, dict[str, float | None]]:
    """Per process: mean VmRSS of `reads` reads `gap_s` apart, and VmHWM at the last read, in MiB.

    Every read also goes into the trace.
    """
    rss: dict[str, list[int]] = {name: [] for name in pids}
    for i in range(reads):
        if i:
            time.sleep(gap_s)
        now = read_all(pids)
        trace.append((time.monotonic(), now))
        for name, value in now.items():
            if value is not None:
                rss[name].append(value)
    out: dict[str, dict[str, float | None]] = {}
    for name, pid in pids.items():
        hwm = status_kib(pid, "VmHWM")
        out[name] = {
            "rss_mib": statistics.fmean(rss[name]) / KIB_PER_MIB if rss[name] else None,
            "hwm_mib": hwm / KIB_PER_MIB if hwm is not None else None,
            "reads": float(len(rss[name])),
        }
    return out


def cycle_extremes(trace: Trace, since: float, until: float, names: list[str]) -> dict[str, dict[str, float | None]]:
    """Per process: the lowest and highest traced VmRSS in (since, until], in MiB."""
    out: dict[str, dict[str, float | None]] = {}
    for name in names:
        values = [kib[name] for t, kib in trace if since < t <= until and kib.get(name) is not None]
        present = [v for v in values if v is not None]
        out[name] = {
            "floor_mib": min(present) / KIB_PER_MIB if present else None,
            "peak_mib": max(present) / KIB_PER_MIB if present else None,
            "trace_reads": float(len(present)),
        }
    return out


def read_records(fed: Federation) -> list[dict[str, Any]]:
    """rounds.jsonl so far; a line caught half-written counts as not there yet."""
    try:
        return fed.rounds_done()
    except json.JSONDecodeError:
        return []


def soak(
    spec: dict[str, Any], run_dir: Path, reads: int, gap_s: float, timeout_s: float
) -> tuple[list[dict[str, Any]], Trace, float]:
    """Run the federation; return one row per round record in order, the VmRSS trace and the agents' start time."""
    rows: list[dict[str, Any]] = []
    trace: Trace = []
    with Federation(spec, run_dir) as fed:
        coordinator = fed.start_coordinator()
        start = time.monotonic()
        if not fed.wait_serving():
            print(fed.log("coordinator")[-3000:], file=sys.stderr)
            raise SystemExit(f"the coordinator did not start (log above; logs in {fed.logs})")
        for agent_id in fed.agent_ids:
            fed.start_agent(agent_id)
        agents_started = time.monotonic()
        pids = {"coordinator": coordinator.pid, **{a: p.pid for a, p in fed.agents.items()}}
        print(
            f"coordinator pid {coordinator.pid} on {fed.address}, "
            + ", ".join(f"{a} pid {p.pid}" for a, p in fed.agents.items())
            + f"; {fed.rounds} rounds, run in {run_dir}",
            flush=True,
        )
        reported: set[str] = set()
        seen = 0
        cycle_start = agents_started
        while True:
            finished = coordinator.poll() is not None  # checked first: records written before the exit are read
            trace.append((time.monotonic(), read_all(pids)))
            records = read_records(fed)
            for record in records[seen:]:
                detected = time.monotonic()
                measured = sample(pids, reads, gap_s, trace)
                row = {
                    "round": int(record["round"]),
                    "elapsed_s": detected - agents_started,
                    "round_seconds": float(record.get("seconds", 0.0)),
                    "agents_in_round": list(record.get("agents", [])),
                    "dropped": list(record.get("dropped", []) or []),
                    "processes": measured,
                    # since the previous record: this round's training, aggregation and evaluation
                    "cycle": cycle_extremes(trace, cycle_start, detected, list(pids)),
                }
                cycle_start = detected
                rows.append(row)
                print(
                    f"round {row['round']:>2}/{fed.rounds}: {row['round_seconds']:5.1f}s, "
                    + ", ".join(f"{name} {fmt_mib(m['rss_mib'])} MiB" for name, m in measured.items()),
                    flush=True,
                )
            seen = max(seen, len(records))
            if finished:
                break
            for agent_id, proc in fed.agents.items():
                if agent_id not in reported and proc.poll() not in (None, 0):
                    reported.add(agent_id)
                    print(f"{agent_id} exited with {proc.returncode}; see {fed.logs / agent_id}.log", flush=True)
            if time.monotonic() - start > timeout_s:
                raise SystemExit(f"timed out after {timeout_s:.0f}s; logs in {fed.logs}")
            time.sleep(POLL_S)
        if coordinator.returncode != 0:
            print(fed.log("coordinator")[-3000:], file=sys.stderr)
            raise SystemExit(f"the coordinator failed with {coordinator.returncode} (log above; logs in {fed.logs})")
        for agent_id, proc in fed.agents.items():
            try:
                if proc.wait(timeout=30) != 0:
                    print(f"{agent_id} exited with {proc.returncode}; see {fed.logs / agent_id}.log", flush=True)
            except subprocess.TimeoutExpired:
                print(f"{agent_id} still running 30s after the coordinator finished", flush=True)
        print(f"run finished in {time.monotonic() - start:.1f}s; logs in {fed.logs}", flush=True)
    return rows, trace, agents_started


def to_mib(kib: int | None) -> float | None:
    """KiB to MiB with one decimal; None stays None."""
    return None if kib is None else round(kib / KIB_PER_MIB, 1)


def fmt_mib(value: float | None) -> str:
    """MiB with one decimal, or '-' for a missing sample."""
    return "-" if value is None else f"{value:.1f}"


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of y against x."""
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    denominator = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / denominator if denominator else 0.0


def series_of(rows: list[dict[str, Any]], name: str, kind: str) -> dict[int, float | None]:
    """Round -> MiB of one process: the post-round sample, or the round's traced floor or peak."""
    if kind == "post_round":
        return {int(row["round"]): row["processes"][name]["rss_mib"] for row in rows}
    return {int(row["round"]): row["cycle"][name][f"{kind}_mib"] for row in rows}


def flatness(series: dict[int, float | None], warmup: int, threshold: float) -> dict[str, Any]:
    """Spread, growth, slope and verdict of one RSS series over the rounds after the warm-up."""
    points = [(r, float(v)) for r, v in sorted(series.items()) if r > warmup and v is not None]
    entry: dict[str, Any] = {
        "window_rounds": [points[0][0], points[-1][0]] if points else None,
        "missing_rounds": [r for r, v in sorted(series.items()) if r > warmup and v is None],
    }
    if len(points) < 2 * WINDOW:
        entry.update(verdict="n/a", reason=f"only {len(points)} rounds sampled after the warm-up")
        return entry
    values = [v for _, v in points]
    low, high = min(values), max(values)
    early = statistics.fmean(values[:WINDOW])
    late = statistics.fmean(values[-WINDOW:])
    spread = (high - low) / low
    growth = (late - early) / early
    entry.update(
        mib_first=points[0][1],
        mib_last=points[-1][1],
        mib_min=low,
        mib_max=high,
        round_min=points[values.index(low)][0],
        round_max=points[values.index(high)][0],
        early_mean_mib=early,
        late_mean_mib=late,
        early_rounds=[points[0][0], points[WINDOW - 1][0]],
        late_rounds=[points[-WINDOW][0], points[-1][0]],
        spread=spread,
        growth=growth,
        slope_mib_per_round=slope(points),
        spread_ok=spread <= threshold,
        growth_ok=growth <= threshold,
        verdict="PASS" if spread <= threshold and growth <= threshold else "FAIL",
    )
    return entry


def analyze(
    rows: list[dict[str, Any]], warmup: int, threshold: float, verdict_series: str
) -> dict[str, dict[str, Any]]:
    """Per process: the series over rounds and the flatness figures of each; the verdict is verdict_series's."""
    figures: dict[str, dict[str, Any]] = {}
    for name in list(rows[0]["processes"]) if rows else []:
        entry: dict[str, Any] = {}
        for kind in SERIES:
            series = series_of(rows, name, kind)
            entry[f"{kind}_mib_by_round"] = {str(r): v for r, v in sorted(series.items())}
        entry["hwm_mib_last"] = next(
            (row["processes"][name]["hwm_mib"] for row in reversed(rows) if row["processes"][name]["hwm_mib"]), None
        )
        for kind in SERIES:
            entry[kind] = flatness(series_of(rows, name, kind), warmup, threshold)
        entry["verdict"] = entry[verdict_series]["verdict"]
        figures[name] = entry
    return figures


def print_table(rows: list[dict[str, Any]], names: list[str]) -> None:
    """One line per round: wall seconds and each process's post-round RSS (the round's traced floor-peak) in MiB."""
    print(f"{'round':>5} {'wall s':>7} " + " ".join(f"{name + ' MiB (floor-peak)':>28}" for name in names))
    for row in rows:
        cells = []
        for name in names:
            cycle = row["cycle"][name]
            cells.append(
                f"{fmt_mib(row['processes'][name]['rss_mib']):>7} "
                f"({fmt_mib(cycle['floor_mib'])}-{fmt_mib(cycle['peak_mib'])})".rjust(28)
            )
        print(f"{row['round']:>5} {row['round_seconds']:>7.1f} " + " ".join(cells))


def summary_line(name: str, entry: dict[str, Any], threshold: float, kind: str) -> str:
    """One line per process: the figures of the verdict's series and the verdict."""
    post = entry[kind]
    if post["verdict"] == "n/a":
        return f"{name}: n/a ({post['reason']})"
    first, last = post["window_rounds"]
    return (
        f"{name} ({kind}): {post['mib_first']:.1f} MiB at round {first} -> {post['mib_last']:.1f} MiB at round {last}; "
        f"spread {post['spread'] * 100:.2f}%, growth {post['growth'] * 100:+.2f}%, "
        f"slope {post['slope_mib_per_round']:+.3f} MiB/round: {post['verdict']} (limit {threshold * 100:.0f}%)"
    )


def diagnostic_line(name: str, entry: dict[str, Any], kinds: list[str]) -> str:
    """One line per process: the same figures for the other series."""
    parts = []
    for kind in kinds:
        f = entry[kind]
        if f["verdict"] == "n/a":
            parts.append(f"{kind} n/a")
        else:
            parts.append(
                f"{kind} {f['mib_first']:.1f}->{f['mib_last']:.1f} MiB, spread {f['spread'] * 100:.2f}%, "
                f"growth {f['growth'] * 100:+.2f}%, slope {f['slope_mib_per_round']:+.3f} MiB/round ({f['verdict']})"
            )
    return f"  {name}: " + "; ".join(parts)


def main() -> int:
    """Run the soak, print the table and the verdicts, and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "bench-memory-soak")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="first rounds left out of the figures")
    parser.add_argument("--reads", type=int, default=3, help="VmRSS reads per sample, averaged")
    parser.add_argument("--gap", type=float, default=0.2, help="seconds between the reads of one sample")
    parser.add_argument("--threshold", type=float, default=0.05, help="largest allowed spread and growth")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    parser.add_argument(
        "--verdict-series", choices=SERIES, default="peak", help="the series the PASS/FAIL verdict is taken on"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "memory_soak.json")
    args = parser.parse_args()
    if args.rounds - args.warmup < 2 * WINDOW:
        parser.error(f"needs at least {2 * WINDOW} rounds after the warm-up")
    spec = federation_spec(args.rounds, args.agents)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    wall_start = time.monotonic()
    rows, trace, t0 = soak(spec, args.run_dir, args.reads, args.gap, args.timeout)
    wall = time.monotonic() - wall_start
    load_after = os.getloadavg()
    if not rows:
        raise SystemExit(f"no round record in {args.run_dir / 'rounds.jsonl'}")
    names = list(rows[0]["processes"])
    figures = analyze(rows, args.warmup, args.threshold, args.verdict_series)
    others = [kind for kind in SERIES if kind != args.verdict_series]
    print_table(rows, names)
    for name in names:
        print(summary_line(name, figures[name], args.threshold, args.verdict_series))
    print(f"the other series ({', '.join(others)}; diagnostics, not the verdict):")
    for name in names:
        print(diagnostic_line(name, figures[name], others))
    verdicts = {name: figures[name]["verdict"] for name in names}
    overall = "PASS" if all(v == "PASS" for v in verdicts.values()) else "FAIL"
    print(f"memory soak: {overall} over {len(rows)} round records in {wall:.0f}s")
    result = {
        "benchmark": "memory_soak",
        "command": ".venv/bin/python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": started.isoformat(timespec="seconds"),
        "definition": {
            "post_round": f"mean of {args.reads} VmRSS reads {args.gap}s apart from /proc/<pid>/status, taken as "
            "soon as the round's record appears in rounds.jsonl (after its evaluation; the next round is starting)",
            "floor, peak": f"lowest and highest VmRSS of a {POLL_S}s trace between the previous round's record "
            "and this one's (the round's training, upload, aggregation and evaluation)",
            "window": f"rounds {args.warmup + 1}..{args.rounds} (rounds 1..{args.warmup} are warm-up)",
            "spread": "(max - min) / min of a series over the window",
            "growth": f"(mean of the window's last {WINDOW} rounds - mean of its first {WINDOW}) / the latter",
            "slope": "least-squares slope of a series against round over the window, MiB per round",
            "verdict": f"{args.verdict_series} series: PASS when spread <= {args.threshold} "
            f"and growth <= {args.threshold}",
        },
        "settings": {
            "rounds": args.rounds,
            "agents": args.agents,
            "warmup": args.warmup,
            "reads": args.reads,
            "gap_s": args.gap,
            "trace_interval_s": POLL_S,
            "threshold": args.threshold,
            "verdict_series": args.verdict_series,
            "run_dir": str(args.run_dir),
            "spec": spec,
        },
        "machine": {
            **machine(),
            "loadavg_before": list(load_before),
            "loadavg_after": list(load_after),
        },
        "wall_seconds": wall,
        "verdict": overall,
        "verdicts": verdicts,
        "processes": figures,
        "rows": rows,
        "trace": {
            "t_s": [round(t - t0, 3) for t, _ in trace],
            **{name: [to_mib(kib.get(name)) for _, kib in trace] for name in names},
        },
    }
    write_result(args.output, result)
    return 0 if overall == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

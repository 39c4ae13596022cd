"""Runs a local federation: one fedpipe-coordinator and N fedpipe-agent processes on 127.0.0.1.

Reads a YAML file with a `coordinator:` mapping (a fedpipe-coordinator config) and an `agents:` mapping
(count, a shared fedpipe-agent config under `config:`, optional per-agent overrides), starts every
process through its console script, prints one line per round and ends with `final accuracy: X`.
Logs of each process go to <run_dir>/logs/.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

START_TIMEOUT_S = 120.0


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of two config mappings; override wins."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def script(name: str) -> str:
    """Path of a console script installed beside this Python."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SystemExit(f"{name} not found beside {sys.executable}: run `make install`")
    return str(path)


def round_line(record: dict[str, Any], rounds: int) -> str:
    """A round record from rounds.jsonl as one line."""
    held = record.get("heldout")
    agents_eval = record.get("agents_eval")
    accuracy = held["accuracy"] if held else (agents_eval["accuracy"] if agents_eval else float("nan"))
    source = "held-out" if held else ("agents'" if agents_eval else "no")
    dropped = f", dropped {','.join(record['dropped'])}" if record.get("dropped") else ""
    return (
        f"round {record['round']}/{rounds}: {len(record['agents'])} agents, {record['seconds']:.1f}s, "
        f"{source} accuracy {accuracy:.3f}{dropped}"
    )


def run(config_path: Path, run_dir_override: Path | None, timeout_s: float) -> int:
    """Start everything, follow the rounds, and return the coordinator's exit code."""
    spec = yaml.safe_load(config_path.read_text())
    coordinator_cfg: dict[str, Any] = spec.get("coordinator", {})
    agents_spec: dict[str, Any] = spec.get("agents", {})
    count = int(agents_spec.get("count", 3))
    run_dir = run_dir_override or Path(coordinator_cfg.get("run", {}).get("run_dir", "runs/demo"))
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run; a leftover state/ would resume
    logs = run_dir / "logs"
    logs.mkdir(parents=True)
    coordinator_cfg = merge(coordinator_cfg, {"run": {"run_dir": str(run_dir)}, "server": {"port": 0}})
    coordinator_cfg.setdefault("metrics", {}).setdefault("port", 0)
    rounds = int(coordinator_cfg.get("run", {}).get("rounds", 5))
    (run_dir / "coordinator.yaml").write_text(yaml.safe_dump(coordinator_cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    with (logs / "coordinator.log").open("wb") as out:
        coordinator = subprocess.Popen(
            [script("fedpipe-coordinator"), "--config", str(run_dir / "coordinator.yaml")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    procs.append(coordinator)
    agents: dict[str, subprocess.Popen[bytes]] = {}
    try:
        port_file = run_dir / "coordinator.port"
        start = time.monotonic()
        while not port_file.exists():
            if coordinator.poll() is not None or time.monotonic() - start > START_TIMEOUT_S:
                print((logs / "coordinator.log").read_text()[-3000:], file=sys.stderr)
                print("the coordinator did not start (log above)", file=sys.stderr)
                return 1
            time.sleep(0.2)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        print(f"coordinator on {address}, {count} agents, {rounds} rounds, run in {run_dir}", flush=True)
        overrides = agents_spec.get("overrides", {})
        for i in range(1, count + 1):
            agent_id = f"agent-{i}"
            agent_cfg = merge(
                agents_spec.get("config", {}),
                {
                    "agent_id": agent_id,
                    "coordinator": address,
                    "data": {"shard": f"{i}/{count}"},
                    "metrics": {"port": 0},
                    "progress": "lines",
                },
            )
            agent_cfg = merge(agent_cfg, overrides.get(agent_id, {}))
            path = run_dir / f"{agent_id}.yaml"
            path.write_text(yaml.safe_dump(agent_cfg))
            with (logs / f"{agent_id}.log").open("wb") as out:
                agents[agent_id] = subprocess.Popen(
                    [script("fedpipe-agent"), "--config", str(path)], stdout=out, stderr=subprocess.STDOUT, env=env
                )
                procs.append(agents[agent_id])
        seen = 0
        records = run_dir / "rounds.jsonl"
        while True:
            if records.exists():
                lines = records.read_text().splitlines()
                for line in lines[seen:]:
                    print(round_line(json.loads(line), rounds), flush=True)
                seen = len(lines)
            if coordinator.poll() is not None:
                break
            for agent_id, proc in list(agents.items()):
                if proc.poll() not in (None, 0):
                    print(f"{agent_id} exited with {proc.returncode}; see {logs}/{agent_id}.log", flush=True)
                    del agents[agent_id]  # reported once; the run goes on while quorum holds
                    break
            if time.monotonic() - start > timeout_s:
                print(f"timed out after {timeout_s:.0f}s", file=sys.stderr)
                return 1
            time.sleep(0.5)
        if records.exists():
            for line in records.read_text().splitlines()[seen:]:
                print(round_line(json.loads(line), rounds), flush=True)
        if coordinator.returncode != 0:
            print((logs / "coordinator.log").read_text()[-3000:], file=sys.stderr)
            print(f"the coordinator failed with {coordinator.returncode} (log above)", file=sys.stderr)
            return coordinator.returncode
        for proc in procs[1:]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.terminate()
        summary = json.loads((run_dir / "summary.json").read_text())
        print(f"final adapter: {run_dir / 'final'}; logs: {logs}", flush=True)
        accuracy = summary.get("final_accuracy")
        if accuracy is None:
            print("final accuracy: n/a (the run evaluates nothing)", flush=True)
        else:
            print(f"final accuracy: {accuracy:.3f}", flush=True)
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    """Parse flags and run the federation."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).with_name("demo.yaml"))
    parser.add_argument("--run-dir", type=Path, default=None, help="overrides coordinator.run.run_dir")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    args = parser.parse_args()
    return run(args.config, args.run_dir, args.timeout)


if __name__ == "__main__":
    sys.exit(main())

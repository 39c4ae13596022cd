"""Runs a local federation: one fedpipe-coordinator and N fedpipe-agent processes on 127.0.0.1.

Reads a YAML file with a `coordinator:` mapping (a fedpipe-coordinator config) and an `agents:` mapping
(count, a shared fedpipe-agent config under `config:`, optional per-agent overrides), starts every
process through its console script, prints one line per round and ends with `final accuracy: X`.
Logs of each process go to <run_dir>/logs/. Unless the coordinator config says `insecure: true`, the
launcher makes a CA and certificates under <run_dir>/certs and every process speaks mTLS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from common.certs import agent_paths, write_bundle
from common.scores import single_class_warning
from common.settings import merge

START_TIMEOUT_S = 120.0


def script(name: str) -> str:
    """Path of a console script installed beside this Python."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SystemExit(f"{name} not found beside {sys.executable}: run `make install`")
    return str(path)


def round_line(record: dict[str, Any], rounds: int, causal: bool = False) -> str:
    """A round record from rounds.jsonl as one line (a causal LM's with perplexity; round 0 is zero-shot)."""
    held = record.get("heldout")
    agents_eval = record.get("agents_eval")
    accuracy = held["accuracy"] if held else (agents_eval["accuracy"] if agents_eval else float("nan"))
    source = "held-out" if held else ("agents'" if agents_eval else "no")
    dropped = f", dropped {','.join(record['dropped'])}" if record.get("dropped") else ""
    perplexity = f", perplexity {math.exp(min(held['loss'], 50.0)):.2f}" if causal and held else ""
    if held and not causal:
        perplexity = f", loss {held['loss']:.4f}"  # moves before accuracy does (Ferret at full-tuning rates)
    scored = held or agents_eval
    if scored and scored.get("macro_f1") is not None:
        recall = ", ".join(f"{k} {v:.2f}" for k, v in scored["class_recall"].items() if v is not None)
        perplexity = f", macro-F1 {scored['macro_f1']:.3f} (recall {recall}){perplexity}"
    zero_shot = " (zero-shot)" if causal and record["round"] == 0 else ""
    return (
        f"round {record['round']}/{rounds}{zero_shot}: {len(record['agents'])} agents, {record['seconds']:.1f}s, "
        f"{source} accuracy {accuracy:.3f}{perplexity}{dropped}"
    )


def free_ports(count: int) -> list[int]:
    """`count` distinct ports nobody listens on now; every socket stays bound until all are chosen,
    so two calls for one federation never hand out the same port."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    """A port nobody listens on now; fixed up front so a restarted coordinator keeps its address."""
    return free_ports(1)[0]


class Federation:
    """The processes of a local federation, started from one launcher YAML; a context manager that
    stops whatever is still running on exit. Tests use it to kill and restart single processes."""

    def __init__(self, spec: dict[str, Any], run_dir: Path) -> None:
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        agents_spec: dict[str, Any] = spec.get("agents", {})
        self.count = int(agents_spec.get("count", 3))
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run; a leftover state/ would resume
        self.logs.mkdir(parents=True)
        coordinator_cfg: dict[str, Any] = merge(
            spec.get("coordinator", {}), {"run": {"run_dir": str(run_dir)}, "server": {"port": free_port()}}
        )
        coordinator_cfg.setdefault("metrics", {}).setdefault("port", 0)
        # Every process shares this host: a held-out evaluation overlapped with training takes the agents' CPU
        # (bench/eval_overlap.py measured longer rounds so), so it waits for training unless the config says so.
        coordinator_cfg.setdefault("evaluation", {}).setdefault("overlap", False)
        self.rounds = int(coordinator_cfg.get("run", {}).get("rounds", 5))
        self.address = f"127.0.0.1:{coordinator_cfg['server']['port']}"
        self.agent_ids = [f"agent-{i}" for i in range(1, self.count + 1)]
        model = agents_spec.get("config", {}).get("model", {})
        self.causal = model.get("task") == "causal-lm" or model.get("path") == "embedded-llm"
        self.secure = not coordinator_cfg.get("insecure", False)
        security: dict[str, Any] = {"insecure": True}
        agent_security: dict[str, dict[str, Any]] = {a: {"insecure": True} for a in self.agent_ids}
        if self.secure:
            # mTLS as in production: a CA, the coordinator's certificate and one per agent, under run_dir/certs.
            certs = run_dir / "certs"
            write_bundle(certs, self.agent_ids, hosts=("localhost", "127.0.0.1"))
            security = {
                "tls": {
                    "cert": str(certs / "coordinator.crt"),
                    "key": str(certs / "coordinator.key"),
                    "client_ca": str(certs / "ca.crt"),
                }
            }
            for agent_id in self.agent_ids:
                crt, key = agent_paths(certs, agent_id)
                agent_security[agent_id] = {"tls": {"ca": str(certs / "ca.crt"), "cert": str(crt), "key": str(key)}}
        coordinator_cfg = merge(coordinator_cfg, security)
        self.coordinator_yaml = run_dir / "coordinator.yaml"
        self.coordinator_yaml.write_text(yaml.safe_dump(coordinator_cfg))
        overrides = agents_spec.get("overrides", {})
        for i, agent_id in enumerate(self.agent_ids, start=1):
            agent_cfg = merge(
                agents_spec.get("config", {}),
                {"agent_id": agent_id, "coordinator": self.address, "metrics": {"port": 0}, "progress": "lines"},
            )
            agent_cfg = merge(merge(agent_cfg, agent_security[agent_id]), overrides.get(agent_id, {}))
            data = agent_cfg.setdefault("data", {})
            # The embedded corpus is one data set for everyone, so each agent takes its shard of it; a file
            # handed to an agent is that agent's own data and is used whole unless the spec shards it.
            if data.get("path", "embedded") == "embedded":
                data.setdefault("shard", f"{i}/{self.count}")
            elif "shard" in data:
                print(f"{agent_id}: data.shard {data['shard']} of {data['path']} (as the spec says)", flush=True)
            (run_dir / f"{agent_id}.yaml").write_text(yaml.safe_dump(agent_cfg))
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: dict[str, int] = {}

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        # Each start of a process gets its own log: <name>.log, then <name>.2.log after a restart.
        self.starts[name] = self.starts.get(name, 0) + 1
        suffix = "" if self.starts[name] == 1 else f".{self.starts[name]}"
        with (self.logs / f"{name}{suffix}.log").open("wb") as out:
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env)

    def log(self, name: str, start: int = 1) -> str:
        """The log of a process's start-th run."""
        suffix = "" if start == 1 else f".{start}"
        return (self.logs / f"{name}{suffix}.log").read_text(errors="replace")

    def start_coordinator(self) -> subprocess.Popen[bytes]:
        """Start (or restart) the coordinator on the federation's fixed address."""
        self.coordinator = self._spawn(
            "coordinator", [script("fedpipe-coordinator"), "--config", str(self.coordinator_yaml)]
        )
        return self.coordinator

    def start_agent(self, agent_id: str) -> subprocess.Popen[bytes]:
        """Start (or restart) one agent."""
        self.agents[agent_id] = self._spawn(
            agent_id, [script("fedpipe-agent"), "--config", str(self.run_dir / f"{agent_id}.yaml")]
        )
        return self.agents[agent_id]

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> bool:
        """Wait until the coordinator accepts connections; False if it exited or timed out."""
        host, port = self.address.rsplit(":", 1)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.coordinator is None or self.coordinator.poll() is not None:
                return False
            try:
                with socket.create_connection((host, int(port)), timeout=1):
                    return True
            except OSError:
                time.sleep(0.2)
        return False

    def rounds_done(self) -> list[dict[str, Any]]:
        """The records of rounds.jsonl so far."""
        path = self.run_dir / "rounds.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        procs = [p for p in [self.coordinator, *self.agents.values()] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run(config_path: Path, run_dir_override: Path | None, timeout_s: float) -> int:
    """Start everything, follow the rounds, and return the coordinator's exit code."""
    spec = yaml.safe_load(config_path.read_text())
    run_dir = run_dir_override or Path(spec.get("coordinator", {}).get("run", {}).get("run_dir", "runs/demo"))
    with Federation(spec, run_dir) as fed:
        coordinator = fed.start_coordinator()
        start = time.monotonic()
        if not fed.wait_serving():
            print(fed.log("coordinator")[-3000:], file=sys.stderr)
            print("the coordinator did not start (log above)", file=sys.stderr)
            return 1
        secured = "mTLS" if fed.secure else "plaintext"
        print(
            f"coordinator on {fed.address} ({secured}), {fed.count} agents, {fed.rounds} rounds, run in {run_dir}",
            flush=True,
        )
        for agent_id in fed.agent_ids:
            fed.start_agent(agent_id)
        agents = dict(fed.agents)
        seen = 0
        while True:
            records = fed.rounds_done()
            for record in records[seen:]:
                print(round_line(record, fed.rounds, fed.causal), flush=True)
            seen = len(records)
            if coordinator.poll() is not None:
                break
            for agent_id, proc in list(agents.items()):
                if proc.poll() not in (None, 0):
                    print(f"{agent_id} exited with {proc.returncode}; see {fed.logs}/{agent_id}.log", flush=True)
                    del agents[agent_id]  # reported once; the run goes on while quorum holds
                    break
            if time.monotonic() - start > timeout_s:
                print(f"timed out after {timeout_s:.0f}s", file=sys.stderr)
                return 1
            time.sleep(0.5)
        for record in fed.rounds_done()[seen:]:
            print(round_line(record, fed.rounds, fed.causal), flush=True)
        if coordinator.returncode != 0:
            print(fed.log("coordinator")[-3000:], file=sys.stderr)
            print(f"the coordinator failed with {coordinator.returncode} (log above)", file=sys.stderr)
            return coordinator.returncode
        for proc in fed.agents.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.terminate()
        summary = json.loads((run_dir / "summary.json").read_text())
        if (run_dir / "final" / "weights.safetensors").exists():  # the Ferret mode keeps trained weights
            what = f"final weights: {run_dir / 'final'} (fedpipe-export {run_dir} --out DIR writes a full model)"
        else:
            what = f"final adapter: {run_dir / 'final'}"
        print(f"{what}; logs: {fed.logs}", flush=True)
        accuracy = summary.get("final_accuracy")
        if accuracy is None:
            print("final accuracy: n/a (the run evaluates nothing)", flush=True)
        else:
            f1 = summary.get("final_macro_f1")
            print(f"final accuracy: {accuracy:.3f}" + (f", macro-F1 {f1:.3f}" if f1 is not None else ""), flush=True)
            last = summary["rounds"][-1] if summary.get("rounds") else {}
            scored = last.get("heldout") or last.get("agents_eval") or {}
            confusion = tuple(tuple(row) for row in scored.get("confusion", ()))
            warning = single_class_warning(confusion, tuple(scored.get("class_recall") or ()))
            if warning:
                print(f"warning: {warning}", flush=True)
        return 0


class Terminated(Exception):
    """SIGTERM or SIGHUP reached the launcher."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


def main() -> int:
    """Parse flags and run the federation; a SIGTERM (or SIGHUP, Ctrl-C) stops every process it started."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).with_name("demo.yaml"))
    parser.add_argument("--run-dir", type=Path, default=None, help="overrides coordinator.run.run_dir")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    args = parser.parse_args()
    # Python's default SIGTERM ends the process without unwinding, which would leave the coordinator and the
    # agents running; raised as an exception it unwinds through Federation.__exit__, which stops them.
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        return run(args.config, args.run_dir, args.timeout)
    except (Terminated, KeyboardInterrupt) as err:
        signum = err.args[0] if isinstance(err, Terminated) else signal.SIGINT
        print(f"stopped by signal {signum}: the coordinator and the agents were stopped", file=sys.stderr)
        return 128 + int(signum)


if __name__ == "__main__":
    sys.exit(main())

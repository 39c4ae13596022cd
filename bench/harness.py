"""Pieces the benchmarks share: a variant (coordinator keys over a base config), the launcher's deep merge,
running a federation, the machine's description and the results file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # deploy/ lives beside bench/, not in the installed package

from common.settings import merge  # noqa: E402

__all__ = ["ROOT", "Variant", "kept_run", "machine", "merge", "run_federation", "write_result"]


@dataclass(frozen=True)
class Variant:
    """One arm of a benchmark: coordinator overrides on top of the shared base config."""

    name: str
    description: str
    coordinator: dict[str, Any]


def run_federation(config_path: Path, run_dir: Path, timeout_s: float, code_root: Path = ROOT) -> float:
    """deploy/local_federation.py of code_root (this checkout, or a frozen copy) with code_root first on
    PYTHONPATH, output to our stdout; its wall seconds. RuntimeError when the federation fails."""
    command = [
        sys.executable,
        str(code_root / "deploy" / "local_federation.py"),
        "--config",
        str(config_path),
        "--run-dir",
        str(run_dir),
        "--timeout",
        str(timeout_s),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(code_root), os.environ.get("PYTHONPATH")) if p)}
    print(f"$ PYTHONPATH={code_root} " + " ".join(command), flush=True)
    start = time.monotonic()
    done = subprocess.run(command, cwd=code_root, env=env, check=False)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise RuntimeError(f"the federation failed with exit code {done.returncode}; logs in {run_dir / 'logs'}")
    return wall


def machine() -> dict[str, Any]:
    """What ran the benchmark: platform, Python and the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": cpus}


def write_result(path: Path, result: Mapping[str, Any]) -> None:
    """The benchmark's JSON results, and a line saying where they went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def kept_run(run_dir: Path, fresh: bool, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The record of one benchmark run: the one a previous invocation left in run_dir/bench.json (settings are
    fixed and runs seeded, so it stands), or run() now, saved there. fresh reruns it."""
    done = run_dir / "bench.json"
    if done.exists() and not fresh:
        record: dict[str, Any] = json.loads(done.read_text())
        return record
    record = run()
    done.write_text(json.dumps(record))
    return record


def run_section(run_dir: Path, seed: int, rounds: int, min_agents: int) -> dict[str, Any]:
    """The coordinator's `run` section of a benchmark federation: generous deadlines (2 cores, nothing may
    time out), a short finish grace, the run's seed."""
    return {
        "rounds": rounds,
        "min_agents": min_agents,
        "run_dir": str(run_dir),
        "round_deadline_s": 1800,
        "registration_timeout_s": 600,
        "finish_grace_s": 5,
        "seed": seed,
    }


class Ledger:
    """A benchmark's runs kept in its results file, rewritten after every run, so a grid longer than one
    sitting goes on where it stopped; `fresh` starts it over."""

    def __init__(
        self,
        path: Path,
        name_of: Callable[[Mapping[str, Any]], str],
        summarise: Callable[[list[dict[str, Any]]], Any],
        fresh: bool,
    ) -> None:
        self.path, self.summarise, self.fresh = path, summarise, fresh
        previous = json.loads(path.read_text())["runs"] if path.exists() and not fresh else []
        self.done: dict[str, dict[str, Any]] = {name_of(r): r for r in previous}

    def record(self, name: str, run_dir: Path, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The run called name: recorded before, or left in run_dir by an earlier invocation (kept_run), or
        run now; the results file is rewritten with it."""
        record = self.done[name] if name in self.done else kept_run(run_dir, self.fresh, run)
        self.done[name] = record
        everything = list(self.done.values())
        write_result(self.path, {"machine": machine(), "table": self.summarise(everything), "runs": everything})
        return record

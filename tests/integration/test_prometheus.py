"""A real Prometheus server (Debian's package) scrapes a running coordinator and its agents (real processes,
mTLS, real training): the key series exist and move, `promtool check metrics` passes on both endpoints,
and every metric docs/metrics.md documents exists after one round."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.local_federation import Federation, free_ports

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
WAIT_S = 240.0
AGENTS = ("agent-1", "agent-2")


@dataclass
class Watched:
    """A federation mid-run, its metrics ports, and the Prometheus server scraping it."""

    fed: Federation
    coordinator_port: int
    agent_ports: dict[str, int]
    prometheus: str  # base URL of its HTTP API
    promtool: Path
    after_round_1: dict[str, str]  # endpoint name -> exposition text scraped right after round 1

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of a PromQL expression."""
        url = f"{self.prometheus}/api/v1/query?query={urllib.parse.quote(expr)}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def values(self, expr: str) -> dict[str, float]:
        """label 'agent' (or '') -> value for each series of expr."""
        return {r["metric"].get("agent", ""): float(r["value"][1]) for r in self.query(expr)}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return str(answer.read().decode())


def wait_until(what: str, check: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    end = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.5)


def federation_spec(run_dir: Path, coordinator_port: int, agent_ports: dict[str, int]) -> dict[str, Any]:
    """Two agents, four short rounds with a probe and both evaluations, metrics on fixed ports."""
    return {
        "coordinator": {
            "planner": "uniform",
            "metrics": {"port": coordinator_port},
            "run": {"rounds": 4, "min_agents": 2, "run_dir": str(run_dir), "round_deadline_s": 120,
                    "registration_timeout_s": 180, "heartbeat_interval_s": 1, "finish_grace_s": 30},
            "lora": {"rank": 4, "alpha": 8, "targets": ["query", "value"]},
            "selection": {"mode": "importance", "budget": 0.5, "probe_steps": 3, "probe_batch_size": 8},
            "training": {"batch_size": 8, "max_steps": 4, "max_seq_len": 32},
            "evaluation": {"agents": True, "initial": False, "heldout": "embedded", "max_samples": 100},
        },
        "agents": {
            "count": len(agent_ports),
            "config": {"threads": 1, "calibration": {"enabled": False}, "data": {"max_samples": 100}},
            "overrides": {agent: {"metrics": {"port": port}} for agent, port in agent_ports.items()},
        },
    }  # fmt: skip


def prometheus_config(coordinator_port: int, agent_ports: dict[str, int]) -> dict[str, Any]:
    """Scrape every second: the coordinator job, and one target per agent labelled with its id."""
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "fedpipe-coordinator", "static_configs": [{"targets": [f"127.0.0.1:{coordinator_port}"]}]},
            {
                "job_name": "fedpipe-agent",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{port}"], "labels": {"agent": agent}}
                    for agent, port in agent_ports.items()
                ],
            },
        ],
    }


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory, prometheus_tools: tuple[Path, Path]) -> Iterator[Watched]:
    """Prometheus scraping a federation that has finished its first round (and goes on to round 4)."""
    base = tmp_path_factory.mktemp("prometheus")
    prometheus_bin, promtool = prometheus_tools
    coordinator_port, web, *ports = free_ports(2 + len(AGENTS))
    agent_ports = dict(zip(AGENTS, ports, strict=True))
    config = base / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(coordinator_port, agent_ports)))
    with (base / "prometheus.log").open("wb") as log:
        server = subprocess.Popen(
            [str(prometheus_bin), f"--config.file={config}", f"--storage.tsdb.path={base / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{web}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    run_dir = base / "run"
    try:
        with Federation(federation_spec(run_dir, coordinator_port, agent_ports), run_dir) as fed:
            fed.start_coordinator()
            assert fed.wait_serving()
            for agent in AGENTS:
                fed.start_agent(agent)
            wait_until("round 1", lambda: len(fed.rounds_done()) >= 1)
            texts = {"coordinator": scrape(coordinator_port), **{a: scrape(p) for a, p in agent_ports.items()}}
            yield Watched(fed, coordinator_port, agent_ports, f"http://127.0.0.1:{web}", promtool, texts)
    finally:
        server.terminate()
        server.wait(timeout=30)


def documented(section: str) -> list[str]:
    """Metric names from one table of docs/metrics.md."""
    text = DOC.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"^\| `(fedpipe_[a-z0-9_]+)` \|", text[start : end if end > 0 else None], re.M)


def test_every_documented_metric_exists_after_one_round(watched: Watched) -> None:
    # Prepare
    expositions = {
        "Coordinator": [watched.after_round_1["coordinator"]],
        "Agent": [watched.after_round_1[agent] for agent in AGENTS],
    }

    # Execute: a metric exists when a sample of it (or of its _count/_bucket) is exposed
    missing = {
        section: [
            name
            for name in documented(section)
            for text in texts
            if not re.search(rf"^{name}(_count|_bucket)?[{{ ]", text, re.M)
        ]
        for section, texts in expositions.items()
    }

    # Assert
    assert missing == {"Coordinator": [], "Agent": []}
    for method in ("Register", "GetTask", "DownloadGlobal", "UploadUpdate"):  # unary and streaming RPCs alike
        assert f'fedpipe_rpc_duration_seconds_count{{code="OK",method="{method}"}}' in expositions["Coordinator"][0]
    assert len(documented("Coordinator")) > 40 and len(documented("Agent")) > 15


def test_promtool_accepts_both_endpoints(watched: Watched) -> None:
    # Prepare
    texts = {"coordinator": scrape(watched.coordinator_port), "agent-1": scrape(watched.agent_ports["agent-1"])}

    # Execute
    checks = {
        name: subprocess.run(
            [str(watched.promtool), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
        )
        for name, text in texts.items()
    }

    # Assert
    for name, check in checks.items():
        assert check.returncode == 0, (name, check.stdout, check.stderr)


def test_prometheus_scrapes_the_key_series_and_they_move(watched: Watched) -> None:
    # Prepare: Prometheus has scraped every target
    wait_until("every target up", lambda: sorted(watched.values("up").values()) == [1.0, 1.0, 1.0], 60)
    rounds_before = watched.values("fedpipe_rounds_completed_total")[""]
    steps_before = watched.values('fedpipe_edge_steps_total{job="fedpipe-agent"}')

    # Execute: let the run go on; the coordinator exits soon after round 4, so read while round 4 runs
    def rounds() -> float:
        return watched.values("fedpipe_rounds_completed_total").get("", 0.0)

    wait_until("round 3 in Prometheus", lambda: rounds() >= 3)
    rounds_after = rounds()
    steps_after = watched.values('fedpipe_edge_steps_total{job="fedpipe-agent"}')
    series = {
        expr: set(watched.values(expr))
        for expr in (
            "fedpipe_agent_train_seconds",
            "fedpipe_agent_flops_per_second",
            "fedpipe_plan_batch_size",
            "fedpipe_agent_peak_memory_bytes",
            "fedpipe_agent_up",
        )
    }
    accuracy = watched.values('fedpipe_global_accuracy{source="heldout"}')[""]
    durations = watched.values('fedpipe_round_duration_seconds_count{job="fedpipe-coordinator"}')[""]
    uploads = watched.query('fedpipe_rpc_duration_seconds_count{method="UploadUpdate",code="OK"}')
    info = watched.values('fedpipe_edge_info{job="fedpipe-agent"}')
    coordinator = watched.fed.coordinator
    assert coordinator is not None
    wait_until("the run to finish", lambda: coordinator.poll() is not None)

    # Assert: the counters moved, and the per-agent series an operator reads are there for both agents
    assert coordinator.returncode == 0
    assert rounds_before >= 1 and rounds_after >= 3
    assert set(steps_after) == set(AGENTS)
    assert all(steps_after[a] > steps_before.get(a, 0.0) for a in AGENTS), (steps_before, steps_after)
    assert series == {expr: set(AGENTS) for expr in series}
    assert 0.0 < accuracy <= 1.0
    assert durations >= 3
    assert uploads and float(uploads[0]["value"][1]) >= 6  # 2 agents x 3 rounds at least
    assert info == dict.fromkeys(AGENTS, 1.0)

"""A long-lived coordinator (`fedpipe-coordinator serve`): runs submitted by an admin over mTLS queue and run one
after another with the same two agent processes, which load the base and the data set each run names; a queued
run is cancelled, agents are refused on the admin API, and a coordinator restart resumes the running run and
keeps the queue."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.certs import admin_paths, agent_paths, write_bundle
from deploy.local_federation import Federation, script

WAIT_S = 300.0


def admin(fed: Federation, *args: str, who: tuple[Path, Path] | None = None) -> subprocess.CompletedProcess[str]:
    """One admin command through the console script, as the admin `ops` unless `who` is another (cert, key)."""
    certs = fed.run_dir / "certs"
    cert, key = who or admin_paths(certs, "ops")
    tls = ["--coordinator", fed.address, "--ca", str(certs / "ca.crt"), "--cert", str(cert), "--key", str(key)]
    command = [script("fedpipe-coordinator"), args[0], *tls, *args[1:]]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=fed.env)


def queue(state: Path) -> dict[str, dict[str, Any]]:
    path = state / "queue.json"
    return {r["name"]: r for r in json.loads(path.read_text())["runs"]} if path.exists() else {}


def tiny_bert(directory: Path) -> None:
    """A random 2-layer BERT with the embedded model's tokenizer: a second base, small enough to train in seconds."""
    from transformers import BertConfig, BertForSequenceClassification

    from common.modeling import configured_model, load_tokenizer

    embedded, _ = configured_model("embedded", "auto", ("a", "b"), False, None)
    tokenizer = load_tokenizer(embedded)
    tokenizer.save_pretrained(str(directory))
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    BertForSequenceClassification(config).save_pretrained(str(directory))


def tickets(path: Path, agent: int) -> None:
    """An agent's own labelled file for the named data set `tickets` (labels no / yes)."""
    rows = ["text,label"] + [
        f"ticket {agent}-{i}: the {'printer' if i % 2 else 'screen'} is {'broken' if i % 2 else 'fine'},"
        f"{'yes' if i % 2 else 'no'}"
        for i in range(40)
    ]
    path.write_text("\n".join(rows) + "\n")


def wait_until(what: str, check: Callable[[], bool], fed: Federation) -> None:
    end = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > end:
            logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in fed.logs.glob("*.log"))
            pytest.fail(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.3)


@pytest.mark.integration
def test_a_serving_coordinator_runs_submitted_runs_in_turn_and_resumes_after_a_restart(tmp_path: Path) -> None:
    # Prepare: the launcher's certificates and agent configs (mTLS), plus an admin certificate; the service's
    # config holds the defaults of every run (one short round of two agents).
    spec = {
        "coordinator": {
            "planner": "uniform",
            "run": {"rounds": 1, "min_agents": 2, "registration_timeout_s": 180, "finish_grace_s": 2},
            "lora": {"rank": 4, "alpha": 8, "targets": ["query", "value"]},
            "selection": {"mode": "all"},
            "training": {"batch_size": 8, "max_steps": 2, "max_seq_len": 32},
            "evaluation": {"agents": True, "initial": False, "heldout": None},
        },
        "agents": {
            "count": 2,
            "config": {
                "threads": 1,
                "poll_wait_s": 1,
                "after_finish": "next-run",
                "calibration": {"enabled": False},
                "data": {"max_samples": 60, "val_fraction": 0.2},
            },
        },
    }
    run_dir = tmp_path / "fed"
    state = tmp_path / "service"
    tiny = tmp_path / "tiny-bert"
    tiny_bert(tiny)
    # agent-1 has a data set named `tickets`; agent-2 has none, so it waits past run B.
    tickets(tmp_path / "tickets-1.csv", 1)
    data = {
        "path": str(tmp_path / "tickets-1.csv"),
        "text_column": "text",
        "label_column": "label",
        "labels": ["no", "yes"],
        "val_fraction": 0.2,
    }
    overrides: dict[str, Any] = {
        "agent-1": {"models": {"tiny": str(tiny)}, "datasets": {"tickets": data}},
        "agent-2": {"models": {"tiny": str(tiny)}},
    }
    spec["agents"]["overrides"] = overrides  # type: ignore[index]
    with Federation(spec, run_dir) as fed:
        write_bundle(run_dir / "certs", [], admins=["ops"])
        config = yaml.safe_load(fed.coordinator_yaml.read_text())
        config["service"] = {"state_dir": str(state)}
        serve_yaml = tmp_path / "serve.yaml"
        serve_yaml.write_text(yaml.safe_dump(config))

        def start() -> subprocess.Popen[bytes]:
            fed.coordinator = fed._spawn(
                "coordinator", [script("fedpipe-coordinator"), "serve", "--config", str(serve_yaml)]
            )
            assert fed.wait_serving(), fed.log("coordinator", fed.starts["coordinator"])
            return fed.coordinator

        first = start()
        for agent_id in fed.agent_ids:
            fed.start_agent(agent_id)
        wait_until(
            "the agents to wait", lambda: all("coordinator's first run" in fed.log(a) for a in fed.agent_ids), fed
        )
        runs = {}
        # B trains another base on a data set each agent names `tickets`, in rounds of a few hundred tiny steps
        # (seconds: they outlast a SIGTERM and the cancel of C); D goes back to the embedded base, kept by the
        # agents since A.
        b_training = {"max_steps": 1000, "local_epochs": 100}
        tiny_run: dict[str, Any] = {"model": {"path": str(tiny), "name": "tiny"}, "labels": ["no", "yes"]}
        settings: dict[str, dict[str, Any]] = {
            "A": {"run": {"rounds": 1}},
            "B": {**tiny_run, "run": {"rounds": 4, "dataset": "tickets", "min_agents": 1}, "training": b_training},
            "C": {"run": {"rounds": 1}},
            "D": {"run": {"rounds": 1, "seed": 4}},
        }
        cancelled = None
        for name, run_settings in settings.items():
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(run_settings))
            submitted = admin(fed, "submit", str(path), "--name", name)
            assert submitted.returncode == 0, submitted.stderr
            runs[name] = re.search(r"run (\S+) queued", submitted.stdout).group(1)  # type: ignore[union-attr]
            if name == "C":
                cancelled = admin(fed, "cancel", runs["C"])

        # Execute: A runs and completes; B starts; the coordinator is stopped (SIGTERM) after B's first round
        # and started again.
        wait_until("run A to complete", lambda: queue(state).get("A", {}).get("state") == "completed", fed)
        rounds_b = state / "runs" / runs["B"] / "rounds.jsonl"
        wait_until("B's first round", lambda: rounds_b.exists() and len(rounds_b.read_text().splitlines()) >= 1, fed)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
        interrupted = queue(state)["B"]["state"]
        second = start()
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({"server": {"port": 1}, "run": {"rounds": 1}}))
        refused_bad = admin(fed, "submit", str(bad))
        crt, key = agent_paths(run_dir / "certs", "agent-1")
        as_agent = admin(fed, "runs", who=(crt, key))
        wait_until("run D to complete", lambda: queue(state).get("D", {}).get("state") == "completed", fed)
        listing = admin(fed, "runs")
        status = admin(fed, "status", runs["B"][:4])
        logs = admin(fed, "logs", runs["B"])
        port = int(re.findall(r"metrics on http://127.0.0.1:(\d+)/metrics", fed.log("coordinator", 2))[0])
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        agents_alive = [fed.agents[a].poll() is None for a in fed.agent_ids]
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0

    # Assert: the admin API refused what it should and named why; A and B ran in turn with both agents, B
    # resumed after its first round in its own directory, C never ran.
    assert refused_bad.returncode == 2 and "server: the serving coordinator sets it" in refused_bad.stderr
    assert cancelled is not None and cancelled.returncode == 0 and f"run {runs['C']} cancelled" in cancelled.stdout
    assert as_agent.returncode == 1 and "PERMISSION_DENIED" in as_agent.stderr and "is an agent" in as_agent.stderr
    final = queue(state)
    assert {n: r["state"] for n, r in final.items()} == {
        "A": "completed",
        "B": "completed",
        "C": "cancelled",
        "D": "completed",
    }
    assert interrupted == "running" and final["B"]["starts"] == 2
    b_log = (state / "runs" / runs["B"] / "coordinator.log").read_text()
    assert (
        re.search(rf"resuming run {runs['B']} after round [123] ", b_log)
        and f"run {runs['B']} completed: 4 rounds" in b_log
    )
    assert len(rounds_b.read_text().splitlines()) == 4
    assert (state / "runs" / runs["A"] / "final").is_dir() and not (state / "runs" / runs["C"]).exists()
    first_log, second_log = fed.log("agent-1"), fed.log("agent-2")
    joined = {a: re.findall(r"joined run (\S+)", fed.log(a)) for a in fed.agent_ids}
    assert joined["agent-1"][:2] == [runs["A"], runs["B"]] and joined["agent-1"][-1] == runs["D"], first_log[-2000:]
    assert joined["agent-2"][0] == runs["A"] and runs["B"] not in joined["agent-2"], second_log[-2000:]
    assert joined["agent-2"][-1] == runs["D"]
    # agent-1 loaded each base once: the tiny one when B asked for it, the embedded one at start, kept for D.
    assert first_log.count("model tiny: bert seq-cls") == 1 and first_log.count("model embedded: bert seq-cls") == 1
    assert f"run {runs['B']}: model tiny, data set tickets" in first_log
    assert f"run {runs['D']}: model embedded, data set (data)" in first_log
    # agent-2 said once why it sat B out, loaded nothing for it, and took part in D.
    assert second_log.count(f"run {runs['B']} asks for data set 'tickets'; `datasets` holds none") == 1
    assert "model tiny:" not in second_log
    b_rounds = [json.loads(line) for line in rounds_b.read_text().splitlines()]
    assert all(r["agents"] == ["agent-1"] for r in b_rounds)
    d_rounds = [json.loads(line) for line in (state / "runs" / runs["D"] / "rounds.jsonl").read_text().splitlines()]
    assert sorted(d_rounds[-1]["agents"]) == ["agent-1", "agent-2"]
    b_config = json.loads((state / "runs" / runs["B"] / "config.json").read_text())
    assert b_config["labels"] == ["no", "yes"] and b_config["run"]["dataset"] == "tickets"
    assert all(agents_alive)
    # The admin commands' output, and metrics that name the current run only.
    assert re.search(rf"{runs['A']}\s+completed", listing.stdout) and re.search(
        rf"{runs['C']}\s+cancelled", listing.stdout
    )
    assert "state:     completed" in status.stdout and "accuracy:" in status.stdout
    assert f"run {runs['B']} completed" in logs.stdout
    assert f'fedpipe_run{{run_id="{runs["D"]}"}} 1.0' in page and runs["A"] not in page and runs["B"] not in page
    assert 'fedpipe_runs{state="completed"} 3.0' in page and 'fedpipe_runs{state="cancelled"} 1.0' in page

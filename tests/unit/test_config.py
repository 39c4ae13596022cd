"""Config: flags > env > YAML > defaults, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.errors import ConfigError
from common.settings import build
from coordinator.config import CoordinatorConfig
from edge_agent.config import AgentConfig


def test_defaults_build() -> None:
    config = build(CoordinatorConfig, [], "fedpipe-coordinator")
    assert config.run.rounds == 5 and config.lora.targets == ["all"] and config.selection.mode == "importance"


def test_flags_override_env_override_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  rounds: 3\n  min_agents: 4\nlora:\n  rank: 4\n")
    monkeypatch.setenv("FEDPIPE_COORDINATOR_RUN__ROUNDS", "7")
    config = build(CoordinatorConfig, ["--config", str(path), "--lora.rank", "16"], "fedpipe-coordinator")
    assert config.run.rounds == 7  # env beats YAML
    assert config.run.min_agents == 4  # YAML beats default
    assert config.lora.rank == 16  # flag beats YAML


@pytest.mark.parametrize(
    ("argv", "yaml_text", "message"),
    [
        (["--run.rounds", "0"], None, "run.rounds: Input should be greater than or equal to 1"),
        ([], "run:\n  roundz: 3\n", "run.roundz: unknown key"),
        ([], "colour: blue\n", "colour: unknown key"),
        (["--training.quantization", "int3"], None, "training.quantization"),
        (["--labels", '["only"]'], None, "labels: Value error, needs at least two distinct labels"),
        ([], "server:\n  chunk_bytes: 9000000\n", "server: Value error, chunk_bytes 9000000 exceeds max_chunk_bytes"),
        ([], "- a list\n", "must hold a mapping"),
    ],
)
def test_bad_coordinator_config_names_the_field(
    tmp_path: Path, argv: list[str], yaml_text: str | None, message: str
) -> None:
    if yaml_text is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml_text)
        argv = ["--config", str(path), *argv]
    with pytest.raises(ConfigError) as caught:
        build(CoordinatorConfig, argv, "fedpipe-coordinator")
    assert message in str(caught.value)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build(CoordinatorConfig, ["--config", str(tmp_path / "nope.yaml")], "fedpipe-coordinator")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data.shard", "4/3"], "data.shard: Value error, must be i/n"),
        (["--agent-id", "bad id"], "agent_id: Value error"),
        (["--coordinator", "nohost"], "coordinator: Value error, must be host:port"),
        (["--data.val-fraction", "1.5"], "data.val_fraction"),
        (["--data.label-skew", "0"], "data.label_skew"),
        (["--devices", "cuda:0,cuda:0"], "devices: Value error, devices lists one twice"),
        (["--devices", "cuda:0,gpu7"], "devices: Value error"),
        (["--devices", "cuda:0,cuda:1", "--nproc", "2"], "set devices or nproc, not both"),
        (["--nproc", "65"], "nproc"),
    ],
)
def test_bad_agent_config_names_the_field(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build(AgentConfig, ["--agent-id", "a1", *argv] if "--agent-id" not in argv else argv, "fedpipe-agent")
    assert message in str(caught.value)


def test_devices_and_nproc_give_the_ranks_of_a_data_parallel_agent() -> None:
    from edge_agent.parallel import parse_devices

    assert parse_devices("cuda:0, cuda:1", 0) == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert parse_devices("", 3) == [torch.device("cpu")] * 3
    assert parse_devices("cuda:0", 0) == [] and parse_devices("", 1) == []  # one device: an ordinary agent


def test_agent_shard_index() -> None:
    config = build(AgentConfig, ["--agent-id", "a1", "--data.shard", "2/3"], "fedpipe-agent")
    assert config.data.shard_index() == (1, 3)


def test_cli_exits_2_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    from coordinator.cli import main

    assert main(["--run.min-agents", "0"]) == 2
    assert "run.min_agents" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["demo.yaml", "demo-llm.yaml", "demo-ferret.yaml"])
def test_the_demo_launcher_configs_build_through_the_config_classes(name: str) -> None:
    # Prepare
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / name).read_text())

    # Execute
    coordinator = CoordinatorConfig(**spec["coordinator"])
    agents = [
        AgentConfig(agent_id=f"agent-{i}", coordinator="127.0.0.1:1", **{**spec["agents"]["config"], **override})
        for i, override in enumerate([{}, *spec["agents"].get("overrides", {}).values()], start=1)
    ]

    # Assert
    assert coordinator.run.rounds >= 1 and all(agent.model.path == coordinator.model.path for agent in agents)

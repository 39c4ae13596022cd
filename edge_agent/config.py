"""fedpipe-agent's one config class: flags > FEDPIPE_AGENT_* env > --config YAML > defaults."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.certs import AGENT_ID_PATTERN
from common.data import EMBEDDED, EMBEDDED_LABEL_COLUMN, EMBEDDED_LABELS, EMBEDDED_TEXT_COLUMN
from common.settings import Labels, ModelSection, Section
from edge_agent.caps import parse_size


class DataSection(Section):
    """The agent's private data."""

    path: str = Field(EMBEDDED, description="CSV or JSONL file, or 'embedded' for the tweet corpus")
    text_column: str = Field(EMBEDDED_TEXT_COLUMN, description="column holding the text")
    label_column: str = Field(EMBEDDED_LABEL_COLUMN, description="column holding the label")
    prompt_column: str = Field("prompt", description="causal-lm: column holding the prompt")
    response_column: str = Field("response", description="causal-lm: column holding the response to learn")
    labels: Labels = Field(list(EMBEDDED_LABELS), description="label names in class-index order")
    shard: str = Field("1/1", description="take shard i of n (1-based), e.g. 2/3")
    label_skew: float | None = Field(None, gt=0, description="Dirichlet alpha for non-IID shards; none = IID")
    max_samples: int = Field(0, ge=0, description="cap on the shard's size, 0 = all")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of the shard kept for validation")
    seed: int = Field(0, description="seed of the shard partition; equal on all agents of a run")

    @field_validator("shard")
    @classmethod
    def _shard_format(cls, value: str) -> str:
        match = re.fullmatch(r"(\d+)/(\d+)", value)
        if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
            raise ValueError("must be i/n with 1 <= i <= n, e.g. 2/3")
        return value

    def shard_index(self) -> tuple[int, int]:
        """(0-based index, count) of the shard."""
        index, count = (int(part) for part in self.shard.split("/"))
        return index - 1, count


class MetricsSection(Section):
    """Prometheus exposition."""

    host: str = Field("127.0.0.1", description="address of the metrics HTTP server")
    port: int = Field(0, ge=-1, le=65535, description="metrics port; 0 picks a free one, -1 turns it off")


class TlsSection(Section):
    """How the agent proves itself to the coordinator and checks the coordinator's certificate."""

    ca: Path | None = Field(None, description="CA certificate that signed the coordinator's certificate (PEM)")
    cert: Path | None = Field(None, description="this agent's certificate (PEM); its common name is the agent id")
    key: Path | None = Field(None, description="this agent's private key (PEM)")
    token_file: Path | None = Field(None, description="file holding this agent's bearer token (token auth)")
    server_name: str | None = Field(
        None, description="name to verify in the coordinator's certificate, when the address host differs"
    )


class CalibrationSection(Section):
    """Short measured training runs at start-up that the coordinator fits its cost model to."""

    enabled: bool = Field(True, description="measure step time and peak memory before registering")
    batch_sizes: list[int] = Field([2, 8], description="the two batch sizes measured, increasing")
    seq_len: int = Field(64, ge=1, description="tokens per sample in the calibration runs")
    rank: int = Field(8, ge=1, description="LoRA rank on every candidate during calibration")
    steps: int = Field(3, ge=2, description="optimizer steps per batch size; the first one is warm-up")

    @field_validator("batch_sizes")
    @classmethod
    def _two_increasing(cls, value: list[int]) -> list[int]:
        if len(value) != 2 or not 1 <= value[0] < value[1]:
            raise ValueError("needs exactly two increasing positive batch sizes, e.g. [2, 8]")
        return value


class AgentConfig(BaseSettings):
    """Everything fedpipe-agent reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="FEDPIPE_AGENT_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    agent_id: str = Field(
        default_factory=lambda: f"agent-{socket.gethostname()}",
        description="unique name of this agent in the run",
    )
    coordinator: str = Field("127.0.0.1:50051", description="coordinator address host:port")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda:N'")
    threads: int = Field(0, ge=0, description="torch CPU threads, 0 = torch's default (per process with nproc)")
    devices: str = Field(
        "",
        description="train each plan data-parallel on these devices, one process each, e.g. cuda:0,cuda:1 "
        "(replaces device)",
    )
    nproc: int = Field(0, ge=0, le=64, description="train each plan data-parallel in this many CPU processes (gloo)")
    group_timeout_s: float = Field(
        300.0, gt=0, description="devices/nproc: how long a rank may wait on the others before the round is lost"
    )
    poll_wait_s: float = Field(10.0, gt=0, description="how long one task poll may wait on the server")
    log_format: Literal["text", "json"] = Field("text", description="log line format")
    progress: Literal["auto", "bar", "lines", "off"] = Field("auto", description="training progress display")
    memory_limit: str | None = Field(
        None, description="cap on usable device memory, e.g. 1.5GiB, 800MiB, 2GB or bytes; none = the device's"
    )
    compute_share: float = Field(1.0, gt=0, le=1, description="share of the device's compute to use (duty cycle)")
    insecure: bool = Field(False, description="plaintext gRPC without authentication; the coordinator must agree")
    reconnect_s: float = Field(
        900.0, gt=0, description="how long to keep retrying an unreachable coordinator before giving up"
    )
    ready_s: float = Field(60.0, gt=0, description="readiness: the coordinator answered within this many seconds")
    after_finish: Literal["exit", "next-run"] = Field(
        "exit",
        description="exit: end when the run is finished; next-run: stay up and join the next run the coordinator "
        "on the same address opens (a new coordinator process included), waiting for it without a time limit",
    )
    tls: TlsSection = TlsSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    models: dict[str, str] = Field(
        {},
        description="other bases a run may name, name -> model directory (or an embedded name); loaded when a run "
        "asks for one, and kept between runs",
    )
    datasets: dict[str, DataSection] = Field(
        {},
        description="named data sets a run may name (run.dataset on the coordinator); the coordinator learns the "
        "name, never the path",
    )
    metrics: MetricsSection = MetricsSection()
    calibration: CalibrationSection = CalibrationSection()

    @field_validator("agent_id")
    @classmethod
    def _agent_id(cls, value: str) -> str:
        if not re.fullmatch(AGENT_ID_PATTERN, value):
            raise ValueError("use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _memory_limit(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # a YAML byte count arrives as an int
        if isinstance(value, str):
            parse_size(value)
        return value

    def memory_limit_bytes(self) -> int:
        """The memory cap in bytes, 0 = none."""
        return parse_size(self.memory_limit) if self.memory_limit else 0

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: str) -> str:
        from edge_agent.parallel import parse_devices

        try:
            parse_devices(value, 0)
        except (RuntimeError, ValueError) as err:  # torch.device's own message names the bad entry
            raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _one_of_devices_nproc(self) -> AgentConfig:
        if self.devices and self.nproc > 1:
            raise ValueError("set devices or nproc, not both")
        return self

    @field_validator("coordinator")
    @classmethod
    def _address(cls, value: str) -> str:
        if not re.fullmatch(r"[^\s:]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}", value):
            raise ValueError("must be host:port")
        return value

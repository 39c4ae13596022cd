"""Operator caps: human sizes, the duty-cycle throttle, and the config fields that carry both."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from common.errors import ConfigError
from common.settings import build
from edge_agent.caps import Throttle, apply_memory_cap, check_peak, parse_size
from edge_agent.config import AgentConfig


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1.5GiB", 3 * 2**29),
        ("800MiB", 800 * 2**20),
        ("2GB", 2 * 10**9),
        ("1024", 1024),
        ("512 kib", 512 * 2**10),
        (" 3TB ", 3 * 10**12),
        ("0.5KB", 500),
        (".5GiB", 2**29),
        ("7b", 7),
    ],
)
def test_parse_size_accepts_human_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lots", "is not a size"),
        ("1.5 GiBs", "is not a size"),
        ("-1GiB", "is not a size"),
        ("1e9", "is not a size"),
        ("", "is not a size"),
        ("0", "at least one byte"),
        ("0.1B", "at least one byte"),
    ],
)
def test_parse_size_rejects_what_is_not_a_size(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(text)


class FakeClock:
    """A clock that only moves when the throttle sleeps, plus oversleep to test the credit."""

    def __init__(self, oversleep: float = 0.0) -> None:
        self.now = 0.0
        self.oversleep = oversleep
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds + self.oversleep

    def clock(self) -> float:
        return self.now


@pytest.mark.parametrize(("share", "owed"), [(0.5, 1.0), (0.25, 3.0), (0.8, 0.25)])
def test_throttle_sleeps_work_times_inverse_share_minus_one(share: float, owed: float) -> None:
    fake = FakeClock()
    throttle = Throttle(share, fake.sleep, fake.clock)
    slept = throttle.after_work(1.0)
    assert slept == pytest.approx(owed) and fake.sleeps == [pytest.approx(owed)]


def test_throttle_credits_oversleep_against_the_next_piece_of_work() -> None:
    fake = FakeClock(oversleep=0.3)
    throttle = Throttle(0.5, fake.sleep, fake.clock)
    throttle.after_work(1.0)  # owes 1.0, sleeps 1.3
    throttle.after_work(1.0)  # owes 1.0 - 0.3
    assert fake.sleeps == [pytest.approx(1.0), pytest.approx(0.7)]
    throttle.after_work(0.1)  # owes 0.1 - 0.3 < 0: no sleep at all
    assert len(fake.sleeps) == 2


def test_full_share_never_sleeps() -> None:
    fake = FakeClock()
    throttle = Throttle(1.0, fake.sleep, fake.clock)
    with throttle:
        fake.now += 5.0
    assert throttle.after_work(3.0) == 0.0 and fake.sleeps == [] and not throttle.active


def test_failed_work_owes_no_sleep() -> None:
    fake = FakeClock()
    throttle = Throttle(0.5, fake.sleep, fake.clock)
    with pytest.raises(RuntimeError), throttle:
        fake.now += 1.0
        raise RuntimeError("out of memory")
    assert fake.sleeps == []


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.parametrize(("share", "low", "high"), [(0.5, 1.8, 2.5), (1.0, 1.0, 1.15)])
def test_throttle_duty_cycle_on_the_real_clock(share: float, low: float, high: float) -> None:
    throttle = Throttle(share)
    start = time.perf_counter()
    for _ in range(10):
        with throttle:
            busy(0.02)
    total = time.perf_counter() - start
    assert throttle.work_s >= 0.2 and low <= total / throttle.work_s <= high


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_throttle_rejects_shares_outside_0_1(share: float) -> None:
    with pytest.raises(ValueError, match="compute share"):
        Throttle(share)


def test_check_peak() -> None:
    assert check_peak(2 * 2**30, 0, "run") and check_peak(2**30, 2**30, "run")
    assert not check_peak(2**30 + 1, 2**30, "run")


def test_caps_and_calibration_flags_build() -> None:
    argv = ["--agent-id", "a1", "--memory-limit", "1.5GiB", "--compute-share", "0.25", "--calibration.seq-len", "48"]
    config = build(AgentConfig, argv, "fedpipe-agent")
    assert config.memory_limit_bytes() == 3 * 2**29 and config.compute_share == 0.25
    assert config.calibration.seq_len == 48 and config.calibration.batch_sizes == [2, 8]
    assert build(AgentConfig, ["--agent-id", "a1"], "fedpipe-agent").memory_limit_bytes() == 0


def test_memory_limit_from_yaml_may_be_a_byte_count(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("agent_id: a1\nmemory_limit: 1073741824\ncalibration:\n  batch_sizes: [4, 16]\n")
    config = build(AgentConfig, ["--config", str(path)], "fedpipe-agent")
    assert config.memory_limit_bytes() == 2**30 and config.calibration.batch_sizes == [4, 16]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--memory-limit", "lots"], "memory_limit: Value error, 'lots' is not a size"),
        (["--memory-limit", "0"], "memory_limit: Value error, '0': a size must be at least one byte"),
        (["--compute-share", "0"], "compute_share: Input should be greater than 0"),
        (["--compute-share", "1.5"], "compute_share: Input should be less than or equal to 1"),
        (["--calibration.batch-sizes", "[8, 2]"], "calibration.batch_sizes: Value error, needs exactly two increasing"),
        (["--calibration.batch-sizes", "[2, 4, 8]"], "calibration.batch_sizes: Value error, needs exactly two"),
        (["--calibration.steps", "1"], "calibration.steps: Input should be greater than or equal to 2"),
        (["--calibration.seq-len", "0"], "calibration.seq_len: Input should be greater than or equal to 1"),
    ],
)
def test_bad_caps_and_calibration_config_names_the_field(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build(AgentConfig, ["--agent-id", "a1", *argv], "fedpipe-agent")
    assert message in str(caught.value)


@pytest.mark.parametrize("limit", [0, 2**30])
def test_memory_cap_on_cpu_is_reported_not_enforced(limit: int) -> None:
    assert apply_memory_cap(torch.device("cpu"), limit) is None

"""A simulated population: virtual agents' profiles and data drawn, seeded, from a heterogeneity spec.

Memory, FLOP/s and data size are log-uniform between the spec's bounds (edge fleets span orders of magnitude,
and log-uniform gives each decade the same share). Each agent's label mix is Dirichlet(label_skew) over the
classes (the per-client form of Hsu et al. 2019), or the pool's own mix when label_skew is unset. An agent's
examples are drawn without replacement from the pool's examples of each class; different agents may share
examples, so a thousand agents can be drawn from a few thousand texts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from common.data import Example
from common.settings import Section
from common.types import DeviceProfile

GIB = 2**30


class SimulationSection(Section):
    """fedpipe-coordinator simulate: the virtual agents and the work they do."""

    agents: int = Field(10, ge=1, le=100_000, description="virtual agents")
    seed: int = Field(0, description="seed of the profiles and the data split")
    memory_gib: tuple[float, float] = Field((2.0, 16.0), description="device memory range, GiB (log-uniform)")
    gflops: tuple[float, float] = Field((2.0, 50.0), description="measured GFLOP/s range (log-uniform)")
    samples: tuple[int, int] = Field((40, 200), description="examples per agent, train + validation (log-uniform)")
    label_skew: float | None = Field(None, gt=0, description="Dirichlet alpha of each agent's label mix; none: IID")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of an agent's examples held for validation")
    workers: int = Field(1, ge=1, le=64, description="virtual agents training at once (each worker holds a base)")
    work: Literal["train", "noise"] = Field(
        "train",
        description="train: the real agent task code (peft training on the shared base); noise: the download plus "
        "seeded noise, no model at all (a load test of the coordinator, nothing is learned)",
    )
    noise_scale: float = Field(0.01, gt=0, description="noise work: standard deviation of the change")
    executor: Literal["threads", "ray"] = Field(
        "threads",
        description="threads: `workers` threads of this process train; ray: Ray tasks do (fedpipe[ray]), at most "
        "`workers` at once",
    )
    ray_address: str = Field(
        "", description="executor ray: '' starts a local Ray with `workers` CPUs; 'auto' or ray://HOST:PORT joins one"
    )

    @model_validator(mode="after")
    def _ranges(self) -> SimulationSection:
        for name in ("memory_gib", "gflops", "samples"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"simulation.{name}: needs 0 < low <= high, got [{low}, {high}]")
        if self.samples[0] < 2:
            raise ValueError("simulation.samples: an agent needs at least 2 examples (one to train on)")
        return self


@dataclass(frozen=True)
class VirtualAgent:
    """One simulated agent: its id, profile and private data."""

    agent_id: str
    profile: DeviceProfile
    train: list[Example]
    val: list[Example]


def agent_ids(count: int) -> list[str]:
    """sim-0001 ... in order, zero-padded to the count's width."""
    width = max(4, len(str(count)))
    return [f"sim-{index:0{width}d}" for index in range(1, count + 1)]


def _log_uniform(rng: np.random.Generator, low: float, high: float, size: int) -> np.ndarray:
    return np.exp(rng.uniform(math.log(low), math.log(high), size))


def draw_population(section: SimulationSection, pool: list[Example], num_classes: int) -> list[VirtualAgent]:
    """The population of the spec over the pool (seeded: the same spec and pool give the same agents)."""
    if not pool:
        raise ValueError("the data pool is empty")
    rng = np.random.default_rng(section.seed)
    count = section.agents
    memory = _log_uniform(rng, *section.memory_gib, count) * GIB
    flops = _log_uniform(rng, *section.gflops, count) * 1e9
    sizes = np.rint(_log_uniform(rng, *section.samples, count)).astype(int)
    by_class = [np.flatnonzero(np.array([e.label for e in pool]) == c) for c in range(num_classes)]
    present = np.array([len(members) > 0 for members in by_class], dtype=float)
    natural = np.array([len(members) for members in by_class], dtype=float) / len(pool)
    agents: list[VirtualAgent] = []
    for index, agent_id in enumerate(agent_ids(count)):
        if section.label_skew is None:
            mix = natural
        else:
            mix = rng.dirichlet([section.label_skew] * num_classes) * present
            mix = mix / mix.sum() if mix.sum() > 0 else natural
        counts = rng.multinomial(int(sizes[index]), mix)
        chosen: list[int] = []
        for cls, wanted in enumerate(counts):
            members = by_class[cls]
            take = min(int(wanted), len(members))
            chosen.extend(int(i) for i in rng.choice(members, size=take, replace=False))
        examples = [pool[i] for i in rng.permutation(chosen)] if chosen else [pool[int(rng.integers(len(pool)))]]
        val_count = min(round(section.val_fraction * len(examples)), len(examples) - 1)
        train, val = examples[val_count:], examples[:val_count]
        profile = DeviceProfile(
            device="cpu",
            device_name="virtual",
            total_memory_bytes=int(memory[index]),
            free_memory_bytes=int(memory[index]),
            host_memory_bytes=int(memory[index]),
            flops_per_s=float(flops[index]),
            compute_dtype="float32",
            threads=1,
            num_train_samples=len(train),
            num_val_samples=len(val),
        )
        agents.append(VirtualAgent(agent_id, profile, train, val))
    return agents

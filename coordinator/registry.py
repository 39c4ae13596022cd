"""Registered agents, their measured profiles and liveness; one model spec per run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from common.errors import ModelMismatch, UnknownAgent
from common.types import DeviceProfile, ModelSpec


@dataclass(frozen=True)
class AgentRecord:
    """What the coordinator knows about one agent."""

    agent_id: str
    profile: DeviceProfile
    registered_at: float
    last_seen: float
    state: str = "idle"


class Registry:
    """Thread-safe map of agents of one run; every agent's model must equal the run's spec, which the
    coordinator derives from its own configuration (never from whoever registers first)."""

    def __init__(self, spec: ModelSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.labels = spec.labels
        self.clock = clock
        self._agents: dict[str, AgentRecord] = {}
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    def register(self, agent_id: str, profile: DeviceProfile, spec: ModelSpec) -> bool:
        """Add or refresh an agent; True when it is new. ModelMismatch when its model differs from the run's."""
        if spec.labels != self.labels:
            raise ModelMismatch(f"agent {agent_id} has labels {list(spec.labels)}, the run uses {list(self.labels)}")
        if spec != self.spec:
            raise ModelMismatch(
                f"agent {agent_id} runs base model {spec.fingerprint} ({spec.model_type}, {spec.task}), the run uses "
                f"{self.spec.fingerprint} ({self.spec.model_type}, {self.spec.task}){_difference(spec, self.spec)}; "
                "all agents must load the coordinator's model.path with the same model settings"
            )
        with self._lock:
            now = self.clock()
            new = agent_id not in self._agents
            self._agents[agent_id] = AgentRecord(agent_id, profile, now, now)
            self.changed.notify_all()
            return new

    def restore(self, profiles: Mapping[str, DeviceProfile]) -> None:
        """After a coordinator restart: the run's agents, each dead until it calls again.

        Agents then carry on with their heartbeats and task polls; none has to register again.
        """
        with self._lock:
            for agent_id, profile in profiles.items():
                self._agents.setdefault(agent_id, AgentRecord(agent_id, profile, float("-inf"), float("-inf")))
            self.changed.notify_all()

    def heartbeat(self, agent_id: str, state: str) -> None:
        """Mark an agent alive; UnknownAgent if it never registered (or the coordinator restarted)."""
        with self._lock:
            record = self._agents.get(agent_id)
            if record is None:
                raise UnknownAgent(f"agent {agent_id!r} is not registered")
            self._agents[agent_id] = replace(record, last_seen=self.clock(), state=state[:32])

    def touch(self, agent_id: str) -> AgentRecord:
        """Any call from an agent counts as a heartbeat; UnknownAgent if it is not registered."""
        with self._lock:
            record = self._agents.get(agent_id)
            if record is None:
                raise UnknownAgent(f"agent {agent_id!r} is not registered")
            record = replace(record, last_seen=self.clock())
            self._agents[agent_id] = record
            return record

    def get(self, agent_id: str) -> AgentRecord:
        """One agent's record; UnknownAgent if absent."""
        with self._lock:
            record = self._agents.get(agent_id)
        if record is None:
            raise UnknownAgent(f"agent {agent_id!r} is not registered")
        return record

    def alive(self, timeout_s: float) -> dict[str, AgentRecord]:
        """Agents heard from within timeout_s, by id in registration order."""
        now = self.clock()
        with self._lock:
            return {a: r for a, r in self._agents.items() if now - r.last_seen <= timeout_s}

    def all(self) -> dict[str, AgentRecord]:
        """Every registered agent."""
        with self._lock:
            return dict(self._agents)

    def wait_for(
        self, count: int, timeout_s: float, alive_s: float, stop: threading.Event | None = None
    ) -> dict[str, AgentRecord]:
        """Block until `count` agents are alive, timeout_s passed or `stop` is set; returns the alive ones."""
        end = self.clock() + timeout_s
        with self._lock:
            while True:
                now = self.clock()
                alive = {a: r for a, r in self._agents.items() if now - r.last_seen <= alive_s}
                if len(alive) >= count or now >= end or (stop is not None and stop.is_set()):
                    return alive
                self.changed.wait(min(1.0, end - now))


def _difference(mine: ModelSpec, run: ModelSpec) -> str:
    """The first field in which an agent's spec differs from the run's, for the refusal message."""
    if mine.fingerprint != run.fingerprint:
        return ""
    for name in ("model_type", "task", "base_parameters", "linear_parameters", "heads", "candidates"):
        if getattr(mine, name) != getattr(run, name):
            if name == "candidates":
                return f" (same fingerprint, other LoRA candidates: {len(mine.candidates)} vs {len(run.candidates)})"
            return f" (same fingerprint, other {name})"
    return ""

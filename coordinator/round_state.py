"""The open round's state, shared by the agent-call handlers (admission) and the round loop (orchestrator).

One condition variable guards every field; handlers and the loop read and write under it and notify it
when something changes (threads wait on it; coroutines are woken through its watchers). Deadlines are read
from the injected clock, so tests can move time.
"""

from __future__ import annotations

import enum
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from common.types import AdapterUpdate, Evaluation, GlobalState, ImportanceReport, ProbePlan, TrainPlan
from coordinator.secure_round import SecureRound

POLL_S = 1.0  # how often waits re-check liveness


class RunAborted(Exception):
    """The run cannot go on (too few agents, no importance scores, a stop); the message says why."""


class Phase(enum.Enum):
    """What the coordinator is doing; agent calls are answered from it."""

    REGISTERING = "registering"
    PROBING = "probing"
    TRAINING = "training"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"
    FINISHED = "finished"


@dataclass(frozen=True)
class Admitted:
    """An update admission accepted for the open round, with what admission measured of it."""

    update: AdapterUpdate
    checksum: bytes  # transfer.checksum_key of the payload, to recognise a replay
    norm: float  # L2 norm of its change to the tensors it was sent (after any clipping)
    raw_norm: float  # the same before clipping
    tensor_norms: Mapping[str, float]  # per tensor, the norm of its change (after any clipping)


@dataclass
class RoundState:
    """Phase, plans, inbox of updates, replay digests, reports and the waits of one run."""

    clock: Callable[[], float] = time.monotonic
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    cond: threading.Condition = field(default_factory=threading.Condition)
    stopping: threading.Event = field(default_factory=threading.Event)
    phase: Phase = Phase.REGISTERING
    end_message: str = "the run is complete"  # what agents hear with FINISHED (a cancelled run says so)
    round: int = 0
    global_: GlobalState | None = None
    plans: dict[str, TrainPlan] = field(default_factory=dict)  # the open training round's plans
    allowed: dict[str, int] = field(default_factory=dict)  # most samples each planned update may claim
    inbox: dict[str, Admitted] = field(default_factory=dict)  # accepted updates of the open round
    # payload checksum of each accepted update by (agent, round), this round and the last (replays)
    digests: dict[tuple[str, int], bytes] = field(default_factory=dict)
    withdrawn: set[str] = field(default_factory=set)  # planned agents that restarted mid-round
    sat_out: dict[str, str] = field(default_factory=dict)  # planned agents refused this round, with the reason
    excluded: dict[str, str] = field(default_factory=dict)  # agents the planner left out, with the reason
    eval_plans: dict[str, TrainPlan] = field(default_factory=dict)  # agents asked to evaluate the global
    eval_reports: dict[str, Evaluation] = field(default_factory=dict)
    probe: ProbePlan | None = None  # the open importance probe
    probe_agents: set[str] = field(default_factory=set)
    importance: dict[str, ImportanceReport] = field(default_factory=dict)
    finished_seen: set[str] = field(default_factory=set)
    notices: dict[str, str] = field(default_factory=dict)  # agent -> what it is told with its WAITs this round
    downloaded: dict[str, int] = field(default_factory=dict)  # agent -> bytes sent to it since the round opened
    # each download of (global round, plan, what the agent holds) as the transport encoded it, and its bytes
    downloads: dict[tuple[int, str, str], tuple[object, int]] = field(default_factory=dict)
    secure: SecureRound | None = None  # the open round's secure aggregation (privacy.secure_aggregation)
    # called on every notify, for waiters that are not threads (the asyncio transport's task polls)
    watchers: list[Callable[[], None]] = field(default_factory=list)

    def notify(self) -> None:
        """Wake every waiter (call with cond held)."""
        self.cond.notify_all()
        for watcher in self.watchers:
            watcher()

    def open_training(
        self,
        round_: int,
        plans: Mapping[str, TrainPlan],
        allowed: Mapping[str, int],
        secure: SecureRound | None = None,
    ) -> None:
        """Start taking uploads for round_ (or, for a secure round, keys and then the secure steps); the last
        round's digests stay one more round for late replays."""
        with self.cond:
            self.phase, self.round, self.plans, self.inbox = Phase.TRAINING, round_, dict(plans), {}
            self.secure = secure
            self.allowed = dict(allowed)
            self.digests = {k: v for k, v in self.digests.items() if k[1] == round_ - 1}
            self.withdrawn, self.sat_out, self.notices, self.downloaded = set(), {}, {}, {}
            self.notify()

    def delivered(self) -> set[str]:
        """Planned agents the training wait no longer waits for: uploaded (a secure round: advertised keys),
        withdrawn or sitting out."""
        return set(self._trained()) | self.withdrawn | set(self.sat_out)

    def trained(self) -> int:
        """How many planned agents finished training: uploads, or a secure round's advertised keys."""
        return len(self._trained())

    def _trained(self) -> Mapping[str, object]:
        return self.secure.keys if self.secure is not None else self.inbox

    def close_training(self) -> dict[str, Admitted]:
        """Stop taking uploads; the round's accepted updates."""
        with self.cond:
            self.phase, self.secure = Phase.AGGREGATING, None
            return dict(self.inbox)

    def open_probe(self, probe: ProbePlan, agents: Collection[str]) -> None:
        """Ask these agents for importance scores."""
        with self.cond:
            self.phase, self.probe, self.probe_agents, self.importance = Phase.PROBING, probe, set(agents), {}
            self.notify()

    def close_probe(self) -> dict[str, ImportanceReport]:
        """The probe's reports; no more are taken."""
        with self.cond:
            self.phase, self.probe = Phase.AGGREGATING, None
            return dict(self.importance)

    def open_evaluation(self, plans: Mapping[str, TrainPlan]) -> None:
        """Ask these agents to evaluate the current global on their validation split."""
        with self.cond:
            self.phase, self.eval_reports, self.eval_plans = Phase.EVALUATING, {}, dict(plans)
            self.notify()

    def close_evaluation(self) -> dict[str, Evaluation]:
        """The evaluations reported; no more are taken."""
        with self.cond:
            self.phase = Phase.AGGREGATING
            return dict(self.eval_reports)

    def set_global(self, global_: GlobalState) -> None:
        """Publish a new global (downloads from now on get it; encoded copies of the old one are dropped)."""
        with self.cond:
            self.global_ = global_
            self.downloads = {}
            self.notify()

    def wait_for(
        self,
        expected: Collection[str],
        received: Callable[[], Collection[str]],
        deadline: float,
        alive: Callable[[], set[str]],
    ) -> str:
        """Wait until every expected agent delivered, the deadline passed, every outstanding agent is dead
        or the run stops; returns which: "done", "deadline", "dead" or "stopped"."""
        with self.cond:
            while True:
                pending = set(expected) - set(received())
                now = self.clock()
                if not pending:
                    return "done"
                if self.stopping.is_set():
                    return "stopped"
                if now >= deadline:
                    return "deadline"
                if not pending & alive():
                    return "dead"
                self.cond.wait(min(POLL_S, deadline - now))

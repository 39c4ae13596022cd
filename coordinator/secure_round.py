"""A secure round's steps on the coordinator (privacy.secure_aggregation): what the round state holds while
one runs, and the waits that drive it after training.

Agents train as usual, then advertise their keys instead of uploading (the training wait counts those). With
the keys in, the participants are fixed and the steps follow, each waiting up to step_deadline_s: shares
(SECAGG_SHARE), masked uploads (SECAGG_MASK, an UploadUpdate of one int64 tensor), unmasking (SECAGG_UNMASK).
The outcome is the sum of the survivors' encoded changes, decoded and laid out, or the reason the round fails.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import torch

from common import linear
from common.errors import InvalidArgument, StaleRound
from common.secagg import MASKED, Params, decode, default_neighbours
from common.types import SecAggStep, SecureSpec, TaskKind, TensorInfo
from coordinator.config import PrivacySection, SecureAggregationSection
from coordinator.metrics import CoordinatorMetrics
from coordinator.secagg import RoundSkipped, SecAggServer

log = logging.getLogger(__name__)


@dataclass
class SecureRound:
    """One secure round's state, in the round state (guarded by its lock)."""

    spec: SecureSpec
    step: str = "keys"  # keys -> shares -> masking -> unmask -> done
    keys: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # advertised while training
    proofs: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # signed rounds: (certificate, signature)
    server: SecAggServer | None = None
    noise_std: float = 0.0  # each agent's share of the DP noise, per coordinate

    @classmethod
    def open(cls, tag: str, layout: Mapping[str, torch.Tensor], privacy: PrivacySection) -> SecureRound:
        """A secure round named tag over this linear layout; agents clip to privacy.dp.clip_norm under DP, else
        to secure_aggregation.clip_norm."""
        secure = privacy.secure_aggregation
        spec = SecureSpec(
            tag=tag,
            layout=linear.shapes(layout),
            fraction_bits=secure.fraction_bits,
            clip_norm=privacy.dp.clip_norm if privacy.dp.enabled else secure.clip_norm,
            signed=secure.signed_keys,
        )
        return cls(spec)

    @property
    def length(self) -> int:
        """Coordinates of the masked vector."""
        return sum(math.prod(shape) for shape in self.spec.layout.values())

    def task_for(self, agent: str) -> tuple[TaskKind, SecAggStep] | None:
        """The SECAGG_* task an agent has to do now, if any: its kind and step."""
        server = self.server
        if server is None:
            return None
        params = server.params
        if self.step == "shares" and agent in params.participants and agent not in server.sealed:
            keys = server.keys_for(agent)
            step = SecAggStep(
                participants=params.participants,
                neighbours=params.neighbours,
                threshold=params.threshold,
                keys=keys,
                proofs={j: self.proofs[j] for j in keys if j in self.proofs},
            )
            return TaskKind.SECAGG_SHARE, step
        if self.step == "masking" and agent in server.sealed and agent not in server.vectors:
            return TaskKind.SECAGG_MASK, SecAggStep(sealed=server.shares_for(agent), noise_std=self.noise_std)
        if self.step == "unmask" and server.closed is not None:
            alive, dropped = server.closed
            if agent in alive and agent not in server.revealed:
                return TaskKind.SECAGG_UNMASK, SecAggStep(survivors=tuple(alive), dropped=tuple(dropped))
        return None

    def check_masked(self, agent: str, infos: list[TensorInfo]) -> None:
        """A masked upload's header: in the masking step, from an agent that shared, exactly one int64 tensor."""
        if self.step != "masking" or self.server is None or agent not in self.server.sealed:
            raise StaleRound(f"{agent} has no masked upload due in secure round {self.spec.tag} ({self.step})")
        expected = [TensorInfo(MASKED, (self.length,), "int64")]
        if list(infos) != expected:
            got = [(i.name, i.shape, i.dtype) for i in infos][:2]
            raise InvalidArgument(
                "payload.tensors", f"a masked upload is one int64 {MASKED} of ({self.length},), not {got}"
            )


@dataclass(frozen=True)
class SecureOutcome:
    """What the secure steps produced: the sum (laid out), whose it is, and how many shared."""

    sums: dict[str, torch.Tensor]
    survivors: tuple[str, ...]
    sharers: int


class SecureSteps:
    """The waits of the secure steps; `wait(expected, received, deadline)` is the orchestrator's."""

    def __init__(
        self,
        section: SecureAggregationSection,
        metrics: CoordinatorMetrics,
        cond: threading.Condition,
        wait: Callable[[Collection[str], Callable[[], Collection[str]], float], None],
        clock: Callable[[], float],
    ) -> None:
        self.section = section
        self.metrics = metrics
        self.cond = cond
        self.wait = wait
        self.clock = clock

    def run(
        self, secure: SecureRound, notify: Callable[[], None], quorum: int, noise: Callable[[int], float]
    ) -> SecureOutcome | str:
        """Shares, masking and unmasking after the keys are in; the outcome, or why the round fails.
        noise(n): each agent's share of the DP noise when n agents share (0 without DP)."""
        section = self.section
        with self.cond:
            participants = tuple(sorted(secure.keys))
        if len(participants) < max(quorum, 2):
            return f"{len(participants)} agents advertised keys, {max(quorum, 2)} needed"
        k = min(section.neighbours or default_neighbours(len(participants)), len(participants) - 1)
        params = Params(
            secure.spec.tag, participants, k, section.threshold_for(k), secure.spec.fraction_bits, secure.length
        )
        server = SecAggServer(params)
        with self.cond:
            for agent in participants:
                server.advertise(agent, *secure.keys[agent])
            secure.server, secure.step = server, "shares"
            notify()
        log.info(
            "secure round %s: %d participants, %d neighbours each, threshold %d", params.tag, len(participants), k,
            params.threshold,
        )  # fmt: skip
        self.metrics.secagg_participants.set(len(participants))
        began = time.perf_counter()
        self.wait(participants, lambda: server.sealed, self.clock() + section.step_deadline_s)
        shared = time.perf_counter()
        with self.cond:
            sharers = sorted(server.sealed)
            secure.noise_std = noise(len(sharers))
            secure.step = "masking"
            notify()
        self._missed("shares", participants, sharers, shared - began)
        if len(sharers) < max(quorum, params.threshold):
            return f"{len(sharers)} agents sent their shares, {max(quorum, params.threshold)} needed"
        self.wait(sharers, lambda: server.vectors, self.clock() + section.step_deadline_s)
        masked = time.perf_counter()
        with self.cond:
            self._missed("masking", sharers, list(server.vectors), masked - shared)
            try:
                alive, _ = server.close_masking()
            except RoundSkipped as err:
                return str(err)
            secure.step = "unmask"
            notify()
        if len(alive) < quorum:
            return f"{len(alive)} masked updates arrived, {quorum} needed (quorum)"
        self.wait(alive, lambda: server.revealed, self.clock() + section.step_deadline_s)
        revealed = time.perf_counter()
        with self.cond:
            secure.step = "done"  # no handler touches the relay from here, so the unmasking needs no lock
            revealers = list(server.revealed)
        self._missed("unmask", alive, revealers, revealed - masked)
        try:
            total = server.result()
        except RoundSkipped as err:
            return str(err)
        sums = linear.unflatten(decode(total, params.fraction_bits), secure.spec.layout)
        self.metrics.secagg_step_seconds.labels("unmasking").set(time.perf_counter() - revealed)
        log.info(
            "secure round %s: the sum of %d masked updates (%d values) unmasked; shares %.2fs, masked uploads %.2fs, "
            "unmask shares %.2fs, unmasking %.2fs",
            params.tag, len(alive), params.length, shared - began, masked - shared, revealed - masked,
            time.perf_counter() - revealed,
        )  # fmt: skip
        return SecureOutcome(sums, tuple(alive), len(sharers))

    def _missed(self, step: str, expected: Collection[str], done: Collection[str], seconds: float) -> None:
        """A step's time, and each agent that did not complete it."""
        self.metrics.secagg_step_seconds.labels(step).set(seconds)
        for agent in sorted(set(expected) - set(done)):
            self.metrics.secagg_missed.labels(agent, step).inc()
            log.warning("secure step %s: %s did not complete it by the deadline", step, agent)

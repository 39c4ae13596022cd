"""A hostile agent of our own, and a federation with it beside honest ones (tests and benchmarks share them).

Mallory holds a valid certificate of the run's CA and behaves like an agent on the wire: it registers with
a plausible profile, polls for tasks and, for every TRAIN task, downloads the global it is sent and uploads
that global with its classifier bias pushed towards one label, claiming as many samples as its plan lets
an honest agent claim. Two attacks:

- "bias": the bias at +-1e6 (a well-formed, finite update that ruins every prediction);
- "scaled": a change of a chosen L2 norm (one for all rounds, or per round), all of it on the bias (an
  attacker that stays under a norm bound).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from fedpipe.v1 import fedpipe_pb2 as pb
from fedpipe.v1 import fedpipe_pb2_grpc as pb_grpc

from common import serde, transfer
from common.certs import agent_paths, write_bundle
from common.data import EMBEDDED_LABELS
from common.modeling import configured_model
from common.types import DeviceProfile, TaskKind, TrainPlan, UpdateMeta
from deploy.local_federation import Federation

MALLORY = "mallory"
BIAS = "classifier.bias"
TRAIN_SAMPLES = 360  # what mallory claims to hold: as much as each honest agent of the tests
PROFILE = DeviceProfile("cpu", "mallory's cpu", 8 * 2**30, 6 * 2**30, 8 * 2**30, 5e10, "float32", 2, TRAIN_SAMPLES, 40)


class Mallory(threading.Thread):
    """The hostile client; `outcomes` holds the coordinator's answer (or refusal) to each upload."""

    def __init__(
        self,
        address: str,
        certs: Path,
        attack: str = "bias",
        norm: float | Mapping[int, float] = 0.0,
        towards: int = 1,
    ) -> None:
        super().__init__(name="mallory", daemon=True)
        crt, key = agent_paths(certs, MALLORY)
        creds = grpc.ssl_channel_credentials((certs / "ca.crt").read_bytes(), key.read_bytes(), crt.read_bytes())
        self.channel = grpc.secure_channel(address, creds)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.attack, self.norm, self.towards = attack, norm, towards
        self.outcomes: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        _, spec = configured_model("embedded", "auto", EMBEDDED_LABELS)
        request = pb.RegisterRequest(
            agent_id=MALLORY, profile=serde.profile_to_pb(PROFILE), model=serde.spec_to_pb(spec)
        )
        _retry(lambda: self.stub.Register(request, timeout=10))
        trained: set[int] = set()
        while not self.done.is_set():
            try:
                answer = self.stub.GetTask(pb.GetTaskRequest(agent_id=MALLORY, wait_s=2.0), timeout=15)
            except grpc.RpcError:
                time.sleep(0.5)
                continue
            task = serde.task_from_pb(answer)
            if task.kind is TaskKind.FINISHED:
                return
            if task.kind is TaskKind.TRAIN and task.plan is not None and task.round not in trained:
                trained.add(task.round)
                self.outcomes.append(self._poison(task.round, task.global_round, task.plan))

    def _poison(self, round_: int, global_round: int, plan: TrainPlan) -> str:
        request = pb.DownloadGlobalRequest(agent_id=MALLORY, global_round=global_round, plan_id=plan.plan_id)
        parts = list(self.stub.DownloadGlobal(request, timeout=60))
        tensors = transfer.decode_payload(parts[0].header, [p.chunk for p in parts[1:]], 1 << 30, 1 << 23)
        bias = tensors[BIAS].clone()
        if self.attack == "bias":
            bias[:] = -1e6
            bias[self.towards] = 1e6
        else:  # all of the allowed change on the bias: +norm/sqrt(2) towards the label, -norm/sqrt(2) away
            norm = self.norm.get(round_, 0.0) if isinstance(self.norm, Mapping) else self.norm
            step = norm / math.sqrt(2)
            bias -= step
            bias[self.towards] += 2 * step
        tensors[BIAS] = bias
        samples = plan.steps_for(TRAIN_SAMPLES) * plan.batch_size
        meta = UpdateMeta(MALLORY, round_, plan.plan_id, samples, plan.steps_for(TRAIN_SAMPLES), 10.0, 0.5, 2**30)
        header, payload = transfer.encode_payload(tensors)
        messages = [pb.UploadUpdateRequest(header=serde.update_header_to_pb(meta, header))]
        messages += [pb.UploadUpdateRequest(chunk=c) for c in transfer.chunked(payload)]
        try:
            return str(self.stub.UploadUpdate(iter(messages), timeout=60).message)
        except grpc.RpcError as err:
            return f"{err.code().name}: {err.details()}"


def _retry(call: Callable[[], object], give_up_s: float = 120.0) -> None:
    end = time.monotonic() + give_up_s
    while True:
        try:
            call()
            return
        except grpc.RpcError:
            if time.monotonic() > end:
                raise
            time.sleep(0.5)


def federate(
    spec: Mapping[str, Any], run_dir: Path, mallory: Mapping[str, Any] | None = None, timeout_s: float = 900.0
) -> dict[str, Any]:
    """Run a launcher spec (deploy/local_federation.py's format) to its end, with Mallory beside the honest
    agents when `mallory` gives its keyword arguments (attack, norm, towards); the run's summary, with
    mallory's answers under "mallory". AssertionError with the coordinator's log tail when the run fails."""
    with Federation(dict(spec), run_dir) as fed:
        if mallory is not None:
            write_bundle(run_dir / "certs", [MALLORY])  # a valid certificate of the run's CA
        coordinator = fed.start_coordinator()
        assert fed.wait_serving(), fed.log("coordinator")[-3000:]
        for agent in fed.agent_ids:
            fed.start_agent(agent)
        client = None
        if mallory is not None:
            client = Mallory(fed.address, run_dir / "certs", **mallory)
            client.start()
        end = time.monotonic() + timeout_s
        while coordinator.poll() is None and time.monotonic() < end:
            time.sleep(0.5)
        assert coordinator.poll() == 0, fed.log("coordinator")[-4000:]
        summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
        if client is not None:
            client.done.set()
            client.join(timeout=30)
            client.channel.close()
            summary["mallory"] = client.outcomes
        return summary


def heldout_accuracies(summary: Mapping[str, Any]) -> list[float]:
    """Held-out accuracy of every evaluated round."""
    return [float(r["heldout"]["accuracy"]) for r in summary["rounds"] if r.get("heldout")]


def change_norms(run_dir: Path, tensor: str | None = None) -> dict[int, list[float]]:
    """Per round, the change norms of the aggregated updates (of one tensor, or whole), from rounds/NNNN/plans.json."""
    norms: dict[int, list[float]] = {}
    for path in sorted((run_dir / "rounds").glob("*/plans.json")):
        round_ = int(path.parent.name)
        for record in json.loads(path.read_text()).values():
            measured = record.get("measured") or {}
            value = measured.get("tensor_change_norms", {}).get(tensor) if tensor else measured.get("change_norm")
            if value is not None:
                norms.setdefault(round_, []).append(float(value))
    return norms

"""A data-parallel agent: this process is rank 0 and talks to the coordinator; it starts one helper process per
further device (NCCL on CUDA, gloo on CPU), and every TRAIN task's plan is trained by all of them at once. A plan
that splits the base by layers over the devices (placement "layers") trains in rank 0 alone; the helpers free
their copies of the base first.

The helpers hold their own copy of the base on their device, get the plan, the downloaded global and (once per
data set) the examples over a pipe, and train in step with rank 0 (edge_agent.collective). Only rank 0 uploads.
A helper that dies (killed, out of memory) makes the next collective fail on every rank within seconds; the
group is then shut down, GroupFailed raised, and started afresh for the next task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import multiprocessing
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from common.data import Example
from common.errors import FedPipeError
from common.types import Accelerator, DeviceProfile, TrainPlan
from edge_agent.collective import Collective

log = logging.getLogger(__name__)

ALLREDUCE_PROBE_BYTES = 8 * 2**20  # large enough to time bandwidth, not per-call latency
START_TIMEOUT_S = 300.0  # helpers import torch and join the group; a slow disk takes a while


class GroupFailed(FedPipeError):
    """A rank of the agent's process group failed; the group is gone and this task's work is lost."""


@dataclass(frozen=True)
class Job:
    """One TRAIN task as a helper needs it (pickled through its pipe)."""

    base: tuple[str, tuple[str, ...], str]  # (model path, labels, task): the helper loads it once
    data_key: int  # which examples (sent earlier) to train on
    plan: TrainPlan
    tensors: bytes  # the downloaded global, in safetensors form
    task: str


def backend_for(devices: Sequence[torch.device]) -> str:
    """NCCL when every rank is a GPU, gloo otherwise."""
    return "nccl" if all(d.type == "cuda" for d in devices) else "gloo"


def parse_devices(devices: str, nproc: int) -> list[torch.device]:
    """--devices cuda:0,cuda:1 or --nproc N (N CPU processes); [] for an ordinary one-device agent."""
    if devices and nproc > 1:
        raise ValueError("set devices or nproc, not both")
    if nproc > 1:
        return [torch.device("cpu")] * nproc
    names = [name.strip() for name in devices.split(",") if name.strip()]
    parsed = [torch.device(name) for name in names]
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"devices lists one twice: {devices}")
    return parsed if len(parsed) > 1 else []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DeviceGroup:
    """Helper processes for ranks 1..n-1, with this process as rank 0 on devices[0]."""

    def __init__(
        self,
        devices: Sequence[torch.device],
        threads: int,
        compute_share: float,
        timeout_s: float,
        memory_cap_bytes: int = 0,
    ) -> None:
        """memory_cap_bytes: the agent's memory_limit, enforced on every GPU rank as on rank 0 (0 = none)."""
        if len(devices) < 2:
            raise ValueError("a device group needs at least two devices")
        self.devices = list(devices)
        self.threads = threads
        self.compute_share = compute_share
        self.timeout_s = timeout_s
        self.memory_cap_bytes = memory_cap_bytes
        self.helpers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        self.sent_data: set[int] = set()
        self.collective: Collective | None = None
        self.allreduce_bytes_per_s = 0.0

    @property
    def world(self) -> int:
        return len(self.devices)

    def start(self) -> None:
        """Spawn the helpers and join the process group with them (and time one all-reduce)."""
        import torch.distributed as dist

        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked, and torch's threads neither
        address = f"127.0.0.1:{_free_port()}"
        backend = backend_for(self.devices)
        for rank in range(1, self.world):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=helper_main,
                args=(
                    rank,
                    self.world,
                    address,
                    backend,
                    str(self.devices[rank]),
                    self.threads,
                    self.compute_share,
                    self.timeout_s,
                    self.memory_cap_bytes,
                    theirs,
                ),
                name=f"fedpipe-rank-{rank}",
                daemon=True,
            )
            process.start()
            theirs.close()
            self.helpers.append((process, ours))
        timeout = datetime.timedelta(seconds=max(self.timeout_s, START_TIMEOUT_S))
        dist.init_process_group(backend, init_method=f"tcp://{address}", rank=0, world_size=self.world, timeout=timeout)
        self.collective = Collective(0, self.world, self.devices[0])
        self.sent_data = set()
        self.allreduce_bytes_per_s = self._time_allreduce()
        log.info(
            "process group: %d ranks on %s over %s, all-reduce %.2f GB/s",
            self.world,
            ", ".join(str(d) for d in self.devices),
            backend,
            self.allreduce_bytes_per_s / 1e9,
        )

    def _time_allreduce(self) -> float:
        """Bus bandwidth of a ring all-reduce (2 (n - 1) / n of the buffer through each rank), best of 3."""
        import torch.distributed as dist

        buffer = torch.ones(ALLREDUCE_PROBE_BYTES // 4, device=self.devices[0])
        best = float("inf")
        for _ in range(4):  # the first warms the connections up
            start = time.perf_counter()
            dist.all_reduce(buffer)
            if buffer.is_cuda:
                torch.cuda.synchronize(buffer.device)
            best = min(best, time.perf_counter() - start)
        return 2 * (self.world - 1) / self.world * ALLREDUCE_PROBE_BYTES / max(best, 1e-9)

    def accelerators(self, first: Accelerator) -> tuple[Accelerator, ...]:
        """Every rank's device; rank 0's as measured, the others by asking each helper to measure its own."""
        found = [first]
        for process, pipe in self.helpers:
            pipe.send(("profile",))
            found.append(self._reply(process, pipe))
        return tuple(found)

    def train(self, job: Job, examples: list[Example], rank0: Callable[[Collective], Any]) -> Any:
        """Run job on every rank: the helpers train alongside rank0(collective), whose result is returned.
        GroupFailed when any rank fails; the group is closed then, and start() runs again on the next call."""
        if self.collective is None:
            self.start()
        assert self.collective is not None
        try:
            for _, pipe in self.helpers:
                if job.data_key not in self.sent_data:
                    pipe.send(("data", job.data_key, examples))
                pipe.send(("train", job))
            self.sent_data.add(job.data_key)
            result = rank0(self.collective)
            for process, pipe in self.helpers:
                self._reply(process, pipe)
            return result
        except GroupFailed:
            self.close()
            raise
        except (RuntimeError, OSError, EOFError) as err:  # a collective broke: a rank died or raised
            why = self._dead() or str(err).splitlines()[0]
            self.close()
            raise GroupFailed(f"the process group failed: {why}") from None
        except BaseException:  # anything else on rank 0 leaves the helpers inside a collective: end them too
            self.close()
            raise

    def release(self) -> int:
        """Have every helper free the base it holds, so a base split by layers over the devices has their memory;
        the number of bases freed. GroupFailed (and the group closed) when a helper fails to answer."""
        try:
            for _, pipe in self.helpers:
                pipe.send(("release",))
            return sum(int(self._reply(process, pipe)) for process, pipe in self.helpers)
        except (GroupFailed, OSError, EOFError) as err:
            self.close()
            raise GroupFailed(f"the process group failed: {err}") from None

    def _reply(self, process: multiprocessing.process.BaseProcess, pipe: Connection) -> Any:
        """The helper's answer; GroupFailed when it reports an error or dies first."""
        deadline = time.monotonic() + self.timeout_s
        while not pipe.poll(1.0):
            if not process.is_alive() or time.monotonic() > deadline:
                raise GroupFailed(f"{process.name} {self._state(process)} before it answered")
        try:
            kind, value = pipe.recv()
        except (EOFError, OSError):
            raise GroupFailed(f"{process.name} {self._state(process)} before it answered") from None
        if kind == "error":
            raise GroupFailed(f"{process.name}: {value}")
        return value

    @staticmethod
    def _state(process: multiprocessing.process.BaseProcess) -> str:
        if process.is_alive():
            return "did not answer in time"
        return f"exited with code {process.exitcode}"

    def _dead(self) -> str:
        """Which helpers have died (waiting briefly: a killed peer's socket closes before its exit is seen)."""
        time.sleep(0.5)
        return "; ".join(f"{p.name} {self._state(p)}" for p, _ in self.helpers if not p.is_alive())

    def close(self) -> None:
        """Stop every helper and leave the process group."""
        import torch.distributed as dist

        for _, pipe in self.helpers:
            with contextlib.suppress(OSError, EOFError):  # a dead helper's pipe
                pipe.send(("stop",))
        for process, pipe in self.helpers:
            process.join(timeout=5.0)
            if process.is_alive():
                process.kill()
                process.join(timeout=5.0)
            pipe.close()
        self.helpers = []
        self.collective = None
        if dist.is_initialized():
            dist.destroy_process_group()


def with_group(measured: DeviceProfile, group: DeviceGroup) -> DeviceProfile:
    """The profile of a data-parallel agent: every device it trains on, and as the planning basis the smallest
    memory and the slowest FLOP/s among them (a synchronous step waits for its slowest rank)."""
    first = Accelerator(measured.device, measured.device_name, measured.total_memory_bytes, measured.flops_per_s)
    devices = group.accelerators(first)
    cap = measured.memory_cap_bytes
    memory = min(d.total_memory_bytes if not cap else min(cap, d.total_memory_bytes) for d in devices)
    if not cap and all(d.device == "cpu" for d in devices):
        memory //= len(devices)  # CPU processes share the host's memory (a memory_limit is per process)
    return dataclasses.replace(
        measured,
        total_memory_bytes=memory,
        free_memory_bytes=min(measured.free_memory_bytes, memory),
        flops_per_s=min(d.flops_per_s for d in devices),
        devices=devices,
        allreduce_bytes_per_s=group.allreduce_bytes_per_s,
    )


def helper_main(
    rank: int,
    world: int,
    address: str,
    backend: str,
    device_name: str,
    threads: int,
    compute_share: float,
    timeout_s: float,
    memory_cap_bytes: int,
    pipe: Connection,
) -> None:
    """A helper rank: join the group, then train what rank 0 sends until told to stop."""
    import torch.distributed as dist
    from safetensors.torch import load as load_tensors

    from common.logs import setup
    from edge_agent.caps import Throttle, apply_memory_cap
    from edge_agent.model import LocalModel
    from edge_agent.profiler import profile
    from edge_agent.trainer import train_local

    setup(f"fedpipe-agent rank {rank}")
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        apply_memory_cap(device, memory_cap_bytes)
    timeout = datetime.timedelta(seconds=max(timeout_s, START_TIMEOUT_S))
    dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=world, timeout=timeout)
    collective = Collective(rank, world, device)
    probe = torch.ones(ALLREDUCE_PROBE_BYTES // 4, device=device)
    for _ in range(4):  # rank 0 times these
        dist.all_reduce(probe)
    del probe
    throttle = Throttle(compute_share)
    models: dict[tuple[str, tuple[str, ...], str], LocalModel] = {}
    data: dict[int, list[Example]] = {}
    while True:
        try:
            message = pipe.recv()
        except EOFError:  # rank 0 is gone
            break
        if message[0] == "stop":
            break
        try:
            if message[0] == "profile":
                from common.modeling import compute_dtype

                measured = profile(device, compute_dtype(device), 0, 0, 0, compute_share)
                found = Accelerator(
                    str(device), measured.device_name, measured.total_memory_bytes, measured.flops_per_s
                )
                pipe.send(("ok", found))
            elif message[0] == "release":
                freed = len(models)
                for old in models.values():
                    old.release()
                models.clear()
                pipe.send(("ok", freed))
            elif message[0] == "data":
                data[message[1]] = message[2]
            elif message[0] == "train":
                job: Job = message[1]
                model = models.get(job.base)
                if model is None:
                    for old in models.values():
                        old.release()
                    models.clear()
                    model = models[job.base] = LocalModel(job.base[0], job.base[1], device, job.base[2])
                adapted = model.prepare(job.plan)
                adapted.load(load_tensors(job.tensors))
                trained = train_local(
                    adapted.model,
                    model.tokenizer,
                    data[job.data_key],
                    job.plan,
                    device,
                    float("inf"),  # rank 0's deadline decides for every rank
                    "off",
                    throttle=throttle,
                    task=job.task,
                    group=collective,
                )
                pipe.send(("ok", trained.steps))
        except Exception as err:  # reported to rank 0, then this rank leaves (its peers fail fast)
            log.exception("rank %d failed", rank)
            pipe.send(("error", f"{type(err).__name__}: {err}"))
            os._exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()

"""Adapter upload (and download) throughput over loopback gRPC, against raw TCP, raw gRPC and serde alone.

In one process this starts the real coordinator: `coordinator.server.start_server` over an
`Orchestrator` with the uniform planner, on 127.0.0.1:0. For each payload size it registers
`repeats + 1` agents through the agent's own `CoordinatorClient` with a hand-made `ModelSpec` whose
LoRA candidates are sized so that the plan's upload is exactly that many bytes, runs the round loop in
a daemon thread, and has every agent fetch its TRAIN task, download the global adapter and upload an
update of `expected_tensors(plan, spec)`. The first agent of each size is a warm-up and is not counted.
The agents run in the benchmark's process (`--agents thread`) or in a `spawn` process of their own
(`process`: their own interpreter and GIL, as on a real edge host); the default measures both.

Measured paths (both exactly what a real agent and the real coordinator execute):

* upload: `CoordinatorClient.upload` -> `transfer.encode_payload` (XXH3-128) -> chunked client stream ->
  `CoordinatorServicer.UploadUpdate` -> `Admission.open_update` (header checks) -> `transfer.PayloadReader`
  (size checks; each tensor screened for its values and change norm as its last byte arrives) -> checksum
  verification -> `Admission.finish_update` (norm bound, inbox) -> response.
* download: `CoordinatorClient.download` -> `Admission.download` (the mode's download tensors) ->
  `transfer.encode_payload` -> server stream -> `transfer.decode_payload` on the client.

Baselines, same placement: `tcp` = the same number of bytes through one raw loopback TCP stream (`sendall` from
one buffer into `recv_into` one receive buffer reused across repeats, so its pages are warm, then a one-byte
answer), the figure the transfers are held against; `grpc` = the same bytes, pre-cut into the upload's chunk
size, through a bare Python gRPC asyncio server's client stream with no serialisation and no checks: the floor
that grpcio itself sets; `serde` = encode_payload + chunk_messages + parse_upload_part + decode_payload on the same
tensors; `serde+check` additionally runs `check_tensors`. Upload and download are also given as a share of the
tcp throughput (1.0: as fast as raw TCP). Throughput is in MB/s with MB = 10**6 bytes.

Writes bench/results/upload_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from harness import machine, write_result

from common import transfer
from common.adapters import check_tensors, expected_tensors
from common.rpc import SERVER_OPTIONS, RetryPolicy, make_channel
from common.security import ServerSecurity
from common.types import DeviceProfile, ModelSpec, ModuleShape, Quantization, TaskKind, TrainPlan, UpdateMeta
from coordinator.config import CoordinatorConfig, EvaluationSection, RunSection, SelectionSection, ServerSection
from coordinator.metrics import CoordinatorMetrics
from coordinator.orchestrator import Orchestrator
from coordinator.planner import PlanOptions, uniform_plan
from coordinator.registry import Registry
from coordinator.server import start_server
from coordinator.strategy import get_strategy
from edge_agent.client import CoordinatorClient
from edge_agent.metrics import AgentMetrics

MIB = 2**20
HIDDEN = 4096  # a 7B-class hidden size: 64 such modules at rank 16 are LLaMA-7B's q,v adapter
BYTES_PER_MODULE_AND_RANK = 2 * HIDDEN * 4  # A (r, d) + B (d, r), float32
DEFAULT_SIZES_MIB = (1.0, 32.0, 256.0)
RESULTS = Path(__file__).resolve().parent / "results" / "upload_throughput.json"
T = TypeVar("T")


@dataclass(frozen=True)
class Shape:
    """Modules and rank that give a payload of exactly `nbytes` bytes."""

    modules: int
    rank: int

    @property
    def nbytes(self) -> int:
        """Upload size of the plan for this shape."""
        return self.modules * self.rank * BYTES_PER_MODULE_AND_RANK


def shape_for(nbytes: int) -> Shape:
    """Rank 16 on as many 4096x4096 modules as needed; one module at a lower rank below 0.5 MiB."""
    per_rank = BYTES_PER_MODULE_AND_RANK
    modules = max(1, nbytes // (16 * per_rank))
    rank = nbytes // (modules * per_rank)
    shape = Shape(modules, rank)
    if rank < 1 or shape.nbytes != nbytes:
        raise SystemExit(f"{nbytes} bytes is not a multiple of {per_rank} (rank x 4096 x 2 x fp32)")
    return shape


def model_spec(shape: Shape, labels: tuple[str, ...]) -> ModelSpec:
    """A hand-made spec: `shape.modules` square candidates and no trainable head."""
    return ModelSpec(
        fingerprint=f"bench-{shape.modules}x{HIDDEN}",
        model_type="bench",
        task="seq-cls",
        labels=labels,
        candidates=tuple(ModuleShape(f"layers.{i}.proj", HIDDEN, HIDDEN) for i in range(shape.modules)),
        heads=(),
        base_parameters=shape.modules * HIDDEN * HIDDEN,
    )


PROFILE = DeviceProfile(
    device="cpu",
    device_name="bench",
    total_memory_bytes=8 * 2**30,
    free_memory_bytes=8 * 2**30,
    host_memory_bytes=8 * 2**30,
    flops_per_s=1e10,
    compute_dtype="float32",
    threads=1,
    num_train_samples=100,
    num_val_samples=10,
)


def options(rank: int) -> PlanOptions:
    """Plan options for the uniform planner: every candidate at `rank`."""
    return PlanOptions(
        targets=("all",),
        rank=rank,
        alpha=2.0 * rank,
        dropout=0.0,
        batch_size=8,
        local_epochs=1,
        max_steps=0,
        learning_rate=1e-3,
        weight_decay=0.0,
        max_seq_len=32,
        quantization=Quantization.NONE,
        deadline_s=600.0,
        seed=0,
    )


def update_tensors(plan: TrainPlan, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Finite random tensors with exactly the names, shapes and dtypes the plan expects, in wire order."""
    generator = torch.Generator().manual_seed(1)
    return {
        info.name: torch.randn(info.shape, generator=generator, dtype=torch.float32) * 0.01
        for info in expected_tensors(plan, spec)
    }


def drive_agents(port: int, shape: Shape, repeats: int, labels: tuple[str, ...]) -> dict[str, list[float]]:
    """What the agents do: register `repeats + 1` agents, then per agent fetch the TRAIN task, download the global
    and upload an update; seconds per download and upload, the first agent's (a warm-up) left out. Runs in the
    benchmark's process or in an agent process of its own (`spawn`)."""
    torch.set_num_threads(1)
    spec = model_spec(shape, labels)
    clients = [
        CoordinatorClient(f"127.0.0.1:{port}", f"bench-{i}", AgentMetrics(), retry=RetryPolicy(give_up_s=0.0))
        for i in range(repeats + 1)  # agent 0 warms up channel, server threads and allocator
    ]
    downloads: list[float] = []
    uploads: list[float] = []
    try:
        for client in clients:
            client.register(PROFILE, spec, "bench")
        tensors: dict[str, torch.Tensor] | None = None
        for i, client in enumerate(clients):
            task = client.get_task(30.0)
            if task.kind is not TaskKind.TRAIN or task.plan is None:
                raise SystemExit(f"{client.agent_id}: expected a TRAIN task, got {task}")
            plan = task.plan
            if tensors is None:
                tensors = update_tensors(plan, spec)
                got = sum(t.numel() * t.element_size() for t in tensors.values())
                assert got == shape.nbytes, (got, shape.nbytes)
            meta = UpdateMeta(client.agent_id, task.round, plan.plan_id, 100, 13, 1.0, 0.5, 0)
            start = time.perf_counter()
            client.download(task.global_round, plan.plan_id)
            middle = time.perf_counter()
            client.upload(meta, tensors)
            download, upload = middle - start, time.perf_counter() - middle
            if i > 0:
                downloads.append(download)
                uploads.append(upload)
    finally:
        for client in clients:
            client.close()
    return {"upload_s": uploads, "download_s": downloads}


def in_agent_process(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a fresh `spawn` process, as an agent runs on its own host: its own interpreter and GIL."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def measure_grpc(shape: Shape, repeats: int, workdir: Path, separate: bool) -> dict[str, Any]:
    """Real coordinator on loopback, the agents in this process or (separate) in one of their own: per agent,
    download the global then upload an update; timings in s."""
    server_section = ServerSection(host="127.0.0.1", port=0, max_upload_bytes=max(256 * MIB, 2 * shape.nbytes))
    config = CoordinatorConfig(
        insecure=True,
        server=server_section,
        run=RunSection(
            rounds=1,
            min_agents=repeats + 1,
            round_deadline_s=600.0,
            registration_timeout_s=120.0,
            agent_timeout_s=600.0,
            run_dir=workdir / f"run-{shape.nbytes}-{'process' if separate else 'thread'}",
            finish_grace_s=0.0,
        ),
        selection=SelectionSection(mode="all"),  # uploads only: no importance probe
        evaluation=EvaluationSection(agents=False, initial=False),
    )
    config.run.run_dir.mkdir(parents=True)
    labels = tuple(config.labels)
    metrics = CoordinatorMetrics()
    orchestrator = Orchestrator(
        config,
        Registry(model_spec(shape, labels)),
        uniform_plan,
        options(shape.rank),
        get_strategy("rank-padding"),
        metrics,
        base_path="bench",
    )
    serving = start_server(orchestrator.admission, server_section, metrics, ServerSecurity.insecure())
    outcome: list[BaseException] = []

    def drive() -> None:
        try:
            orchestrator.run()
        except BaseException as err:  # reported to the main thread
            outcome.append(err)

    try:
        loop = threading.Thread(target=drive, name="orchestrator", daemon=True)
        loop.start()  # it waits for the agents to register
        args = (serving.port, shape, repeats, labels)
        times = in_agent_process(drive_agents, *args) if separate else drive_agents(*args)
        loop.join(120.0)
        if outcome:
            raise outcome[0]
        if loop.is_alive():
            raise SystemExit("the orchestrator did not finish its round")
        return times
    finally:
        serving.stop(grace_s=0)


def measure_serde(shape: Shape, repeats: int) -> dict[str, Any]:
    """The same payload through serde alone, plus the server's tensor check; timings in s."""
    spec = model_spec(shape, ("a", "b"))
    plan = next(iter(uniform_plan({"bench-0": PROFILE}, spec, options(shape.rank), 1).plans.values()))
    tensors = update_tensors(plan, spec)
    expected = expected_tensors(plan, spec)
    limits = ServerSection()
    chunk = transfer.DEFAULT_CHUNK_BYTES

    def round_trip() -> dict[str, torch.Tensor]:
        header, payload = transfer.encode_payload(tensors)
        parts = (transfer.parse_upload_part(m) for m in transfer.chunk_messages(payload, chunk))
        return transfer.decode_payload(
            header,
            (c for c in map(transfer.chunk_of, parts) if c is not None),
            max(limits.max_upload_bytes, 2 * shape.nbytes),
            limits.max_chunk_bytes,
        )

    round_trip()  # warm-up
    serde_s: list[float] = []
    check_s: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        decoded = round_trip()
        middle = time.perf_counter()
        check_tensors(decoded, expected)
        end = time.perf_counter()
        serde_s.append(middle - start)
        check_s.append(end - start)
    return {"serde_s": serde_s, "serde_check_s": check_s}


def send_tcp(port: int, nbytes: int, repeats: int) -> list[float]:
    """The TCP baseline's sender: per repeat, connect, send nbytes and wait for the one-byte answer; seconds each,
    the first (a warm-up) left out."""
    data = bytes(nbytes)
    seconds: list[float] = []
    for index in range(repeats + 1):
        with socket.create_connection(("127.0.0.1", port)) as sender:
            start = time.perf_counter()
            sender.sendall(data)
            sender.recv(1)
            if index:
                seconds.append(time.perf_counter() - start)
    return seconds


def measure_tcp(nbytes: int, repeats: int, separate: bool) -> list[float]:
    """Seconds to move nbytes through one loopback TCP stream and get a one-byte answer, per repeat; the sender is
    a thread of this process, or (separate) a process of its own, like the agents it is held against."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def receive() -> None:
        view = memoryview(bytearray(nbytes))
        for _ in range(repeats + 1):
            connection, _ = listener.accept()
            with connection:
                got = 0
                while got < nbytes:
                    got += connection.recv_into(view[got:])
                connection.sendall(b"k")

    with listener:
        receiver = threading.Thread(target=receive, daemon=True)
        receiver.start()
        seconds = in_agent_process(send_tcp, port, nbytes, repeats) if separate else send_tcp(port, nbytes, repeats)
        receiver.join()
    return seconds


RAW_METHOD = "/fedpipe.bench.Raw/Send"


def send_grpc(port: int, nbytes: int, repeats: int) -> list[float]:
    """The raw gRPC baseline's client: per repeat, stream nbytes as pre-cut chunks and wait for the answer; seconds
    each, the first (a warm-up) left out."""
    size = transfer.DEFAULT_CHUNK_BYTES
    chunks = [bytes(min(size, nbytes - offset)) for offset in range(0, nbytes, size)]
    seconds: list[float] = []
    with make_channel(f"127.0.0.1:{port}", None) as channel:
        send = channel.stream_unary(RAW_METHOD, None, None)  # no (de)serialisers: the bytes go as they are
        for index in range(repeats + 1):
            start = time.perf_counter()
            answer = send(iter(chunks), timeout=600.0)
            if index:
                seconds.append(time.perf_counter() - start)
            if int.from_bytes(answer, "little") != nbytes:
                raise SystemExit(f"raw gRPC: the server counted {answer!r}, not {nbytes} bytes")
    return seconds


async def _count(chunks: Any, _context: Any) -> bytes:
    got = 0
    async for chunk in chunks:
        got += len(chunk)
    return got.to_bytes(8, "little")


def measure_grpc_floor(nbytes: int, repeats: int, separate: bool) -> list[float]:
    """Seconds to stream nbytes through a bare grpc.aio server (the coordinator's server options, its own event-loop
    thread) that only counts them, per repeat; the client is a thread of this process or (separate) its own."""
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, name="raw-grpc", daemon=True)
    runner.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        handler = grpc.stream_unary_rpc_method_handler(_count)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("fedpipe.bench.Raw", {"Send": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30.0)
    try:
        return in_agent_process(send_grpc, port, nbytes, repeats) if separate else send_grpc(port, nbytes, repeats)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30.0)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(30.0)
        loop.close()


def mbps(nbytes: int, seconds: float) -> float:
    """MB/s with MB = 10**6 bytes."""
    return nbytes / seconds / 1e6


def main() -> int:
    """Measure every size, print a table and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes-mib", type=float, nargs="+", default=list(DEFAULT_SIZES_MIB))
    parser.add_argument("--repeats", type=int, default=5, help="timed uploads per size (after one warm-up)")
    parser.add_argument(
        "--agents",
        nargs="+",
        choices=("thread", "process"),
        default=["thread", "process"],
        help="where the agents (and the TCP baseline's sender) run: in this process, or in one of their own",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    header = (
        f"{'size MiB':>8} {'agents':>7} {'tcp MB/s':>9} {'grpc MB/s':>9} {'upload MB/s':>11} {'download MB/s':>13} "
        f"{'serde MB/s':>10} {'serde+chk MB/s':>14} {'up/tcp':>6} {'down/tcp':>8} {'up ms':>7}"
    )
    print(header)
    with tempfile.TemporaryDirectory(prefix="fedpipe-bench-") as tmp:
        for size in args.sizes_mib:
            shape = shape_for(round(size * MIB))
            base = measure_serde(shape, args.repeats)
            raw = statistics.median(base["serde_s"])
            raw_check = statistics.median(base["serde_check_s"])
            for placement in args.agents:
                separate = placement == "process"
                grpc_times = measure_grpc(shape, args.repeats, Path(tmp), separate)
                tcp_s = measure_tcp(shape.nbytes, args.repeats, separate)
                tcp = statistics.median(tcp_s)
                floor_s = measure_grpc_floor(shape.nbytes, args.repeats, separate)
                floor = statistics.median(floor_s)
                up = statistics.median(grpc_times["upload_s"])
                down = statistics.median(grpc_times["download_s"])
                row = {
                    "size_mib": shape.nbytes / MIB,
                    "agents": placement,
                    "bytes": shape.nbytes,
                    "modules": shape.modules,
                    "rank": shape.rank,
                    "hidden": HIDDEN,
                    "repeats": args.repeats,
                    "tcp_mbps": mbps(shape.nbytes, tcp),
                    "grpc_mbps": mbps(shape.nbytes, floor),
                    "upload_mbps": mbps(shape.nbytes, up),
                    "download_mbps": mbps(shape.nbytes, down),
                    "serde_mbps": mbps(shape.nbytes, raw),
                    "serde_check_mbps": mbps(shape.nbytes, raw_check),
                    "grpc_share_of_tcp": tcp / floor,
                    "upload_share_of_tcp": tcp / up,
                    "upload_share_of_grpc": floor / up,
                    "download_share_of_tcp": tcp / down,
                    "upload_over_serde": up / raw,
                    "upload_over_serde_check": up / raw_check,
                    "median_tcp_s": tcp,
                    "median_grpc_s": floor,
                    "median_upload_s": up,
                    "median_download_s": down,
                    "median_serde_s": raw,
                    "median_serde_check_s": raw_check,
                    **grpc_times,
                    **base,
                    "tcp_s": tcp_s,
                    "grpc_s": floor_s,
                }
                rows.append(row)
                print(
                    f"{row['size_mib']:>8.2f} {placement:>7} {row['tcp_mbps']:>9.1f} {row['grpc_mbps']:>9.1f} "
                    f"{row['upload_mbps']:>11.1f} "
                    f"{row['download_mbps']:>13.1f} {row['serde_mbps']:>10.1f} {row['serde_check_mbps']:>14.1f} "
                    f"{row['upload_share_of_tcp']:>6.2f} {row['download_share_of_tcp']:>8.2f} {up * 1e3:>7.1f}",
                    flush=True,
                )
    result = {
        "benchmark": "upload_throughput",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "mb": "10**6 bytes",
        "statistic": f"median of {args.repeats} timed transfers after one warm-up",
        "torch_threads": 1,
        "machine": machine(),
        "rows": rows,
    }
    write_result(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

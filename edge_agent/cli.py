"""fedpipe-agent: parse config, load data, profile the device, build the model, run the agent loop."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

from common import logs
from common.errors import ConfigError, FedPipeError, Stopped
from common.settings import build

if TYPE_CHECKING:
    import grpc

    from edge_agent.config import AgentConfig
    from edge_agent.secagg import KeySigner

log = logging.getLogger("fedpipe.agent")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of fedpipe-agent; returns the exit code."""
    from edge_agent.config import AgentConfig

    try:
        config = build(AgentConfig, sys.argv[1:] if argv is None else argv, "fedpipe-agent")
    except ConfigError as err:
        print(f"fedpipe-agent: config error: {err}", file=sys.stderr)
        return 2
    logs.setup(f"agent[{config.agent_id}]", config.log_format)
    try:
        return run(config)
    except ConfigError as err:
        log.error("config error: %s", err)
        return 2
    except Stopped as err:
        log.info("%s", err)
        return 0
    except FedPipeError as err:
        log.error("%s", err)
        return 1


def run(config: AgentConfig) -> int:
    """Build every part from the config, then hand over to the agent loop."""
    import torch

    from common.metrics import serve
    from common.modeling import compute_dtype, pick_device
    from common.rpc import RetryPolicy
    from edge_agent.agent import Agent
    from edge_agent.caps import Throttle, apply_memory_cap
    from edge_agent.client import CoordinatorClient
    from edge_agent.metrics import AgentMetrics
    from edge_agent.parallel import DeviceGroup, parse_devices, with_group
    from edge_agent.profiler import profile
    from edge_agent.secagg import SecureWork
    from edge_agent.workspace import Workspace

    credentials = agent_credentials(config)  # wrong TLS files fail here, before minutes of loading
    devices = parse_devices(config.devices, config.nproc)
    threads = config.threads or (max(1, (os.cpu_count() or 1) // config.nproc) if config.nproc > 1 else 0)
    if threads:
        torch.set_num_threads(threads)
    device = pick_device(str(devices[0]) if devices else config.device)
    for other in devices[1:]:
        pick_device(str(other))  # CUDA asked for and not there: said before anything starts
    memory_cap = config.memory_limit_bytes()
    apply_memory_cap(device, memory_cap)
    throttle = Throttle(config.compute_share)
    measured = profile(device, compute_dtype(device), 0, 0, memory_cap, config.compute_share)  # samples: per data set
    group = None
    if devices:
        group = DeviceGroup(devices, threads, config.compute_share, config.group_timeout_s, memory_cap)
        group.start()
        measured = with_group(measured, group)
    log.info(
        "device %s (%s): %.1f GiB, %.2f GFLOP/s %s, %d threads%s",
        measured.device,
        measured.device_name,
        measured.total_memory_bytes / 2**30,
        measured.flops_per_s / 1e9,
        measured.compute_dtype,
        measured.threads,
        f", compute share {config.compute_share:g}" if throttle.active else "",
    )
    metrics = AgentMetrics()
    agents: list[Agent] = []  # the agent once built; until then /readyz says why it is not ready

    def ready() -> tuple[bool, str]:
        return agents[0].ready() if agents else (False, "starting: loading the model and calibrating")

    if config.metrics.port >= 0:
        # Up before the model loads and calibrates (minutes on a slow host), so probes see a live process.
        port = serve(metrics.registry, config.metrics.host, config.metrics.port, ready)
        log.info("metrics on http://%s:%d/metrics, readiness on /readyz", config.metrics.host, port)
    workspace = Workspace(config, device, measured, throttle)
    loaded = workspace.default()
    stopping = threading.Event()  # SIGTERM: the agent loop and the client's retries both end on it
    client = CoordinatorClient(
        config.coordinator,
        config.agent_id,
        metrics,
        credentials,
        config.tls.server_name,
        RetryPolicy(give_up_s=config.reconnect_s, stop=stopping),
    )
    agent = Agent(
        config.agent_id,
        client,
        loaded.model,
        loaded.data,
        loaded.profile,
        loaded.spec,
        metrics,
        config.poll_wait_s,
        config.progress,
        throttle,
        config.ready_s,
        stopping,
        config.after_finish,
        workspace,
        SecureWork(config.agent_id, key_signer(config)),
        group,
    )
    agents.append(agent)

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping after the current step", signum)
        agent.stop.set()

    signal.signal(signal.SIGTERM, stop)
    try:
        agent.run()
    finally:
        client.close()
        if group is not None:
            group.close()
    return 0


def agent_credentials(config: AgentConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials from the config, None with --insecure; the certificate must name this agent."""
    from common.certs import common_name
    from common.security import channel_credentials, read_file

    if config.insecure:
        log.warning("--insecure: plaintext gRPC, the coordinator is not verified; use only on a trusted network")
        return None
    tls = config.tls
    if tls.cert is not None:
        name = common_name(read_file(tls.cert, "tls.cert"))
        if name != config.agent_id:
            raise ConfigError(f"tls.cert: the certificate is for {name!r}, but agent_id is {config.agent_id!r}")
    return channel_credentials(tls.ca, tls.cert, tls.key, tls.token_file)


if __name__ == "__main__":
    sys.exit(main())


def key_signer(config: AgentConfig) -> KeySigner | None:
    """The agent's mTLS key, certificate and CA, which sign its secure-aggregation keys (None without them)."""
    tls = config.tls
    if config.insecure or tls.cert is None or tls.key is None or tls.ca is None:
        return None
    from edge_agent.secagg import KeySigner

    return KeySigner(tls.key.read_bytes(), tls.cert.read_bytes(), tls.ca.read_bytes())

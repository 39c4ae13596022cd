"""Who may talk to a coordinator: mTLS by default (an agent is its certificate), bearer tokens over TLS as
the alternative, plaintext only when both sides say --insecure. Real servers and sockets on 127.0.0.1;
certificates from `fedpipe-coordinator certs`. Also the standard health and reflection services."""

from __future__ import annotations

import hashlib
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from fedpipe.v1 import fedpipe_pb2 as pb
from fedpipe.v1 import fedpipe_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry
from rig import AGENT_A, AGENT_B, RPC_TIMEOUT_S, Coordinator, launch, refused, register, train_assignment

from common.certs import agent_paths, certs_main, write_bundle
from common.metrics import serve
from common.security import ServerSecurity, server_security, token_digest
from coordinator.cli import main as coordinator_main
from coordinator.servicer import REJECT_REASONS
from edge_agent.cli import main as agent_main

pytestmark = pytest.mark.integration

TOKENS = {AGENT_A: "token-of-agent-a-0123456789", AGENT_B: "token-of-agent-b-9876543210"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's CA, the coordinator's certificate and agent-a's and agent-b's, via the certs command."""
    out = tmp_path_factory.mktemp("pki")
    assert certs_main(["--out", str(out), "--agents", f"{AGENT_A},{AGENT_B}"]) == 0
    return out


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA, with its own certificate for agent-a."""
    out = tmp_path_factory.mktemp("other-pki")
    write_bundle(out, [AGENT_A])
    return out


def client_credentials(pki: Path, agent: str | None) -> grpc.ChannelCredentials:
    """TLS trusting the run's CA, presenting the agent's certificate (none when agent is None)."""
    ca = (pki / "ca.crt").read_bytes()
    if agent is None:
        return grpc.ssl_channel_credentials(ca)
    crt, key = agent_paths(pki, agent)
    return grpc.ssl_channel_credentials(ca, key.read_bytes(), crt.read_bytes())


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[ServerSecurity, grpc.ChannelCredentials | None], Coordinator]]:
    """Start coordinators with given server security and stub credentials; stop them all afterwards."""
    started: list[Coordinator] = []

    def run(security: ServerSecurity, credentials: grpc.ChannelCredentials | None) -> Coordinator:
        started.append(launch(tmp_path / f"run-{len(started)}", security=security, credentials=credentials))
        return started[-1]

    yield run
    for coordinator in started:
        coordinator.stop()


def mtls(pki: Path) -> ServerSecurity:
    return server_security(False, pki / "coordinator.crt", pki / "coordinator.key", "mtls", pki / "ca.crt", tokens=None)


def stub(coordinator: Coordinator, credentials: grpc.ChannelCredentials | None) -> pb_grpc.CoordinatorStub:
    """A second client of the same coordinator; plaintext when credentials is None."""
    address = coordinator.address
    channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    return pb_grpc.CoordinatorStub(channel)


def test_an_agent_with_its_certificate_is_served(pki: Path, start: Callable[..., Coordinator]) -> None:
    # Prepare
    coordinator = start(mtls(pki), client_credentials(pki, AGENT_A))

    # Execute
    answer = register(coordinator.stub, AGENT_A)

    # Assert
    assert answer.run_id == coordinator.orchestrator.run_id
    assert set(coordinator.orchestrator.registry.all()) == {AGENT_A}


@pytest.mark.parametrize(
    "who",
    [
        pytest.param("no-certificate", id="tls-without-client-certificate"),
        pytest.param("other-ca", id="certificate-from-another-ca"),
        pytest.param("plaintext", id="plaintext-client"),
    ],
)
def test_a_client_the_ca_did_not_vouch_for_is_refused(
    who: str, pki: Path, other_pki: Path, start: Callable[..., Coordinator]
) -> None:
    # Prepare
    coordinator = start(mtls(pki), client_credentials(pki, AGENT_A))
    credentials = {
        "no-certificate": client_credentials(pki, None),
        "other-ca": grpc.ssl_channel_credentials(
            (pki / "ca.crt").read_bytes(),
            agent_paths(other_pki, AGENT_A)[1].read_bytes(),
            agent_paths(other_pki, AGENT_A)[0].read_bytes(),
        ),
        "plaintext": None,
    }[who]

    # Execute
    code, _ = refused(lambda: register(stub(coordinator, credentials), AGENT_A))

    # Assert: the handshake fails, so no call reaches the service and nothing is registered
    assert code == grpc.StatusCode.UNAVAILABLE
    assert coordinator.orchestrator.registry.all() == {}


def test_a_tls_agent_cannot_talk_to_a_plaintext_coordinator(pki: Path, start: Callable[..., Coordinator]) -> None:
    # Prepare: --insecure on the coordinator only
    coordinator = start(ServerSecurity.insecure(), None)

    # Execute
    code, _ = refused(lambda: register(stub(coordinator, client_credentials(pki, AGENT_A)), AGENT_A))

    # Assert: insecure works only when both sides ask for it
    assert code == grpc.StatusCode.UNAVAILABLE
    assert register(coordinator.stub, AGENT_A).run_id == coordinator.orchestrator.run_id  # both plaintext


def test_an_agent_cannot_act_as_another(pki: Path, start: Callable[..., Coordinator]) -> None:
    # Prepare: both agents registered with their own certificates, round 1 open
    coordinator = start(mtls(pki), client_credentials(pki, AGENT_A))
    as_b = stub(coordinator, client_credentials(pki, AGENT_B))
    register(coordinator.stub, AGENT_A)
    register(as_b, AGENT_B)
    b = train_assignment(as_b, AGENT_B)
    train_assignment(coordinator.stub, AGENT_A)
    before = coordinator.orchestrator.state.global_
    forged = b.update(seed=5, samples=10)  # agent-b's update, sent over agent-a's certificate

    # Execute
    calls = {
        "register": lambda: register(coordinator.stub, AGENT_B),
        "heartbeat": lambda: coordinator.stub.Heartbeat(
            pb.HeartbeatRequest(agent_id=AGENT_B, state="idle"), timeout=RPC_TIMEOUT_S
        ),
        "upload": lambda: coordinator.stub.UploadUpdate(iter(forged.messages()), timeout=RPC_TIMEOUT_S),
        "advertise keys": lambda: coordinator.stub.AdvertiseKeys(
            pb.AdvertiseKeysRequest(agent_id=AGENT_B, round=1, plan_id=b.plan.plan_id), timeout=RPC_TIMEOUT_S
        ),
        "share keys": lambda: coordinator.stub.ShareKeys(
            pb.ShareKeysRequest(agent_id=AGENT_B, round=1), timeout=RPC_TIMEOUT_S
        ),
        "unmask": lambda: coordinator.stub.Unmask(pb.UnmaskRequest(agent_id=AGENT_B, round=1), timeout=RPC_TIMEOUT_S),
    }
    outcomes = {name: refused(call) for name, call in calls.items()}

    # Assert: each refused naming both identities; nothing changed; agent-b itself still uploads
    for name, (code, details) in outcomes.items():
        assert code == grpc.StatusCode.PERMISSION_DENIED, (name, details)
        assert f"authenticated as '{AGENT_A}', which may not act as '{AGENT_B}'" in details, (name, details)
    metrics = coordinator.orchestrator.metrics.registry
    assert metrics.get_sample_value("fedpipe_updates_rejected_total", {"reason": REJECT_REASONS[code]}) == 1
    assert coordinator.orchestrator.state.global_ is before and coordinator.orchestrator.state.inbox == {}
    answer = as_b.UploadUpdate(iter(forged.messages()), timeout=RPC_TIMEOUT_S)
    assert answer.accepted and answer.message == "accepted for round 1 (1/2)"


def test_token_auth_over_tls(pki: Path, tmp_path: Path, start: Callable[..., Coordinator]) -> None:
    # Prepare: server-only TLS; the coordinator keeps sha256 digests of the agents' tokens
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({agent: token_digest(token) for agent, token in TOKENS.items()}))
    security = server_security(False, pki / "coordinator.crt", pki / "coordinator.key", "token", None, tokens)
    ca = grpc.ssl_channel_credentials((pki / "ca.crt").read_bytes())

    def with_token(token: str) -> grpc.ChannelCredentials:
        return grpc.composite_channel_credentials(ca, grpc.access_token_call_credentials(token))

    coordinator = start(security, with_token(TOKENS[AGENT_A]))

    # Execute
    accepted = register(coordinator.stub, AGENT_A)
    impersonation = refused(lambda: register(coordinator.stub, AGENT_B))
    wrong = refused(lambda: register(stub(coordinator, with_token("not-a-token")), AGENT_A))
    missing = refused(lambda: register(stub(coordinator, ca), AGENT_A))

    # Assert
    assert accepted.run_id == coordinator.orchestrator.run_id
    assert impersonation[0] == grpc.StatusCode.PERMISSION_DENIED
    assert wrong[0] == missing[0] == grpc.StatusCode.UNAUTHENTICATED
    assert "no valid bearer token" in wrong[1]
    assert hashlib.sha256(TOKENS[AGENT_A].encode()).hexdigest() in tokens.read_text()
    assert TOKENS[AGENT_A] not in tokens.read_text(), "the coordinator stores digests, not tokens"


def test_health_and_reflection_for_generic_grpc_tools(pki: Path, start: Callable[..., Coordinator]) -> None:
    # Prepare
    coordinator = start(mtls(pki), client_credentials(pki, AGENT_A))
    channel = grpc.secure_channel(coordinator.address, client_credentials(pki, AGENT_A))
    health = health_pb2_grpc.HealthStub(channel)
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)

    # Execute
    overall = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT_S)
    service = health.Check(health_pb2.HealthCheckRequest(service="fedpipe.v1.Coordinator"), timeout=RPC_TIMEOUT_S)
    listing = next(iter(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
    coordinator.stop()
    channel.close()

    # Assert
    assert overall.status == service.status == health_pb2.HealthCheckResponse.SERVING
    names = {s.name for s in listing.list_services_response.service}
    assert {"fedpipe.v1.Coordinator", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_missing_tls_files_stop_both_sides_before_anything_starts(
    tmp_path: Path, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    crt_a, key_a = agent_paths(pki, AGENT_A)

    # Execute: in this process, so the handler the CLIs install (on capsys's stream, closed after this test) goes
    # again afterwards; later tests' log lines would otherwise meet a closed file
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        coordinator = coordinator_main(["--run.run-dir", str(run_dir), "--metrics.port", "-1", "--server.port", "0"])
        agent = agent_main(["--agent-id", AGENT_A, "--metrics.port", "-1"])
        wrong_cert = agent_main(
            ["--agent-id", AGENT_B, "--tls.ca", str(pki / "ca.crt"), "--tls.cert", str(crt_a), "--tls.key", str(key_a)]
        )
    finally:
        root.handlers[:], root.level = saved, level
    errors = capsys.readouterr().err

    # Assert: exit 2, the missing field named with the way out, and no server was started
    assert coordinator == agent == wrong_cert == 2
    assert "tls.cert: required (TLS is on by default" in errors
    assert "tls.ca: required" in errors
    assert f"tls.cert: the certificate is for '{AGENT_A}', but agent_id is '{AGENT_B}'" in errors
    assert not (run_dir / "coordinator.port").exists()


def test_agent_readiness_endpoint_follows_the_probe() -> None:
    # Prepare
    state = {"ready": False}
    port = serve(CollectorRegistry(), "127.0.0.1", 0, lambda: (state["ready"], "ready" if state["ready"] else "no"))

    def status(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    # Execute
    before = status("/readyz")
    state["ready"] = True
    after = status("/readyz")

    # Assert
    assert before == (503, "no\n") and after == (200, "ready\n")
    assert status("/healthz") == (200, "ok\n")
    assert status("/metrics")[0] == 200

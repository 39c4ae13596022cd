"""A serving coordinator's submissions and runs without a server (coordinator.service), and who is an admin
(common.security)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from common.errors import InvalidArgument, PermissionDenied, Unauthenticated
from common.security import ServerSecurity, token_digest
from coordinator.config import CoordinatorConfig
from coordinator.jobs import JobQueue
from coordinator.service import Service, run_config


def service(tmp_path: Path) -> Service:
    config = CoordinatorConfig.model_validate({"insecure": True, "run": {"rounds": 1, "registration_timeout_s": 1}})
    return Service(config, ServerSecurity.insecure(), JobQueue(tmp_path / "state"))


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("run: [1, 2", "not YAML"),
        ("- a list", "mapping at the top level"),
        ("tls: {cert: x.pem}", "tls: the serving coordinator sets it"),
        ("run: {run_dir: /x}", "run.run_dir"),
        ("run: {rounds: -1}", "run.rounds"),
        ("model: {path: /no/such/model}", "model.path: /no/such/model is not a model directory"),
        ("evaluation: {heldout: /no/such.csv}", "evaluation.heldout: /no/such.csv does not exist"),
    ],
)
def test_a_bad_submission_is_refused_naming_what_is_wrong_and_queues_nothing(
    tmp_path: Path, text: str, named: str
) -> None:
    runs = service(tmp_path)
    with pytest.raises(InvalidArgument, match="config_yaml") as raised:
        runs.submit(text, "bad")
    assert named in str(raised.value)
    assert runs.queue.all() == []


def test_a_run_that_cannot_start_fails_with_its_reason_and_the_service_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # what the process's logging set-up does; the run's log takes the same lines
    runs = service(tmp_path)
    heldout = tmp_path / "heldout.csv"
    heldout.write_text("text,sentiment\nfine,positive\n")
    doomed = runs.submit(f"evaluation: {{heldout: {heldout}}}", "doomed")
    nobody = runs.submit("run: {min_agents: 1}", "nobody comes")
    heldout.unlink()  # gone between submission and start

    first = runs.queue.take(timeout_s=0)
    assert first is not None and first.run_id == doomed.run_id
    failed = runs.run_job(first, run_config(runs.config, first.settings, runs.queue.run_dir(first.run_id)))
    second = runs.queue.take(timeout_s=0)
    assert second is not None
    aborted = runs.run_job(second, run_config(runs.config, second.settings, runs.queue.run_dir(second.run_id)))

    assert failed.state == "failed" and str(heldout) in failed.message
    assert (
        aborted.run_id == nobody.run_id and aborted.state == "failed" and "agents needed are alive" in aborted.message
    )
    log = (runs.queue.run_dir(nobody.run_id) / "coordinator.log").read_text()
    assert f"run {nobody.run_id} (nobody comes) starts" in log and "aborted" in log
    assert runs.metrics.runs.labels("failed")._value.get() == 2


def test_the_one_shot_coordinator_takes_no_submissions(tmp_path: Path) -> None:
    runs = service(tmp_path)
    runs.single = True
    with pytest.raises(InvalidArgument, match="start `fedpipe-coordinator serve`"):
        runs.submit("run: {rounds: 2}", "")


class Context:
    """The parts of a gRPC call context that ServerSecurity reads."""

    def __init__(self, common_name: str | None = None, token: str | None = None) -> None:
        self.common_name = common_name
        self.token = token

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_common_name": [self.common_name.encode()]} if self.common_name else {}

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []


def fake(common_name: str | None = None, token: str | None = None) -> Any:
    """A Context typed as the gRPC context it stands in for."""
    return Context(common_name, token)


def test_under_mtls_an_admin_is_an_admin_certificate_and_admin_names_narrows_them() -> None:
    anyone = ServerSecurity("mtls")
    listed = ServerSecurity("mtls", admin_names=frozenset({"ops"}))
    context = fake("admin:ops")

    assert anyone.admin(context) == "admin:ops" and listed.admin(context) == "admin:ops"
    with pytest.raises(PermissionDenied, match=r"not one of admin\.names"):
        listed.admin(fake("admin:intern"))
    with pytest.raises(PermissionDenied, match="'site-a' is an agent"):
        anyone.admin(fake("site-a"))
    with pytest.raises(Unauthenticated):
        anyone.admin(fake())
    with pytest.raises(PermissionDenied):  # an admin may not act as an agent
        anyone.authorize(context, "ops")


def test_under_token_auth_admin_tokens_are_apart_from_the_agents() -> None:
    tokens = {token_digest("agent-secret"): "site-a", token_digest("admin-secret"): "admin:ops"}
    security = ServerSecurity("token", tokens=tokens)

    assert security.admin(fake(token="admin-secret")) == "admin:ops"
    with pytest.raises(PermissionDenied, match="is an agent"):
        security.admin(fake(token="agent-secret"))
    with pytest.raises(Unauthenticated):
        security.admin(fake(token="guess"))
    assert ServerSecurity.insecure().admin(fake()) == "admin:anonymous"


def test_admin_tokens_load_apart_from_the_agents_and_may_not_share_one(tmp_path: Path) -> None:
    from common.certs import write_bundle
    from common.errors import ConfigError
    from common.security import server_security

    write_bundle(tmp_path, [])
    cert, key = tmp_path / "coordinator.crt", tmp_path / "coordinator.key"
    agents, admins, shared = tmp_path / "agents.yaml", tmp_path / "admins.yaml", tmp_path / "shared.yaml"
    agents.write_text(f"site-a: {token_digest('a')}\n")
    admins.write_text(f"ops: {token_digest('o')}\n")
    shared.write_text(f"ops: {token_digest('a')}\n")

    security = server_security(False, cert, key, "token", None, agents, admins)

    assert security.admin(fake(token="o")) == "admin:ops" and security.identity(fake(token="a")) == "site-a"
    with pytest.raises(ConfigError, match="shares a token with agent 'site-a'"):
        server_security(False, cert, key, "token", None, agents, shared)
    with pytest.raises(ConfigError, match=r"admin\.tokens: token auth only"):
        server_security(False, cert, key, "mtls", tmp_path / "ca.crt", None, admins)
    with pytest.raises(ConfigError, match=r"admin\.names: mtls only"):
        server_security(False, cert, key, "token", None, agents, None, ["ops"])

"""common.certs: the deployment PKI, its files on disk, the `certs` command, and a real gRPC mTLS handshake."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import cast

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.certs import Issued, certs_main, check_agent_id, common_name, create_ca, issue, write_bundle
from common.errors import ConfigError


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def ca() -> Issued:
    return create_ca()


# ---------------------------------------------------------------- certificates


def test_bundle_leaf_certificates_verify_against_the_ca(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "pki"

    # Execute
    written = write_bundle(out, ["edge-1", "edge_2"])

    # Assert
    assert written == {
        "ca": out / "ca.crt",
        "coordinator": out / "coordinator.crt",
        "agent:edge-1": out / "agents" / "edge-1.crt",
        "agent:edge_2": out / "agents" / "edge_2.crt",
    }
    ca_cert = load(out / "ca.crt")
    ca_cert.verify_directly_issued_by(ca_cert)  # self-signed
    for crt in written.values():
        load(crt).verify_directly_issued_by(ca_cert)


def test_server_certificate_puts_ips_in_ip_entries_and_names_in_dns_entries(ca: Issued) -> None:
    # Prepare
    hosts = ["localhost", "127.0.0.1", "::1", "coord.example.org", "10.0.0.7"]

    # Execute
    cert = x509.load_pem_x509_certificate(issue(ca, "fedpipe-coordinator", hosts=hosts, server=True).cert_pem)

    # Assert
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "coord.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.0.7"),
    ]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "fedpipe-coordinator"


def test_agent_certificate_names_the_agent_in_cn_and_dns_san(ca: Issued) -> None:
    # Prepare
    agent_id = "jetson.lab-3"

    # Execute
    cert = x509.load_pem_x509_certificate(issue(ca, agent_id).cert_pem)

    # Assert
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == agent_id
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [agent_id]
    assert san.get_values_for_type(x509.IPAddress) == []


@pytest.mark.parametrize(
    ("server", "usage"), [(True, ExtendedKeyUsageOID.SERVER_AUTH), (False, ExtendedKeyUsageOID.CLIENT_AUTH)]
)
def test_leaf_extended_key_usage_is_server_or_client(ca: Issued, server: bool, usage: x509.ObjectIdentifier) -> None:
    # Prepare
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)

    # Execute
    cert = x509.load_pem_x509_certificate(issue(ca, "leaf", hosts=["localhost"], server=server).cert_pem)

    # Assert
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_ca_is_a_critical_path_length_zero_ca_that_signs_certificates(ca: Issued) -> None:
    # Execute
    cert = x509.load_pem_x509_certificate(ca.cert_pem)

    # Assert
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is True and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert cert.subject == cert.issuer
    assert common_name(ca.cert_pem) == "FedPipe CA"


def test_validity_starts_five_minutes_back_and_lasts_the_given_days(ca: Issued) -> None:
    # Prepare
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)

    # Execute
    cert = x509.load_pem_x509_certificate(issue(ca, "edge-1", days=30).cert_pem)

    # Assert
    after = datetime.datetime.now(datetime.UTC)
    skew = datetime.timedelta(minutes=5)
    assert before - skew <= cert.not_valid_before_utc <= after - skew
    assert before + datetime.timedelta(days=30) <= cert.not_valid_after_utc <= after + datetime.timedelta(days=30)


def test_serials_are_random(ca: Issued) -> None:
    # Execute
    serials = {x509.load_pem_x509_certificate(issue(ca, "edge-1").cert_pem).serial_number for _ in range(3)}

    # Assert
    assert len(serials) == 3


# ---------------------------------------------------------------- files


def test_keys_are_private_unencrypted_pkcs8_and_certificates_readable(tmp_path: Path) -> None:
    # Execute
    write_bundle(tmp_path, ["edge-1"])

    # Assert
    for name in ("ca", "coordinator", "agents/edge-1"):
        key = tmp_path / f"{name}.key"
        assert mode(key) == 0o600
        assert mode(tmp_path / f"{name}.crt") == 0o644
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
        serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert not list(tmp_path.rglob("*.tmp"))


def test_existing_ca_is_reused_for_new_agents(tmp_path: Path) -> None:
    # Prepare
    write_bundle(tmp_path, ["edge-1"])
    ca_bytes = (tmp_path / "ca.crt").read_bytes()
    ca_key_bytes = (tmp_path / "ca.key").read_bytes()
    coordinator_bytes = (tmp_path / "coordinator.crt").read_bytes()

    # Execute
    written = write_bundle(tmp_path, ["edge-1", "edge-2"])

    # Assert
    assert written == {"agent:edge-2": tmp_path / "agents" / "edge-2.crt"}
    assert (tmp_path / "ca.crt").read_bytes() == ca_bytes
    assert (tmp_path / "ca.key").read_bytes() == ca_key_bytes
    assert (tmp_path / "coordinator.crt").read_bytes() == coordinator_bytes
    load(tmp_path / "agents" / "edge-2.crt").verify_directly_issued_by(load(tmp_path / "ca.crt"))


def test_existing_agent_certificate_is_kept_without_force(tmp_path: Path) -> None:
    # Prepare
    write_bundle(tmp_path, ["edge-1"])
    crt, key = tmp_path / "agents" / "edge-1.crt", tmp_path / "agents" / "edge-1.key"
    old = (crt.read_bytes(), key.read_bytes())

    # Execute
    written = write_bundle(tmp_path, ["edge-1"])

    # Assert
    assert written == {}
    assert (crt.read_bytes(), key.read_bytes()) == old


def test_force_reissues_leaves_under_the_same_ca(tmp_path: Path) -> None:
    # Prepare
    write_bundle(tmp_path, ["edge-1"])
    crt = tmp_path / "agents" / "edge-1.crt"
    old_agent, old_ca = crt.read_bytes(), (tmp_path / "ca.crt").read_bytes()

    # Execute
    written = write_bundle(tmp_path, ["edge-1"], force=True)

    # Assert
    assert written == {"coordinator": tmp_path / "coordinator.crt", "agent:edge-1": crt}
    assert crt.read_bytes() != old_agent
    assert (tmp_path / "ca.crt").read_bytes() == old_ca
    load(crt).verify_directly_issued_by(load(tmp_path / "ca.crt"))
    assert mode(tmp_path / "agents" / "edge-1.key") == 0o600


def test_bad_agent_id_is_rejected_before_any_file_is_written(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "pki"

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"'\.\./evil'"):
        write_bundle(out, ["edge-1", "../evil"])
    assert not out.exists()


def test_half_a_ca_is_refused_rather_than_replaced(tmp_path: Path) -> None:
    # Prepare
    write_bundle(tmp_path, [])
    (tmp_path / "ca.key").unlink()

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"ca\.key does not"):
        write_bundle(tmp_path, ["edge-1"])
    assert not (tmp_path / "agents").exists()


@pytest.mark.parametrize("agent_id", ["a", "edge-1", "Jetson_Orin.3", "0" * 63])
def test_check_agent_id_accepts_valid_ids(agent_id: str) -> None:
    assert check_agent_id(agent_id) == agent_id


@pytest.mark.parametrize("agent_id", ["", "-edge", ".hidden", "a/b", "a b", "x" * 64, "ünï"])
def test_check_agent_id_names_the_bad_id(agent_id: str) -> None:
    with pytest.raises(ConfigError, match="agent id"):
        check_agent_id(agent_id)


def test_common_name_round_trips(ca: Issued) -> None:
    # Execute / Assert
    assert common_name(issue(ca, "edge-7").cert_pem) == "edge-7"


@pytest.mark.parametrize(
    "pem", [b"", b"not a certificate", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]
)
def test_common_name_rejects_garbage(pem: bytes) -> None:
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        common_name(pem)


# ---------------------------------------------------------------- certs command


def test_certs_main_writes_and_prints_the_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    out = tmp_path / "pki"

    # Execute
    code = certs_main(["--out", str(out), "--agent", "edge-1", "--agents", "edge-2, edge-3", "--host", "10.1.2.3"])

    # Assert
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"wrote {out / 'ca.key'}" in lines
    assert f"wrote {out / 'agents' / 'edge-3.crt'}" in lines
    assert sum(line.startswith("wrote ") for line in lines) == 2 * 5
    assert (
        f"coordinator: --tls.cert {out}/coordinator.crt --tls.key {out}/coordinator.key --tls.client-ca {out}/ca.crt"
        in lines
    )
    assert (
        f"agent edge-2: --agent-id edge-2 --tls.ca {out}/ca.crt "
        f"--tls.cert {out}/agents/edge-2.crt --tls.key {out}/agents/edge-2.key" in lines
    )
    san = load(out / "coordinator.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert san.get_values_for_type(x509.DNSName) == []


def test_certs_main_second_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    certs_main(["--out", str(tmp_path), "--agent", "edge-1"])
    capsys.readouterr()

    # Execute
    code = certs_main(["--out", str(tmp_path), "--agent", "edge-1"])

    # Assert
    out = capsys.readouterr().out
    assert code == 0
    assert "wrote" not in out and "nothing to write" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--agent", "bad/id"], "agent id 'bad/id'"),
        (["--agents", "ok,-bad"], "agent id '-bad'"),
        (["--days", "0"], "days"),
    ],
)
def test_certs_main_exits_2_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    # Execute
    code = certs_main(["--out", str(tmp_path / "pki"), *argv])

    # Assert
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("fedpipe-coordinator certs: ") and message in captured.err
    assert captured.out == ""
    assert not (tmp_path / "pki").exists()


def test_certs_main_usage_error_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    code = certs_main(["--agent", "edge-1"])

    # Assert
    assert code == 2
    assert "--out" in capsys.readouterr().err


# ---------------------------------------------------------------- gRPC mTLS


def echo_common_name(request: bytes, context: grpc.ServicerContext) -> bytes:
    # grpc-stubs types auth_context() values as bytes; at runtime each is a list of bytes.
    return cast(Sequence[bytes], context.auth_context()["x509_common_name"])[0]


@pytest.fixture
def mtls_server(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A server on 127.0.0.1 holding a certificate for that IP only, requiring a client certificate."""
    write_bundle(tmp_path, ["edge-1"], hosts=["127.0.0.1"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(echo_common_name)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {"Echo": handler}),))
    credentials = grpc.ssl_server_credentials(
        [((tmp_path / "coordinator.key").read_bytes(), (tmp_path / "coordinator.crt").read_bytes())],
        root_certificates=(tmp_path / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield tmp_path, port
    finally:
        server.stop(None)


def call_echo(port: int, ca_pem: bytes, client: Issued) -> bytes:
    channel = grpc.secure_channel(
        f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca_pem, client.key_pem, client.cert_pem)
    )
    try:
        return cast(bytes, channel.unary_unary("/t.T/Echo", None, None)(b"x", timeout=10))
    finally:
        channel.close()


def test_mtls_handshake_authenticates_the_agent_by_common_name(mtls_server: tuple[Path, int]) -> None:
    # Prepare
    out, port = mtls_server
    agent = Issued((out / "agents" / "edge-1.crt").read_bytes(), (out / "agents" / "edge-1.key").read_bytes())

    # Execute
    peer = call_echo(port, (out / "ca.crt").read_bytes(), agent)

    # Assert
    assert peer == b"edge-1"


def test_mtls_refuses_a_client_from_another_ca(mtls_server: tuple[Path, int]) -> None:
    # Prepare
    out, port = mtls_server
    stranger = issue(create_ca("Other CA"), "edge-1")

    # Execute
    with pytest.raises(grpc.RpcError) as caught:
        call_echo(port, (out / "ca.crt").read_bytes(), stranger)

    # Assert
    assert cast(grpc.Call, caught.value).code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_client_checks_the_server_san(tmp_path: Path) -> None:
    # Prepare: the coordinator certificate names another host, but is served on 127.0.0.1
    write_bundle(tmp_path, ["edge-1"], hosts=["coord.example.org"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    credentials = grpc.ssl_server_credentials(
        [((tmp_path / "coordinator.key").read_bytes(), (tmp_path / "coordinator.crt").read_bytes())],
        root_certificates=(tmp_path / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    agent = Issued((tmp_path / "agents" / "edge-1.crt").read_bytes(), (tmp_path / "agents" / "edge-1.key").read_bytes())

    try:
        # Execute
        with pytest.raises(grpc.RpcError) as caught:
            call_echo(port, (tmp_path / "ca.crt").read_bytes(), agent)
    finally:
        server.stop(None)

    # Assert
    error = cast(grpc.Call, caught.value)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "hostname" in (error.details() or "").lower()


def test_an_admin_certificate_names_admin_and_is_added_under_the_same_ca(tmp_path: Path) -> None:
    write_bundle(tmp_path, ["site-a"])
    ca_before = (tmp_path / "ca.crt").read_bytes()

    written = write_bundle(tmp_path, [], admins=["ops"])

    crt = tmp_path / "admins" / "ops.crt"
    assert written == {"admin:ops": crt}
    assert common_name(crt.read_bytes()) == "admin:ops"
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    assert stat.S_IMODE((tmp_path / "admins" / "ops.key").stat().st_mode) == 0o600
    with pytest.raises(ConfigError):
        write_bundle(tmp_path, [], admins=["bad name"])

"""A small PKI for a FedPipe deployment: a CA, the coordinator's server certificate, a client certificate per agent."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError

PROG = "fedpipe-coordinator certs"
COORDINATOR_CN = "fedpipe-coordinator"
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
# Must match edge_agent.config's agent_id validator: the id doubles as the certificate CN and a file name.
AGENT_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"  # an agent id, and the common name of its certificate
_AGENT_ID = re.compile(AGENT_ID_PATTERN)
# Hosts whose clocks run a little behind must not reject a certificate issued moments ago.
_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes


def check_agent_id(agent_id: str) -> str:
    """Return the id if it is a valid agent id, else raise ConfigError naming it."""
    if not _AGENT_ID.fullmatch(agent_id):
        raise ConfigError(
            f"agent id {agent_id!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return agent_id


def create_ca(common_name: str = "FedPipe CA", days: int = 3650) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    _check_days(days)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(ca: Issued, common_name: str, *, hosts: Sequence[str] = (), server: bool = False, days: int = 825) -> Issued:
    """A leaf certificate signed by `ca`: a server certificate for `hosts`, or a client certificate for an agent."""
    _check_days(days)
    ca_cert = _load_cert(ca.cert_pem, "CA certificate")
    ca_key = _load_ca_key(ca.key_pem, ca_cert)
    key = ec.generate_private_key(ec.SECP256R1())
    if server:
        if not hosts:
            raise ConfigError("a server certificate needs at least one host name or IP address")
        names = [_host_name(host) for host in hosts]
    else:
        # gRPC reports a client's SAN DNS names in its auth context; keep the id there as well as in the CN.
        names = [x509.DNSName(common_name)]
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def common_name(cert_pem: bytes) -> str:
    """The subject common name of a PEM certificate; ConfigError if it does not parse or has none."""
    cert = _load_cert(cert_pem, "certificate")
    attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attributes:
        raise ConfigError(f"certificate subject {cert.subject.rfc4514_string()!r} has no common name (CN)")
    value = attributes[0].value
    return value if isinstance(value, str) else value.decode()


def write_bundle(
    out: Path,
    agents: Sequence[str],
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 825,
    force: bool = False,
    admins: Sequence[str] = (),
) -> dict[str, Path]:
    """Write (or extend) a deployment's certificates under `out`; return what was written, keyed "ca",
    "coordinator", "agent:<id>" and "admin:<name>", each mapped to its .crt path. An admin's certificate
    names `admin:<name>` (a form no agent id takes), which a serving coordinator's admin API asks for.

    An existing CA is reused so agents can be added later; existing leaf certificates are kept unless `force`.
    """
    # Validate everything first: a bad id must not leave a half-written bundle behind.
    agent_ids = list(dict.fromkeys(check_agent_id(agent) for agent in agents))
    admin_names = list(dict.fromkeys(check_agent_id(admin) for admin in admins))  # an admin name has an id's form
    _check_days(days)
    if not hosts:
        raise ConfigError("the coordinator certificate needs at least one host name or IP address")
    for host in hosts:
        _host_name(host)

    written: dict[str, Path] = {}
    ca_crt, ca_key = out / "ca.crt", out / "ca.key"
    if ca_crt.exists() and ca_key.exists():
        ca = Issued(ca_crt.read_bytes(), ca_key.read_bytes())
        _load_ca_key(ca.key_pem, _load_cert(ca.cert_pem, str(ca_crt)))  # fail now, not after writing leaves
        new_ca = False
    elif ca_crt.exists() or ca_key.exists():
        # Replacing half a CA would silently orphan every certificate it signed; let the operator decide.
        present, missing = (ca_crt, ca_key) if ca_crt.exists() else (ca_key, ca_crt)
        raise ConfigError(f"{present} exists but {missing} does not; restore it or remove both to start a new CA")
    else:
        out.mkdir(parents=True, exist_ok=True)
        ca = create_ca()
        _write_pair(ca_crt, ca_key, ca)
        written["ca"] = ca_crt
        new_ca = True

    # A new CA invalidates whatever leaves were there before, so they are reissued regardless of `force`.
    reissue = force or new_ca
    coordinator_crt, coordinator_key = out / "coordinator.crt", out / "coordinator.key"
    if reissue or not (coordinator_crt.exists() and coordinator_key.exists()):
        _write_pair(coordinator_crt, coordinator_key, issue(ca, COORDINATOR_CN, hosts=hosts, server=True, days=days))
        written["coordinator"] = coordinator_crt

    if agent_ids:
        (out / "agents").mkdir(exist_ok=True)
    for agent_id in agent_ids:
        crt, key = agent_paths(out, agent_id)
        if reissue or not (crt.exists() and key.exists()):
            _write_pair(crt, key, issue(ca, agent_id, days=days))
            written[f"agent:{agent_id}"] = crt
    if admin_names:
        (out / "admins").mkdir(exist_ok=True)
    for name in admin_names:
        crt, key = admin_paths(out, name)
        if reissue or not (crt.exists() and key.exists()):
            _write_pair(crt, key, issue(ca, f"admin:{name}", days=days))
            written[f"admin:{name}"] = crt
    return written


def agent_paths(out: Path, agent_id: str) -> tuple[Path, Path]:
    """Where write_bundle puts an agent's certificate and key."""
    return out / "agents" / f"{agent_id}.crt", out / "agents" / f"{agent_id}.key"


def admin_paths(out: Path, name: str) -> tuple[Path, Path]:
    """Where write_bundle puts an admin's certificate and key."""
    return out / "admins" / f"{name}.crt", out / "admins" / f"{name}.key"


def certs_main(argv: Sequence[str]) -> int:
    """`fedpipe-coordinator certs`: write the bundle and print the flags that use it; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Create a CA, the coordinator's certificate and one client certificate per agent. "
        "Run again with new agents to add them under the same CA.",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory to write to")
    parser.add_argument("--agent", action="append", default=[], metavar="ID", help="an agent id (repeatable)")
    parser.add_argument("--agents", action="append", default=[], metavar="A,B,C", help="comma-separated agent ids")
    parser.add_argument(
        "--admin", action="append", default=[], metavar="NAME", help="an admin of a serving coordinator (repeatable)"
    )
    parser.add_argument(
        "--host",
        action="append",
        default=None,
        metavar="NAME",
        help="a DNS name or IP address agents use to reach the coordinator (repeatable; default: localhost, 127.0.0.1)",
    )
    parser.add_argument("--days", type=int, default=825, help="validity of the issued certificates (default: 825)")
    parser.add_argument("--force", action="store_true", help="reissue existing coordinator and agent certificates")
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exit_:
        # argparse exits on --help and usage errors; callers expect an exit code from us, not an exception.
        return 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 2

    agents: list[str] = list(args.agent)
    for group in args.agents:
        agents.extend(part.strip() for part in group.split(",") if part.strip())
    hosts: list[str] = args.host or list(DEFAULT_HOSTS)
    out: Path = args.out
    try:
        written = write_bundle(out, agents, hosts=hosts, days=args.days, force=args.force, admins=args.admin)
    except (ConfigError, OSError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2

    for crt in written.values():
        print(f"wrote {crt}")
        print(f"wrote {crt.with_suffix('.key')}")
    if not written:
        print(f"nothing to write: the certificates in {out} exist (--force reissues them)")
    print(
        f"coordinator: --tls.cert {out / 'coordinator.crt'} --tls.key {out / 'coordinator.key'} "
        f"--tls.client-ca {out / 'ca.crt'}"
    )
    for agent_id in dict.fromkeys(agents):
        crt, key = agent_paths(out, agent_id)
        print(f"agent {agent_id}: --agent-id {agent_id} --tls.ca {out / 'ca.crt'} --tls.cert {crt} --tls.key {key}")
    for name in dict.fromkeys(args.admin):
        crt, key = admin_paths(out, name)
        print(f"admin {name}: fedpipe-coordinator runs --ca {out / 'ca.crt'} --cert {crt} --key {key}")
    return 0


def _check_days(days: int) -> None:
    if days < 1:
        raise ConfigError(f"days: {days} is not a validity; use at least 1")


def _host_name(host: str) -> x509.GeneralName:
    """An IP address SAN when `host` parses as one (TLS matches IPs only against IP entries), else a DNS SAN."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(char.isspace() for char in host):
        raise ConfigError(f"host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted on purpose: services start unattended; the file mode (0600) is the protection.
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_cert(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as err:
        raise ConfigError(f"{what} is not a PEM certificate: {err}") from err


def _load_ca_key(pem: bytes, ca_cert: x509.Certificate) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"CA key is not an unencrypted PEM private key: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"CA key is a {type(key).__name__}; expected an EC key")
    if key.public_key() != ca_cert.public_key():
        raise ConfigError("CA key does not belong to the CA certificate")
    return key


def _write_pair(crt: Path, key: Path, issued: Issued) -> None:
    # Key first: a certificate on disk without its key would make write_bundle skip the pair next time.
    _write_atomic(key, issued.key_pem, 0o600)
    _write_atomic(crt, issued.cert_pem, 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file and rename, so readers never see half a key; the mode is set before any data."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never write through a file (or symlink) someone else put at the temporary name.
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask may have narrowed `mode`; certificates should stay readable
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

"""Transport security for both sides: TLS credentials, and which agent is behind a call.

mTLS (the default): an agent is the common name of its client certificate, signed by the run's CA.
Token (the documented alternative): server-only TLS, and each call carries `authorization: Bearer T`;
the coordinator keeps only sha256(T) per agent. --insecure: plaintext, nobody is checked.
Admins (the admin API of a serving coordinator) are told apart from agents by a form no agent id can take:
`admin:NAME`, the common name of an admin certificate (mTLS) or the identity of an admin token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import grpc
import yaml

from common.errors import ConfigError, PermissionDenied, Unauthenticated

Mode = Literal["mtls", "token", "insecure"]
HINT = "TLS is on by default: make the files with `fedpipe-coordinator certs`, or pass --insecure on both sides"


def read_file(path: Path | None, field_name: str) -> bytes:
    """A credentials file's bytes; ConfigError naming the field when it is missing or unreadable."""
    if path is None:
        raise ConfigError(f"{field_name}: required ({HINT})")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{field_name}: cannot read {path}: {err.strerror or err}") from None
    if not data.strip():
        raise ConfigError(f"{field_name}: {path} is empty")
    return data


def _pem(path: Path | None, field_name: str, kind: str) -> bytes:
    data = read_file(path, field_name)
    if b"-----BEGIN " not in data or kind.encode() not in data:
        raise ConfigError(f"{field_name}: {path} is not a PEM {kind.lower()}")
    return data


def token_digest(token: str) -> str:
    """sha256 hex of a token, the form the coordinator stores."""
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: Path | None, field_name: str = "tls.tokens", prefix: str = "") -> dict[str, str]:
    """A YAML/JSON map id -> sha256 hex of its token (tls.tokens: agents; admin.tokens: admins, whose ids
    get `prefix`); returned as digest -> id."""
    raw = yaml.safe_load(read_file(path, field_name))
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{field_name}: {path} must map ids to sha256 hex digests")
    by_digest: dict[str, str] = {}
    for who, digest in raw.items():
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ConfigError(f"{field_name}: the entry of {who!r} is not a sha256 hex digest")
        if digest in by_digest:
            raise ConfigError(f"{field_name}: {who!r} and {by_digest[digest]!r} share a token")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", str(who)):  # no colon: admin:NAME stays admins'
            raise ConfigError(f"{field_name}: {who!r} is not an id (1-63 letters, digits, '.', '_' or '-')")
        by_digest[digest] = f"{prefix}{who}"
    return by_digest


ADMIN = "admin:"  # the prefix of every admin identity; agent ids cannot hold a colon


@dataclass(frozen=True)
class ServerSecurity:
    """The coordinator's credentials and its check of who is calling."""

    mode: Mode
    credentials: grpc.ServerCredentials | None = None
    tokens: Mapping[str, str] = field(default_factory=dict)  # sha256 hex -> agent id, or admin:NAME
    admin_names: frozenset[str] = frozenset()  # mtls: the admins allowed; empty = any the CA signed

    @classmethod
    def insecure(cls) -> ServerSecurity:
        """Plaintext; every caller may claim any agent id."""
        return cls("insecure")

    def identity(self, context: grpc.ServicerContext) -> str | None:
        """The authenticated agent (or admin:NAME) behind a call, or None."""
        if self.mode == "mtls":
            # grpc-stubs type the values as bytes; grpc gives a list of bytes per key
            names = cast(Sequence[bytes], context.auth_context().get("x509_common_name") or [])
            return names[0].decode() if names else None
        if self.mode == "token":
            for key, value in context.invocation_metadata():
                if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                    digest = token_digest(value[len("Bearer ") :])
                    # compare_digest on every entry so timing says nothing about which token is close
                    matches = [a for d, a in self.tokens.items() if hmac.compare_digest(d, digest)]
                    return matches[0] if matches else None
        return None

    def admin(self, context: grpc.ServicerContext) -> str:
        """The admin behind a call (admin:NAME); Unauthenticated or PermissionDenied for anyone else."""
        if self.mode == "insecure":
            return f"{ADMIN}anonymous"  # --insecure checks nobody, admins included
        who = self.identity(context)
        if who is None:
            what = "client certificate" if self.mode == "mtls" else "bearer token"
            raise Unauthenticated(f"no valid {what}; the admin API needs an admin's")
        if not who.startswith(ADMIN):
            raise PermissionDenied(f"{who!r} is an agent; the admin API takes admins only")
        if self.mode == "mtls" and self.admin_names and who[len(ADMIN) :] not in self.admin_names:
            raise PermissionDenied(f"{who!r} is not one of admin.names")
        return who

    def authorize(self, context: grpc.ServicerContext, agent_id: str) -> None:
        """Refuse a call whose caller is not the agent it names."""
        if self.mode == "insecure":
            return
        who = self.identity(context)
        if who is None:
            what = "client certificate" if self.mode == "mtls" else "bearer token"
            raise Unauthenticated(f"no valid {what}; agent {agent_id!r} is not authenticated")
        if who != agent_id:
            raise PermissionDenied(f"authenticated as {who!r}, which may not act as {agent_id!r}")


def server_security(
    insecure: bool,
    cert: Path | None,
    key: Path | None,
    auth: Literal["mtls", "token"],
    client_ca: Path | None,
    tokens: Path | None,
    admin_tokens: Path | None = None,
    admin_names: Sequence[str] = (),
) -> ServerSecurity:
    """Read and check the coordinator's TLS files; ConfigError names the field that is wrong.
    admin_tokens (token auth) and admin_names (mtls) say who may use the admin API."""
    if insecure:
        return ServerSecurity.insecure()
    certificate = _pem(cert, "tls.cert", "CERTIFICATE")
    pair = [(_pem(key, "tls.key", "PRIVATE KEY"), certificate)]
    if auth == "mtls":
        if admin_tokens is not None:
            raise ConfigError("admin.tokens: token auth only; under mtls an admin presents an admin certificate")
        ca = _pem(client_ca, "tls.client_ca", "CERTIFICATE")
        credentials = grpc.ssl_server_credentials(pair, root_certificates=ca, require_client_auth=True)
        return ServerSecurity("mtls", credentials, admin_names=frozenset(admin_names))
    if admin_names:
        raise ConfigError("admin.names: mtls only; under token auth the admins are the names in admin.tokens")
    by_digest = load_tokens(tokens)
    if admin_tokens is not None:
        admins = load_tokens(admin_tokens, "admin.tokens", ADMIN)
        shared = set(admins) & set(by_digest)
        if shared:
            raise ConfigError(
                f"admin.tokens: {admins[min(shared)]!r} shares a token with agent {by_digest[min(shared)]!r}"
            )
        by_digest = {**by_digest, **admins}
    return ServerSecurity("token", grpc.ssl_server_credentials(pair), by_digest)


def channel_credentials(
    ca: Path | None, cert: Path | None, key: Path | None, token_file: Path | None
) -> grpc.ChannelCredentials:
    """An agent's credentials: the CA it trusts, and its certificate or its token."""
    root = _pem(ca, "tls.ca", "CERTIFICATE")
    if cert is None and key is None and token_file is None:
        raise ConfigError(f"tls.cert and tls.key (or tls.token_file): required ({HINT})")
    if cert is not None or key is not None:
        ssl = grpc.ssl_channel_credentials(
            root, _pem(key, "tls.key", "PRIVATE KEY"), _pem(cert, "tls.cert", "CERTIFICATE")
        )
    else:
        ssl = grpc.ssl_channel_credentials(root)
    if token_file is None:
        return ssl
    token = read_file(token_file, "tls.token_file").decode().strip()
    return grpc.composite_channel_credentials(ssl, grpc.access_token_call_credentials(token))

"""Transport security for both sides: TLS credentials, and which agent is behind a call.

mTLS (the default): an agent is the common name of its client certificate, signed by the run's CA.
Token (the documented alternative): server-only TLS, and each call carries `authorization: Bearer T`;
the coordinator keeps only sha256(T) per agent. --insecure: plaintext, nobody is checked.
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


def load_tokens(path: Path | None) -> dict[str, str]:
    """tls.tokens: a YAML/JSON map agent id -> sha256 hex of its token; returned as digest -> agent id."""
    raw = yaml.safe_load(read_file(path, "tls.tokens"))
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"tls.tokens: {path} must map agent ids to sha256 hex digests")
    by_digest: dict[str, str] = {}
    for agent, digest in raw.items():
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ConfigError(f"tls.tokens: the entry of {agent!r} is not a sha256 hex digest")
        if digest in by_digest:
            raise ConfigError(f"tls.tokens: {agent!r} and {by_digest[digest]!r} share a token")
        by_digest[digest] = str(agent)
    return by_digest


@dataclass(frozen=True)
class ServerSecurity:
    """The coordinator's credentials and its check of who is calling."""

    mode: Mode
    credentials: grpc.ServerCredentials | None = None
    tokens: Mapping[str, str] = field(default_factory=dict)  # sha256 hex -> agent id

    @classmethod
    def insecure(cls) -> ServerSecurity:
        """Plaintext; every caller may claim any agent id."""
        return cls("insecure")

    def identity(self, context: grpc.ServicerContext) -> str | None:
        """The authenticated agent behind a call, or None."""
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
) -> ServerSecurity:
    """Read and check the coordinator's TLS files; ConfigError names the field that is wrong."""
    if insecure:
        return ServerSecurity.insecure()
    certificate = _pem(cert, "tls.cert", "CERTIFICATE")
    pair = [(_pem(key, "tls.key", "PRIVATE KEY"), certificate)]
    if auth == "mtls":
        ca = _pem(client_ca, "tls.client_ca", "CERTIFICATE")
        return ServerSecurity("mtls", grpc.ssl_server_credentials(pair, root_certificates=ca, require_client_auth=True))
    return ServerSecurity("token", grpc.ssl_server_credentials(pair), load_tokens(tokens))


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

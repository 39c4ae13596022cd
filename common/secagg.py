"""Secure aggregation's shared arithmetic (SecAgg+, Bell et al. 2020, after Bonawitz et al. 2017).

Both sides use these: the round's neighbour graph, fixed-point vectors mod 2^62, masks expanded from 32-byte
seeds by ChaCha20, X25519 + HKDF for the pairwise seeds and the share keys, AES-GCM for shares in transit
(bound to round, sender and receiver, so a share replayed into another round or to another agent does not
open), and Shamir sharing of 32-byte secrets over the prime field 2^521 - 1.

Vectors are int64 tensors holding values in [0, 2^62): the sum of two stays below 2^63, so every step is an
exact int64 operation followed by `& MASK`, never an overflow.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import random
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from common.errors import InvalidArgument

BITS = 62
MODULUS = 1 << BITS
MASK = MODULUS - 1
PRIME = (1 << 521) - 1  # a Mersenne prime above any 32-byte secret
SHARE_BYTES = 66  # a field element, big-endian
SECRET_BYTES = 32
SEALED_BYTES = 12 + 2 * SHARE_BYTES + 16  # nonce, two shares, AES-GCM tag
MASKED = "secagg::masked"  # the one tensor of a masked upload: int64 of the layout's length


# ---------------------------------------------------------------- the round's parameters and graph


@dataclass(frozen=True)
class Params:
    """What every participant of one secure round agrees on before any key is drawn."""

    tag: str  # names the round (run id and round number): mixed into every key and share
    participants: tuple[str, ...]  # sorted agent ids; an agent's Shamir x-coordinate is its position + 1
    neighbours: int  # k: each agent masks with, and shares its secrets among, k others (n - 1: every other)
    threshold: int  # t: shares needed to rebuild a secret; at most k
    fraction_bits: int  # fixed-point scale 2^f
    length: int  # coordinates of the summed vector

    def __post_init__(self) -> None:
        n = len(self.participants)
        if tuple(sorted(set(self.participants))) != self.participants or n < 2:
            raise ValueError(f"secure aggregation needs two or more distinct, sorted participants (got {n})")
        if not 1 <= self.neighbours <= n - 1:
            raise ValueError(f"neighbours must be in [1, {n - 1}] for {n} participants (got {self.neighbours})")
        if not 1 <= self.threshold <= self.neighbours:
            raise ValueError(f"threshold must be in [1, {self.neighbours}] (got {self.threshold})")

    def index(self, agent: str) -> int:
        """The agent's Shamir x-coordinate (1-based)."""
        return self.participants.index(agent) + 1

    def graph(self) -> dict[str, tuple[str, ...]]:
        """Each participant's neighbours: a Harary graph (k/2 on each side on a ring) over a shuffle seeded by
        the tag, so every party derives the same one; k = n - 1 is the complete graph of the original SecAgg."""
        order = list(self.participants)
        random.Random(hashlib.sha256(f"fedpipe-secagg-graph|{self.tag}".encode()).digest()).shuffle(order)
        n, k = len(order), self.neighbours
        links: dict[str, set[str]] = {agent: set() for agent in order}
        for position, agent in enumerate(order):
            for step in range(1, k // 2 + 1):
                other = order[(position + step) % n]
                links[agent].add(other)
                links[other].add(agent)
            if k % 2 == 1:  # odd degree: the opposite node on the ring as well (n even), or the next one
                other = order[(position + n // 2) % n]
                if other != agent:
                    links[agent].add(other)
                    links[other].add(agent)
        return {agent: tuple(sorted(links[agent])) for agent in self.participants}


def default_neighbours(n: int) -> int:
    """SecAgg+'s logarithmic degree: about 3 log2 n, even, capped at n - 1 (complete below ~16 agents)."""
    k = 2 * math.ceil(1.5 * math.log2(max(n, 2)))
    return min(n - 1, k)


# ---------------------------------------------------------------- fixed point mod 2^62


def encode(values: torch.Tensor, fraction_bits: int, parties: int) -> torch.Tensor:
    """float values -> round(x 2^f) mod 2^62; InvalidArgument when the sum of `parties` such vectors could
    wrap (some |x| 2^f over 2^61 / parties)."""
    scaled = torch.round(values.double().flatten() * float(1 << fraction_bits))
    limit = float(1 << (BITS - 1)) / parties
    if scaled.numel() and float(scaled.abs().max()) >= limit:
        raise InvalidArgument("secure_aggregation", f"a value over {limit / (1 << fraction_bits):.3g} would wrap")
    return scaled.to(torch.int64) & MASK


def decode(vector: torch.Tensor, fraction_bits: int) -> torch.Tensor:
    """Inverse of encode on a sum: the centred residue over 2^f, float64."""
    centred = torch.where(vector >= (1 << (BITS - 1)), vector - MODULUS, vector)
    return centred.double() / float(1 << fraction_bits)


def expand(seed: bytes, length: int) -> torch.Tensor:
    """`length` uniform values mod 2^62 from a 32-byte seed (the ChaCha20 keystream, nonce 0)."""
    if len(seed) != SECRET_BYTES:
        raise ValueError(f"a mask seed is {SECRET_BYTES} bytes, not {len(seed)}")
    if length == 0:
        return torch.zeros(0, dtype=torch.int64)
    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    stream = bytearray(8 * length)
    encryptor.update_into(bytes(8 * length), stream)  # the keystream, written once into the tensor's memory
    return torch.frombuffer(stream, dtype=torch.int64).bitwise_and_(MASK)


def add_into(total: torch.Tensor, other: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """total += sign * other mod 2^62, in place (both in [0, 2^62): no step leaves int64); returns total."""
    (total.add_(other) if sign > 0 else total.sub_(other)).bitwise_and_(MASK)
    return total


# ---------------------------------------------------------------- keys


def new_key() -> X25519PrivateKey:
    """A fresh X25519 key from the operating system's entropy."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of a key's public half."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of a private key (what is Shamir-shared)."""
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def load_public(raw: bytes, what: str) -> X25519PublicKey:
    """A peer's public key; InvalidArgument naming it when the bytes are no X25519 key."""
    if len(raw) != 32:
        raise InvalidArgument(what, f"an X25519 public key is 32 bytes, not {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def load_private(raw: bytes) -> X25519PrivateKey:
    """A private key from its 32 raw bytes (a rebuilt mask key)."""
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: X25519PrivateKey, peer: bytes, tag: str, purpose: str, what: str) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256 over the X25519 secret, bound to the round and purpose."""
    shared = private.exchange(load_public(peer, what))
    info = f"fedpipe-secagg|{purpose}|{tag}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def pair_sign(params: Params, me: str, other: str) -> int:
    """+1 when me sorts before other, -1 after: the pairwise masks cancel in the sum."""
    return 1 if me < other else -1


# ---------------------------------------------------------------- signed keys (against a coordinator that swaps them)


def keys_message(tag: str, agent: str, keys: tuple[bytes, bytes]) -> bytes:
    """What an agent signs: the round, its id and its two public keys."""
    return f"fedpipe-secagg-keys|{tag}|{agent}|".encode() + keys[0] + keys[1]


def sign_keys(private_key_pem: bytes, tag: str, agent: str, keys: tuple[bytes, bytes]) -> bytes:
    """ECDSA-SHA256 (or RSA-PSS) signature of the agent's keys with its certificate's private key."""
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    message = keys_message(tag, agent, keys)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH), hashes.SHA256())
    raise InvalidArgument("tls.key", f"a {type(key).__name__} cannot sign secure-aggregation keys (EC or RSA only)")


def verify_keys(
    ca_pem: bytes, certificate_pem: bytes, signature: bytes, tag: str, agent: str, keys: tuple[bytes, bytes]
) -> None:
    """The keys are the agent's: its certificate is issued by the CA, valid now, names the agent (CN), and signs
    them for this round; InvalidArgument naming the agent otherwise."""
    what = f"keys[{agent}]"
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert = x509.load_pem_x509_certificate(certificate_pem)
    except ValueError:
        raise InvalidArgument(what, f"{agent}'s certificate does not parse") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise InvalidArgument(what, f"{agent}'s certificate is not issued by this federation's CA") from None
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise InvalidArgument(what, f"{agent}'s certificate is not valid now")
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [agent]:
        raise InvalidArgument(what, f"the certificate relayed as {agent}'s names {names}")
    public = cert.public_key()
    message = keys_message(tag, agent, keys)
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH)
            public.verify(signature, message, pss, hashes.SHA256())
        else:
            raise InvalidArgument(what, f"{agent}'s certificate holds a {type(public).__name__} key")
    except InvalidSignature:
        raise InvalidArgument(what, f"{agent}'s keys for round {tag} are not signed by its certificate") from None


# ---------------------------------------------------------------- Shamir over GF(2^521 - 1)


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Shares of a 32-byte secret at the points xs; any threshold of them rebuild it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a shared secret is {SECRET_BYTES} bytes, not {len(secret)}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares: dict[int, int] = {}
    for x in xs:
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % PRIME
        shares[x] = y
    return shares


def combine(shares: Mapping[int, int], threshold: int) -> bytes:
    """The secret from at least threshold shares (Lagrange at 0); ValueError with fewer."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares, {threshold} needed")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (x_i, y_i) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (x_j, _) in enumerate(points):
            if i != j:
                numerator = numerator * (-x_j) % PRIME
                denominator = denominator * (x_i - x_j) % PRIME
        secret = (secret + y_i * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ValueError("the shares do not rebuild a 32-byte secret (inconsistent shares)")
    return secret.to_bytes(SECRET_BYTES, "big")


# ---------------------------------------------------------------- shares in transit


def share_aad(tag: str, sender: str, receiver: str) -> bytes:
    """What a share's ciphertext is bound to."""
    return f"fedpipe-secagg-share|{tag}|{sender}|{receiver}".encode()


def seal(key: bytes, tag: str, sender: str, receiver: str, mask_share: int, key_share: int) -> bytes:
    """A sender's two shares (of its self-mask seed and of its mask key) for one receiver: nonce + AES-GCM."""
    nonce = os.urandom(12)
    plain = mask_share.to_bytes(SHARE_BYTES, "big") + key_share.to_bytes(SHARE_BYTES, "big")
    return nonce + AESGCM(key).encrypt(nonce, plain, share_aad(tag, sender, receiver))


def open_sealed(key: bytes, tag: str, sender: str, receiver: str, sealed: bytes) -> tuple[int, int]:
    """(self-mask share, mask-key share); InvalidArgument when it does not authenticate for this round, sender
    and receiver (replayed from another round, or altered)."""
    try:
        plain = AESGCM(key).decrypt(sealed[:12], sealed[12:], share_aad(tag, sender, receiver))
    except (InvalidTag, ValueError):
        raise InvalidArgument(
            f"shares[{sender}]", f"the share from {sender} does not open for round {tag} (replayed or altered)"
        ) from None
    if len(plain) != 2 * SHARE_BYTES:
        raise InvalidArgument(f"shares[{sender}]", f"a share holds {2 * SHARE_BYTES} bytes, not {len(plain)}")
    return int.from_bytes(plain[:SHARE_BYTES], "big"), int.from_bytes(plain[SHARE_BYTES:], "big")


def byte_chi_square(vector: torch.Tensor) -> float:
    """Pearson's statistic of the low 7 bytes of each int64 value against uniform bytes (255 degrees of
    freedom: about 255 +- 23 for a uniform vector mod 2^62, far more for an unmasked one)."""
    raw = bytearray(vector.contiguous().numpy().tobytes())
    data = torch.frombuffer(raw, dtype=torch.uint8).view(-1, 8)[:, :7].flatten()
    counts = torch.bincount(data.long(), minlength=256).double()
    expected = data.numel() / 256
    return float(((counts - expected) ** 2 / expected).sum())

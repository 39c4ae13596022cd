"""An agent's side of one secure-aggregation round (common.secagg): keys, shares, the masked vector, unmasking.

The agent's secrets (two X25519 keys and the self-mask seed) never leave it whole: its neighbours hold Shamir
shares, sealed so that only the addressee opens them. What it uploads is its encoded vector plus its self-mask
plus or minus one pairwise mask per neighbour that shared with it: uniform mod 2^62 to anyone without the seeds.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from common import linear
from common.errors import InvalidArgument
from common.linear import clip, flatten
from common.secagg import (
    MASKED,
    Params,
    add_into,
    agree,
    encode,
    expand,
    new_key,
    open_sealed,
    pair_sign,
    private_bytes,
    public_bytes,
    seal,
    sign_keys,
    split,
    verify_keys,
)
from common.types import Task, TaskKind, TrainPlan, UpdateMeta

log = logging.getLogger(__name__)


def secure_input(
    terms: Mapping[str, torch.Tensor],
    params: Params,
    clip_norm: float = 0.0,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """An agent's change as it enters the masked sum: clipped to clip_norm (0: not clipped), plus its share of
    DP-FedAvg's noise (N(0, noise_std^2) per coordinate: the coordinator's z C / sqrt(n) split across the n
    agents), flattened in the layout's name order and encoded to fixed point."""
    if clip_norm > 0:
        terms, _ = clip(terms, clip_norm)
    vector = flatten(terms)
    if vector.numel() != params.length:
        raise ValueError(f"a change of {vector.numel()} values for a round of {params.length}")
    if noise_std > 0:
        vector = vector + noise_std * torch.randn(vector.shape, generator=generator, dtype=torch.float64)
    return encode(vector, params.fraction_bits, len(params.participants))


class SecAggClient:
    """One agent in one round: advertise (before the participants are known), then join, share, receive,
    masked and unmask, in that order."""

    def __init__(self, agent_id: str, params: Params | None = None) -> None:
        self.agent_id = agent_id
        self.joined: Params | None = None
        self.neighbours: tuple[str, ...] = ()
        self.share_key = new_key()  # c: keys the sealed shares
        self.mask_key = new_key()  # s: keys the pairwise masks; Shamir-shared
        self.self_seed = secrets.token_bytes(32)  # b: the self-mask; Shamir-shared
        self.peers: dict[str, tuple[bytes, bytes]] = {}
        self.held: dict[str, tuple[int, int]] = {}  # sender -> (self-mask share, mask-key share) it gave us
        if params is not None:
            self.join(params)

    def join(self, params: Params) -> None:
        """The round's participants are known: take this agent's place in its graph."""
        if self.agent_id not in params.participants:
            raise InvalidArgument("secagg.participants", f"{self.agent_id} is not a participant of round {params.tag}")
        self.joined = params
        self.neighbours = params.graph()[self.agent_id]

    @property
    def params(self) -> Params:
        """The round's parameters (ValueError before join)."""
        if self.joined is None:
            raise ValueError(f"{self.agent_id} has not joined a secure round")
        return self.joined

    def advertise(self) -> tuple[bytes, bytes]:
        """The two public keys: (share key, mask key)."""
        return public_bytes(self.share_key), public_bytes(self.mask_key)

    def share(self, peers: Mapping[str, tuple[bytes, bytes]]) -> dict[str, bytes]:
        """Sealed shares of the self-mask seed and the mask key, one per neighbour that advertised keys."""
        strangers = sorted(set(peers) - set(self.neighbours))
        if strangers:
            raise InvalidArgument("keys", f"{strangers[:3]} are not {self.agent_id}'s neighbours")
        if len(peers) < self.params.threshold:
            raise InvalidArgument(
                "keys", f"{len(peers)} neighbours advertised keys, {self.params.threshold} needed to share with"
            )
        self.peers = dict(peers)
        params = self.params
        xs = [params.index(j) for j in sorted(peers)]
        seed_shares = split(self.self_seed, params.threshold, xs)
        key_shares = split(private_bytes(self.mask_key), params.threshold, xs)
        sealed: dict[str, bytes] = {}
        for j in sorted(peers):
            key = agree(self.share_key, peers[j][0], params.tag, "share", f"keys[{j}]")
            x = params.index(j)
            sealed[j] = seal(key, params.tag, self.agent_id, j, seed_shares[x], key_shares[x])
        return sealed

    def receive(self, sealed: Mapping[str, bytes]) -> None:
        """Open the shares neighbours sealed for us (InvalidArgument for one that does not open)."""
        strangers = sorted(set(sealed) - set(self.peers))
        if strangers:
            raise InvalidArgument("shares", f"shares from {strangers[:3]}, who are not neighbours with keys")
        for sender in sorted(sealed):
            key = agree(self.share_key, self.peers[sender][0], self.params.tag, "share", f"keys[{sender}]")
            self.held[sender] = open_sealed(key, self.params.tag, sender, self.agent_id, sealed[sender])

    def masked(self, encoded: torch.Tensor) -> torch.Tensor:
        """The encoded vector plus the self-mask and the pairwise masks with every neighbour that shared."""
        params = self.params
        if encoded.shape != (params.length,) or encoded.dtype != torch.int64:
            raise ValueError(
                f"an encoded vector is int64 of length {params.length}, not {encoded.dtype} {encoded.shape}"
            )
        total = add_into(encoded.clone(), expand(self.self_seed, params.length))
        for j in sorted(self.held):
            seed = agree(self.mask_key, self.peers[j][1], params.tag, "mask", f"keys[{j}]")
            add_into(total, expand(seed, params.length), pair_sign(params, self.agent_id, j))
        return total

    def unmask(self, survivors: Collection[str], dropped: Collection[str]) -> dict[str, tuple[str, int]]:
        """Per neighbour that shared with us: its self-mask share if it survived, its mask-key share if it
        dropped; never both for one neighbour, and nothing while fewer than threshold agents survive."""
        alive, gone = set(survivors), set(dropped)
        if alive & gone:
            raise InvalidArgument("unmask", f"{sorted(alive & gone)[:3]} named both surviving and dropped")
        if len(alive) < self.params.threshold:
            raise InvalidArgument("unmask", f"{len(alive)} survivors, under the threshold {self.params.threshold}")
        revealed: dict[str, tuple[str, int]] = {}
        for j, (seed_share, key_share) in sorted(self.held.items()):
            if j in alive:
                revealed[j] = ("seed", seed_share)
            elif j in gone:
                revealed[j] = ("key", key_share)
        return revealed


@dataclass
class _Pending:
    """A trained round waiting for its secure steps."""

    round: int
    plan: TrainPlan
    terms: dict[str, torch.Tensor]
    meta: UpdateMeta
    client: SecAggClient


@dataclass(frozen=True)
class KeySigner:
    """What signs this agent's keys and checks its neighbours': its mTLS key and certificate, and the CA."""

    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes


class SecureGateway(Protocol):
    """The gateway calls secure aggregation makes (edge_agent.agent.Gateway has them)."""

    def upload(self, meta: UpdateMeta, tensors: Mapping[str, torch.Tensor]) -> str: ...
    def advertise_keys(
        self, round_: int, plan_id: str, keys: tuple[bytes, bytes], proof: tuple[bytes, bytes] | None = None
    ) -> None: ...
    def share_keys(self, round_: int, sealed: Mapping[str, bytes]) -> None: ...
    def unmask(self, round_: int, revealed: Mapping[str, tuple[str, int]]) -> None: ...


class SecureWork:
    """An agent's secure rounds: what it keeps between its TRAIN task and the SECAGG_* tasks that follow."""

    def __init__(self, agent_id: str, signer: KeySigner | None = None) -> None:
        self.agent_id = agent_id
        self.signer = signer  # None: no certificate, so no signed rounds
        self.pending: _Pending | None = None

    def trained(
        self,
        gateway: SecureGateway,
        plan: TrainPlan,
        meta: UpdateMeta,
        sent: Mapping[str, torch.Tensor],
        tensors: Mapping[str, torch.Tensor],
    ) -> None:
        """After training: lay the change out, draw this round's keys and advertise them (nothing uploads yet)."""
        secure = plan.secure
        assert secure is not None
        terms = linear.terms(tensors, sent, plan, secure.layout)
        client = SecAggClient(self.agent_id)
        keys = client.advertise()
        proof = None
        if secure.signed:
            if self.signer is None:
                raise InvalidArgument(
                    "tls.cert", "the round's secure aggregation takes signed keys; this agent has no tls.cert/key/ca"
                )
            proof = (self.signer.cert_pem, sign_keys(self.signer.key_pem, secure.tag, self.agent_id, keys))
        self.pending = _Pending(meta.round, plan, terms, meta, client)
        gateway.advertise_keys(meta.round, plan.plan_id, keys, proof)
        log.info(
            "round %d: trained; keys advertised for secure aggregation%s", meta.round, " (signed)" if proof else ""
        )

    def step(self, gateway: SecureGateway, task: Task) -> None:
        """One SECAGG_* task of the pending round."""
        pending, step = self.pending, task.secagg
        if pending is None or pending.round != task.round or step is None:
            raise InvalidArgument("secagg", f"no secure round {task.round} is pending on {self.agent_id}")
        secure = pending.plan.secure
        assert secure is not None
        client = pending.client
        if task.kind is TaskKind.SECAGG_SHARE:
            length = sum(math.prod(shape) for shape in secure.layout.values())
            client.join(
                Params(secure.tag, step.participants, step.neighbours, step.threshold, secure.fraction_bits, length)
            )
            if secure.signed:  # a coordinator that swapped a neighbour's keys would read what is sealed for it
                self._check_signed(secure.tag, step.keys, step.proofs)
            gateway.share_keys(task.round, client.share(step.keys))
        elif task.kind is TaskKind.SECAGG_MASK:
            client.receive(step.sealed)
            encoded = secure_input(pending.terms, client.params, secure.clip_norm, step.noise_std)
            message = gateway.upload(pending.meta, {MASKED: client.masked(encoded)})
            log.info("round %d: masked update sent (%d values): %s", task.round, encoded.numel(), message)
        elif task.kind is TaskKind.SECAGG_UNMASK:
            gateway.unmask(task.round, client.unmask(step.survivors, step.dropped))
            self.pending = None
        else:
            raise InvalidArgument("task.kind", f"{task.kind.value} is no secure-aggregation step")

    def _check_signed(
        self, tag: str, keys: Mapping[str, tuple[bytes, bytes]], proofs: Mapping[str, tuple[bytes, bytes]]
    ) -> None:
        """Every neighbour's keys are signed by its own certificate, issued by the CA (else nothing is shared)."""
        assert self.signer is not None  # trained() refused a signed round without one
        for peer in sorted(keys):
            proof = proofs.get(peer)
            if proof is None:
                raise InvalidArgument(f"keys[{peer}]", f"{peer}'s keys for round {tag} come without a signature")
            verify_keys(self.signer.ca_pem, proof[0], proof[1], tag, peer, keys[peer])
        log.info("secure round %s: the keys of %d neighbours are signed by their certificates", tag, len(keys))

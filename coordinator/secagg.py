"""The coordinator's side of one secure-aggregation round (common.secagg): it relays keys and sealed shares,
holds only masked vectors, and learns the sum once the survivors' shares remove the masks.

Steps, each accepting one message per agent: advertise (public keys) -> share (sealed shares, one per
neighbour) -> masked (the masked vector) -> unmask (per neighbour, a self-mask share if it survived, a mask-key
share if it dropped). An agent that shared but sent no masked vector is dropped: its pairwise masks are rebuilt
from its mask key. An agent that sent its vector is in the sum whether or not it unmasks. With fewer than
threshold shares for any secret needed, the round fails with the reason (RoundSkipped).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from common.errors import InvalidArgument
from common.secagg import (
    MODULUS,
    PRIME,
    SEALED_BYTES,
    Params,
    add_into,
    agree,
    combine,
    expand,
    load_private,
    load_public,
    pair_sign,
)


class RoundSkipped(Exception):
    """The sum cannot be unmasked (too few survivors or shares); the round publishes nothing."""


class SecAggServer:
    """One round's relay and unmasking; holds public keys, sealed shares and masked vectors, nothing else."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.graph = params.graph()
        self.keys: dict[str, tuple[bytes, bytes]] = {}
        self.sealed: dict[str, dict[str, bytes]] = {}  # sender -> receiver -> sealed share
        self.vectors: dict[str, torch.Tensor] = {}
        self.revealed: dict[str, dict[str, tuple[str, int]]] = {}  # revealer -> neighbour -> (kind, share)
        self.closed: tuple[list[str], list[str]] | None = None  # (survivors, dropped) once masking closed

    def _member(self, agent: str) -> None:
        if agent not in self.graph:
            raise InvalidArgument("agent_id", f"{agent} is not a participant of secure round {self.params.tag}")

    # ------------------------------------------------------------------ advertise and share

    def advertise(self, agent: str, share_key: bytes, mask_key: bytes) -> None:
        """An agent's two public keys, once."""
        self._member(agent)
        if agent in self.keys:
            raise InvalidArgument("keys", f"{agent} already advertised keys for round {self.params.tag}")
        load_public(share_key, "keys.share_key")
        load_public(mask_key, "keys.mask_key")
        self.keys[agent] = (share_key, mask_key)

    def keys_for(self, agent: str) -> dict[str, tuple[bytes, bytes]]:
        """The advertised keys of an agent's neighbours."""
        return {j: self.keys[j] for j in self.graph[agent] if j in self.keys}

    def share(self, sender: str, sealed: Mapping[str, bytes]) -> None:
        """An agent's sealed shares, once: exactly one per neighbour whose keys it was given."""
        self._member(sender)
        if sender not in self.keys:
            raise InvalidArgument("shares", f"{sender} shares without having advertised keys")
        if sender in self.sealed:
            if self.sealed[sender] == dict(sealed):
                return  # a resend after a lost answer
            raise InvalidArgument("shares", f"{sender} already sent its shares for round {self.params.tag}")
        expected = set(self.keys_for(sender))
        if set(sealed) != expected:
            raise InvalidArgument(
                "shares",
                f"{sender} sent shares for {sorted(sealed)[:4]}, expected its neighbours {sorted(expected)[:4]}",
            )
        wrong = sorted(j for j, value in sealed.items() if len(value) != SEALED_BYTES)
        if wrong:
            raise InvalidArgument("shares", f"{sender}'s shares for {wrong[:3]} are not {SEALED_BYTES} bytes")
        self.sealed[sender] = dict(sealed)

    def shares_for(self, receiver: str) -> dict[str, bytes]:
        """The sealed shares addressed to an agent."""
        return {s: by[receiver] for s, by in sorted(self.sealed.items()) if receiver in by}

    # ------------------------------------------------------------------ masked vectors and unmasking

    def masked(self, agent: str, vector: torch.Tensor) -> None:
        """An agent's masked vector, once; it must have shared, and the vector is int64 in [0, 2^62)."""
        self._member(agent)
        if agent not in self.sealed:
            raise InvalidArgument("masked", f"{agent} sends a masked vector without having shared")
        if agent in self.vectors:
            raise InvalidArgument("masked", f"{agent} already sent its masked vector for round {self.params.tag}")
        if self.closed is not None:
            raise InvalidArgument("masked", f"round {self.params.tag} is unmasking; {agent}'s vector is too late")
        if vector.dtype != torch.int64 or vector.shape != (self.params.length,):
            raise InvalidArgument(
                "masked", f"expected int64 of length {self.params.length}, got {vector.dtype} {tuple(vector.shape)}"
            )
        if vector.numel() and (int(vector.min()) < 0 or int(vector.max()) >= MODULUS):
            raise InvalidArgument("masked", "values outside [0, 2^62)")
        self.vectors[agent] = vector

    def close_masking(self) -> tuple[list[str], list[str]]:
        """End the masked step: (agents whose masked vector is in, agents that shared but sent none), what
        every unmask request names; later vectors are refused. RoundSkipped when fewer than threshold are in:
        then no agent is asked for a share at all."""
        if self.closed is None:
            self.closed = (sorted(self.vectors), sorted(set(self.sealed) - set(self.vectors)))
        alive = self.closed[0]
        if len(alive) < self.params.threshold:
            raise RoundSkipped(f"{len(alive)} agents sent masked vectors, under the threshold {self.params.threshold}")
        return self.closed

    def unmask(self, agent: str, revealed: Mapping[str, tuple[str, int]]) -> None:
        """A survivor's shares: for each neighbour that shared with it, the kind the survivor sets call for."""
        self._member(agent)
        if self.closed is None:
            raise InvalidArgument("unmask", f"round {self.params.tag} is still taking masked vectors")
        alive, _ = self.closed
        if agent not in self.vectors:
            raise InvalidArgument("unmask", f"{agent} sent no masked vector, so it takes no part in unmasking")
        if agent in self.revealed:
            if self.revealed[agent] == dict(revealed):
                return  # a resend after a lost answer
            raise InvalidArgument("unmask", f"{agent} already sent its unmasking shares for round {self.params.tag}")
        held = {s for s, by in self.sealed.items() if agent in by}
        for j, (kind, share) in revealed.items():
            if not 0 <= share < PRIME:
                raise InvalidArgument("unmask", f"{agent}'s share of {j} is no field element")
            if j not in held:
                raise InvalidArgument("unmask", f"{agent} reveals a share of {j}, which never shared with it")
            wanted = "seed" if j in alive else "key"
            if kind != wanted:
                raise InvalidArgument("unmask", f"{agent} reveals {j}'s {kind} share; {j}'s {wanted} share is due")
        self.revealed[agent] = dict(revealed)

    def result(self) -> torch.Tensor:
        """The sum of the masked agents' encoded vectors (mod 2^62); RoundSkipped naming what is missing."""
        params = self.params
        alive, dropped = self.close_masking()
        total = torch.zeros(params.length, dtype=torch.int64)
        for agent in alive:
            add_into(total, self.vectors[agent])
        for agent in alive:  # remove each survivor's self-mask
            add_into(total, expand(self._rebuild(agent, "seed"), params.length), -1)
        for gone in dropped:  # remove the pairwise masks survivors made with a dropped agent
            mask_key = load_private(self._rebuild(gone, "key"))
            for k in alive:
                if k not in self.sealed[gone]:
                    continue  # k never held gone's shares, so it never masked with gone
                seed = agree(mask_key, self.keys[k][1], params.tag, "mask", f"keys[{k}]")
                add_into(total, expand(seed, params.length), -pair_sign(params, k, gone))
        return total

    def _rebuild(self, owner: str, kind: str) -> bytes:
        shares = {
            self.params.index(revealer): share
            for revealer, by in self.revealed.items()
            for j, (k, share) in by.items()
            if j == owner and k == kind
        }
        if len(shares) < self.params.threshold:
            what = "self-mask seed" if kind == "seed" else "mask key"
            raise RoundSkipped(
                f"{len(shares)} shares of {owner}'s {what} arrived, {self.params.threshold} needed to unmask the sum"
            )
        try:
            return combine(shares, self.params.threshold)
        except ValueError as err:
            raise RoundSkipped(f"{owner}'s {kind} shares do not agree: {err}") from None

"""SecAgg+ end to end in one process: agents (edge_agent.secagg) and the coordinator's relay
(coordinator.secagg) over the shared arithmetic (common.secagg), with dropouts, thresholds and bad shares."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dp import PLANS, SPEC, global_adapter, upload

from common import linear
from common.adapters import broadcast_tensors
from common.errors import InvalidArgument
from common.secagg import (
    MASK,
    MODULUS,
    Params,
    byte_chi_square,
    combine,
    decode,
    default_neighbours,
    encode,
    expand,
    split,
)
from coordinator.secagg import RoundSkipped, SecAggServer
from edge_agent.secagg import SecAggClient, secure_input

LENGTH = 4096
BITS = 24


def params(n: int, neighbours: int | None = None, threshold: int | None = None, tag: str = "run-1/3") -> Params:
    k = neighbours if neighbours is not None else default_neighbours(n)
    return Params(
        tag=tag,
        participants=tuple(f"agent-{i:02d}" for i in range(n)),
        neighbours=k,
        threshold=threshold if threshold is not None else k // 2 + 1,
        fraction_bits=BITS,
        length=LENGTH,
    )


def vectors(p: Params, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {agent: torch.randn(LENGTH, generator=generator, dtype=torch.float64) for agent in p.participants}


def masked_round(
    p: Params,
    inputs: dict[str, torch.Tensor],
    drop_before_masking: Collection[str] = (),
    drop_before_unmasking: Collection[str] = (),
) -> tuple[SecAggServer, torch.Tensor]:
    """Every step of one round over encoded inputs; the dropped agents stop after sharing or after masking.
    Returns the server and the unmasked sum (mod 2^62)."""
    server = SecAggServer(p)
    clients = {agent: SecAggClient(agent, p) for agent in p.participants}
    for agent, client in clients.items():
        server.advertise(agent, *client.advertise())
    for agent, client in clients.items():
        server.share(agent, client.share(server.keys_for(agent)))
    for agent, client in clients.items():
        client.receive(server.shares_for(agent))
        if agent not in drop_before_masking:
            server.masked(agent, client.masked(inputs[agent]))
    alive, dropped = server.close_masking()
    for agent in alive:
        if agent not in drop_before_unmasking:
            server.unmask(agent, clients[agent].unmask(alive, dropped))
    return server, server.result()


def secure_round(
    p: Params,
    values: dict[str, torch.Tensor],
    drop_before_masking: Collection[str] = (),
    drop_before_unmasking: Collection[str] = (),
) -> tuple[SecAggServer, torch.Tensor]:
    """masked_round over float vectors; the decoded sum."""
    inputs = {agent: encode(values[agent], BITS, len(p.participants)) for agent in p.participants}
    server, total = masked_round(p, inputs, drop_before_masking, drop_before_unmasking)
    return server, decode(total, BITS)


def plain_sum(values: dict[str, torch.Tensor], agents: Collection[str]) -> torch.Tensor:
    return torch.stack([values[a] for a in sorted(agents)]).sum(dim=0)


@pytest.mark.parametrize(("n", "neighbours"), [(3, None), (10, 4), (10, 9), (25, None)])
def test_the_unmasked_sum_is_the_plain_sum_to_fixed_point_tolerance(n: int, neighbours: int | None) -> None:
    p = params(n, neighbours)
    values = vectors(p)
    _, total = secure_round(p, values)
    # each value rounds to within 2^-(f+1), so the sum to within n of those
    assert float((total - plain_sum(values, p.participants)).abs().max()) <= n * 2.0 ** -(BITS + 1)


def test_agents_dropped_before_masking_are_left_out_and_their_masks_removed() -> None:
    p = params(10, 6, 3)
    values = vectors(p, 1)
    gone = {"agent-03", "agent-07"}
    _, total = secure_round(p, values, drop_before_masking=gone)
    expected = plain_sum(values, set(p.participants) - gone)
    assert float((total - expected).abs().max()) <= 10 * 2.0 ** -(BITS + 1)


def test_an_agent_killed_after_masking_stays_in_the_sum() -> None:
    p = params(10, 6, 3)
    values = vectors(p, 2)
    _, total = secure_round(p, values, drop_before_unmasking={"agent-05"})
    assert float((total - plain_sum(values, p.participants)).abs().max()) <= 10 * 2.0 ** -(BITS + 1)


def test_fewer_than_threshold_survivors_skips_the_round_with_the_reason() -> None:
    p = params(6, 5, 4)
    with pytest.raises(RoundSkipped, match="under the threshold 4"):
        secure_round(p, vectors(p), drop_before_masking={"agent-00", "agent-01", "agent-02"})


def test_too_few_unmasking_shares_skips_the_round_naming_the_secret() -> None:
    p = params(6, 5, 4)
    with pytest.raises(RoundSkipped, match=r"shares of agent-.*self-mask seed arrived, 4 needed"):
        secure_round(p, vectors(p), drop_before_unmasking={"agent-00", "agent-01", "agent-02"})


def test_what_the_coordinator_holds_of_one_agent_is_uniform_and_an_unmasked_vector_is_not() -> None:
    # Prepare
    p = params(5, 4, 3)
    values = vectors(p, 3)
    server, _ = secure_round(p, values)
    # chi-square with 255 degrees of freedom: mean 255, sd sqrt(510) ~ 22.6; 400 is over 6 sd out
    limit = 400.0

    # Assert: every agent's masked vector passes, its plain encoding fails, and so does a mask-free one
    for agent, vector in server.vectors.items():
        assert byte_chi_square(vector) < limit, agent
        assert byte_chi_square(encode(values[agent], BITS, 5)) > limit
    assert byte_chi_square(expand(b"\x01" * 32, LENGTH)) < limit


def test_a_share_from_another_round_or_for_another_agent_does_not_open() -> None:
    # Prepare: two rounds between the same agents
    p1, p2 = params(4, 3, 1, tag="run/1"), params(4, 3, 1, tag="run/2")
    a1, b1 = SecAggClient("agent-00", p1), SecAggClient("agent-01", p1)
    a2 = SecAggClient("agent-00", p2)
    server1, server2 = SecAggServer(p1), SecAggServer(p2)
    for client, server in ((a1, server1), (b1, server1), (a2, server2)):
        server.advertise(client.agent_id, *client.advertise())
    sealed_1 = b1.share({"agent-00": a1.advertise()})

    # Execute / Assert: round 2's agent-00 cannot open round 1's share, nor can a wrong receiver
    a2.peers = {"agent-01": b1.advertise()}
    with pytest.raises(InvalidArgument, match="does not open for round run/2"):
        a2.receive({"agent-01": sealed_1["agent-00"]})
    a1.peers = {"agent-01": b1.advertise()}
    tampered = sealed_1["agent-00"][:-1] + bytes([sealed_1["agent-00"][-1] ^ 1])
    with pytest.raises(InvalidArgument, match="replayed or altered"):
        a1.receive({"agent-01": tampered})
    a1.receive({"agent-01": sealed_1["agent-00"]})  # the genuine one opens
    assert set(a1.held) == {"agent-01"}


def test_the_relay_refuses_repeats_strangers_and_out_of_turn_messages() -> None:
    p = params(4, 3, 2)
    server = SecAggServer(p)
    clients = {agent: SecAggClient(agent, p) for agent in p.participants}
    for agent, client in clients.items():
        server.advertise(agent, *client.advertise())
    with pytest.raises(InvalidArgument, match="already advertised"):
        server.advertise("agent-00", *clients["agent-00"].advertise())
    with pytest.raises(InvalidArgument, match="not a participant"):
        server.advertise("mallory", b"\0" * 32, b"\0" * 32)
    with pytest.raises(InvalidArgument, match="without having shared"):
        server.masked("agent-00", torch.zeros(LENGTH, dtype=torch.int64))
    shares = clients["agent-00"].share(server.keys_for("agent-00"))
    server.share("agent-00", shares)
    server.share("agent-00", shares)  # the same resent (a lost answer) is taken
    with pytest.raises(InvalidArgument, match="already sent its shares"):
        server.share("agent-00", clients["agent-00"].share(server.keys_for("agent-00")))  # different ones are not
    with pytest.raises(InvalidArgument, match="values outside"):
        server.masked("agent-00", torch.full((LENGTH,), MODULUS, dtype=torch.int64))
    with pytest.raises(InvalidArgument, match="still taking masked vectors"):
        server.unmask("agent-00", {})


def test_the_graph_is_symmetric_of_the_asked_degree_and_the_same_for_every_party() -> None:
    for n, k in ((10, 4), (11, 6), (25, default_neighbours(25)), (7, 6), (8, 7)):
        p = params(n, k, 2)
        graph = p.graph()
        assert graph == params(n, k, 2).graph()
        assert all(agent not in links for agent, links in graph.items())
        assert all(agent in graph[j] for agent, links in graph.items() for j in links)
        assert all(len(links) >= k for links in graph.values())
        assert sum(len(links) for links in graph.values()) <= n * (k + 1)
    assert default_neighbours(1000) == 30 and default_neighbours(10) == 9


@settings(max_examples=20, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), threshold=st.integers(1, 6), extra=st.integers(0, 4))
def test_any_threshold_shares_rebuild_the_secret_and_fewer_do_not(secret: bytes, threshold: int, extra: int) -> None:
    shares = split(secret, threshold, list(range(1, threshold + extra + 1)))
    assert combine(dict(list(shares.items())[-threshold:]), threshold) == secret
    if threshold > 1:
        with pytest.raises(ValueError, match="needed"):
            combine(dict(list(shares.items())[: threshold - 1]), threshold)


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50), parties=st.integers(1, 1000))
def test_fixed_point_round_trips_to_half_a_step(values: list[float], parties: int) -> None:
    tensor = torch.tensor(values, dtype=torch.float64)
    encoded = encode(tensor, BITS, parties)
    assert int(encoded.min()) >= 0 and int(encoded.max()) <= MASK
    assert float((decode(encoded, BITS) - tensor).abs().max()) <= 2.0 ** -(BITS + 1)


def test_a_value_that_could_wrap_the_sum_is_refused() -> None:
    limit = 2.0 ** (61 - BITS) / 100
    with pytest.raises(InvalidArgument, match="would wrap"):
        encode(torch.tensor([limit * 1.01]), BITS, 100)
    assert math.isfinite(float(decode(encode(torch.tensor([limit * 0.99]), BITS, 100), BITS)[0]))


def test_a_secure_round_of_lora_updates_gives_the_linear_mean() -> None:
    # Prepare: three agents' LoRA uploads at unequal ranks, laid out by each agent from its own download
    global_ = global_adapter(4)
    layout = linear.layout(global_, PLANS, SPEC)
    shapes = {name: tuple(count.shape) for name, count in layout.items()}
    length = sum(count.numel() for count in layout.values())
    p = Params("run/7", tuple(sorted(PLANS)), neighbours=2, threshold=2, fraction_bits=BITS, length=length)
    changes = {
        agent: linear.terms(upload(plan, i), broadcast_tensors(global_, plan, SPEC), plan, shapes)
        for i, (agent, plan) in enumerate(sorted(PLANS.items()))
    }

    # Execute: the masked round, then the coordinator's unflatten and mean
    _, total = masked_round(p, {agent: secure_input(changes[agent], p) for agent in p.participants})
    sums = linear.unflatten(decode(total, BITS), shapes)
    secure = linear.apply_mean(global_, sums, layout, SPEC)

    # Assert: the plain linear mean, to fixed point
    plain_sums = {name: torch.stack([c[name] for c in changes.values()]).sum(dim=0) for name in layout}
    plain = linear.apply_mean(global_, plain_sums, layout, SPEC)
    for module in plain.lora:
        torch.testing.assert_close(secure.lora[module].a, plain.lora[module].a, atol=1e-6, rtol=0)
        torch.testing.assert_close(secure.lora[module].b, plain.lora[module].b, atol=1e-6, rtol=0)
    for name in plain.heads:
        torch.testing.assert_close(secure.heads[name], plain.heads[name], atol=1e-6, rtol=0)


def test_secure_input_clips_and_adds_the_agents_share_of_the_noise() -> None:
    p = Params("run/8", ("a", "b"), neighbours=1, threshold=1, fraction_bits=BITS, length=200_000)
    terms = {"w": torch.full((200_000,), 0.01, dtype=torch.float64)}  # norm ~4.47
    vector = decode(
        secure_input(terms, p, clip_norm=1.0, noise_std=0.3, generator=torch.Generator().manual_seed(2)), BITS
    )
    clipped_value = 1.0 / math.sqrt(200_000)
    noise = vector - clipped_value
    assert abs(float(noise.mean())) < 4 * 0.3 / math.sqrt(200_000)
    assert abs(float(noise.std()) - 0.3) < 4 * 0.3 / math.sqrt(400_000)
    with pytest.raises(ValueError, match="a change of 200000 values for a round of 5"):
        secure_input(terms, Params("run/8", ("a", "b"), 1, 1, BITS, 5))


def test_signed_keys_verify_only_for_their_agent_round_and_ca() -> None:
    # Prepare: a federation's CA and two agents' certificates, and another CA
    from common.certs import create_ca, issue
    from common.secagg import sign_keys, verify_keys

    ca, other_ca = create_ca(), create_ca("Another CA")
    alice, bob = issue(ca, "agent-a"), issue(ca, "agent-b")
    stranger = issue(other_ca, "agent-a")
    keys = SecAggClient("agent-a").advertise()
    signature = sign_keys(alice.key_pem, "run/1", "agent-a", keys)

    # Execute / Assert
    verify_keys(ca.cert_pem, alice.cert_pem, signature, "run/1", "agent-a", keys)
    refusals = [
        ((ca.cert_pem, alice.cert_pem, signature, "run/2", "agent-a", keys), "not signed by its certificate"),
        ((ca.cert_pem, alice.cert_pem, signature, "run/1", "agent-a", (keys[1], keys[0])), "not signed"),
        ((ca.cert_pem, bob.cert_pem, signature, "run/1", "agent-a", keys), r"names \['agent-b'\]"),
        ((ca.cert_pem, stranger.cert_pem, sign_keys(stranger.key_pem, "run/1", "agent-a", keys), "run/1",
          "agent-a", keys), "not issued by this federation's CA"),
    ]  # fmt: skip
    for args, message in refusals:
        with pytest.raises(InvalidArgument, match=message):
            verify_keys(*args)


def test_an_agent_in_a_signed_round_refuses_a_neighbours_unsigned_keys() -> None:
    from common.certs import create_ca, issue
    from common.secagg import sign_keys
    from common.types import SecAggStep, SecureSpec, Task, TaskKind, UpdateMeta
    from edge_agent.secagg import KeySigner, SecureWork

    ca = create_ca()
    mine = issue(ca, "agent-00")
    work = SecureWork("agent-00", KeySigner(mine.key_pem, mine.cert_pem, ca.cert_pem))
    plan = replace(PLANS["a"], secure=SecureSpec("run/9", {"w": (4,)}, BITS, 0.0, signed=True))

    class Gateway:
        def __init__(self) -> None:
            self.shared: list[object] = []
            self.proof: tuple[bytes, bytes] | None = None

        def upload(self, meta: UpdateMeta, tensors: object) -> str:
            return ""

        def advertise_keys(
            self, round_: int, plan_id: str, keys: object, proof: tuple[bytes, bytes] | None = None
        ) -> None:
            self.proof = proof

        def share_keys(self, round_: int, sealed: object) -> None:
            self.shared.append(sealed)

        def unmask(self, round_: int, revealed: object) -> None:
            raise AssertionError("nothing may be revealed")

    gateway = Gateway()
    work.pending = None
    meta = UpdateMeta("agent-00", 1, "p", 1, 1, 0.0, 0.0, 0)
    work.trained(gateway, plan, meta, {}, {})
    assert gateway.proof is not None and gateway.proof[0] == mine.cert_pem
    step = SecAggStep(participants=("agent-00", "agent-01"), neighbours=1, threshold=1,
                      keys={"agent-01": SecAggClient("agent-01").advertise()})  # fmt: skip
    with pytest.raises(InvalidArgument, match="come without a signature"):
        work.step(gateway, Task(TaskKind.SECAGG_SHARE, 1, secagg=step))
    assert gateway.shared == []
    # the same neighbour with its keys signed by its certificate: the shares go out
    theirs = issue(ca, "agent-01")
    keys = SecAggClient("agent-01").advertise()
    proof = (theirs.cert_pem, sign_keys(theirs.key_pem, "run/9", "agent-01", keys))
    signed = replace(step, keys={"agent-01": keys}, proofs={"agent-01": proof})
    work.step(gateway, Task(TaskKind.SECAGG_SHARE, 1, secagg=signed))
    assert len(gateway.shared) == 1

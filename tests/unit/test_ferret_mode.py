"""The coordinator's Ferret mode on a hand-made two-block model: upload checks, aggregation as the weighted
mean of the agents' reconstructions, what travels down, and the checkpoint round trip."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from common.errors import InvalidArgument, StaleRound
from common.ferret import reconstruct, weights_digest
from common.types import ModelSpec, ModuleShape, Quantization, TensorInfo, TrainPlan, UpdateMeta
from coordinator.modes import Contribution
from coordinator.modes.ferret import COEF, DELTA, BaseWeights, FerretGlobal, FerretMode
from coordinator.strategy import get_strategy

Q, V = "enc.layer.0.q", "enc.layer.0.v"
HEAD_W, HEAD_B = "classifier.weight", "classifier.bias"
SPEC = ModelSpec(
    fingerprint="f",
    model_type="bert",
    task="seq-cls",
    labels=("n", "p"),
    candidates=(ModuleShape(Q, 4, 4), ModuleShape(V, 6, 4)),  # weights (4, 4) and (4, 6): 16 and 24 values
    heads=((HEAD_W, (2, 4)), (HEAD_B, (2,))),
    base_parameters=40,
    linear_parameters=40,
)
SEED, BASIS = 5, "gaussian"


class FixedWeights(BaseWeights):
    """The base's blocks without a checkpoint: seeded tensors."""

    def __init__(self) -> None:
        super().__init__("none", SPEC)

    def block(self, name: str) -> torch.Tensor:
        shape = (4, 4) if name == Q else (4, 6)
        return torch.randn(shape, generator=torch.Generator().manual_seed(len(name)))


PLAN = TrainPlan(
    plan_id="p",
    target_modules=(Q, V),
    rank_pattern={},
    lora_alpha=0.0,
    lora_dropout=0.0,
    modules_to_save=("classifier",),
    batch_size=4,
    local_epochs=1,
    max_steps=3,
    learning_rate=1e-3,
    weight_decay=0.0,
    quantization=Quantization.NONE,
    max_seq_len=16,
    deadline_s=60.0,
    seed=1,
    mode="ferret",
    directions=10,
    basis=BASIS,
    shared_seed=SEED,
)


def mode() -> FerretMode:
    return FerretMode(SPEC, "none", SEED, BASIS, FixedWeights())


def start() -> FerretGlobal:
    global_ = mode().initial(SPEC, {"a": PLAN}, seed=3)
    assert isinstance(global_, FerretGlobal)
    return global_


def infos(counts: dict[str, int], extra: tuple[TensorInfo, ...] = ()) -> list[TensorInfo]:
    declared = [TensorInfo(block + COEF, (count,), "float32") for block, count in counts.items()]
    return [*declared, TensorInfo(HEAD_W, (2, 4), "float32"), TensorInfo(HEAD_B, (2,), "float32"), *extra]


def test_an_upload_within_the_plan_is_declared_fine() -> None:
    mode().check_declared(infos({Q: 4, V: 6}), PLAN, SPEC)


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        (infos({Q: 1, V: 6}), r"1 coefficients, out of range \[2, 10\]"),
        (infos({Q: 17, V: 2}), r"17 coefficients, out of range \[2, 10\]"),  # more than the block has values
        (infos({Q: 8, V: 8}), r"16 coefficients in all, over the plan's 10"),
        (infos({Q: 4}), r"missing enc.layer.0.v::coef"),
        (infos({Q: 4, V: 4}, (TensorInfo("enc.layer.1.q::coef", (2,), "float32"),)), r"unknown blocks or tensors"),
        ([TensorInfo(Q + COEF, (4,), "float16"), *infos({V: 4})], r"must be a float32 vector"),
        (infos({Q: 4, V: 4})[:-1], r"missing classifier.bias"),
    ],
    ids=["too-few", "more-than-values", "over-budget", "missing-block", "unknown-block", "float16", "no-head"],
)
def test_a_coefficient_upload_outside_the_plan_is_refused(declared: list[TensorInfo], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        mode().check_declared(declared, PLAN, SPEC)


def test_non_finite_coefficients_and_a_digest_of_other_weights_are_refused() -> None:
    # Prepare
    plan = replace(PLAN, global_digest="ab" * 32)
    meta = UpdateMeta("a", 1, "p", 4, 1, 1.0, 0.5, 0, base_digest="cd" * 32)

    # Execute / Assert
    with pytest.raises(InvalidArgument, match="NaN or Inf"):
        mode().check_values({Q + COEF: torch.tensor([1.0, float("nan")])}, 1e4)
    with pytest.raises(StaleRound, match="not the digest of the round's global"):
        mode().check_origin(meta, plan)
    mode().check_origin(replace(meta, base_digest="ab" * 32), plan)


def coefficients(seed: int, counts: dict[str, int]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {block + COEF: torch.randn(count, generator=generator) for block, count in counts.items()}


def test_the_aggregate_is_the_weighted_mean_of_the_agents_reconstructions() -> None:
    # Prepare: two agents with different direction counts for the same block
    ferret, global_ = mode(), start()
    heads_a = {HEAD_W: torch.ones(2, 4), HEAD_B: torch.zeros(2)}
    heads_b = {HEAD_W: torch.full((2, 4), 5.0), HEAD_B: torch.ones(2)}
    a = Contribution("a", 3.0, {**coefficients(1, {Q: 4, V: 6}), **heads_a}, PLAN)
    b = Contribution("b", 1.0, {**coefficients(2, {Q: 2, V: 6}), **heads_b}, PLAN)

    # Execute
    new, metrics = ferret.aggregate(global_, [a, b], get_strategy("rank-padding"), round_=1)

    # Assert: block = old + (3 rec(c_a) + 1 rec(c_b)) / 4, on the round's directions; heads the weighted mean
    assert isinstance(new, FerretGlobal) and new.round == 1
    for block, shape in ((Q, (4, 4)), (V, (4, 6))):
        rebuilt = [reconstruct(c.tensors[block + COEF], shape, SEED, 1, block, BASIS) for c in (a, b)]
        expected = global_.blocks[block] + (3 * rebuilt[0] + rebuilt[1]) / 4
        torch.testing.assert_close(new.blocks[block], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new.heads[HEAD_W], torch.full((2, 4), 2.0))
    assert new.previous_digest == ferret.digest(global_) and new.coefficients[Q + COEF].numel() == 4
    assert metrics["directions"] == 10.0


def test_what_travels_down_follows_what_the_agent_holds() -> None:
    # Prepare
    ferret, global_ = mode(), start()
    update = Contribution(
        "a", 1.0, {**coefficients(1, {Q: 4, V: 6}), HEAD_W: torch.ones(2, 4), HEAD_B: torch.zeros(2)}, PLAN
    )
    new, _ = ferret.aggregate(global_, [update], get_strategy("fedavg"), round_=1)

    # Execute
    current = ferret.download(new, PLAN, SPEC, ferret.digest(new))
    previous = ferret.download(new, PLAN, SPEC, ferret.digest(global_))
    other = ferret.download(new, PLAN, SPEC, "00" * 32)

    # Assert: nothing, the last round's coefficients and heads, or everything in full
    assert isinstance(new, FerretGlobal)
    assert current == {}
    assert set(previous) == {Q + COEF, V + COEF, HEAD_W, HEAD_B}
    assert set(other) == {Q, V, HEAD_W, HEAD_B} and torch.equal(other[Q], new.blocks[Q])


def test_the_checkpoint_round_trip_keeps_every_bit_and_the_route_from_the_previous_global() -> None:
    # Prepare
    ferret, global_ = mode(), start()
    update = Contribution(
        "a", 1.0, {**coefficients(1, {Q: 4, V: 6}), HEAD_W: torch.ones(2, 4), HEAD_B: torch.zeros(2)}, PLAN
    )
    new, _ = ferret.aggregate(global_, [update], get_strategy("fedavg"), round_=1)

    # Execute
    back = ferret.from_state(1, ferret.state_tensors(new))

    # Assert
    assert isinstance(back, FerretGlobal) and isinstance(new, FerretGlobal)
    assert ferret.digest(back) == ferret.digest(new) == weights_digest({**new.blocks, **new.heads})
    assert back.previous_digest == new.previous_digest and torch.equal(
        back.coefficients[V + COEF], new.coefficients[V + COEF]
    )


def test_a_change_norm_is_estimated_from_the_coefficients() -> None:
    # Prepare: E|c|^2 = (d / K) |delta|^2, so |delta| ~ |c| sqrt(K / d)
    ferret, global_ = mode(), start()
    tensors = {Q + COEF: torch.tensor([3.0, 4.0]), HEAD_W: global_.heads[HEAD_W] + 1.0, HEAD_B: global_.heads[HEAD_B]}

    # Execute
    norms = ferret.change_norms(tensors, global_, PLAN, SPEC)

    # Assert
    assert norms[Q + COEF] == pytest.approx(5.0 * (2 / 16) ** 0.5)
    assert norms[HEAD_W] == pytest.approx(8**0.5) and norms[HEAD_B] == 0.0


def test_with_no_directions_the_blocks_whole_changes_travel_and_average_exactly() -> None:
    # Prepare: the FedAvg reference: a plan of 0 directions (the mode learns the blocks' shapes from its global)
    ferret = mode()
    global_ = ferret.initial(SPEC, {"a": PLAN}, seed=3)
    assert isinstance(global_, FerretGlobal)
    plan = replace(PLAN, directions=0)
    heads = {HEAD_W: torch.zeros(2, 4), HEAD_B: torch.zeros(2)}
    a = Contribution("a", 1.0, {Q + DELTA: torch.ones(4, 4), V + DELTA: torch.zeros(4, 6), **heads}, plan)
    b = Contribution("b", 3.0, {Q + DELTA: torch.full((4, 4), 5.0), V + DELTA: torch.ones(4, 6), **heads}, plan)

    # Execute
    ferret.check_declared(
        [TensorInfo(Q + DELTA, (4, 4), "float32"), TensorInfo(V + DELTA, (4, 6), "float32"), *infos({})[-2:]],
        plan,
        SPEC,
    )
    new, _ = ferret.aggregate(global_, [a, b], get_strategy("fedavg"), round_=1)

    # Assert: old + (1 * 1 + 3 * 5) / 4 = old + 4; the wrong shape is refused
    assert isinstance(new, FerretGlobal)
    torch.testing.assert_close(new.blocks[Q], global_.blocks[Q] + 4.0)
    torch.testing.assert_close(new.blocks[V], global_.blocks[V] + 0.75)
    with pytest.raises(InvalidArgument, match=r"expected float32 \(4, 4\)"):
        ferret.check_declared([TensorInfo(Q + DELTA, (16,), "float32")], plan, SPEC)


def test_the_linear_mean_of_evenly_shared_coefficients_is_the_unit_weight_aggregate() -> None:
    # Prepare: a trains both blocks (10 directions: 5 each), b only V (all 10 on it); heads moved
    ferret = FerretMode(SPEC, "none", SEED, BASIS, FixedWeights(), even_directions=True)
    global_ = ferret.initial(SPEC, {"a": PLAN}, seed=3)
    plans = ferret.finalize_plans({"a": PLAN, "b": replace(PLAN, target_modules=(V,))}, global_)
    assert all(p.even_directions for p in plans.values())
    assert ferret.even_counts(plans["a"]) == {Q: 5, V: 5} and ferret.even_counts(plans["b"]) == {V: 10}
    a = Contribution(
        "a", 1.0, {**coefficients(1, {Q: 5, V: 5}), HEAD_W: torch.ones(2, 4), HEAD_B: torch.zeros(2)}, plans["a"]
    )
    b = Contribution(
        "b", 1.0, {**coefficients(2, {V: 10}), HEAD_W: torch.zeros(2, 4), HEAD_B: torch.ones(2)}, plans["b"]
    )

    # Execute
    layout = ferret.linear_layout(global_, plans)
    sums = {name: torch.zeros_like(count) for name, count in layout.items()}
    for contribution in (a, b):
        for name, value in ferret.linear_terms(global_, contribution, layout).items():
            sums[name] += value
    linear, _ = ferret.apply_linear(global_, sums, layout, get_strategy("fedavg"), 1)
    reference, _ = ferret.aggregate(global_, [a, b], get_strategy("fedavg"), round_=1)

    # Assert: the layout pads V to 10 and counts both agents there, Q once; the result is the aggregate's
    assert layout[V + COEF].tolist() == [2.0] * 10 and layout[Q + COEF].tolist() == [1.0] * 5
    assert isinstance(linear, FerretGlobal) and isinstance(reference, FerretGlobal)
    for block in (Q, V):
        torch.testing.assert_close(linear.blocks[block], reference.blocks[block], rtol=1e-5, atol=1e-6)
    for head in (HEAD_W, HEAD_B):
        torch.testing.assert_close(linear.heads[head], reference.heads[head], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(linear.coefficients[V + COEF], reference.coefficients[V + COEF])
    # an upload that splits them otherwise is refused at its header
    with pytest.raises(InvalidArgument, match="shares them evenly: 5"):
        ferret.check_declared(infos({Q: 3, V: 7}), plans["a"], SPEC)

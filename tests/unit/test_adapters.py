"""Unit tests for common.adapters: scaling fold/unfold, rank padding/truncation, names, broadcast."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.adapters import (
    HEAD_INIT_STD,
    LORA_A,
    LORA_B,
    PEFT_PREFIX,
    FoldedUpdate,
    GlobalAdapter,
    LoraPair,
    broadcast_tensors,
    change_norm,
    change_norms,
    check_tensors,
    check_values,
    expected_tensors,
    fold,
    fold_update,
    fresh_pair,
    from_peft_key,
    global_to_peft,
    head_modules,
    init_global,
    lora_module,
    lora_names,
    lora_parameter_count,
    pad_rank,
    scale_change,
    scaling,
    sent_views,
    to_peft_key,
    truncate_rank,
    unfold,
)
from common.errors import InvalidArgument
from common.types import ModelSpec, ModuleShape, Quantization, TensorInfo, TrainPlan
from coordinator.modes.lora import SentTensors

Q = "enc.layer.0.q"  # d_in 3, d_out 2
V = "enc.layer.0.v"  # d_in 4, d_out 5
W = "enc.layer.1.o"  # d_in 6, d_out 3, never in the default plan

SPEC = ModelSpec(
    fingerprint="fp",
    model_type="toy",
    task="seq-cls",
    labels=("neg", "pos"),
    candidates=(ModuleShape(Q, 3, 2), ModuleShape(V, 4, 5), ModuleShape(W, 6, 3)),
    heads=(
        ("classifier.weight", (2, 4)),
        ("classifier.bias", (2,)),
        ("pooler.dense.weight", (4, 4)),
        ("pooler.dense.bias", (4,)),
    ),
    base_parameters=1000,
)


def make_plan(
    ranks: Mapping[str, int] | None = None,
    alpha: float = 8.0,
    modules_to_save: tuple[str, ...] = ("classifier",),
    seed: int = 7,
) -> TrainPlan:
    """A plan over SPEC; ranks default to q: 2, v: 4."""
    rank_pattern = dict(ranks) if ranks is not None else {Q: 2, V: 4}
    return TrainPlan(
        plan_id="plan-1",
        target_modules=tuple(rank_pattern),
        rank_pattern=rank_pattern,
        lora_alpha=alpha,
        lora_dropout=0.0,
        modules_to_save=modules_to_save,
        batch_size=8,
        local_epochs=1,
        max_steps=0,
        learning_rate=1e-3,
        weight_decay=0.0,
        quantization=Quantization.NONE,
        max_seq_len=32,
        deadline_s=60.0,
        seed=seed,
    )


def rand_pair(rank: int, d_in: int, d_out: int, seed: int) -> LoraPair:
    """A pair with every entry random (B non-zero, unlike a fresh pair)."""
    generator = torch.Generator().manual_seed(seed)
    return LoraPair(a=torch.randn(rank, d_in, generator=generator), b=torch.randn(d_out, rank, generator=generator))


def make_global(ranks: Mapping[str, int], seed: int = 0) -> GlobalAdapter:
    """A global adapter over SPEC with random folded pairs at these ranks and random heads."""
    generator = torch.Generator().manual_seed(seed + 1000)
    lora = {
        module: rand_pair(rank, SPEC.candidate(module).in_features, SPEC.candidate(module).out_features, seed + i)
        for i, (module, rank) in enumerate(ranks.items())
    }
    heads = {
        "classifier.weight": torch.randn(2, 4, generator=generator),
        "classifier.bias": torch.randn(2, generator=generator),
        "pooler.dense.weight": torch.randn(4, 4, generator=generator),
    }
    return GlobalAdapter(round=3, lora=lora, heads=heads)


# ---------------------------------------------------------------- scaling, fold / unfold


@pytest.mark.parametrize(
    ("alpha", "rank", "expected"),
    [(16.0, 8, 2.0), (8.0, 8, 1.0), (1.0, 4, 0.25), (32.0, 1, 32.0), (3.0, 2, 1.5)],
)
def test_scaling_is_alpha_over_rank(alpha: float, rank: int, expected: float) -> None:
    # Execute
    result = scaling(alpha, rank)

    # Assert
    assert result == expected


def test_fold_multiplies_b_by_alpha_over_rank_and_keeps_a() -> None:
    # Prepare
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b = torch.tensor([[1.0, -1.0], [0.5, 2.0]])

    # Execute
    pair = fold(a, b, alpha=8.0)  # rank 2 -> scale 4

    # Assert
    assert torch.equal(pair.a, a)
    assert torch.equal(pair.b, torch.tensor([[4.0, -4.0], [2.0, 8.0]]))
    assert pair.rank == 2


@settings(max_examples=50, deadline=None)
@given(
    rank=st.integers(1, 6),
    alpha=st.sampled_from([1.0, 2.0, 3.0, 8.0, 16.0, 0.5, 7.0]),
    seed=st.integers(0, 2**16),
)
def test_folded_product_is_peft_delta_w_and_unfold_inverts_fold(rank: int, alpha: float, seed: int) -> None:
    # Prepare
    raw = rand_pair(rank, 5, 3, seed)

    # Execute
    folded = fold(raw.a, raw.b, alpha)
    a_back, b_back = unfold(folded, alpha)

    # Assert
    peft_delta = (alpha / rank) * (raw.b @ raw.a)
    torch.testing.assert_close(folded.b @ folded.a, peft_delta)
    assert torch.equal(a_back, raw.a)
    torch.testing.assert_close(b_back, raw.b)


@pytest.mark.parametrize(("alpha", "rank"), [(16.0, 8), (8.0, 2), (1.0, 4), (4.0, 4)])
def test_unfold_of_fold_is_exact_for_power_of_two_scales(alpha: float, rank: int) -> None:
    # Prepare
    raw = rand_pair(rank, 4, 3, seed=rank)

    # Execute
    a_back, b_back = unfold(fold(raw.a, raw.b, alpha), alpha)

    # Assert
    assert torch.equal(a_back, raw.a)
    assert torch.equal(b_back, raw.b)


# ---------------------------------------------------------------- pad / truncate


def test_pad_rank_appends_zero_rows_to_a_and_zero_columns_to_b() -> None:
    # Prepare
    pair = LoraPair(a=torch.tensor([[1.0, 2.0, 3.0]]), b=torch.tensor([[4.0], [5.0]]))

    # Execute
    padded = pad_rank(pair, 3)

    # Assert
    assert padded.rank == 3
    assert torch.equal(padded.a, torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(padded.b, torch.tensor([[4.0, 0.0, 0.0], [5.0, 0.0, 0.0]]))


def test_pad_rank_keeps_dtype() -> None:
    # Prepare
    pair = LoraPair(a=torch.ones(1, 2, dtype=torch.float64), b=torch.ones(3, 1, dtype=torch.float64))

    # Execute
    padded = pad_rank(pair, 2)

    # Assert
    assert padded.a.dtype == torch.float64
    assert padded.b.dtype == torch.float64


def test_pad_rank_to_same_rank_is_unchanged() -> None:
    # Prepare
    pair = rand_pair(2, 3, 4, seed=1)

    # Execute
    padded = pad_rank(pair, 2)

    # Assert
    assert torch.equal(padded.a, pair.a)
    assert torch.equal(padded.b, pair.b)


def test_pad_rank_down_raises() -> None:
    # Prepare
    pair = rand_pair(3, 3, 4, seed=1)

    # Execute / Assert
    with pytest.raises(ValueError, match="cannot pad rank 3 down to 2"):
        pad_rank(pair, 2)


def test_truncate_rank_up_raises() -> None:
    # Prepare
    pair = rand_pair(2, 3, 4, seed=1)

    # Execute / Assert
    with pytest.raises(ValueError, match="cannot truncate rank 2 up to 3"):
        truncate_rank(pair, 3)


def test_truncate_rank_keeps_first_slots_as_independent_copies() -> None:
    # Prepare
    pair = rand_pair(4, 3, 5, seed=2)
    original_a = pair.a.clone()

    # Execute
    original_b = pair.b.clone()
    cut = truncate_rank(pair, 2)
    cut.a.zero_()
    cut.b.zero_()

    # Assert
    assert cut.rank == 2
    assert tuple(cut.b.shape) == (5, 2)
    assert torch.equal(pair.a, original_a)  # the source was not aliased
    assert torch.equal(pair.b, original_b)
    assert torch.equal(truncate_rank(pair, 2).b, pair.b[:, :2])


@settings(max_examples=50, deadline=None)
@given(rank=st.integers(1, 5), extra=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_pad_keeps_delta_w_and_truncate_undoes_pad(rank: int, extra: int, seed: int) -> None:
    # Prepare
    pair = rand_pair(rank, 4, 3, seed)

    # Execute
    padded = pad_rank(pair, rank + extra)
    back = truncate_rank(padded, rank)

    # Assert
    assert padded.rank == rank + extra
    torch.testing.assert_close(padded.b @ padded.a, pair.b @ pair.a)
    assert torch.equal(back.a, pair.a)
    assert torch.equal(back.b, pair.b)


# ---------------------------------------------------------------- names


def test_lora_names() -> None:
    # Execute
    names = lora_names("enc.q")

    # Assert
    assert names == ("enc.q.lora_A", "enc.q.lora_B")


@pytest.mark.parametrize(
    ("name", "module"),
    [("enc.q.lora_A", "enc.q"), ("enc.q.lora_B", "enc.q"), ("classifier.weight", None), ("lora_A", None),
     ("enc.q.lora_A.x", None), (".lora_B", "")],
)  # fmt: skip
def test_lora_module_inverts_lora_names_and_knows_no_other_name(name: str, module: str | None) -> None:
    # Execute / Assert
    assert lora_module(name) == module
    if module is not None:
        assert name in lora_names(module)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("enc.q.lora_A", "base_model.model.enc.q.lora_A.weight"),
        ("enc.q.lora_B", "base_model.model.enc.q.lora_B.weight"),
        ("classifier.weight", "base_model.model.classifier.weight"),
        ("classifier.bias", "base_model.model.classifier.bias"),
    ],
)
def test_to_peft_key(name: str, key: str) -> None:
    # Execute
    result = to_peft_key(name)

    # Assert
    assert result == key


# Keys as peft 0.21 writes them: get_peft_model_state_dict drops the adapter name, model.state_dict()
# keeps it (".lora_A.default.weight", ".modules_to_save.default.weight").
@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("base_model.model.enc.q.lora_A.weight", "enc.q.lora_A"),
        ("base_model.model.enc.q.lora_B.weight", "enc.q.lora_B"),
        ("base_model.model.enc.q.lora_A.default.weight", "enc.q.lora_A"),
        ("base_model.model.enc.q.lora_B.default.weight", "enc.q.lora_B"),
        ("base_model.model.classifier.weight", "classifier.weight"),
        ("base_model.model.classifier.bias", "classifier.bias"),
        ("base_model.model.classifier.modules_to_save.default.weight", "classifier.weight"),
        ("base_model.model.classifier.modules_to_save.default.bias", "classifier.bias"),
    ],
)
def test_from_peft_key(key: str, name: str) -> None:
    # Execute
    result = from_peft_key(key)

    # Assert
    assert result == name


@pytest.mark.parametrize("key", ["model.enc.q.lora_A.weight", "enc.q.lora_A", "", "base_model.enc.q"])
def test_from_peft_key_rejects_keys_without_the_peft_prefix(key: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="not a peft adapter key"):
        from_peft_key(key)


_SEGMENT = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True).filter(
    lambda s: s not in ("default", "modules_to_save", "lora_A", "lora_B")
)


@settings(max_examples=100, deadline=None)
@given(
    path=st.lists(_SEGMENT, min_size=1, max_size=5),
    suffix=st.sampled_from([".lora_A", ".lora_B", ".weight", ".bias"]),
)
def test_peft_key_round_trip(path: list[str], suffix: str) -> None:
    # Prepare
    name = ".".join(path) + suffix

    # Execute
    key = to_peft_key(name)
    back = from_peft_key(key)

    # Assert
    assert key.startswith(PEFT_PREFIX)
    assert back == name


def test_head_modules_deduplicates_in_spec_order() -> None:
    # Execute
    modules = head_modules(SPEC)

    # Assert
    assert modules == ("classifier", "pooler.dense")


# ---------------------------------------------------------------- expected tensors, counts


def test_expected_tensors_lists_lora_pairs_then_saved_heads_in_order() -> None:
    # Prepare
    plan = make_plan({V: 3, Q: 1}, modules_to_save=("classifier",))

    # Execute
    infos = expected_tensors(plan, SPEC)

    # Assert
    assert infos == [
        TensorInfo(f"{V}.lora_A", (3, 4), "float32"),
        TensorInfo(f"{V}.lora_B", (5, 3), "float32"),
        TensorInfo(f"{Q}.lora_A", (1, 3), "float32"),
        TensorInfo(f"{Q}.lora_B", (2, 1), "float32"),
        TensorInfo("classifier.weight", (2, 4), "float32"),
        TensorInfo("classifier.bias", (2,), "float32"),
    ]


def test_expected_tensors_without_saved_heads_has_only_lora() -> None:
    # Prepare
    plan = make_plan({Q: 2}, modules_to_save=())

    # Execute
    infos = expected_tensors(plan, SPEC)

    # Assert
    assert [info.name for info in infos] == [f"{Q}.lora_A", f"{Q}.lora_B"]


def test_expected_tensors_unknown_module_raises_key_error() -> None:
    # Prepare
    plan = make_plan({"nope": 2})

    # Execute / Assert
    with pytest.raises(KeyError):
        expected_tensors(plan, SPEC)


@pytest.mark.parametrize(
    ("ranks", "expected"),
    [
        ({}, 0),
        ({Q: 1}, 5),
        ({Q: 2, V: 3}, 2 * (3 + 2) + 3 * (4 + 5)),
        ({Q: 8, V: 8, W: 8}, 8 * (5 + 9 + 9)),
    ],
)
def test_lora_parameter_count(ranks: dict[str, int], expected: int) -> None:
    # Execute
    count = lora_parameter_count(ranks, SPEC)

    # Assert
    assert count == expected


@settings(max_examples=30, deadline=None)
@given(ranks=st.fixed_dictionaries({Q: st.integers(1, 8), V: st.integers(1, 8)}))
def test_lora_parameter_count_matches_expected_tensor_sizes(ranks: dict[str, int]) -> None:
    # Prepare
    plan = make_plan(ranks, modules_to_save=())

    # Execute
    count = lora_parameter_count(ranks, SPEC)

    # Assert
    assert count == sum(math.prod(info.shape) for info in expected_tensors(plan, SPEC))


# ---------------------------------------------------------------- init_global, fresh_pair


def test_fresh_pair_has_zero_b_and_kaiming_bounded_a() -> None:
    # Prepare
    generator = torch.Generator().manual_seed(0)

    # Execute
    pair = fresh_pair(in_features=16, out_features=5, rank=3, generator=generator)

    # Assert
    assert tuple(pair.a.shape) == (3, 16)
    assert tuple(pair.b.shape) == (5, 3)
    assert torch.equal(pair.b, torch.zeros(5, 3))
    assert float(pair.a.abs().max()) <= 1.0 / math.sqrt(16)
    assert bool((pair.a != 0).all())
    assert float(pair.a.min()) < 0.0 < float(pair.a.max())


def test_init_global_builds_fresh_pairs_at_plan_ranks_and_saved_heads() -> None:
    # Prepare
    plan = make_plan({Q: 2, V: 4}, modules_to_save=("classifier",))

    # Execute
    global_ = init_global(SPEC, plan, seed=11)

    # Assert
    assert global_.round == 0
    assert global_.ranks() == {Q: 2, V: 4}
    for module, pair in global_.lora.items():
        shape = SPEC.candidate(module)
        assert tuple(pair.a.shape) == (plan.rank_pattern[module], shape.in_features)
        assert torch.equal(pair.b, torch.zeros(shape.out_features, plan.rank_pattern[module]))
        assert float(pair.a.abs().max()) <= 1.0 / math.sqrt(shape.in_features)
        assert bool((pair.a != 0).any())
    assert set(global_.heads) == {"classifier.weight", "classifier.bias"}
    assert torch.equal(global_.heads["classifier.bias"], torch.zeros(2))
    weight = global_.heads["classifier.weight"]
    assert tuple(weight.shape) == (2, 4)
    assert bool((weight != 0).all())
    assert float(weight.abs().max()) < 6 * HEAD_INIT_STD


def test_init_global_is_deterministic_per_seed() -> None:
    # Prepare
    plan = make_plan()

    # Execute
    first = init_global(SPEC, plan, seed=5)
    again = init_global(SPEC, plan, seed=5)
    other = init_global(SPEC, plan, seed=6)

    # Assert
    assert torch.equal(first.lora[Q].a, again.lora[Q].a)
    assert torch.equal(first.heads["classifier.weight"], again.heads["classifier.weight"])
    assert not torch.equal(first.lora[Q].a, other.lora[Q].a)


# ---------------------------------------------------------------- broadcast


def test_broadcast_at_global_rank_reproduces_folded_delta_w() -> None:
    # Prepare
    global_ = make_global({Q: 2, V: 4})
    plan = make_plan({Q: 2, V: 4}, alpha=8.0)  # alpha 8 at rank 4, 4 at rank 2: scale 2 on both, exact

    # Execute
    tensors = broadcast_tensors(global_, plan, SPEC)

    # Assert: each module unfolded with its own alpha, which keeps alpha / rank equal across modules
    assert (plan.alpha_of(Q), plan.alpha_of(V), plan.alpha_pattern()) == (4.0, 8.0, {Q: 4.0})
    for module in (Q, V):
        a_name, b_name = lora_names(module)
        scale = plan.alpha_of(module) / plan.rank_pattern[module]
        assert scale == 2.0
        assert torch.equal(scale * tensors[b_name] @ tensors[a_name], global_.lora[module].b @ global_.lora[module].a)


@settings(max_examples=50, deadline=None)
@given(
    rank=st.integers(1, 6),
    alpha=st.floats(0.25, 64.0, allow_nan=False, allow_infinity=False),
    seed=st.integers(0, 2**16),
)
def test_broadcast_at_global_rank_reproduces_delta_w_for_any_alpha(rank: int, alpha: float, seed: int) -> None:
    # Prepare
    global_ = make_global({V: rank}, seed=seed)
    plan = make_plan({V: rank}, alpha=alpha)

    # Execute
    tensors = broadcast_tensors(global_, plan, SPEC)

    # Assert
    peft_delta = (alpha / rank) * tensors[f"{V}.lora_B"] @ tensors[f"{V}.lora_A"]
    torch.testing.assert_close(peft_delta, global_.lora[V].b @ global_.lora[V].a, rtol=1e-5, atol=1e-5)


def test_broadcast_truncates_to_agent_rank_and_unfolds_with_its_alpha() -> None:
    # Prepare
    global_ = make_global({Q: 2, V: 4})
    plan = make_plan({Q: 1, V: 2}, alpha=4.0)

    # Execute
    tensors = broadcast_tensors(global_, plan, SPEC)

    # Assert
    assert torch.equal(tensors[f"{Q}.lora_A"], global_.lora[Q].a[:1])
    # alpha 4 at the plan's largest rank 2, so 2 at rank 1: both modules scaled by alpha / r = 2
    assert torch.equal(tensors[f"{Q}.lora_B"], global_.lora[Q].b[:, :1] / 2.0)
    assert torch.equal(tensors[f"{V}.lora_A"], global_.lora[V].a[:2])
    assert torch.equal(tensors[f"{V}.lora_B"], global_.lora[V].b[:, :2] / 2.0)


def test_broadcast_above_global_rank_adds_fresh_slots_that_keep_delta_w() -> None:
    # Prepare
    global_ = make_global({Q: 1, V: 2})
    plan = make_plan({Q: 3, V: 2}, alpha=6.0)  # q scale 2, exact

    # Execute
    tensors = broadcast_tensors(global_, plan, SPEC)
    again = broadcast_tensors(global_, plan, SPEC)
    other_agent = broadcast_tensors(global_, replace(plan, seed=plan.seed + 1), SPEC)
    next_round = broadcast_tensors(replace(global_, round=global_.round + 1), plan, SPEC)

    # Assert
    a, b = tensors[f"{Q}.lora_A"], tensors[f"{Q}.lora_B"]
    assert tuple(a.shape) == (3, 3)
    assert tuple(b.shape) == (2, 3)
    assert torch.equal(a[:1], global_.lora[Q].a)
    assert torch.equal(b[:, :1], global_.lora[Q].b / 2.0)
    assert torch.equal(b[:, 1:], torch.zeros(2, 2))
    assert bool((a[1:] != 0).any())  # new slots must be able to learn
    assert float(a[1:].abs().max()) <= 1.0 / math.sqrt(3)
    assert torch.equal(2.0 * b @ a, global_.lora[Q].b @ global_.lora[Q].a)
    assert torch.equal(again[f"{Q}.lora_A"], a)
    assert torch.equal(other_agent[f"{Q}.lora_A"], a)  # every agent gets the same fresh slots
    assert not torch.equal(next_round[f"{Q}.lora_A"][1:], a[1:])  # drawn anew for each global round


def test_broadcast_of_module_missing_from_global_starts_fresh() -> None:
    # Prepare
    global_ = make_global({Q: 2})
    plan = make_plan({Q: 2, W: 3})

    # Execute
    tensors = broadcast_tensors(global_, plan, SPEC)

    # Assert
    a, b = tensors[f"{W}.lora_A"], tensors[f"{W}.lora_B"]
    assert tuple(a.shape) == (3, 6)
    assert torch.equal(b, torch.zeros(3, 3))
    assert bool((a != 0).any())
    assert float(a.abs().max()) <= 1.0 / math.sqrt(6)


def test_broadcast_sends_only_saved_heads_as_copies() -> None:
    # Prepare
    global_ = make_global({Q: 2})
    plan = make_plan({Q: 2}, modules_to_save=("classifier",))

    # Execute
    tensors = broadcast_tensors(global_, plan, SPEC)
    tensors["classifier.weight"].zero_()

    # Assert
    assert set(tensors) == {f"{Q}.lora_A", f"{Q}.lora_B", "classifier.weight", "classifier.bias"}
    assert bool((global_.heads["classifier.weight"] != 0).any())  # not aliased


@settings(max_examples=40, deadline=None)
@given(
    global_ranks=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    plan_ranks=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(0, 3)),
    alpha=st.floats(0.5, 32.0, allow_nan=False, allow_infinity=False),
    picked=st.sets(st.integers(0, 7)),
)
def test_sent_views_are_the_broadcast_without_its_copies(
    global_ranks: tuple[int, int], plan_ranks: tuple[int, int, int], alpha: float, picked: set[int]
) -> None:
    # Prepare: ranks below, at and above the global's, a module the global lacks (W), a saved head
    global_ = make_global({Q: global_ranks[0], V: global_ranks[1]})
    global_ = replace(global_, heads={**global_.heads, "classifier.weight": torch.ones(2, 4)})
    ranks = {Q: plan_ranks[0], V: plan_ranks[1], **({W: plan_ranks[2]} if plan_ranks[2] else {})}
    plan = make_plan(ranks, alpha=alpha, modules_to_save=("classifier",))
    sent = broadcast_tensors(global_, plan, SPEC)
    names = [name for index, name in enumerate([*sent, "not.sent"]) if index in picked]

    # Execute
    views = sent_views(global_, plan, SPEC, names)

    # Assert: bit for bit the broadcast's tensors, for exactly the names asked that it sends; the broadcast's own
    # are copies (writing them leaves the global as it was)
    assert set(views) == set(names) & set(sent)
    assert all(torch.equal(views[name], sent[name]) for name in views)
    before = {m: (p.a.clone(), p.b.clone()) for m, p in global_.lora.items()}
    head = global_.heads["classifier.weight"].clone()
    for tensor in sent.values():
        tensor.add_(1.0)
    assert all(torch.equal(global_.lora[m].a, a) and torch.equal(global_.lora[m].b, b) for m, (a, b) in before.items())
    assert torch.equal(global_.heads["classifier.weight"], head)


def test_sent_tensors_are_sent_views_computed_once_per_global_rank_and_alpha() -> None:
    # Prepare: Q within the global's rank, V beyond it (fresh slots), W new to it, the heads; two plans that
    # differ only in W's rank (Q's alpha is the same in both: their largest rank is V's)
    global_ = make_global({Q: 2, V: 3})
    plan = make_plan({Q: 1, V: 4, W: 2}, alpha=4.0)
    other = make_plan({Q: 1, V: 4, W: 1}, alpha=4.0)
    names = list(broadcast_tensors(global_, plan, SPEC))
    cache = SentTensors()

    # Execute
    first = cache.get(global_, plan, SPEC, names)
    again = cache.get(global_, plan, SPEC, reversed(names))
    narrower = cache.get(global_, other, SPEC, names)
    newer = make_global({Q: 2, V: 3}, seed=1)
    after = cache.get(newer, plan, SPEC, names)

    # Assert: the same tensors as sent_views, in the order named; LoRA tensors reused for the same rank and
    # alpha, computed afresh for another rank and for another global
    expected = sent_views(global_, plan, SPEC, names)
    assert list(first) == names and list(again) == names[::-1]
    assert all(torch.equal(first[name], expected[name]) for name in names)
    lora = [name for name in names if name.endswith((LORA_A, LORA_B))]
    assert all(again[name] is first[name] for name in lora)
    assert narrower[Q + LORA_B] is first[Q + LORA_B] and narrower[W + LORA_B] is not first[W + LORA_B]
    assert torch.equal(narrower[W + LORA_B], sent_views(global_, other, SPEC, [W + LORA_B])[W + LORA_B])
    assert all(torch.equal(after[name], sent_views(newer, plan, SPEC, [name])[name]) for name in names)
    assert not torch.equal(after[Q + LORA_A], first[Q + LORA_A])


def test_screened_change_norms_add_up_to_the_whole_upload_s() -> None:
    # Prepare: an upload that moved every tensor the broadcast sent
    global_ = make_global({Q: 2, V: 3})
    plan = make_plan({Q: 1, V: 4, W: 2}, alpha=4.0)
    sent = broadcast_tensors(global_, plan, SPEC)
    generator = torch.Generator().manual_seed(3)
    upload = {name: value + torch.randn(value.shape, generator=generator) for name, value in sent.items()}

    # Execute: one tensor at a time against views, as the coordinator screens an upload while it arrives
    one_by_one: dict[str, float] = {}
    for name, value in upload.items():
        one_by_one.update(change_norms({name: value}, sent_views(global_, plan, SPEC, [name])))

    # Assert
    assert one_by_one == change_norms(upload, sent)


def test_broadcast_matches_expected_tensors_of_the_plan() -> None:
    # Prepare
    global_ = make_global({Q: 4, V: 1})
    global_ = replace(
        global_,
        heads={**global_.heads, "classifier.bias": torch.zeros(2), "classifier.weight": torch.ones(2, 4)},
    )
    plan = make_plan({Q: 2, V: 3, W: 1}, modules_to_save=("classifier",))

    # Execute
    tensors = broadcast_tensors(global_, plan, SPEC)

    # Assert: the broadcast is exactly what the plan's agent would have to upload
    check_tensors(tensors, expected_tensors(plan, SPEC))
    assert list(tensors) == [info.name for info in expected_tensors(plan, SPEC)]
    assert all(t.is_contiguous() for t in tensors.values())


@settings(max_examples=40, deadline=None)
@given(
    global_rank=st.integers(1, 5),
    agent_rank=st.integers(1, 5),
    alpha=st.sampled_from([1.0, 2.0, 8.0, 16.0, 5.0]),
    seed=st.integers(0, 2**16),
)
def test_unchanged_upload_folds_back_to_truncated_global(
    global_rank: int, agent_rank: int, alpha: float, seed: int
) -> None:
    # Prepare
    global_ = make_global({V: global_rank}, seed=seed)
    plan = make_plan({V: agent_rank}, alpha=alpha, modules_to_save=())
    shared = min(global_rank, agent_rank)

    # Execute: an agent that trains nothing uploads what it downloaded
    update = fold_update("agent", 1.0, broadcast_tensors(global_, plan, SPEC), plan)

    # Assert
    pair = update.lora[V]
    assert pair.rank == agent_rank
    assert torch.equal(pair.a[:shared], global_.lora[V].a[:shared])
    torch.testing.assert_close(pair.b[:, :shared], global_.lora[V].b[:, :shared])
    assert torch.equal(pair.b[:, shared:], torch.zeros(5, agent_rank - shared))


# ---------------------------------------------------------------- fold_update


def test_fold_update_folds_lora_casts_to_fp32_and_keeps_heads() -> None:
    # Prepare
    plan = make_plan({Q: 2}, alpha=8.0)  # scale 4
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.bfloat16)
    b = torch.tensor([[1.0, 0.5], [-1.0, 2.0]], dtype=torch.bfloat16)
    head = torch.tensor([0.5, -0.25])
    tensors = {f"{Q}.lora_A": a, f"{Q}.lora_B": b, "classifier.bias": head}

    # Execute
    update = fold_update("agent-7", 12.0, tensors, plan)

    # Assert
    assert isinstance(update, FoldedUpdate)
    assert update.agent_id == "agent-7"
    assert update.weight == 12.0
    assert set(update.lora) == {Q}
    assert update.lora[Q].a.dtype == torch.float32
    assert torch.equal(update.lora[Q].a, a.float())
    assert torch.equal(update.lora[Q].b, torch.tensor([[4.0, 2.0], [-4.0, 8.0]]))
    assert set(update.heads) == {"classifier.bias"}
    assert torch.equal(update.heads["classifier.bias"], head)


def test_fold_update_missing_tensor_raises_key_error() -> None:
    # Prepare
    plan = make_plan({Q: 2})

    # Execute / Assert
    with pytest.raises(KeyError):
        fold_update("a", 1.0, {f"{Q}.lora_A": torch.zeros(2, 3)}, plan)


# ---------------------------------------------------------------- check_tensors


def _valid_upload(plan: TrainPlan) -> dict[str, torch.Tensor]:
    return {info.name: torch.zeros(info.shape) for info in expected_tensors(plan, SPEC)}


def test_check_tensors_accepts_a_valid_upload() -> None:
    # Prepare
    plan = make_plan()
    tensors = _valid_upload(plan)

    # Execute / Assert: no exception
    check_tensors(tensors, expected_tensors(plan, SPEC))


_QA = f"{Q}.lora_A"
_QB = f"{Q}.lora_B"


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ("drop_a", "tensors", "missing"),
        ("extra", "tensors", "not in the plan"),
        ("shape", f"tensors[{_QA}].shape", "expected (2, 3), got (3, 2)"),
        ("dtype", f"tensors[{_QA}].dtype", "expected float32, got bfloat16"),
        ("nan", f"tensors[{_QB}]", "NaN or Inf"),
        ("inf", f"tensors[{_QB}]", "NaN or Inf"),
        ("neg_inf", "tensors[classifier.weight]", "NaN or Inf"),
    ],
)
def test_check_tensors_names_the_bad_field(change: str, field: str, problem: str) -> None:
    # Prepare
    plan = make_plan({Q: 2, V: 4})
    tensors = _valid_upload(plan)
    if change == "drop_a":
        del tensors[_QA]
    elif change == "extra":
        tensors["pooler.dense.weight"] = torch.zeros(4, 4)
    elif change == "shape":
        tensors[_QA] = torch.zeros(3, 2)
    elif change == "dtype":
        tensors[_QA] = torch.zeros(2, 3, dtype=torch.bfloat16)
    elif change == "nan":
        tensors[_QB][1, 0] = float("nan")
    elif change == "inf":
        tensors[_QB][0, 1] = float("inf")
    else:
        tensors["classifier.weight"][0, 0] = float("-inf")

    # Execute
    with pytest.raises(InvalidArgument) as caught:
        check_tensors(tensors, expected_tensors(plan, SPEC))

    # Assert
    assert caught.value.field == field
    assert problem in caught.value.problem


def test_check_tensors_lists_at_most_three_missing_names() -> None:
    # Prepare
    plan = make_plan({Q: 2, V: 4})

    # Execute
    with pytest.raises(InvalidArgument) as caught:
        check_tensors({}, expected_tensors(plan, SPEC))

    # Assert
    assert caught.value.field == "tensors"
    assert caught.value.problem.endswith(" ...")
    assert caught.value.problem.count("'") == 6


# ---------------------------------------------------------------- global_to_peft


def test_global_to_peft_unfolds_each_pair_at_its_global_rank() -> None:
    # Prepare
    global_ = make_global({Q: 2, V: 4})

    # Execute
    state = global_to_peft(global_, alpha=16.0)  # scales 8 and 4

    # Assert
    assert set(state) == {
        f"base_model.model.{Q}.lora_A.weight",
        f"base_model.model.{Q}.lora_B.weight",
        f"base_model.model.{V}.lora_A.weight",
        f"base_model.model.{V}.lora_B.weight",
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
        "base_model.model.pooler.dense.weight",
    }
    assert torch.equal(state[f"base_model.model.{Q}.lora_A.weight"], global_.lora[Q].a)
    assert torch.equal(state[f"base_model.model.{Q}.lora_B.weight"], global_.lora[Q].b / 8.0)
    assert torch.equal(state[f"base_model.model.{V}.lora_B.weight"], global_.lora[V].b / 4.0)
    assert torch.equal(state["base_model.model.classifier.bias"], global_.heads["classifier.bias"])
    for key, value in state.items():
        assert value.is_contiguous()
        assert from_peft_key(key) in {*lora_names(Q), *lora_names(V), *global_.heads}


def test_global_adapter_ranks() -> None:
    # Prepare
    global_ = make_global({Q: 3, V: 1})

    # Execute
    ranks = global_.ranks()

    # Assert
    assert ranks == {Q: 3, V: 1}


def test_init_global_head_and_leading_slots_do_not_depend_on_other_ranks() -> None:
    # Prepare: the same seed, one plan at rank 1 everywhere, one at rank 3 on Q (another planner's choice)
    low = make_plan({Q: 1, V: 2})
    high = make_plan({Q: 3, V: 2})

    # Execute
    a = init_global(SPEC, low, seed=11)
    b = init_global(SPEC, high, seed=11)

    # Assert
    assert all(torch.equal(a.heads[name], b.heads[name]) for name in a.heads)
    assert torch.equal(a.lora[V].a, b.lora[V].a)
    assert torch.equal(a.lora[Q].a, b.lora[Q].a[:1])
    assert not torch.equal(init_global(SPEC, low, seed=12).lora[Q].a, a.lora[Q].a)


def test_change_norms_are_per_tensor_and_add_up_to_the_whole() -> None:
    # Prepare
    sent = {"a": torch.zeros(2, 2), "b": torch.ones(3)}
    got = {"a": torch.tensor([[3.0, 0.0], [0.0, 4.0]]), "b": torch.ones(3) + 12.0 / 3**0.5}

    # Execute
    norms = change_norms(got, sent)

    # Assert
    assert norms == pytest.approx({"a": 5.0, "b": 12.0})
    assert change_norm(got, sent) == pytest.approx(13.0)


def test_scale_change_takes_one_factor_or_one_per_tensor() -> None:
    # Prepare
    sent = {"a": torch.zeros(2), "b": torch.ones(2)}
    got = {"a": torch.tensor([2.0, 4.0]), "b": torch.tensor([3.0, 5.0])}

    # Execute
    half = scale_change(got, sent, 0.5)
    per_tensor = scale_change(got, sent, {"a": 0.25})

    # Assert: the change (not the value) is scaled; a tensor without a factor keeps its change
    assert torch.equal(half["a"], torch.tensor([1.0, 2.0])) and torch.equal(half["b"], torch.tensor([2.0, 3.0]))
    assert torch.equal(per_tensor["a"], torch.tensor([0.5, 1.0])) and torch.equal(per_tensor["b"], got["b"])


@pytest.mark.parametrize(
    ("value", "bound", "message"),
    [(float("nan"), 0.0, "NaN or Inf"), (float("inf"), 1e4, "NaN or Inf"), (2e4, 1e4, r"\|value\| 2e\+04 over")],
)
def test_check_values_refuses_non_finite_and_out_of_bound_values(value: float, bound: float, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_values({"t": torch.tensor([0.0, value])}, bound)


def test_check_values_passes_values_within_the_bound_and_any_finite_value_without_one() -> None:
    check_values({"t": torch.tensor([-1e4, 1e4])}, 1e4)
    check_values({"t": torch.tensor([3e38])}, 0.0)

"""Cost model arithmetic against hand figures, and the fedpipe planner's decisions on made-up profiles."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from common.types import Accelerator, CalibrationPoint, DeviceProfile, ModelSpec, ModuleShape, Quantization
from coordinator import costmodel
from coordinator.planner import PlanOptions, SearchSpace, fedpipe_plan, mask_subsets, uniform_plan

# MiniLM-L6's figures: 24 attention candidates of 384 x 384, 10,764,288 Linear weights, 22,713,216 in all.
SPEC = ModelSpec(
    fingerprint="minilm",
    model_type="bert",
    task="seq-cls",
    labels=("negative", "positive"),
    candidates=tuple(
        ModuleShape(f"bert.encoder.layer.{i}.attention.{k}", 384, 384)
        for i in range(6)
        for k in ("self.query", "self.key", "self.value", "output.dense")
    ),
    heads=(("classifier.weight", (2, 384)), ("classifier.bias", (2,))),
    base_parameters=22_713_216,
    linear_parameters=10_764_288,
)
GIB = 2**30


def calibration(step_low: float, step_high: float, peak_low: int, peak_high: int) -> tuple[CalibrationPoint, ...]:
    trainable = 24 * 8 * 768 + 770
    return (
        CalibrationPoint(2, 64, 8, Quantization.NONE, step_low, peak_low, trainable),
        CalibrationPoint(8, 64, 8, Quantization.NONE, step_high, peak_high, trainable),
    )


def profile(memory: float, step_scale: float = 1.0, samples: int = 540) -> DeviceProfile:
    points = calibration(0.1 * step_scale, 0.34 * step_scale, 700 * 2**20, 760 * 2**20)
    return DeviceProfile(
        "cpu",
        "cpu",
        int(memory * GIB),
        int(memory * GIB),
        24 * GIB,
        5e10,
        "float32",
        1,
        samples,
        60,
        calibration=points,
    )


OPTIONS = PlanOptions(
    ("all",),
    8,
    16.0,
    0.0,
    16,
    1,
    0,
    1e-3,
    0.0,
    64,
    Quantization.NONE,
    300.0,
    0,
    search=SearchSpace(ranks=(4, 8, 16), batch_sizes=(2, 4, 8, 16)),
)


@pytest.mark.parametrize(
    ("quantization", "element", "expected"),
    [
        (Quantization.NONE, 4, 22_713_216 * 4),  # 90,852,864
        (Quantization.NONE, 2, 22_713_216 * 2),  # bf16 on a GPU
        # int8: 1 byte per Linear weight + one fp32 scale per output row (4 / 384 per weight); rest fp32
        (Quantization.INT8, 4, 10_764_288 + 112_128 + 11_948_928 * 4),  # 58,672,128
        # NF4 with double quantization: 0.5 + 1/64 + 4/16384 bytes per weight = 5,552,964; rest fp32
        (Quantization.NF4, 4, 5_382_144 + 168_192 + 2_628 + 11_948_928 * 4),  # 53,348,676
    ],
)
def test_base_bytes_match_hand_figures(quantization: Quantization, element: int, expected: int) -> None:
    assert costmodel.base_bytes(SPEC, quantization, element) == expected


def test_fit_to_two_calibration_runs() -> None:
    measured = profile(4.0)
    fit = costmodel.fit(measured, SPEC)
    # memory: 60 MiB more for 384 more tokens; time: 0.24 s more for 384 more tokens
    # the base's slope: LoRA's saved tensors in the calibration (24 modules: dropout output, mask, A output)
    # come off, and predict() adds back the configuration's
    assert fit.activation_bytes_per_token == pytest.approx(60 * 2**20 / 384 - 24 * (384 * 4 + 384 + 8 * 4))
    assert fit.step_seconds_per_token == pytest.approx(0.24 / 384)
    assert fit.step_seconds_fixed == pytest.approx(0.1 - 0.24 / 384 * 128)
    fixed = 22_713_216 * 4 + (24 * 8 * 768 + 770) * 16
    assert fit.overhead_bytes == pytest.approx(700 * 2**20 - 60 * 2**20 / 384 * 128 - fixed)
    # the prediction at a calibrated point gives back the measurement
    config = costmodel.Config(8, 8, Quantization.NONE, tuple(m.name for m in SPEC.candidates))
    cost = costmodel.predict(measured, SPEC, fit, config, 64, 1e9)
    assert cost.peak_memory_bytes == pytest.approx(760 * 2**20)
    assert cost.step_seconds == pytest.approx(0.34)
    assert cost.payload_bytes == (24 * 8 * 768 + 770) * 4


def test_quantization_lowers_predicted_memory_by_the_base_difference() -> None:
    measured = profile(4.0)
    fit = costmodel.fit(measured, SPEC)
    modules = tuple(m.name for m in SPEC.candidates)
    full = costmodel.predict(measured, SPEC, fit, costmodel.Config(8, 8, Quantization.NONE, modules), 64, 1e9)
    nf4 = costmodel.predict(measured, SPEC, fit, costmodel.Config(8, 8, Quantization.NF4, modules), 64, 1e9)
    assert full.peak_memory_bytes - nf4.peak_memory_bytes == pytest.approx(90_852_864 - 53_348_676)
    assert nf4.step_seconds == pytest.approx(full.step_seconds * 1.1)


def test_fast_and_slow_agents_get_the_same_round_time_and_the_fast_one_more_samples() -> None:
    planned = fedpipe_plan({"fast": profile(8.0), "slow": profile(8.0, step_scale=4.0)}, SPEC, OPTIONS, 1)
    fast, slow = planned.predictions["fast"], planned.predictions["slow"]
    assert slow.under_training == 0.0 and slow.samples >= 540  # the slowest still does its whole share
    assert fast.samples > slow.samples
    assert fast.round_seconds <= planned.round_seconds + 1e-9 and slow.round_seconds <= planned.round_seconds + 1e-9
    assert fast.round_seconds == pytest.approx(slow.round_seconds, rel=0.25)
    assert planned.plans["fast"].max_steps == fast.steps


@pytest.mark.parametrize(
    ("memory", "quantization", "batch", "binding"),
    [
        (0.8, Quantization.NONE, 4, "memory"),  # batch 8 at full precision would not fit
        # NF4 at batch 4 fits on the top half of the mask: 12 fewer LoRA modules keep fewer activations
        (0.74, Quantization.NF4, 4, "memory"),
    ],
)
def test_small_memory_gets_a_cheaper_configuration_within_its_cap(
    memory: float, quantization: Quantization, batch: int, binding: str
) -> None:
    planned = fedpipe_plan({"big": profile(8.0), "small": profile(memory)}, SPEC, OPTIONS, 1)
    big, small = planned.plans["big"], planned.plans["small"]
    assert (big.quantization, big.batch_size) == (Quantization.NONE, 16)
    assert (small.quantization, small.batch_size) == (quantization, batch)
    prediction = planned.predictions["small"]
    assert prediction.peak_memory_bytes <= prediction.usable_memory_bytes
    assert prediction.binding == binding
    assert planned.predictions["big"].binding == "none"  # the richest configuration of the search space


def test_an_agent_that_fits_nothing_is_left_out_with_the_reason() -> None:
    planned = fedpipe_plan({"ok": profile(8.0), "tiny": profile(0.3)}, SPEC, OPTIONS, 1)
    assert set(planned.plans) == {"ok"}
    reason = planned.excluded["tiny"]
    assert reason.startswith("needs ") and "at its smallest configuration" in reason and "usable" in reason


def test_allowing_under_training_shortens_the_round() -> None:
    profiles = {"fast": profile(8.0), "slow": profile(8.0, step_scale=4.0)}
    strict = fedpipe_plan(profiles, SPEC, OPTIONS, 1)
    loose = fedpipe_plan(profiles, SPEC, replace(OPTIONS, search=replace(OPTIONS.search, max_under_training=0.3)), 1)
    assert loose.round_seconds < strict.round_seconds
    weighted = sum(p.under_training for p in loose.predictions.values()) / 2
    assert 0 < weighted <= 0.3 + 1e-9


def test_planner_is_pure_and_uniform_predicts_too() -> None:
    profiles = {"a": profile(8.0), "b": profile(2.0, step_scale=2.0)}
    assert fedpipe_plan(profiles, SPEC, OPTIONS, 3) == fedpipe_plan(profiles, SPEC, OPTIONS, 3)
    uniform = uniform_plan(profiles, SPEC, OPTIONS, 3)
    assert uniform.predictions["b"].step_seconds == pytest.approx(2 * uniform.predictions["a"].step_seconds)


def test_mask_subsets_keep_the_most_important_in_model_order() -> None:
    modules = ("m0", "m1", "m2", "m3")
    subsets = mask_subsets(modules, {"m0": 0.1, "m1": 0.9, "m2": 0.5, "m3": 0.2}, (1.0, 0.5))
    assert subsets == [modules, ("m1", "m2")]


def test_a_spec_without_linear_weights_or_heads_still_plans() -> None:
    # Prepare: a hand-made spec (as RPC tests and benchmarks build), uncalibrated agents
    bare = replace(SPEC, heads=(), linear_parameters=0)
    profiles = {"a": replace(profile(8.0), calibration=()), "b": profile(8.0)}

    # Execute
    uniform = uniform_plan(profiles, bare, OPTIONS, 1)
    planned = fedpipe_plan(profiles, bare, OPTIONS, 1)

    # Assert: no division by zero; every agent planned with a finite step time
    assert set(uniform.plans) == set(planned.plans) == {"a", "b"}
    assert all(
        0 < p.step_seconds < float("inf") for p in [*uniform.predictions.values(), *planned.predictions.values()]
    )


# ---------------------------------------------------------------- the Ferret mode


FERRET = replace(OPTIONS, mode="ferret", directions=1000)


def test_a_block_trained_in_full_costs_its_weights_gradient_starting_copy_and_adam_moments() -> None:
    # Prepare: the same agent and batch, LoRA rank 8 on 4 matrices against the 4 matrices in full
    modules = tuple(m.name for m in SPEC.candidates[:4])
    fit = costmodel.fit(profile(16), SPEC)
    lora = costmodel.Config(8, 8, Quantization.NONE, modules)
    full = costmodel.Config(8, 0, Quantization.NONE, modules, "ferret", "adamw", 1000)

    # Execute
    lora_cost = costmodel.predict(profile(16), SPEC, fit, lora, 64, 1e8)
    full_cost = costmodel.predict(profile(16), SPEC, fit, full, 64, 1e8)
    sgd_cost = costmodel.predict(profile(16), SPEC, fit, replace(full, optimizer="sgd"), 64, 1e8)

    # Assert: 4 x 147,456 weights at 20 bytes, 4 of which the fp32 base holds anyway, plus one direction buffer,
    # against LoRA's 24,576 parameters at 16 bytes; per token (8 x 64) each full block keeps its fp32 input,
    # each LoRA module its dropout output, mask and A output
    blocks = 4 * 384 * 384
    heads = 770
    activations = 8 * 64 * 4 * (384 * 4 - (384 * 4 + 384 + 8 * 4))
    assert full_cost.peak_memory_bytes - lora_cost.peak_memory_bytes == pytest.approx(
        blocks * (20 - 4) + 4 * 384 * 384 - (4 * 8 * 768) * 16 + activations, rel=1e-9
    )
    assert full_cost.peak_memory_bytes - sgd_cost.peak_memory_bytes == blocks * 8
    assert full_cost.payload_bytes == 4 * (1000 + heads) and full_cost.step_seconds > lora_cost.step_seconds


def test_the_ferret_planner_gives_a_tight_agent_fewer_blocks_and_leaves_out_one_that_fits_none() -> None:
    # Prepare: full precision only; the whole mask at batch 2 needs 0.735 GiB, half of it 0.708 GiB (usable: 90%)
    profiles = {"roomy": profile(16), "tight": profile(0.80), "tiny": profile(0.7)}
    options = replace(FERRET, search=replace(FERRET.search, quantizations=(Quantization.NONE,)))

    # Execute
    planned = fedpipe_plan(profiles, SPEC, options, 1)

    # Assert
    assert planned.plans["roomy"].mode == "ferret" and planned.plans["roomy"].rank_pattern == {}
    assert len(planned.plans["roomy"].target_modules) == 24
    assert len(planned.plans["tight"].target_modules) == 12
    assert "tiny" in planned.excluded and "GiB" in planned.excluded["tiny"]
    assert planned.plans["roomy"].directions == 1000 and planned.plans["roomy"].shared_seed == FERRET.seed


def test_layer_indices_and_backward_depth_from_module_names() -> None:
    from common.adapters import backward_layers, layer_count, layer_index

    assert layer_index("bert.encoder.layer.3.attention.self.value") == 3
    assert layer_index("model.layers.12.self_attn.q_proj") == 12
    assert layer_index("transformer.h.0.attn.c_attn") == 0
    assert layer_index("classifier") is None
    assert layer_count(SPEC) == 6
    names = [m.name for m in SPEC.candidates]
    assert backward_layers(SPEC, names) == 6
    assert backward_layers(SPEC, [n for n in names if ".layer.4." in n or ".layer.5." in n]) == 2
    assert backward_layers(SPEC, ["classifier"]) == 6  # unknown: the whole depth, the safe side


def shallow_profile() -> DeviceProfile:
    """Full-depth runs at batch 2 and 8, and a shallow run (last layer only) at batch 8 with 40 MiB less."""
    full = calibration(0.1, 0.34, 700 * 2**20, 760 * 2**20)
    last_layer_lora = 4 * 8 * 768 + 770
    shallow = CalibrationPoint(
        8, 64, 8, Quantization.NONE, 0.22, 720 * 2**20 - (24 - 4) * 8 * 768 * 16, last_layer_lora, 1
    )
    return replace(profile(4.0), calibration=(*full, shallow))


def test_a_shallow_calibration_run_gives_the_per_token_figures_by_depth() -> None:
    # Prepare
    measured = shallow_profile()
    fit = costmodel.fit(measured, SPEC)
    names = tuple(m.name for m in SPEC.candidates)
    last = tuple(n for n in names if ".layer.5." in n)
    middle = tuple(n for n in names if int(n.split(".")[3]) >= 3)  # layers 3-5: depth 3

    # Execute
    def predicted(modules: tuple[str, ...]) -> costmodel.Cost:
        return costmodel.predict(measured, SPEC, fit, costmodel.Config(8, 8, Quantization.NONE, modules), 64, 1e9)

    everything, top, half = predicted(names), predicted(last), predicted(middle)

    # Assert: full depth reproduces the full run, the last layer the shallow run (its own smaller adapter
    # accounted for), three layers lie two fifths of the way from the shallow figures to the full ones
    assert everything.peak_memory_bytes == pytest.approx(760 * 2**20)
    assert top.peak_memory_bytes == pytest.approx(720 * 2**20 - 20 * 8 * 768 * 16, rel=1e-9)
    activations = {k: fit.per_token(d)[0] for k, d in (("full", 6), ("top", 1), ("half", 3))}
    assert activations["half"] == pytest.approx(activations["top"] + 0.4 * (activations["full"] - activations["top"]))
    assert top.step_seconds < half.step_seconds < everything.step_seconds
    assert fit.per_token(0) == fit.per_token(6) == (fit.activation_bytes_per_token, fit.step_seconds_per_token)


def test_without_a_shallow_run_depth_changes_nothing_measured_and_scales_the_formula() -> None:
    measured = profile(4.0)
    calibrated = costmodel.fit(measured, SPEC)
    formula = costmodel.fit(replace(measured, calibration=()), SPEC)
    assert calibrated.per_token(2) == calibrated.per_token(6)
    assert formula.per_token(3)[0] == pytest.approx(formula.per_token(6)[0] / 2)


def test_lora_activations_are_priced_per_module_rank_and_dropout() -> None:
    from edge_agent.calibrate import DROPOUT

    query = SPEC.candidates[0].name
    assert costmodel.CALIBRATION_DROPOUT == DROPOUT  # the fit removes what the calibration runs really kept
    # fp32: lora_A's input (384 x 4 bytes), dropout's mask (384 x 1) and lora_B's input (rank x 4)
    assert costmodel.lora_activation_bytes_per_token(SPEC, [(query, 16)], 0.05, 4) == 384 * 4 + 384 + 16 * 4
    assert costmodel.lora_activation_bytes_per_token(SPEC, [(query, 16)], 0.0, 2) == 384 * 2 + 16 * 2


def test_a_data_parallel_agent_is_priced_at_its_per_device_share_plus_the_allreduce() -> None:
    # Prepare
    one = profile(8.0)
    devices = tuple(costmodel_device(i) for i in range(4))
    four = replace(one, devices=devices, allreduce_bytes_per_s=1e9)
    fitted = costmodel.fit(one, SPEC)
    config = costmodel.Config(
        batch_size=32, rank=8, quantization=Quantization.NONE, modules=tuple(m.name for m in SPEC.candidates[:2])
    )
    share = replace(config, batch_size=8)

    # Execute
    alone = costmodel.predict(one, SPEC, fitted, config, 64, 1e8)
    split = costmodel.predict(four, SPEC, fitted, config, 64, 1e8)
    quarter = costmodel.predict(one, SPEC, fitted, share, 64, 1e8)
    ring = costmodel.allreduce_seconds(split.payload_bytes, 4, 1e9)

    # Assert: memory is one device's share of the batch; time is that share's step plus the ring all-reduce
    assert split.peak_memory_bytes == pytest.approx(quarter.peak_memory_bytes)
    assert split.peak_memory_bytes < alone.peak_memory_bytes
    assert ring == pytest.approx(2 * 3 / 4 * split.payload_bytes / 1e9)
    assert split.step_seconds == pytest.approx(quarter.step_seconds + ring)
    assert costmodel.allreduce_seconds(split.payload_bytes, 1, 1e9) == 0.0
    # A batch that does not divide: the largest share (ceil) is what a device holds
    odd = costmodel.predict(four, SPEC, fitted, replace(config, batch_size=30), 64, 1e8)
    assert odd.peak_memory_bytes == pytest.approx(quarter.peak_memory_bytes)


def costmodel_device(index: int) -> Accelerator:
    return Accelerator(f"cuda:{index}", "GPU", 8 * GIB, 5e10)


def test_a_data_parallel_agent_is_planned_per_device_batch_times_its_devices() -> None:
    # Prepare: the same device twice over (one agent) beside an ordinary agent with one of them
    devices = (costmodel_device(0), costmodel_device(1))
    pair = replace(profile(8.0), devices=devices, allreduce_bytes_per_s=1e10)
    search = replace(OPTIONS.search, max_local_epochs=8)

    # Execute
    planned = fedpipe_plan({"one": profile(8.0), "pair": pair}, SPEC, replace(OPTIONS, search=search), 1)

    # Assert: the pair's batch is a per-device batch of the search times 2 (past the search's largest); the
    # single agent keeps the search's; each of the pair's devices takes the single agent's share and step
    one, two = planned.plans["one"], planned.plans["pair"]
    assert one.batch_size in search.batch_sizes and two.batch_size == 2 * one.batch_size > max(search.batch_sizes)
    alone, both = planned.predictions["one"], planned.predictions["pair"]
    assert both.peak_memory_bytes == alone.peak_memory_bytes
    assert both.step_seconds == pytest.approx(alone.step_seconds, rel=1e-3) and both.step_seconds > alone.step_seconds
    assert both.samples == 2 * alone.samples and alone.binding == both.binding == "none"


def test_a_base_split_by_layers_holds_a_share_of_it_per_device_and_runs_the_devices_in_turn() -> None:
    # Prepare: the same device alone and as two; one configuration at the whole batch
    one = profile(8.0)
    pair = replace(one, devices=(costmodel_device(0), costmodel_device(1)), allreduce_bytes_per_s=1e9)
    fitted = costmodel.fit(one, SPEC)
    config = costmodel.Config(batch_size=32, rank=8, quantization=Quantization.NONE, modules=(SPEC.candidates[0].name,))
    layers = replace(config, placement=costmodel.LAYERS)

    # Execute
    alone = costmodel.predict(one, SPEC, fitted, config, 64, 1e8)
    split = costmodel.predict(pair, SPEC, fitted, layers, 64, 1e8)

    # Assert: half of what one device holds at the whole batch, plus one of the six layers' share (a layer is
    # not split), beside the overhead every device has; the step is one device's at the whole batch plus the
    # hidden states (384 fp32 values per token) across one boundary, forward and backward
    held = alone.peak_memory_bytes - fitted.overhead_bytes
    assert split.peak_memory_bytes == pytest.approx(held / 2 + held / 6 + fitted.overhead_bytes)
    assert costmodel.hidden_size(SPEC) == 384
    handoff = 2 * 1 * (32 * 64 * 384 * 4) / 1e9
    assert costmodel.handoff_seconds(32 * 64 * 384 * 4, 2, 1e9) == pytest.approx(handoff)
    assert split.step_seconds == pytest.approx(alone.step_seconds + handoff)
    assert split.payload_bytes == alone.payload_bytes
    # One device: nothing is split, whatever the configuration says
    assert costmodel.predict(one, SPEC, fitted, layers, 64, 1e8) == alone
    assert costmodel.handoff_seconds(1000, 1, 1e9) == 0.0


def pair_search() -> SearchSpace:
    """One configuration per placement: rank 8 on every matrix at 16-bit, 8 samples per device."""
    return replace(
        OPTIONS.search, ranks=(8,), batch_sizes=(8,), quantizations=(Quantization.NONE,), mask_fractions=(1.0,)
    )


def memory_between(low: float, high: float, headroom: float) -> float:
    """Device GiB whose usable share lies halfway between two peaks (bytes)."""
    return (low + high) / 2 / (1 - headroom) / GIB


@pytest.mark.parametrize("planner", [fedpipe_plan, uniform_plan])
def test_a_base_too_large_for_one_device_is_split_over_them_and_one_that_fits_is_replicated(planner: Any) -> None:
    # Prepare: the memory of a pair of devices between what a split base and a replicated one need
    search = pair_search()
    options = replace(OPTIONS, search=search, batch_size=16, rank=8)
    modules = tuple(m.name for m in SPEC.candidates)
    pair = replace(profile(8.0), devices=(costmodel_device(0), costmodel_device(1)), allreduce_bytes_per_s=1e9)
    fitted = costmodel.fit(pair, SPEC)
    replicas = costmodel.Config(16, 8, Quantization.NONE, modules, dropout=0.0)
    layers = replace(replicas, placement=costmodel.LAYERS, batch_size=8 if planner is fedpipe_plan else 16)
    need = {
        c.placement: costmodel.predict(pair, SPEC, fitted, c, 64, 1e8).peak_memory_bytes for c in (replicas, layers)
    }
    assert need["layers"] < need["replicas"]
    tight = memory_between(need["layers"], need["replicas"], search.memory_headroom)
    small = replace(pair, total_memory_bytes=int(tight * GIB), free_memory_bytes=int(tight * GIB))

    # Execute
    roomy = planner({"pair": pair}, SPEC, options, 1)
    split = planner({"pair": small}, SPEC, options, 1)
    alone = planner({"one": replace(small, devices=())}, SPEC, options, 1)

    # Assert: replicas while the base fits each device; split by layers when only that fits, at the whole batch
    # through both devices (fedpipe: the search's per-device batch); an agent of one such device is left out
    assert roomy.plans["pair"].placement == costmodel.REPLICAS
    assert split.plans["pair"].placement == costmodel.LAYERS
    assert split.plans["pair"].plan_id != roomy.plans["pair"].plan_id
    if planner is fedpipe_plan:
        assert roomy.plans["pair"].batch_size == 16 and split.plans["pair"].batch_size == 8
        assert split.predictions["pair"].peak_memory_bytes <= split.predictions["pair"].usable_memory_bytes
        assert "one" in alone.excluded and not alone.plans
    else:
        assert alone.plans["one"].placement == costmodel.REPLICAS  # the uniform planner never leaves one out


def test_between_equal_configurations_the_planner_replicates_and_ferret_is_never_split() -> None:
    # Prepare: plenty of memory, and a slow agent that sets a round time in which the pair finishes either way
    pair = replace(profile(64.0), devices=(costmodel_device(0), costmodel_device(1)), allreduce_bytes_per_s=1e9)
    agents = {"pair": pair, "slow": profile(64.0, step_scale=50.0)}
    options = replace(OPTIONS, search=replace(pair_search(), batch_sizes=(4, 8)), deadline_s=1e6)

    # Execute
    lora = fedpipe_plan(agents, SPEC, options, 1)
    ferret = fedpipe_plan(agents, SPEC, replace(options, mode="ferret", directions=64), 1)

    # Assert
    assert lora.predictions["pair"].under_training == 0.0
    assert lora.plans["pair"].placement == costmodel.REPLICAS and lora.plans["pair"].batch_size == 16
    assert ferret.plans["pair"].placement == costmodel.REPLICAS and ferret.plans["pair"].batch_size == 8


def test_cpu_worker_processes_are_never_split_they_share_one_memory() -> None:
    # Prepare: two CPU workers with memory between what a split base and a replicated one would need
    workers = (Accelerator("cpu", "cpu", 8 * GIB, 5e10), Accelerator("cpu", "cpu", 8 * GIB, 5e10))
    pair = replace(profile(8.0), devices=workers, allreduce_bytes_per_s=1e9)
    search = pair_search()
    options = replace(OPTIONS, search=search, batch_size=16, rank=8)
    fitted = costmodel.fit(pair, SPEC)
    replicas = costmodel.Config(16, 8, Quantization.NONE, tuple(m.name for m in SPEC.candidates), dropout=0.0)
    layers = replace(replicas, placement=costmodel.LAYERS, batch_size=8)
    need = [costmodel.predict(pair, SPEC, fitted, c, 64, 1e8).peak_memory_bytes for c in (layers, replicas)]
    tight = memory_between(need[0], need[1], search.memory_headroom)
    small = replace(pair, total_memory_bytes=int(tight * GIB), free_memory_bytes=int(tight * GIB))

    # Execute
    fedpipe = fedpipe_plan({"pair": small}, SPEC, options, 1)
    uniform = uniform_plan({"pair": small}, SPEC, options, 1)

    # Assert: the fedpipe planner leaves it out rather than split it; the uniform planner replicates
    assert need[0] < need[1]
    assert "pair" in fedpipe.excluded and not fedpipe.plans
    assert uniform.plans["pair"].placement == costmodel.REPLICAS

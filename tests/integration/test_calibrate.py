"""Calibration runs and capped profiles on the real MiniLM (CPU)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from common.adapters import expected_tensors
from common.batching import encode
from common.data import DataSource, Example, embedded_split
from common.modeling import model_spec, resolve_model_path
from common.types import ModelSpec, Quantization
from edge_agent.calibrate import calibrate, calibration_plan, long_examples
from edge_agent.caps import Throttle, apply_memory_cap
from edge_agent.model import LocalModel
from edge_agent.profiler import peak_memory_bytes, profile, reset_peak_memory

LABELS = ("negative", "positive")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Setup:
    model: LocalModel
    spec: ModelSpec
    examples: list[Example]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread: on a host shared with other processes, OpenMP threads spin-waiting for a
    descheduled sibling make step times 20-50x slower at random, which is not what these tests measure."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup() -> Setup:
    path = resolve_model_path("embedded")
    return Setup(
        LocalModel(path, LABELS, CPU), model_spec(path, LABELS), embedded_split(DataSource("embedded"))[0][:64]
    )


@pytest.mark.integration
def test_calibration_measures_two_batch_sizes_and_leaves_a_usable_model(setup: Setup) -> None:
    # Other processes on a shared CPU can stall one of the two timed steps: a few tries tell that apart
    # from a step time that does not grow with the batch.
    for _ in range(3):
        points = calibrate(setup.model, setup.examples, setup.spec, (2, 8), 32, 8, 3, Throttle(1.0))
        if points[1].step_seconds > points[0].step_seconds:
            break

    small, large, shallow = points
    assert (small.batch_size, large.batch_size, shallow.batch_size) == (2, 8, 8)
    assert (small.layers, large.layers, shallow.layers) == (0, 0, 1)
    assert all(p.seq_len == 32 and p.rank == 8 and p.quantization is Quantization.NONE for p in points)
    assert large.step_seconds > small.step_seconds > 0
    assert large.peak_memory_bytes > small.peak_memory_bytes > 0
    # the shallow run (LoRA on the last layer only) keeps the activations of one layer, not of all
    assert 0 < shallow.peak_memory_bytes < large.peak_memory_bytes
    plan = calibration_plan(setup.spec, 2, 32, 8, 3)
    lora_and_heads = sum(torch.Size(info.shape).numel() for info in expected_tensors(plan, setup.spec))
    assert small.trainable_parameters == large.trainable_parameters == lora_and_heads
    last = calibration_plan(setup.spec, 8, 32, 8, 3, shallow=True)
    assert last.target_modules and all(".layer.5." in m for m in last.target_modules)
    shallow_params = sum(torch.Size(info.shape).numel() for info in expected_tensors(last, setup.spec))
    assert shallow.trainable_parameters == shallow_params < lora_and_heads
    adapted = setup.model.adapted
    assert adapted is not None
    trainable = sum(p.numel() for p in adapted.model.parameters() if p.requires_grad)
    assert trainable == shallow_params  # the count is what the optimizer really held (the last run's)
    assert setup.model.quantization is Quantization.NONE


@pytest.mark.integration
def test_calibration_batches_are_exactly_seq_len_tokens(setup: Setup) -> None:
    texts = long_examples(setup.model.tokenizer, [*setup.examples[:3], Example("", 1)], 8, 32)

    inputs = encode(setup.model.tokenizer, texts, 32, CPU)

    assert inputs["input_ids"].shape == (8, 32) and bool(inputs["attention_mask"].all())


def test_cpu_peak_memory_resets_to_the_current_resident_set() -> None:
    reset_peak_memory(CPU)
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    high = peak_memory_bytes(CPU)
    del block
    reset_peak_memory(CPU)
    assert high - peak_memory_bytes(CPU) > 32 * 2**20


def test_profile_reports_caps_and_measures_flops_under_the_throttle() -> None:
    capped = profile(CPU, torch.float32, 10, 2, memory_cap_bytes=2**30, compute_share=0.5)
    assert capped.total_memory_bytes == 2**30 and capped.free_memory_bytes <= 2**30
    assert capped.memory_cap_bytes == 2**30 and capped.compute_share == 0.5
    # Interleaved runs, and the best of each kind: other processes on a busy host only ever slow a run down, so
    # the fastest free and the fastest capped run are the two least disturbed, and their ratio is the throttle's.
    full = [profile(CPU, torch.float32, 10, 2).flops_per_s]
    throttled = [capped.flops_per_s]
    for _ in range(2):
        full.append(profile(CPU, torch.float32, 10, 2).flops_per_s)
        throttled.append(profile(CPU, torch.float32, 10, 2, compute_share=0.5).flops_per_s)
    assert 0.3 <= max(throttled) / max(full) <= 0.75, (full, throttled)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_cap_is_enforced_and_reported() -> None:
    device = torch.device("cuda:0")
    try:
        fraction = apply_memory_cap(device, 2**30)
        assert fraction is not None and 0 < fraction < 1
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
        measured = profile(device, torch.bfloat16, 1, 0, memory_cap_bytes=2**30)
        assert measured.total_memory_bytes == 2**30 and measured.memory_cap_bytes == 2**30
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()

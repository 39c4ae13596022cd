"""Step time and peak memory of SmolLM2-135M LoRA training at fp32, bf16, LLM.int8 and NF4 on this machine.

    .venv/bin/python bench/llm_quantization.py

Every variant runs in a fresh subprocess (this script again, with --variant), so the resident set and its
high-water mark belong to that variant alone. Each child sets torch to --threads (2) threads, loads the
embedded SmolLM2-135M-Instruct (`resolve_model_path("embedded-llm")`, the converted fp32 checkpoint) and
wraps it with peft LoRA through `common.modeling.AdaptedModel`: rank 8, alpha 16, dropout 0, on q_proj and
v_proj of all 30 layers. It then trains with the agent's own loop (`edge_agent.trainer.train_local`:
AdamW, gradient clipping, warm-up schedule) on batches of 4 instruction-formatted embedded tweets
(`common.data.embedded_split`, task causal-lm). Each tweet is repeated inside its instruction until
prompt + answer reach 96 tokens, and `encode_causal` cuts the prompt's beginning, so every batch is
exactly 4 x 96 tokens (checked before training). Variants:

* none-fp32: `load_base(..., Quantization.NONE, cpu)`, fp32 weights and compute. What FedPipe's
  "none" (nominally 16-bit) precision means on a CPU, where `compute_dtype` is fp32. The BASELINE.
* none-bf16: the same base loaded with dtype=bfloat16 (the literal 16-bit, as `load_base` does on a
  bf16 GPU). peft keeps the LoRA tensors in fp32 (its default autocast_adapter_dtype) and casts the
  input to them; the base matmuls run in bf16. --bf16-steps can shorten it on a CPU where bf16 is slow
  (on the benchmark machine it is not: it has AMX-BF16, so the default is the same 8 steps).
* int8: `load_base(..., Quantization.INT8, cpu)`: bitsandbytes LLM.int8 linear layers, fp32 elsewhere.
* nf4: `load_base(..., Quantization.NF4, cpu)`: NF4 with double quantization, fp32 compute.

Per child: load seconds (`load_base` or the bf16 equivalent); the lifetime high-water mark right after
loading (the load peak); the resident set before and after loading, each after gc and malloc_trim, the
latter after one read of every tensor: an fp32 base stays a lazy memory map of the checkpoint until a
step touches it. The weights' share is split into RssAnon and RssFile, and the resident part of the
model.safetensors mappings is read from /proc/self/smaps after loading and after training. Then 1
warm-up step + --steps measured steps. A step's time is the interval between
consecutive step ends (as edge_agent.calibrate measures), so the warm-up step is excluded. Peak memory
is `TrainResult.peak_memory_bytes`: VmHWM reset to the current RSS at the start of `train_local`
(edge_agent.profiler), so it is the whole process's resident peak during training, libraries and
weights included. A thread samples RssAnon and RssFile every 20 ms during training, for the split of
that peak (VmHWM has none). The loss of every step is kept; the last one must be finite. For context the
parent first measures square-matmul GFLOP/s in fp32 and bf16 (edge_agent.profiler.measure_flops).

The whole set runs --rounds times (2), the second round in reverse order, and the load average is
recorded before and after each child. Ratios are against none-fp32 of the same round, and of the
means over rounds. Writes bench/results/llm_quantization.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness import machine, write_result

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: common/ and edge_agent/ from this checkout

VARIANTS = ("none-fp32", "none-bf16", "int8", "nf4")
BASELINE = "none-fp32"
LABELS = ("negative", "positive")
TARGETS = ("q_proj", "v_proj")
RANK = 8
ALPHA = 16.0
LEARNING_RATE = 1e-4
MIB = 1024 * 1024
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
SAMPLE_PERIOD_S = 0.02  # RssAnon/RssFile sampling during training (VmHWM has no such split)


def status_bytes() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process now, in bytes (/proc/self/status)."""
    found: dict[str, int] = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in STATUS_FIELDS:
                found[key] = int(value.split()[0]) * 1024
    return found


def checkpoint_rss_bytes() -> int:
    """Resident bytes of this process's memory mappings of *.safetensors files (/proc/self/smaps)."""
    total = 0
    inside = False
    with open("/proc/self/smaps") as handle:
        for line in handle:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = len(head) >= 6 and head[-1].endswith(".safetensors")  # a mapping's header line
            elif inside and head[:1] == ["Rss:"]:
                total += int(head[1]) * 1024
    return total


def settle() -> dict[str, int]:
    """Memory figures after collecting garbage and giving freed heap back to the OS (glibc malloc_trim)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
    return status_bytes()


def touch(model: Any) -> None:
    """Read every parameter and buffer once, so memory-mapped checkpoint pages are resident, as after a step."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            torch.sum(tensor)


class Sampler(threading.Thread):
    """Samples VmRSS, RssAnon and RssFile every `period` seconds and keeps the largest of each."""

    def __init__(self, period: float) -> None:
        super().__init__(daemon=True)
        self.period = period
        self.done = threading.Event()
        self.peaks: dict[str, int] = dict.fromkeys(("VmRSS", "RssAnon", "RssFile"), 0)
        self.samples = 0

    def run(self) -> None:
        while not self.done.wait(self.period):
            now = status_bytes()
            self.samples += 1
            for key in self.peaks:
                self.peaks[key] = max(self.peaks[key], now.get(key, 0))

    def stop(self) -> dict[str, int]:
        self.done.set()
        self.join()
        return self.peaks


def bench_examples(tokenizer: Any, count: int, seq_len: int) -> list[Any]:
    """`count` embedded instruction tweets whose tweet is repeated until prompt + answer reach seq_len tokens."""
    from common.batching import prompt_ids, response_ids
    from common.data import SEQ_CLS, DataSource, embedded_split, instruct

    pool, _ = embedded_split(DataSource("embedded", labels=LABELS, task=SEQ_CLS))
    out = []
    for example in pool[:count]:
        tweet = example.text.strip()
        repeats = 1
        while True:
            item = instruct(replace(example, text=" ".join([tweet] * repeats)), LABELS)
            tokens = len(prompt_ids(tokenizer, item.text)) + len(response_ids(tokenizer, item.response))
            if tokens >= seq_len:
                break
            repeats += 1
        out.append(item)
    return out


def run_variant(variant: str, steps: int, batch_size: int, seq_len: int, threads: int) -> dict[str, Any]:
    """One variant in this (fresh) process: load, wrap, train 1 + steps steps; figures as a dict."""
    import torch

    torch.set_num_threads(threads)
    from common.adapters import head_modules
    from common.batching import encode
    from common.data import CAUSAL_LM
    from common.modeling import (
        AdaptedModel,
        auto_class,
        load_base,
        load_tokenizer,
        model_spec,
        resolve_model_path,
    )
    from common.types import Quantization, TrainPlan
    from edge_agent.trainer import train_local

    device = torch.device("cpu")
    path = resolve_model_path("embedded-llm")
    tokenizer = load_tokenizer(path)
    spec = model_spec(path, LABELS, task=CAUSAL_LM)
    modules = tuple(m.name for m in spec.candidates if m.name.rsplit(".", 1)[-1] in TARGETS)
    total = 1 + steps
    examples = bench_examples(tokenizer, batch_size * total, seq_len)
    loss_tokens = 0
    for i in range(0, len(examples), batch_size):
        inputs = encode(tokenizer, examples[i : i + batch_size], seq_len, device, CAUSAL_LM)
        if tuple(inputs["input_ids"].shape) != (batch_size, seq_len) or not bool(inputs["attention_mask"].all()):
            raise RuntimeError(f"batch {i // batch_size} is {tuple(inputs['input_ids'].shape)}, not full")
        loss_tokens += int((inputs["labels"][:, 1:] != -100).sum())

    quantization = Quantization.NONE if variant.startswith("none-") else Quantization(variant)
    before = settle()
    start = time.perf_counter()
    if variant == "none-bf16":
        base = auto_class(CAUSAL_LM).from_pretrained(path, dtype=torch.bfloat16)
        base.to(device)
        for param in base.parameters():
            param.requires_grad_(False)
    else:
        base = load_base(path, LABELS, quantization, device, task=CAUSAL_LM)
    load_seconds = time.perf_counter() - start
    load_peak = status_bytes()["VmHWM"]
    touch(base)
    after = settle()
    checkpoint_after_load = checkpoint_rss_bytes()
    footprint = int(base.get_memory_footprint())

    plan = TrainPlan(
        plan_id=f"bench-{variant}",
        target_modules=modules,
        rank_pattern=dict.fromkeys(modules, RANK),
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        modules_to_save=head_modules(spec),
        batch_size=batch_size,
        local_epochs=1,
        max_steps=total,
        learning_rate=LEARNING_RATE,
        weight_decay=0.0,
        quantization=quantization,
        max_seq_len=seq_len,
        deadline_s=math.inf,
        seed=0,
    )
    adapted = AdaptedModel(base, CAUSAL_LM)
    model = adapted.ensure(plan)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.requires_grad})
    rss_after_wrap = settle()

    stamps: list[float] = []
    losses: list[float] = []

    def on_step(samples: int, loss: float) -> None:
        stamps.append(time.perf_counter())
        losses.append(loss)

    sampler = Sampler(SAMPLE_PERIOD_S)
    sampler.start()
    began = time.perf_counter()
    result = train_local(
        model, tokenizer, examples, plan, device, math.inf, progress="off", on_step=on_step, task=CAUSAL_LM
    )
    sampled = sampler.stop()
    checkpoint_after_training = checkpoint_rss_bytes()
    step_seconds = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "variant": variant,
        "threads": torch.get_num_threads(),
        "target_modules": len(modules),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "adapter_dtype": str(trainable[0].dtype).removeprefix("torch."),
        "frozen_dtypes": frozen_dtypes,
        "load_seconds": load_seconds,
        "rss_before_load_bytes": before["VmRSS"],
        "rss_after_load_bytes": after["VmRSS"],
        "weights_rss_bytes": after["VmRSS"] - before["VmRSS"],
        "weights_anon_bytes": after["RssAnon"] - before["RssAnon"],
        "weights_file_bytes": after["RssFile"] - before["RssFile"],
        "model_footprint_bytes": footprint,
        "checkpoint_mapped_rss_after_load_bytes": checkpoint_after_load,
        "checkpoint_mapped_rss_after_training_bytes": checkpoint_after_training,
        "load_peak_rss_bytes": load_peak,
        "rss_after_wrap_bytes": rss_after_wrap["VmRSS"],
        "loss_tokens": loss_tokens,
        "steps": result.steps,
        "first_step_seconds": stamps[0] - began,
        "step_seconds": step_seconds,
        "mean_step_seconds": statistics.fmean(step_seconds),
        "min_step_seconds": min(step_seconds),
        "train_seconds": result.seconds,
        "peak_rss_bytes": result.peak_memory_bytes,
        "sampled_peak_rss_bytes": sampled["VmRSS"],
        "sampled_peak_anon_bytes": sampled["RssAnon"],
        "sampled_peak_file_bytes": sampled["RssFile"],
        "rss_samples": sampler.samples,
        "losses": losses,
        "final_loss": losses[-1],
        "loss_finite": all(math.isfinite(v) for v in losses),
    }


def spawn(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant in a fresh interpreter and return its figures."""
    steps = args.bf16_steps if variant == "none-bf16" else args.steps
    with tempfile.TemporaryDirectory(prefix="llm-quant-") as tmp:
        out = Path(tmp) / "result.json"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--variant",
            variant,
            "--child-output",
            str(out),
            "--steps",
            str(steps),
            "--batch-size",
            str(args.batch_size),
            "--seq-len",
            str(args.seq_len),
            "--threads",
            str(args.threads),
        ]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, check=False, timeout=args.timeout)
        wall = time.perf_counter() - started
        if done.returncode != 0 or not out.is_file():
            raise SystemExit(f"variant {variant} failed with exit code {done.returncode}")
        figures: dict[str, Any] = json.loads(out.read_text())
    figures["process_wall_seconds"] = wall
    return figures


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def summarize(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    """Per-variant means over rounds, and ratios against the baseline's means."""
    summary: dict[str, Any] = {}
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        summary[variant] = {
            "runs": len(mine),
            "mean_step_seconds": statistics.fmean(r["mean_step_seconds"] for r in mine),
            "min_step_seconds": min(r["min_step_seconds"] for r in mine),
            "peak_rss_bytes": statistics.fmean(r["peak_rss_bytes"] for r in mine),
            "weights_rss_bytes": statistics.fmean(r["weights_rss_bytes"] for r in mine),
            "load_seconds": statistics.fmean(r["load_seconds"] for r in mine),
            "load_peak_rss_bytes": statistics.fmean(r["load_peak_rss_bytes"] for r in mine),
            "sampled_peak_anon_bytes": statistics.fmean(r["sampled_peak_anon_bytes"] for r in mine),
            "sampled_peak_file_bytes": statistics.fmean(r["sampled_peak_file_bytes"] for r in mine),
        }
    if BASELINE in summary:
        base = summary[BASELINE]
        for figures in summary.values():
            figures["step_ratio"] = ratio(figures["mean_step_seconds"], base["mean_step_seconds"])
            figures["min_step_ratio"] = ratio(figures["min_step_seconds"], base["min_step_seconds"])
            figures["peak_ratio"] = ratio(figures["peak_rss_bytes"], base["peak_rss_bytes"])
    return summary


def print_table(runs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Runs first, then the means over rounds; memory in MiB."""
    header = (
        f"{'round':>5} {'variant':<10} {'loadavg':>7} {'load s':>6} {'weights':>7} {'load pk':>7} {'steps':>5} "
        f"{'mean s':>7} {'min s':>7} {'peak':>6} {'anon pk':>7} {'file pk':>7} {'x step':>6} {'x peak':>6} {'loss':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in runs:
        print(
            f"{r['round']:>5} {r['variant']:<10} {r['loadavg_before'][0]:>7.2f} {r['load_seconds']:>6.2f} "
            f"{r['weights_rss_bytes'] / MIB:>7.0f} {r['load_peak_rss_bytes'] / MIB:>7.0f} {len(r['step_seconds']):>5} "
            f"{r['mean_step_seconds']:>7.3f} {r['min_step_seconds']:>7.3f} {r['peak_rss_bytes'] / MIB:>6.0f} "
            f"{r['sampled_peak_anon_bytes'] / MIB:>7.0f} {r['sampled_peak_file_bytes'] / MIB:>7.0f} "
            f"{r.get('step_ratio', math.nan):>6.2f} {r.get('peak_ratio', math.nan):>6.2f} {r['final_loss']:>6.3f}"
        )
    print("-" * len(header))
    for variant, m in summary.items():
        print(
            f"{'mean':>5} {variant:<10} {'':>7} {m['load_seconds']:>6.2f} {m['weights_rss_bytes'] / MIB:>7.0f} "
            f"{m['load_peak_rss_bytes'] / MIB:>7.0f} {'':>5} {m['mean_step_seconds']:>7.3f} "
            f"{m['min_step_seconds']:>7.3f} "
            f"{m['peak_rss_bytes'] / MIB:>6.0f} {m['sampled_peak_anon_bytes'] / MIB:>7.0f} "
            f"{m['sampled_peak_file_bytes'] / MIB:>7.0f} {m.get('step_ratio', math.nan):>6.2f} "
            f"{m.get('peak_ratio', math.nan):>6.2f}"
        )


def matmul_gflops(threads: int) -> dict[str, float]:
    """Square-matmul GFLOP/s in fp32 and bf16 (edge_agent.profiler.measure_flops), for context."""
    import torch

    from edge_agent.profiler import measure_flops

    torch.set_num_threads(threads)
    out: dict[str, float] = {}
    for size in (512, 2048):
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            out[f"{name}_{size}"] = measure_flops(torch.device("cpu"), dtype, seconds=1.0, size=size) / 1e9
    return out


def main() -> int:
    """Run every variant in fresh subprocesses, round after round; print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="measured steps after the warm-up step")
    parser.add_argument("--bf16-steps", type=int, default=8, help="measured steps of none-bf16")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    parser.add_argument("--output", type=Path, default=RESULTS / "llm_quantization.json")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--child-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.bf16_steps < 1:
        parser.error("--steps and --bf16-steps must be at least 1 (the warm-up step comes on top)")

    if args.variant:
        figures = run_variant(args.variant, args.steps, args.batch_size, args.seq_len, args.threads)
        args.child_output.write_text(json.dumps(figures) + "\n")
        return 0

    from common.modeling import resolve_model_path

    path = resolve_model_path("embedded-llm")  # converts from GGUF once, outside the timed children
    variants: list[str] = list(args.variants)
    gflops = matmul_gflops(args.threads)
    print("matmul GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in gflops.items()), flush=True)
    runs: list[dict[str, Any]] = []
    for round_ in range(1, args.rounds + 1):
        order = variants if round_ % 2 else variants[::-1]
        for variant in order:
            before = os.getloadavg()
            print(f"round {round_}: {variant} (load average {before[0]:.2f})", flush=True)
            figures = spawn(variant, args)
            figures.update(round=round_, loadavg_before=list(before), loadavg_after=list(os.getloadavg()))
            print(
                f"  step {figures['mean_step_seconds']:.3f} s (min {figures['min_step_seconds']:.3f}), peak "
                f"{figures['peak_rss_bytes'] / MIB:.0f} MiB, load {figures['load_seconds']:.2f} s, "
                f"final loss {figures['final_loss']:.3f}",
                flush=True,
            )
            runs.append(figures)
    for run in runs:
        base = [r for r in runs if r["round"] == run["round"] and r["variant"] == BASELINE]
        if base:
            run["step_ratio"] = ratio(run["mean_step_seconds"], base[0]["mean_step_seconds"])
            run["peak_ratio"] = ratio(run["peak_rss_bytes"], base[0]["peak_rss_bytes"])
    runs.sort(key=lambda r: (r["round"], variants.index(r["variant"])))
    summary = summarize(runs, variants)
    print()
    print_table(runs, summary)
    bad = [f"{r['variant']} round {r['round']}" for r in runs if not r["loss_finite"]]
    if bad:
        print(f"NON-FINITE LOSS: {', '.join(bad)}")

    executable = Path(sys.executable)
    with contextlib.suppress(ValueError):
        executable = executable.relative_to(ROOT)
    result = {
        "benchmark": "llm_quantization",
        "command": " ".join([executable.as_posix(), Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {
            "model": "embedded-llm (SmolLM2-135M-Instruct, converted fp32 checkpoint)",
            "model_path": path,
            "task": "causal-lm, embedded tweets as instructions (labels negative/positive)",
            "lora": {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "targets": list(TARGETS), "layers": "all 30"},
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "optimizer": f"AdamW via edge_agent.trainer.train_local, lr {LEARNING_RATE}, weight decay 0",
            "steps": {"warmup": 1, "measured": args.steps, "measured_none_bf16": args.bf16_steps},
            "threads": args.threads,
            "rounds": args.rounds,
            "order": "round 1 as listed, round 2 reversed, and so on",
            "baseline": BASELINE,
            "step_seconds": "interval between consecutive step ends (the warm-up step excluded)",
            "peak_rss": "VmHWM reset at the start of train_local (edge_agent.profiler): whole-process peak",
            "weights_rss": (
                "VmRSS after load and one read of every tensor minus VmRSS before load, each after gc and "
                "malloc_trim; split into RssAnon and RssFile (memory-mapped checkpoint pages)"
            ),
            "checkpoint_mapped_rss": "Rss of the model.safetensors mappings in /proc/self/smaps (part of RssFile)",
            "sampled_peaks": f"largest RssAnon / RssFile sampled every {SAMPLE_PERIOD_S} s during train_local",
        },
        "machine": machine(),
        "matmul_gflops": gflops,
        "summary": summary,
        "runs": runs,
    }
    write_result(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

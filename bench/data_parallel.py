"""Step time and samples/s of one data-parallel agent at 1 and 2 processes (CPU: gloo; CUDA: NCCL).

    .venv/bin/python bench/data_parallel.py                 # --models embedded embedded-llm, --steps 12

Each arm trains the same LoRA plan (every candidate at rank 8, batch 16, 64 tokens, AdamW, no dropout) with
the agent's own loop (edge_agent.trainer.train_local) through edge_agent.parallel.DeviceGroup, the code an
agent started with --nproc runs. Arms on a CPU host of C cores:

* one process, C threads (the baseline: an ordinary agent using the whole host);
* two processes, C / 2 threads each (--nproc 2);
* one process, C / 2 threads (what one of the two ranks would do alone: the scaling reference).

A step's time is the interval between consecutive step ends, median over the steps after the first two;
samples/s = batch / step time. On CUDA (--devices cuda:0,cuda:1) the arms are one GPU, two GPUs data-parallel,
and the base split by layers over the two in one process (placement "layers", what the planner gives a base too
large for one GPU). Writes bench/results/data_parallel.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def plan_for(spec: Any, steps: int, batch: int, seq_len: int, rank: int = 8, quantization: str = "none") -> Any:
    """A LoRA plan at `rank` on every candidate of spec (alpha 2 x rank, no dropout), its heads trained in full."""
    from common.types import Quantization, TrainPlan

    modules = tuple(m.name for m in spec.candidates)
    heads = tuple(sorted({name.split(".")[0] for name, _ in spec.heads}))
    return TrainPlan(
        plan_id="bench", target_modules=modules, rank_pattern=dict.fromkeys(modules, rank), lora_alpha=2.0 * rank,
        lora_dropout=0.0, modules_to_save=heads, batch_size=batch, local_epochs=1000, max_steps=steps,
        learning_rate=1e-4, weight_decay=0.0, quantization=Quantization(quantization), max_seq_len=seq_len,
        deadline_s=3600.0, seed=0,
    )  # fmt: skip


def examples_for(task: str, count: int) -> list[Any]:
    """The first `count` embedded training tweets, as instructions for a causal LM."""
    from common.data import EMBEDDED_LABELS, DataSource, embedded_split, instruct

    tweets = embedded_split(DataSource("embedded"))[0][:count]
    return [instruct(e, EMBEDDED_LABELS) for e in tweets] if task == "causal-lm" else list(tweets)


def arm(
    model_name: str, devices: list[torch.device], threads: int, args: argparse.Namespace, placement: str = "replicas"
) -> dict[str, Any]:
    """One arm: train the plan on these devices (one process when there is one device, or when the base is split
    by layers over them), time its steps."""
    from safetensors.torch import save

    from common.modeling import layer_split, model_spec, resolve_model_path
    from edge_agent.collective import Collective
    from edge_agent.model import LocalModel
    from edge_agent.parallel import DeviceGroup, Job
    from edge_agent.trainer import train_local

    task = "causal-lm" if model_name == "embedded-llm" else "seq-cls"
    labels = () if task == "causal-lm" else ("negative", "positive")
    path = resolve_model_path(model_name)
    plan = plan_for(model_spec(path, labels, task=task), args.steps, args.batch, args.seq_len)
    examples = examples_for(task, args.batch * args.steps)
    torch.set_num_threads(threads)
    model = LocalModel(path, labels, devices[0], task)
    split = None
    if placement == "layers":
        split = layer_split(devices, [torch.cuda.mem_get_info(d)[1] for d in devices])
    adapted = model.prepare(plan, split)
    start = adapted.extract()
    stamps: list[float] = []

    def rank0(collective: Collective | None) -> Any:
        return train_local(
            adapted.model, model.tokenizer, examples, plan, devices[0], time.monotonic() + 3600, "off",
            on_step=lambda *_: stamps.append(time.perf_counter()), task=task, group=collective,
        )  # fmt: skip

    group = None
    if len(devices) > 1 and split is None:
        group = DeviceGroup(devices, threads, 1.0, 600.0)
        group.start()
        tensors = save({k: v.contiguous().clone() for k, v in start.items()})
        job = Job((path, labels, task), id(examples), plan, tensors, task)
        result = group.train(job, examples, rank0)
    else:
        result = rank0(None)
    steps = [b - a for a, b in itertools.pairwise(stamps)][1:]  # the first two steps warm up
    step = statistics.median(steps)
    record = {
        "model": model_name,
        "processes": 1 if split is not None else len(devices),
        "devices": len(devices),
        "placement": placement,
        "threads_per_process": threads,
        "steps": result.steps,
        "step_seconds": step,
        "step_seconds_spread": [min(steps), max(steps)],
        "samples_per_second": args.batch / step,
        "allreduce_bytes_per_s": group.allreduce_bytes_per_s if group else None,
        "peak_memory_bytes": result.peak_memory_bytes,
        "final_loss": result.mean_loss,
    }
    if group is not None:
        group.close()
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["embedded", "embedded-llm"])
    parser.add_argument("--devices", default="", help="CUDA devices for the two-process arm, e.g. cuda:0,cuda:1")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "data_parallel.json")
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    runs = []
    for model_name in args.models:
        if args.devices:
            two = [torch.device(d) for d in args.devices.split(",")]
            arms = [([two[0]], 0, "replicas"), (two, 0, "replicas"), (two, 0, "layers")]
        else:
            cpu = torch.device("cpu")
            arms = [
                ([cpu], cores, "replicas"),
                ([cpu, cpu], max(1, cores // 2), "replicas"),
                ([cpu], max(1, cores // 2), "replicas"),
            ]
        for devices, threads, placement in arms:
            record = arm(model_name, devices, threads or torch.get_num_threads(), args, placement)
            print(json.dumps(record), flush=True)
            runs.append(record)
    for model_name in args.models:
        base = next(r for r in runs if r["model"] == model_name)
        for r in runs:
            if r["model"] == model_name:
                r["speedup_vs_first"] = r["samples_per_second"] / base["samples_per_second"]
    result = {"machine": {"cpus": cores, "torch": torch.__version__}, "settings": vars(args) | {"output": None},
              "runs": runs}  # fmt: skip
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    for r in runs:
        print(f"{r['model']:>13} {r['placement']:>8} {r['devices']} dev {r['processes']} proc x "
              f"{r['threads_per_process']} threads: "
              f"{r['step_seconds']:.3f} s/step, {r['samples_per_second']:.1f} samples/s, "
              f"x{r['speedup_vs_first']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make gpu-check`: what FedPipe does on one CUDA GPU, in one prepared run of a few minutes.

    .venv/bin/python bench/gpu_check.py            # needs CUDA; --allow-cpu --quick is the CI smoke run

Parts, each recorded in one JSON file (--out, default runs/gpu-check/gpu_check.json) and a short Markdown
table beside it (gpu_check.md):

1. tests: the `gpu`-marked tests (pytest -m gpu).
2. precisions: LoRA training of each base at 16-bit (bf16 where the GPU has it), LLM.int8 and NF4, every
   variant in a fresh process: load seconds, median step seconds after one warm-up step, samples/s, peak
   CUDA memory (torch.cuda.max_memory_allocated, what the agent reports), and the cost model's formula
   prediction for the same configuration (no calibration: what the planner assumes before any measurement).
   Bases: the embedded SmolLM2-135M, and LLaMA shapes with random weights built from a config (1B: 2048
   wide, 22 layers, TinyLlama's shape; 7B with --shapes 7b, LLaMA-2-7B's shape, NF4 only unless --all-7b):
   memory and speed need no trained weights.
3. federations: a coordinator and two agents on the same GPU, the second capped in memory and compute so
   the planner gives them different plans, once per base precision (planning.quantizations [none], [int8],
   [nf4]) on the embedded causal LM: per agent and round the planned against the measured peak CUDA memory,
   and the profile's measured FLOP/s against the device's nominal bf16 figure where it is known.
4. data-parallel, on a host with two GPUs or more: bench/data_parallel.py --devices cuda:0,cuda:1 (one
   agent's step time and samples/s on one GPU, on two with NCCL, and with the base split by layers over the
   two), its output kept under "data_parallel".

On a CPU (--allow-cpu, for CI) every part runs the same code at toy sizes (--quick): the tests part is
skipped there, the precisions run on a tiny random LLaMA, and one federation runs one round.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core FLOP/s from the vendors' data sheets (no sparsity), by a name fragment of
# torch.cuda.get_device_name(); a device not listed gets no ratio.
NOMINAL_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
                "RTX 4090": 165e12, "RTX 6000 Ada": 364e12}  # fmt: skip
SHAPES = {  # LLaMA shapes: hidden, intermediate, layers, heads, key-value heads
    "tiny": (128, 344, 2, 4, 2),
    "1b": (2048, 5632, 22, 32, 4),
    "7b": (4096, 11008, 32, 32, 32),
}
QUANTIZATIONS = ("none", "int8", "nf4")


def nominal_flops(name: str) -> float | None:
    """The data sheet's dense bf16 FLOP/s of a GPU by its name, when known."""
    for fragment, flops in NOMINAL_BF16.items():
        if fragment in name:
            return flops
    return None


def random_llama(shape: str, directory: Path, device: str) -> Path:
    """A LLaMA of `shape` with random weights, saved with the embedded LLM's tokenizer (a real vocabulary)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from common.modeling import resolve_model_path

    target = directory / f"llama-{shape}"
    if (target / "config.json").is_file():
        return target
    hidden, intermediate, layers, heads, kv_heads = SHAPES[shape]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded-llm"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: a 7B shape in fp32 would take twice the memory first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del model
    return target


def model_path(base: str, work: Path, device: str) -> str:
    from common.modeling import resolve_model_path

    return resolve_model_path("embedded-llm") if base == "smollm2" else str(random_llama(base, work, device))


def run_variant(base: str, quantization: str, device_name: str, steps: int, batch: int, seq_len: int) -> dict[str, Any]:
    """One base at one precision, in this (fresh) process: load, train, measure."""
    import torch
    from data_parallel import examples_for, plan_for

    from common.data import CAUSAL_LM
    from common.modeling import AdaptedModel, compute_dtype, load_base, load_tokenizer, model_spec
    from common.types import Quantization
    from coordinator import costmodel
    from edge_agent.profiler import profile
    from edge_agent.trainer import train_local

    device = torch.device(device_name)
    work = Path(os.environ.get("FEDPIPE_GPU_CHECK_WORK", tempfile.gettempdir()))
    path = model_path(base, work, device_name)
    spec = model_spec(path, (), task=CAUSAL_LM)
    level = Quantization(quantization)
    start = time.perf_counter()
    model = AdaptedModel(load_base(path, (), level, device, CAUSAL_LM), CAUSAL_LM)
    load_seconds = time.perf_counter() - start
    modules = tuple(m.name for m in spec.candidates)
    plan = plan_for(spec, steps + 1, batch, seq_len, rank=16, quantization=quantization)  # + the warm-up step
    trained_model = model.ensure(plan)
    tokenizer = load_tokenizer(path)
    examples = examples_for(CAUSAL_LM, batch * (steps + 1))
    stamps: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = train_local(
        trained_model, tokenizer, examples, plan, device, time.monotonic() + 3600, "off",
        on_step=lambda *_: stamps.append(time.perf_counter()), task=CAUSAL_LM,
    )  # fmt: skip
    step_times = [b - a for a, b in itertools.pairwise(stamps)]  # the first step is the warm-up
    measured = profile(device, compute_dtype(device), len(examples), 0)
    fitted = costmodel.fit(measured, spec)
    config = costmodel.Config(batch_size=batch, rank=16, quantization=level, modules=modules, dropout=0.0)
    predicted = costmodel.predict(measured, spec, fitted, config, seq_len, 1e9)
    step = statistics.median(step_times) if step_times else result.seconds / max(1, result.steps)
    return {
        "base": base,
        "quantization": quantization,
        "parameters": spec.base_parameters,
        "load_seconds": round(load_seconds, 3),
        "steps": result.steps,
        "step_seconds": step,
        "samples_per_second": batch / step,
        "peak_memory_bytes": result.peak_memory_bytes,
        "formula_peak_memory_bytes": int(predicted.peak_memory_bytes),
        "formula_step_seconds": predicted.step_seconds,
        "final_loss": result.mean_loss,
        "compute_dtype": str(compute_dtype(device)).removeprefix("torch."),
    }


def spawn_variant(base: str, quantization: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """run_variant in a child process: a fresh CUDA allocator and resident set per variant."""
    command = [sys.executable, __file__, "--variant", f"{base}:{quantization}", "--device", args.device,
               "--steps", str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len)]  # fmt: skip
    env = {**os.environ, "FEDPIPE_GPU_CHECK_WORK": str(work), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'proto'}"}
    start = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout)
    if proc.returncode != 0:
        return {"base": base, "quantization": quantization, "error": proc.stderr[-2000:]}
    record: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    record["wall_seconds"] = round(time.monotonic() - start, 1)
    return record


def federation_config(quantization: str, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Two agents on one device; the second with a tight memory cap and half the compute."""
    calibration = {"seq_len": args.seq_len, "steps": 2, "enabled": not args.quick}  # quick: the formulas
    data = {"max_samples": 8 * args.batch * args.steps, "val_fraction": 0.1}
    agent = {"threads": 2, "device": args.device, "data": data, "calibration": calibration}
    return {
        "coordinator": {
            "planner": "fedpipe",
            "run": {"rounds": args.rounds, "min_agents": 2, "run_dir": str(run_dir), "round_deadline_s": 600,
                    "registration_timeout_s": 600, "finish_grace_s": 5},
            "model": {"path": "embedded-llm"},
            "lora": {"rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "selection": {"mode": "all"},
            "training": {"max_seq_len": args.seq_len, "max_steps": args.steps, "learning_rate": 1e-4},
            "planning": {"quantizations": [quantization]},
            "evaluation": {"agents": False, "initial": False, "heldout": None},
        },
        "agents": {
            "count": 2,
            "config": {**agent, "model": {"path": "embedded-llm"}},
            "overrides": {"agent-1": {"memory_limit": args.memory_limit},
                          "agent-2": {"memory_limit": args.tight_memory_limit, "compute_share": 0.5}},
        },
    }  # fmt: skip


def run_federation(quantization: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One federation through the console scripts; per agent and round the planned and measured figures."""
    import yaml

    run_dir = work / f"federation-{quantization}"
    config = work / f"federation-{quantization}.yaml"
    config.write_text(yaml.safe_dump(federation_config(quantization, run_dir, args)))
    command = [sys.executable, str(ROOT / "deploy" / "local_federation.py"), "--config", str(config),
               "--run-dir", str(run_dir), "--timeout", str(args.timeout)]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout + 60)
    record: dict[str, Any] = {"quantization": quantization, "wall_seconds": round(time.monotonic() - start, 1)}
    if proc.returncode != 0:
        record["error"] = (proc.stdout + proc.stderr)[-3000:]
        return record
    agents: dict[str, Any] = {}
    for round_dir in sorted((run_dir / "rounds").glob("[0-9]*")):
        plans = json.loads((round_dir / "plans.json").read_text())
        for agent, entry in plans.items():
            plan = entry["plan"]
            peak = (entry.get("measured") or {}).get("peak_memory_bytes")
            planned = (entry.get("predicted") or {}).get("peak_memory_bytes")
            agents.setdefault(agent, []).append({
                "round": int(round_dir.name), "batch_size": plan["batch_size"], "quantization": plan["quantization"],
                "max_rank": max(plan["rank_pattern"].values(), default=0), "planned_peak_bytes": planned,
                "measured_peak_bytes": peak,
                "error": (planned - peak) / peak if planned and peak else None,
            })  # fmt: skip
    record["agents"] = agents
    record["profiles"] = profiles_of(run_dir)
    return record


def profiles_of(run_dir: Path) -> dict[str, Any]:
    """Each agent's registered device, memory and measured FLOP/s (from the run's agents.json)."""
    path = run_dir / "agents.json"
    if not path.is_file():
        return {}
    found = {}
    for agent, profile in json.loads(path.read_text()).get("profiles", {}).items():
        flops = profile.get("flops_per_s")
        nominal = nominal_flops(str(profile.get("device_name", "")))
        found[agent] = {"device_name": profile.get("device_name"), "flops_per_s": flops,
                        "total_memory_bytes": profile.get("total_memory_bytes"),
                        "share_of_nominal": flops / nominal if flops and nominal else None}  # fmt: skip
    return found


def run_data_parallel(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """bench/data_parallel.py on cuda:0 and cuda:0,cuda:1 (SmolLM2); its JSON, or the error."""
    output = work / "data_parallel.json"
    command = [sys.executable, str(ROOT / "bench" / "data_parallel.py"), "--models", "embedded-llm",
               "--devices", "cuda:0,cuda:1", "--output", str(output)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'proto'}"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout)
    if proc.returncode != 0 or not output.is_file():
        return {"error": (proc.stdout + proc.stderr)[-3000:]}
    result: dict[str, Any] = json.loads(output.read_text())
    return result


def run_tests(timeout: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)  # fmt: skip
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return {"returncode": proc.returncode, "summary": tail}


def table(report: dict[str, Any]) -> str:
    """The short Markdown summary."""
    mib = 2**20
    lines = [f"# gpu-check on {report['device_name']} (torch {report['torch']}, CUDA {report['cuda']})", ""]
    if "tests" in report:
        lines += [f"gpu tests: {report['tests']['summary']} (exit {report['tests']['returncode']})", ""]
    lines += [
        "| base | precision | load s | step s | samples/s | peak MiB | formula MiB |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for v in report["precisions"]:
        if "error" in v:
            lines.append(f"| {v['base']} | {v['quantization']} | failed | | | | |")
            continue
        lines.append(f"| {v['base']} | {v['quantization']} | {v['load_seconds']:.1f} | {v['step_seconds']:.3f} | "
                     f"{v['samples_per_second']:.1f} | {v['peak_memory_bytes'] / mib:.0f} | "
                     f"{v['formula_peak_memory_bytes'] / mib:.0f} |")  # fmt: skip
    lines += ["", "| federation | agent | round | batch | rank | planned MiB | measured MiB | error |",
              "|---|---|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    for federation in report["federations"]:
        if "error" in federation:
            lines.append(f"| {federation['quantization']} | failed | | | | | | |")
            continue
        for agent, rounds in sorted(federation["agents"].items()):
            for r in rounds:
                planned = f"{r['planned_peak_bytes'] / mib:.0f}" if r["planned_peak_bytes"] else "-"
                peak = f"{r['measured_peak_bytes'] / mib:.0f}" if r["measured_peak_bytes"] else "-"
                error = f"{r['error']:+.1%}" if r["error"] is not None else "-"
                lines.append(f"| {federation['quantization']} | {agent} | {r['round']} | {r['batch_size']} | "
                             f"{r['max_rank']} | {planned} | {peak} | {error} |")  # fmt: skip
    parallel = report.get("data_parallel")
    if parallel and "runs" in parallel:
        lines += ["", "| model | placement | devices | s/step | samples/s | ratio |", "|---|---|--:|--:|--:|--:|"]
        for r in parallel["runs"]:
            lines.append(f"| {r['model']} | {r['placement']} | {r['devices']} | {r['step_seconds']:.3f} | "
                         f"{r['samples_per_second']:.1f} | {r['speedup_vs_first']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--allow-cpu", action="store_true", help="run on a CPU (the CI smoke run)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: a tiny LLaMA, one federation round")
    parser.add_argument("--shapes", nargs="*", default=["1b"], choices=[s for s in SHAPES if s != "tiny"])
    parser.add_argument("--all-7b", action="store_true", help="the 7B shape at every precision, not NF4 only")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory-limit", default="16GiB", help="agent-1's cap")
    parser.add_argument("--tight-memory-limit", default="1.5GiB", help="agent-2's cap")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--timeout", type=float, default=600.0, help="per child process or federation")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: BASE:QUANT in a child
    args = parser.parse_args()
    if args.variant:
        base, quantization = args.variant.split(":")
        record = run_variant(base, quantization, args.device, args.steps, args.batch, args.seq_len)
        print(json.dumps(record))
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        if not args.allow_cpu:
            print(f"gpu-check: torch {torch.__version__} sees no CUDA device. Install a CUDA build first, e.g. "
                  "make gpu-check GPU_TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'",
                  file=sys.stderr)  # fmt: skip
            return 2
        args.device = "cpu"
    if args.quick:
        args.steps, args.batch, args.seq_len, args.rounds, args.shapes = 2, 2, 32, 1, []
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    work.mkdir(exist_ok=True)
    cuda = args.device.startswith("cuda")
    report: dict[str, Any] = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "settings": {k: str(v) for k, v in vars(args).items() if k != "variant"},
    }
    began = time.monotonic()
    if cuda and not args.skip_tests:
        print("gpu-check: the gpu-marked tests", flush=True)
        report["tests"] = run_tests(args.timeout)
    variants = [(b, q) for b in (["tiny"] if args.quick else ["smollm2", *args.shapes]) for q in QUANTIZATIONS]
    variants = [(b, q) for b, q in variants if b != "7b" or q == "nf4" or args.all_7b]
    if args.quick:
        variants = [("tiny", "none"), ("tiny", "nf4")]
    report["precisions"] = []
    for base, quantization in variants:
        print(f"gpu-check: {base} at {quantization}", flush=True)
        report["precisions"].append(spawn_variant(base, quantization, args, work))
    report["federations"] = []
    for quantization in ("none",) if args.quick else QUANTIZATIONS:
        print(f"gpu-check: federation with {quantization} bases", flush=True)
        report["federations"].append(run_federation(quantization, args, work))
    if cuda and torch.cuda.device_count() >= 2:
        print("gpu-check: one agent on one GPU and on two", flush=True)
        report["data_parallel"] = run_data_parallel(args, work)
    report["seconds"] = round(time.monotonic() - began, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(table(report))
    print(table(report), flush=True)
    failed = [
        v for v in [*report["precisions"], *report["federations"], report.get("data_parallel", {})] if "error" in v
    ]
    tests_failed = report.get("tests", {}).get("returncode", 0) not in (0, 5)  # 5: no gpu test collected
    return 1 if failed or tests_failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Seconds to aggregate one round of LoRA updates at mixed ranks, per strategy, against a memcpy of the same bytes.

Settings (fixed before the first run):

* minilm: 100 updates of MiniLM-L6 all-linear adapters (6 layers x query, key, value, attention output
  384x384, intermediate 384->1536, output 1536->384), ranks cycling 4, 8, 16, weights 1-3, over a rank-16
  global;
* llama7b: 16 updates of a LLaMA-7B-shaped q,v adapter (32 layers x q_proj, v_proj, 4096x4096), ranks
  cycling 8, 16, 32, 64, over a rank-64 global.

Random float32 factors (B scaled by 0.01, as trained B is small), seeded. Per case and strategy: the best of
`--repeats` aggregations (default 3 for minilm, 1 for llama7b) and the same for copying every update's bytes
once (torch.Tensor.clone of each factor), and their ratio. Writes bench/results/aggregation_speed.json.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from harness import ROOT, machine, write_result

from common.adapters import FoldedUpdate, GlobalAdapter, LoraPair
from coordinator.strategy import get_strategy

Shapes = dict[str, tuple[int, int]]  # module -> (d_out, d_in)


def minilm_shapes() -> Shapes:
    shapes: Shapes = {}
    for layer in range(6):
        for name, shape in {
            "attention.self.query": (384, 384),
            "attention.self.key": (384, 384),
            "attention.self.value": (384, 384),
            "attention.output.dense": (384, 384),
            "intermediate.dense": (1536, 384),
            "output.dense": (384, 1536),
        }.items():
            shapes[f"encoder.layer.{layer}.{name}"] = shape
    return shapes


def llama_shapes() -> Shapes:
    return {f"model.layers.{i}.self_attn.{p}": (4096, 4096) for i in range(32) for p in ("q_proj", "v_proj")}


def random_pair(generator: torch.Generator, shape: tuple[int, int], rank: int) -> LoraPair:
    d_out, d_in = shape
    a = torch.randn(rank, d_in, generator=generator)
    return LoraPair(a=a, b=torch.randn(d_out, rank, generator=generator) * 0.01)


def build(
    shapes: Shapes, count: int, ranks: tuple[int, ...], global_rank: int
) -> tuple[GlobalAdapter, list[FoldedUpdate]]:
    generator = torch.Generator().manual_seed(0)
    lora = {m: random_pair(generator, s, global_rank) for m, s in shapes.items()}
    updates = [
        FoldedUpdate(
            agent_id=f"agent-{i}",
            weight=float(1 + i % 3),
            lora={m: random_pair(generator, s, ranks[i % len(ranks)]) for m, s in shapes.items()},
            heads={},
        )
        for i in range(count)
    ]
    return GlobalAdapter(round=1, lora=lora, heads={}), updates


def best_of(repeats: int, work: Callable[[], Any]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def copy_all(updates: list[FoldedUpdate]) -> None:
    for update in updates:
        for pair in update.lora.values():
            pair.a.clone()
            pair.b.clone()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("minilm", "llama7b"), default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--strategies", default="rank-padding,slot-average,flexlora,hetlora", help="comma-separated strategy names"
    )
    args = parser.parse_args()
    cases = {
        "minilm": (minilm_shapes(), 100, (4, 8, 16), 16, 3),
        "llama7b": (llama_shapes(), 16, (8, 16, 32, 64), 64, 1),
    }
    results: dict[str, Any] = {}
    for name, (shapes, count, ranks, global_rank, repeats) in cases.items():
        if args.only and name != args.only:
            continue
        global_, updates = build(shapes, count, ranks, global_rank)
        nbytes = sum(p.a.nbytes + p.b.nbytes for u in updates for p in u.lora.values())
        memcpy = best_of(args.repeats or repeats, partial(copy_all, updates))
        entry: dict[str, Any] = {
            "updates": count,
            "modules": len(shapes),
            "ranks": list(ranks),
            "global_rank": global_rank,
            "update_bytes": nbytes,
            "memcpy_seconds": memcpy,
            "strategies": {},
        }
        for strategy_name in args.strategies.split(","):
            strategy = get_strategy(strategy_name)
            seconds = best_of(args.repeats or repeats, partial(strategy, global_, updates))
            entry["strategies"][strategy_name] = {"seconds": seconds, "vs_memcpy": seconds / memcpy}
            print(
                f"{name}: {strategy_name:13s} {seconds:8.3f}s  ({seconds / memcpy:7.1f}x a memcpy of "
                f"{nbytes / 2**20:.0f} MiB, {memcpy:.3f}s)",
                flush=True,
            )
        results[name] = entry
    write_result(ROOT / "bench" / "results" / "aggregation_speed.json", {"machine": machine(), "cases": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

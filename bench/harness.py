"""Pieces the benchmarks share: a variant (coordinator keys over a base config), a deep merge, the machine's
description and the results file."""

from __future__ import annotations

import copy
import json
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Variant:
    """One arm of a benchmark: coordinator overrides on top of the shared base config."""

    name: str
    description: str
    coordinator: dict[str, Any]


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of two config mappings; override wins."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def machine() -> dict[str, Any]:
    """What ran the benchmark: platform, Python and the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": cpus}


def write_result(path: Path, result: Mapping[str, Any]) -> None:
    """The benchmark's JSON results, and a line saying where they went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")

"""Pieces the federation benchmarks share: a variant (coordinator keys over a base config) and a deep merge."""

from __future__ import annotations

import copy
from dataclasses import dataclass
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

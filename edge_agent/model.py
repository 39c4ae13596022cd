"""The agent's model: the base loaded once at the planned quantization, with the plan's LoRA layout."""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import torch

from common.data import SEQ_CLS
from common.modeling import AdaptedModel, load_base, load_tokenizer
from common.types import Quantization, TrainPlan

log = logging.getLogger(__name__)


class LocalModel:
    """Keeps the base model across rounds; reloads it only when the plan's quantization or placement changes (or,
    for the Ferret mode, the blocks held in full precision). One base is loaded at a time."""

    def __init__(self, path: str, labels: tuple[str, ...], device: torch.device, task: str = SEQ_CLS) -> None:
        self.path = path
        self.labels = labels
        self.device = device
        self.task = task
        self.tokenizer: Any = load_tokenizer(path)
        self.quantization: Quantization | None = None
        self.split: dict[str, Any] | None = None  # the loaded base's layer split (common.modeling.layer_split)
        self.adapted: AdaptedModel | None = None
        self.full: Any = None  # the Ferret mode's base: (quantization, held blocks) -> model
        self.full_key: tuple[Quantization, tuple[str, ...]] | None = None

    def _free(self) -> None:
        self.adapted, self.split = None, None
        self.full, self.full_key = None, None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def release(self) -> None:
        """Free the loaded base's weights (another base trains now); the tokenizer stays, the weights reload on
        the next plan."""
        self._free()

    def full_at(self, quantization: Quantization, blocks: tuple[str, ...]) -> tuple[Any, bool]:
        """The base at this quantization with `blocks` in float32 (trained in full), and whether it was just
        loaded (so it holds the checkpoint's weights, not the run's)."""
        key = (quantization, tuple(sorted(blocks)))
        if self.full is not None and key == self.full_key:
            return self.full, False
        self._free()
        start = time.perf_counter()
        self.full = load_base(self.path, self.labels, quantization, self.device, self.task, full_precision=key[1])
        self.full_key = key
        self.quantization = None  # base_at must load its own again
        log.info(
            "model: loaded %s at %s with %d blocks in float32 on %s in %.1fs",
            self.path,
            quantization.value,
            len(blocks),
            self.device,
            time.perf_counter() - start,
        )
        return self.full, True

    def base_at(self, quantization: Quantization, split: dict[str, Any] | None = None) -> AdaptedModel:
        """The model at this quantization (split: by layers over several devices, common.modeling.layer_split),
        loading the base only when the precision or the placement changes."""
        if self.adapted is None or quantization is not self.quantization or split != self.split:
            self._free()
            start = time.perf_counter()
            base = load_base(self.path, self.labels, quantization, self.device, self.task, split=split)
            self.adapted = AdaptedModel(base, self.task)
            self.quantization, self.split = quantization, split
            placed = getattr(base, "hf_device_map", None) if split is not None else None
            where = f"split over {sorted(set(map(str, placed.values())))}" if placed else f"on {self.device}"
            log.info(
                "model: loaded %s at %s %s in %.1fs", self.path, quantization.value, where, time.perf_counter() - start
            )
        return self.adapted

    def prepare(self, plan: TrainPlan, split: dict[str, Any] | None = None) -> AdaptedModel:
        """The model for this plan, with its LoRA layout applied (tensors still to be loaded); split: where a
        "layers" plan's base goes."""
        adapted = self.base_at(plan.quantization, split)
        adapted.ensure(plan)
        return adapted

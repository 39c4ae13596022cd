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
    """Keeps the base model across rounds; reloads it only when the plan's quantization changes."""

    def __init__(self, path: str, labels: tuple[str, ...], device: torch.device, task: str = SEQ_CLS) -> None:
        self.path = path
        self.labels = labels
        self.device = device
        self.task = task
        self.tokenizer: Any = load_tokenizer(path)
        self.quantization: Quantization | None = None
        self.adapted: AdaptedModel | None = None

    def base_at(self, quantization: Quantization) -> AdaptedModel:
        """The model at this quantization, loading the base only when the precision changes."""
        if self.adapted is None or quantization is not self.quantization:
            self.adapted = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            start = time.perf_counter()
            base = load_base(self.path, self.labels, quantization, self.device, self.task)
            self.adapted = AdaptedModel(base, self.task)
            self.quantization = quantization
            log.info(
                "model: loaded %s at %s on %s in %.1fs",
                self.path,
                quantization.value,
                self.device,
                time.perf_counter() - start,
            )
        return self.adapted

    def prepare(self, plan: TrainPlan) -> AdaptedModel:
        """The model for this plan, with its LoRA layout applied (tensors still to be loaded)."""
        adapted = self.base_at(plan.quantization)
        adapted.ensure(plan)
        return adapted

"""Evaluation hook: loss and accuracy of a global adapter on a held-out file, at full precision.

Optional: a coordinator without a held-out file never imports transformers.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Any, Protocol

import torch

from common.adapters import GlobalAdapter, broadcast_tensors
from common.data import DataSource, Example, embedded_split, load_examples
from common.types import Evaluation, ModelSpec, TrainPlan

log = logging.getLogger(__name__)


class Evaluator(Protocol):
    """Anything that scores a global adapter."""

    def __call__(self, global_: GlobalAdapter, template: TrainPlan, spec: ModelSpec) -> Evaluation: ...


class HeldOutEvaluator:
    """Scores globals on a held-out set; the base model and data load on first use and stay."""

    def __init__(self, model_path: str, source: DataSource, max_samples: int, threads: int = 0) -> None:
        """model_path: the run's resolved model directory (the one its spec was derived from)."""
        self.model_path = model_path
        self.source = source
        self.max_samples = max_samples
        self.threads = threads
        self._examples: list[Example] | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def examples(self, task: str | None = None) -> list[Example]:
        """The held-out examples (the embedded corpus's reserved 1,000, or the whole file), for a task
        (default: the one the model path implies)."""
        if task is not None and task != self.source.task:
            self.source, self._examples = replace(self.source, task=task), None
        if self._examples is None:
            examples = embedded_split(self.source)[1] if self.source.path == "embedded" else load_examples(self.source)
            self._examples = examples[: self.max_samples] if self.max_samples else examples
        return self._examples

    def __call__(self, global_: GlobalAdapter, template: TrainPlan, spec: ModelSpec) -> Evaluation:
        """Loss and accuracy of global_ at its own ranks, on CPU in fp32."""
        from common.modeling import AdaptedModel, evaluate, load_base, load_tokenizer
        from common.types import Quantization

        with self._lock:
            start = time.perf_counter()
            device = torch.device("cpu")
            if self._model is None:
                self._tokenizer = load_tokenizer(self.model_path)
                self._model = AdaptedModel(
                    load_base(self.model_path, spec.labels, Quantization.NONE, device, spec.task), spec.task
                )
            ranks = global_.ranks()
            plan = replace(
                template,
                target_modules=tuple(ranks),
                rank_pattern=ranks,
                lora_dropout=0.0,
                quantization=Quantization.NONE,
            )
            self._model.ensure(plan)
            self._model.load(broadcast_tensors(global_, plan, spec))
            examples = self.examples(spec.task)
            result = evaluate(self._model.model, self._tokenizer, examples, plan.max_seq_len, device, task=spec.task)
            log.info("held-out evaluation of round %d: %.1fs", global_.round, time.perf_counter() - start)
            return result

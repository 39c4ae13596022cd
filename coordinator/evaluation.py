"""Evaluation hook: loss and accuracy of a global adapter on a held-out file, at full precision.

Optional: a coordinator without a held-out file never imports transformers.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import torch

from common.data import DataSource, Example, embedded_split, load_examples
from common.types import Evaluation, GlobalState, ModelSpec, TrainPlan

if TYPE_CHECKING:
    from coordinator.modes import Mode

log = logging.getLogger(__name__)


class Evaluator(Protocol):
    """Anything that scores a global."""

    def __call__(self, global_: GlobalState, template: TrainPlan, spec: ModelSpec) -> Evaluation: ...


class HeldOutEvaluator:
    """Scores globals on a held-out set; the full-precision base and the data load on first use and stay.

    The training mode builds the model to score around `base` (and may keep what it builds in `cache`).
    """

    def __init__(self, model_path: str, source: DataSource, max_samples: int, mode: Mode, threads: int = 0) -> None:
        """model_path: the run's resolved model directory (the one its spec was derived from)."""
        self.model_path = model_path
        self.source = source
        self.max_samples = max_samples
        self.mode = mode
        self.threads = threads
        self._examples: list[Example] | None = None
        self.base: Any = None
        self.cache: dict[str, Any] = {}
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

    def __call__(self, global_: GlobalState, template: TrainPlan, spec: ModelSpec) -> Evaluation:
        """Loss and accuracy of global_, on CPU in fp32."""
        from common.batching import evaluate
        from common.modeling import load_base, load_tokenizer
        from common.types import Quantization

        with self._lock:
            start = time.perf_counter()
            device = torch.device("cpu")
            if self.base is None:
                self._tokenizer = load_tokenizer(self.model_path)
                self.base = load_base(self.model_path, spec.labels, Quantization.NONE, device, spec.task)
            model = self.mode.evaluation_model(self, global_, template, spec)
            examples = self.examples(spec.task)
            result = evaluate(model, self._tokenizer, examples, template.max_seq_len, device, task=spec.task)
            log.info("held-out evaluation of round %d: %.1fs", global_.round, time.perf_counter() - start)
            return result

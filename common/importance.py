"""AdaLoRA's importance score for SVD-form adapters (METHOD.md section 1), in plain torch.

A probe attaches P Λ Q adapters (peft's lora_A, lora_E, lora_B) to every candidate matrix, trains a few
steps and feeds each step's gradients to a SensitivityTracker. A triplet's score is s(λ_i) plus the mean
score of row i of P and of column i of Q; a matrix's importance is the sum over its triplets. Kept free
of transformers and peft so the coordinator and the unit tests can use it without the heavy imports.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

DEFAULT_BETA = 0.85  # AdaLoRA's (and peft's) EMA factor for both sensitivity and uncertainty


class SensitivityTracker:
    """Smoothed sensitivity Ibar and uncertainty Ubar per named tensor; score = Ibar * Ubar."""

    def __init__(self, beta1: float = DEFAULT_BETA, beta2: float = DEFAULT_BETA) -> None:
        for label, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 < beta < 1.0:  # peft's RankAllocator asserts the same open interval
                raise ValueError(f"{label} must lie in (0, 1), got {beta}")
        self.beta1 = beta1
        self.beta2 = beta2
        self._sensitivity: dict[str, torch.Tensor] = {}  # Ibar
        self._uncertainty: dict[str, torch.Tensor] = {}  # Ubar

    def update(self, params: Mapping[str, torch.Tensor]) -> None:
        """Fold in I = |w * grad| of every tensor that has a gradient; call after backward, before zero_grad."""
        # Follows peft 0.21's RankAllocator.update_ipt: both averages start at zero, Ibar is updated
        # first and Ubar then measures |I - Ibar| against the *updated* Ibar. One difference: peft keeps
        # the parameter's dtype, we compute in float32 so bf16 training does not round the scores.
        with torch.no_grad():
            for name, param in params.items():
                grad = param.grad
                if grad is None:
                    continue
                current = (param.detach().float() * grad.detach().float()).abs()
                previous_i = self._sensitivity.get(name, torch.zeros_like(current))
                previous_u = self._uncertainty.get(name, torch.zeros_like(current))
                smoothed = self.beta1 * previous_i + (1 - self.beta1) * current
                self._sensitivity[name] = smoothed
                self._uncertainty[name] = self.beta2 * previous_u + (1 - self.beta2) * (current - smoothed).abs()

    def score(self, name: str) -> torch.Tensor:
        """Elementwise Ibar * Ubar of one tensor; KeyError when it never had a gradient."""
        return self._sensitivity[name] * self._uncertainty[name]

    def __contains__(self, name: object) -> bool:
        return name in self._sensitivity


def triplet_scores(s_a: torch.Tensor, s_e: torch.Tensor, s_b: torch.Tensor) -> torch.Tensor:
    """Per-triplet scores S_i = s_e[i] + mean_j s_a[i, j] + mean_j s_b[j, i], shape (r,)."""
    # P = lora_A is (r, d_in), Λ = lora_E is (r, 1), Q = lora_B is (d_out, r): triplet i is row i of P,
    # entry i of Λ and column i of Q, as in peft's RankAllocator.mask_to_budget.
    rank = s_a.shape[0]
    if s_a.dim() != 2 or s_b.dim() != 2 or s_b.shape[1] != rank or s_e.numel() != rank:
        raise ValueError(f"triplet shapes disagree: A {tuple(s_a.shape)}, E {tuple(s_e.shape)}, B {tuple(s_b.shape)}")
    return s_e.reshape(rank) + s_a.mean(dim=1) + s_b.mean(dim=0)


def matrix_scores(tracker: SensitivityTracker, triplets: Mapping[str, tuple[str, str, str]]) -> dict[str, float]:
    """Importance of each module: the sum of its triplet scores; triplets maps module -> (A, E, B) names."""
    return {
        module: float(triplet_scores(tracker.score(a), tracker.score(e), tracker.score(b)).sum())
        for module, (a, e, b) in triplets.items()
    }


def lora_scores(tracker: SensitivityTracker, pairs: Mapping[str, tuple[str, str]]) -> dict[str, float]:
    """Importance of each module from a plain LoRA pair tracked during training: its rank slots scored as
    AdaLoRA's triplets without the singular value (row i of A, column i of B), summed; pairs maps module ->
    (A, B) names. Modules whose tensors never had a gradient are left out."""
    scores: dict[str, float] = {}
    for module, (a, b) in pairs.items():
        if a not in tracker or b not in tracker:
            continue
        s_a, s_b = tracker.score(a), tracker.score(b)
        scores[module] = float(triplet_scores(s_a, s_a.new_zeros(s_a.shape[0]), s_b).sum())
    return scores

"""Unit tests for common.importance: the smoothed sensitivity tracker, triplet and matrix scores."""

from __future__ import annotations

import pytest
import torch

from common.importance import SensitivityTracker, matrix_scores, triplet_scores


def with_grad(weight: list[float], grad: list[float]) -> torch.Tensor:
    tensor = torch.tensor(weight, requires_grad=True)
    tensor.grad = torch.tensor(grad)
    return tensor


def test_one_update_starts_both_averages_from_zero() -> None:
    # Prepare: betas with exact binary fractions, so the hand computation is exact in float32.
    tracker = SensitivityTracker(beta1=0.5, beta2=0.75)
    param = with_grad([2.0, -1.0], [0.5, 3.0])  # I = [1, 3]

    # Execute
    tracker.update({"w": param})

    # Assert: Ibar = 0.5 * I = [0.5, 1.5]; Ubar = 0.25 * |I - Ibar| = [0.125, 0.375]; s = Ibar * Ubar.
    assert torch.equal(tracker.score("w"), torch.tensor([0.0625, 0.5625]))


def test_two_updates_measure_uncertainty_against_the_updated_mean() -> None:
    # Prepare
    tracker = SensitivityTracker(beta1=0.5, beta2=0.75)
    tracker.update({"w": with_grad([2.0, -1.0], [0.5, 3.0])})  # Ibar [0.5, 1.5], Ubar [0.125, 0.375]

    # Execute: I = [3, 1]
    tracker.update({"w": with_grad([2.0, -1.0], [1.5, -1.0])})

    # Assert: Ibar = [1.75, 1.25]; Ubar = 0.75 * [0.125, 0.375] + 0.25 * |[3, 1] - [1.75, 1.25]|
    # = [0.40625, 0.34375]. Measuring against the old Ibar (peft does not) would give [0.71875, 0.65625].
    assert torch.equal(tracker.score("w"), torch.tensor([1.75 * 0.40625, 1.25 * 0.34375]))


def test_default_betas_are_adalora_0_85() -> None:
    # Prepare
    tracker = SensitivityTracker()

    # Execute: I = 4
    tracker.update({"w": with_grad([2.0], [-2.0])})

    # Assert: Ibar = 0.15 * 4 = 0.6; Ubar = 0.15 * |4 - 0.6| = 0.51.
    assert tracker.score("w").item() == pytest.approx(0.6 * 0.51, rel=1e-6)


def test_tensors_without_gradient_are_skipped_and_unknown_names_raise() -> None:
    # Prepare
    tracker = SensitivityTracker()
    no_grad = torch.ones(2, requires_grad=True)

    # Execute
    tracker.update({"w": with_grad([1.0], [1.0]), "frozen": no_grad})

    # Assert
    assert "w" in tracker and "frozen" not in tracker
    with pytest.raises(KeyError):
        tracker.score("frozen")


def test_scores_are_float32_and_detached_even_for_half_precision_parameters() -> None:
    # Prepare
    tracker = SensitivityTracker(beta1=0.5, beta2=0.5)
    param = torch.tensor([3.0], dtype=torch.bfloat16, requires_grad=True)
    param.grad = torch.tensor([2.0], dtype=torch.bfloat16)

    # Execute
    tracker.update({"w": param})

    # Assert: I = 6, Ibar = 3, Ubar = 0.5 * 3 = 1.5.
    score = tracker.score("w")
    assert score.dtype == torch.float32 and not score.requires_grad
    assert score.item() == 4.5


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1])
def test_betas_outside_the_open_unit_interval_are_refused(beta: float) -> None:
    with pytest.raises(ValueError, match="beta"):
        SensitivityTracker(beta1=beta)
    with pytest.raises(ValueError, match="beta"):
        SensitivityTracker(beta2=beta)


def test_triplet_scores_add_lambda_row_of_a_and_column_of_b() -> None:
    # Prepare: rank 2, d_in 3, d_out 3.
    s_a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # row means 2, 5
    s_e = torch.tensor([[10.0], [20.0]])
    s_b = torch.tensor([[1.0, 0.0], [2.0, 3.0], [3.0, 6.0]])  # column means 2, 3

    # Execute
    scores = triplet_scores(s_a, s_e, s_b)

    # Assert: S_0 = 10 + 2 + 2, S_1 = 20 + 5 + 3.
    assert torch.equal(scores, torch.tensor([14.0, 28.0]))


def test_triplet_scores_refuse_mismatched_ranks() -> None:
    with pytest.raises(ValueError, match="triplet shapes"):
        triplet_scores(torch.ones(2, 3), torch.ones(2, 1), torch.ones(3, 3))


def test_matrix_scores_sum_each_modules_triplets() -> None:
    # Prepare: beta1 = beta2 = 0.5 and one update give s = 0.5 I * 0.5 |I - 0.5 I| = I^2 / 8.
    tracker = SensitivityTracker(beta1=0.5, beta2=0.5)

    def factor(rows: int, cols: int, value: float) -> torch.Tensor:
        tensor = torch.ones(rows, cols, requires_grad=True)
        tensor.grad = torch.full((rows, cols), value)
        return tensor

    tracker.update(
        {
            "q.A": factor(2, 3, 4.0),  # s = 2 everywhere: row means 2
            "q.E": factor(2, 1, 8.0),  # s = 8
            "q.B": factor(3, 2, 2.0),  # s = 0.5: column means 0.5
            "v.A": factor(2, 3, 0.0),
            "v.E": factor(2, 1, 4.0),  # s = 2
            "v.B": factor(3, 2, 0.0),
        }
    )

    # Execute
    scores = matrix_scores(tracker, {"q": ("q.A", "q.E", "q.B"), "v": ("v.A", "v.E", "v.B")})

    # Assert: q = 2 triplets x (8 + 2 + 0.5); v = 2 x 2.
    assert scores == {"q": 21.0, "v": 4.0}


def test_lora_scores_sum_the_rank_slots_of_a_and_b() -> None:
    # Prepare: one step of I = |w * grad| (so Ibar = 0.15 I and Ubar = 0.15 * 0.85 I)
    from common.importance import SensitivityTracker, lora_scores

    a = torch.nn.Parameter(torch.ones(2, 3))
    b = torch.nn.Parameter(torch.ones(4, 2))
    a.grad, b.grad = torch.full((2, 3), 2.0), torch.full((4, 2), 1.0)
    tracker = SensitivityTracker()

    # Execute
    tracker.update({"a": a, "b": b})
    scores = lora_scores(tracker, {"m": ("a", "b"), "never": ("x", "y")})

    # Assert: per slot mean s_A (0.15 * 0.1275 * 4) + mean s_B (0.15 * 0.1275 * 1), two slots
    factor = 0.15 * (0.15 * 0.85)
    assert scores == {"m": pytest.approx(2 * (factor * 4 + factor * 1))}

"""Classification scores from confusion matrices (common.scores), their reports and their bounds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.scores import (
    class_recall,
    combine,
    confusion_matrix,
    macro_f1,
    predicted_classes,
    single_class_warning,
)
from common.types import Evaluation, RoundResult
from coordinator.reporting import round_line, weighted_evaluation
from coordinator.rundir import result_from_record, result_record

# 65 negative, 35 positive, everything predicted negative: accuracy 0.65 and nothing learned.
MAJORITY = ((65.0, 0.0), (35.0, 0.0))


def test_majority_class_predictor_scores() -> None:
    # Execute
    recall = class_recall(MAJORITY)
    f1 = macro_f1(MAJORITY)
    warning = single_class_warning(MAJORITY, ("negative", "positive"))

    # Assert: F1 of negative = 2*65 / (2*65 + 35) (35 false positives), positive 0
    assert recall == (1.0, 0.0)
    assert f1 == pytest.approx((130 / 165 + 0.0) / 2)
    assert predicted_classes(MAJORITY) == (0,)
    assert warning is not None and "'negative' for every example" in warning and "65.0%" in warning


def test_three_class_scores_by_hand() -> None:
    # Prepare: rows true class, columns predicted
    confusion = ((5.0, 1.0, 0.0), (2.0, 3.0, 1.0), (0.0, 0.0, 4.0))

    # Execute
    recall = class_recall(confusion)
    f1 = macro_f1(confusion)

    # Assert: per class F1 = 2TP / (2TP + FP + FN)
    assert recall == pytest.approx((5 / 6, 3 / 6, 4 / 4))
    assert f1 == pytest.approx((10 / (10 + 2 + 1) + 6 / (6 + 1 + 3) + 8 / (8 + 1 + 0)) / 3)
    assert single_class_warning(confusion, ("a", "b", "c")) is None


def test_a_class_absent_from_data_and_predictions_has_no_f1_and_no_recall() -> None:
    confusion = ((3.0, 1.0, 0.0), (0.0, 2.0, 0.0), (0.0, 0.0, 0.0))
    assert class_recall(confusion) == (0.75, 1.0, None)
    assert macro_f1(confusion) == pytest.approx((6 / 7 + 4 / 5) / 2)
    assert macro_f1(()) is None


def test_one_class_data_predicted_as_one_class_is_not_warned_about() -> None:
    assert single_class_warning(((10.0, 0.0), (0.0, 0.0)), ("a", "b")) is None


def test_confusion_matrix_refuses_an_index_outside_the_classes() -> None:
    with pytest.raises(ValueError, match="out of"):
        confusion_matrix([0, 2], [0, 1], 2)
    with pytest.raises(ValueError, match="labels against"):
        confusion_matrix([0], [0, 1], 2)


@settings(max_examples=60, deadline=None)
@given(
    classes=st.integers(2, 5),
    pairs=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=60),
)
def test_confusion_invariants(classes: int, pairs: list[tuple[int, int]]) -> None:
    # Prepare
    truth = [t % classes for t, _ in pairs]
    predicted = [p % classes for _, p in pairs]

    # Execute
    confusion = confusion_matrix(truth, predicted, classes)
    f1 = macro_f1(confusion)

    # Assert: totals, the diagonal is the hits, recall and F1 in [0, 1], perfect predictions score 1
    assert sum(map(sum, confusion)) == len(pairs)
    assert sum(confusion[i][i] for i in range(classes)) == sum(t == p for t, p in zip(truth, predicted, strict=True))
    assert f1 is not None and 0.0 <= f1 <= 1.0
    assert all(r is None or 0.0 <= r <= 1.0 for r in class_recall(confusion))
    assert macro_f1(confusion_matrix(truth, truth, classes)) == 1.0
    assert set(predicted_classes(confusion)) == set(predicted)


def test_combine_weighs_each_source_by_its_weight_not_its_count() -> None:
    # Prepare: a has 10 examples, b 100; equal weights give them equal say
    a = ((10.0, 0.0), (0.0, 0.0))
    b = ((0.0, 0.0), (0.0, 100.0))

    # Execute
    equal = combine({"a": a, "b": b}, {"a": 1.0, "b": 1.0})
    as_counted = combine({"a": a, "b": b}, {"a": 10.0, "b": 100.0})

    # Assert
    assert equal == ((1.0, 0.0), (0.0, 1.0))
    assert as_counted == ((10.0, 0.0), (0.0, 100.0))
    assert combine({}, {}) == ()
    with pytest.raises(ValueError, match="different sizes"):
        combine({"a": a, "c": ((1.0,),)}, {"a": 1.0, "c": 1.0})


def test_agents_evaluations_combine_their_matrices_at_the_capped_weights() -> None:
    # Prepare: one agent claims 1,000 samples against its peers' 10 (capped at 3 x the median = 30)
    reports = {
        "a": Evaluation(0.5, 1.0, 10, ((5.0, 0.0), (0.0, 5.0))),
        "b": Evaluation(0.5, 1.0, 10, ((5.0, 0.0), (0.0, 5.0))),
        "c": Evaluation(0.7, 0.5, 1000, ((1000.0, 0.0), (0.0, 0.0))),
    }

    # Execute
    combined = weighted_evaluation(reports, ratio=3.0)
    missing = weighted_evaluation({**reports, "d": Evaluation(0.5, 1.0, 10)}, ratio=3.0)

    # Assert: c's matrix counts for 30, not 1,000
    assert combined is not None and missing is not None
    assert [list(row) for row in combined.confusion] == [pytest.approx([5 + 5 + 30.0, 0.0]), [0.0, 10.0]]
    assert combined.class_recall == (1.0, 1.0)
    assert missing.confusion == ()  # one agent without a matrix: no matrix rather than a biased one


def test_round_records_carry_macro_f1_and_recall_by_name_and_read_back() -> None:
    # Prepare
    held = Evaluation(0.69, 0.65, 100, MAJORITY)
    result = RoundResult(1, ("agent-1",), 3.0, 100, heldout=held)

    # Execute
    record = result_record(result, ("negative", "positive"))
    back = result_from_record(record)
    line = round_line(result, 5, labels=("negative", "positive"))

    # Assert
    assert record["heldout"]["macro_f1"] == pytest.approx(held.macro_f1)
    assert record["heldout"]["class_recall"] == {"negative": 1.0, "positive": 0.0}
    assert back.heldout == held
    assert "held-out accuracy 0.650 macro-F1 0.394 (recall negative 1.00, positive 0.00)" in line

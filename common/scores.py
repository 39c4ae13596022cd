"""Classification scores from a confusion matrix: per-class recall, macro-F1, which classes a model predicts.

Accuracy alone hides a model that predicts the majority class for everything (on a 65/35 data set it
scores 0.65); recall per class and macro-F1 do not. A confusion matrix is rows = true class, columns =
predicted class; its entries are counts, or weighted counts when several agents' matrices are combined.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Confusion = tuple[tuple[float, ...], ...]


def confusion_matrix(labels: Sequence[int], predictions: Sequence[int], classes: int) -> Confusion:
    """Counts of (true, predicted) pairs; ValueError for a class index outside [0, classes)."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels against {len(predictions)} predictions")
    counts = [[0.0] * classes for _ in range(classes)]
    for true, predicted in zip(labels, predictions, strict=True):
        if not (0 <= true < classes and 0 <= predicted < classes):
            raise ValueError(f"class index out of [0, {classes}): true {true}, predicted {predicted}")
        counts[true][predicted] += 1.0
    return tuple(tuple(row) for row in counts)


def class_recall(confusion: Confusion) -> tuple[float | None, ...]:
    """Per true class, the share of its examples predicted as it; None for a class with no examples."""
    recall: list[float | None] = []
    for i, row in enumerate(confusion):
        support = sum(row)
        recall.append(row[i] / support if support > 0 else None)
    return tuple(recall)


def macro_f1(confusion: Confusion) -> float | None:
    """Unweighted mean of per-class F1 = 2TP / (2TP + FP + FN) over the classes that occur as a true or a
    predicted class (others have no F1 to speak of); None for an empty matrix."""
    scores = []
    for i, row in enumerate(confusion):
        true_positive = row[i]
        false_negative = sum(row) - true_positive
        false_positive = sum(other[i] for other in confusion) - true_positive
        denominator = 2 * true_positive + false_positive + false_negative
        if denominator > 0:
            scores.append(2 * true_positive / denominator)
    return sum(scores) / len(scores) if scores else None


def predicted_classes(confusion: Confusion) -> tuple[int, ...]:
    """The classes predicted for at least one example."""
    return tuple(i for i in range(len(confusion)) if any(row[i] > 0 for row in confusion))


def combine(confusions: Mapping[str, Confusion], weights: Mapping[str, float]) -> Confusion:
    """The weighted sum of several sources' matrices, each scaled so its total is its weight; () when no
    source has one, ValueError when their sizes differ."""
    present = {k: c for k, c in confusions.items() if c and weights.get(k, 0.0) > 0}
    if not present:
        return ()
    sizes = {len(c) for c in present.values()}
    if len(sizes) != 1:
        raise ValueError(f"confusion matrices of different sizes: {sorted(sizes)}")
    n = sizes.pop()
    total = [[0.0] * n for _ in range(n)]
    for key, confusion in present.items():
        count = sum(sum(row) for row in confusion)
        scale = weights[key] / count if count > 0 else 0.0
        for i, row in enumerate(confusion):
            for j, value in enumerate(row):
                total[i][j] += value * scale
    return tuple(tuple(row) for row in total)


def single_class_warning(confusion: Confusion, labels: Sequence[str]) -> str | None:
    """A warning when every example was predicted as one class while the data holds several; else None."""
    predicted = predicted_classes(confusion)
    present = [i for i, row in enumerate(confusion) if sum(row) > 0]
    if len(predicted) != 1 or len(present) < 2:
        return None
    only = predicted[0]
    name = labels[only] if only < len(labels) else str(only)
    share = sum(confusion[only]) / sum(sum(row) for row in confusion)
    return (
        f"the global predicts '{name}' for every example ({share:.1%} of the examples are '{name}'): its "
        f"accuracy is that class's share, it has learned the label prior rather than the task"
    )

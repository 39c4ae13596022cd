"""The closed loop's refit: exact scales on hand figures, and the property that a refitted prediction meets the
measurement it was refitted on."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.closed_loop import Measured, refit
from coordinator.planner import Prediction


def predicted(step_seconds: float, peak: int) -> Prediction:
    return Prediction(peak, 2 * peak, step_seconds, 10, 80, 10 * step_seconds, 0.0, "none")


@pytest.mark.parametrize(
    ("measured", "expected"),
    [
        (Measured(10, 1.05, 1050), None),  # both within 10%
        (Measured(10, 2.0, 1000), (2.0 * 1.5, 0.5)),  # step twice the prediction: time scale doubles
        (Measured(10, 1.0, 800), (1.5, 0.5 * 0.8)),  # peak 20% under: memory scale shrinks
        (Measured(10, 0.5, 1300), (1.5 * 0.5, 0.5 * 1.3)),  # both off
        (Measured(10, 2.0, 0), (3.0, 0.5)),  # no peak measured: memory kept
        (Measured(0, 0.0, 5000), None),  # no step: nothing to learn from
    ],
)
def test_refit_scales_what_is_off_by_the_measured_ratio(
    measured: Measured, expected: tuple[float, float] | None
) -> None:
    got = refit((1.5, 0.5), measured, predicted(0.1, 1000), 0.1)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_a_prediction_of_nothing_is_not_refitted_on() -> None:
    assert refit((1.0, 1.0), Measured(4, 4.0, 100), predicted(0.0, 0), 0.1) is None


@settings(max_examples=200, deadline=None)
@given(
    scales=st.tuples(st.floats(0.05, 20.0), st.floats(0.05, 20.0)),
    step=st.floats(1e-3, 10.0),
    peak=st.integers(1, 2**40),
    off=st.tuples(st.floats(0.1, 10.0), st.floats(0.1, 10.0)),
    steps=st.integers(1, 1000),
    threshold=st.floats(0.01, 0.5),
)
def test_a_refitted_prediction_meets_the_measurement_and_an_unrefitted_one_was_close(
    scales: tuple[float, float],
    step: float,
    peak: int,
    off: tuple[float, float],
    steps: int,
    threshold: float,
) -> None:
    # Prepare: the prediction was made at `scales`; the agent measured `off` times it
    measured = Measured(steps, step * off[0] * steps, max(1, round(peak * off[1])))
    prediction = predicted(step, peak)

    # Execute
    got = refit(scales, measured, prediction, threshold)

    # Assert: each figure either stays (it was within the threshold) or is rescaled so the prediction at the new
    # scales (scaled linearly from the old) is the measurement
    new = got or scales
    for old_scale, new_scale, was, now in (
        (scales[0], new[0], prediction.step_seconds, measured.step_seconds),
        (scales[1], new[1], float(prediction.peak_memory_bytes), float(measured.peak_memory_bytes)),
    ):
        if new_scale == old_scale:
            assert abs(now / was - 1) <= threshold
        else:
            assert was * new_scale / old_scale == pytest.approx(now, rel=1e-9)
    assert (got is None) == (new == scales)

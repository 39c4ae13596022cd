"""The DP-FedAvg accountant (coordinator.privacy) against dp-accounting's own figures."""

from __future__ import annotations

import dp_accounting
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ConfigError
from coordinator.privacy import ORDERS, epsilon, noise_for


@pytest.mark.parametrize(("z", "q", "rounds"), [(1.1, 0.5, 10), (0.8, 1.0, 5), (2.0, 0.05, 200)])
def test_epsilon_is_dp_accountings_own_figure(z: float, q: float, rounds: int) -> None:
    accountant = dp_accounting.rdp.RdpAccountant(list(ORDERS))
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    assert epsilon(z, q, rounds, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)


def test_known_figure_of_the_full_batch_gaussian() -> None:
    # q = 1, one round: the Gaussian mechanism's RDP epsilon at z = 1 and delta 1e-5 is about 5.3 at the best
    # integer order (alpha / (2 z^2) + log(1/delta) / (alpha - 1), minimised); the accountant must not be looser.
    assert 4.0 < epsilon(1.0, 1.0, 1, 1e-5) < 5.5
    assert epsilon(1.0, 1.0, 0, 1e-5) == 0.0


@settings(max_examples=15, deadline=None)
@given(
    z=st.floats(0.5, 4.0),
    q=st.floats(0.01, 1.0),
    rounds=st.integers(1, 50),
)
def test_epsilon_grows_with_rounds_and_sampling_and_falls_with_noise(z: float, q: float, rounds: int) -> None:
    delta = 1e-5
    base = epsilon(z, q, rounds, delta)
    assert base > 0
    assert epsilon(z, q, rounds + 1, delta) >= base
    assert epsilon(z * 1.5, q, rounds, delta) <= base
    assert epsilon(z, min(1.0, q * 1.5), rounds, delta) >= base


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_noise_for_a_target_meets_it_and_a_little_less_does_not(target: float) -> None:
    z = noise_for(target, 0.3, 20, 1e-5)
    assert epsilon(z, 0.3, 20, 1e-5) <= target
    assert epsilon(z * 0.99, 0.3, 20, 1e-5) > target


def test_bad_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="noise_multiplier"):
        epsilon(0.0, 0.5, 1, 1e-5)
    with pytest.raises(ConfigError, match="sampling rate"):
        epsilon(1.0, 1.5, 1, 1e-5)
    with pytest.raises(ConfigError, match="delta"):
        epsilon(1.0, 0.5, 1, 1.0)
    with pytest.raises(ConfigError, match="target_epsilon"):
        noise_for(0.0, 0.5, 1, 1e-5)

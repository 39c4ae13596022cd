"""Client-level differential privacy: the accountant of DP-FedAvg's subsampled Gaussian mechanism.

Each round, every sampled agent's clipped update (norm C) is summed and Gaussian noise of standard deviation
z * C is added: a Poisson-subsampled Gaussian mechanism with sampling rate q and noise multiplier z. Its
privacy loss over the rounds so far is computed by `dp-accounting`'s Renyi-DP accountant (not summed per
round, which overstates it by orders of magnitude), at integer orders, where its bound is exact to evaluate.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from common.errors import ConfigError

# Integer Renyi orders (the fractional ones' series do not always converge); wide enough for epsilon 0.1-50.
ORDERS: tuple[float, ...] = tuple(float(order) for order in (*range(2, 65), 80, 96, 128, 160, 192, 256, 512, 1024))

logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting logs each order it drops


def _accounting() -> Any:
    try:
        import dp_accounting
    except ImportError:
        raise ConfigError("privacy.dp: install the extra, pip install 'fedpipe[privacy]' (dp-accounting)") from None
    return dp_accounting


def _check(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> None:
    if noise_multiplier <= 0:
        raise ConfigError(f"privacy.dp.noise_multiplier: must be > 0 (got {noise_multiplier})")
    if not 0 < sampling_rate <= 1:
        raise ConfigError(f"privacy.dp: the sampling rate must be in (0, 1] (got {sampling_rate})")
    if rounds < 0:
        raise ConfigError(f"privacy.dp: rounds must be >= 0 (got {rounds})")
    if not 0 < delta < 1:
        raise ConfigError(f"privacy.dp.delta: must be in (0, 1) (got {delta})")


def epsilon(
    noise_multiplier: float, sampling_rate: float, rounds: int, delta: float, orders: Sequence[float] = ORDERS
) -> float:
    """The (epsilon, delta) guarantee's epsilon after `rounds` rounds of the subsampled Gaussian; 0 before any."""
    _check(noise_multiplier, sampling_rate, rounds, delta)
    return epsilon_of([(sampling_rate, noise_multiplier)] * rounds, delta, orders)


def epsilon_of(events: Sequence[tuple[float, float]], delta: float, orders: Sequence[float] = ORDERS) -> float:
    """Epsilon at delta after one subsampled Gaussian per event, (sampling rate, noise multiplier) each."""
    for sampling_rate, noise_multiplier in events:
        _check(noise_multiplier, sampling_rate, 1, delta)
    if not events:
        _check(1.0, 1.0, 0, delta)
        return 0.0
    dp = _accounting()
    accountant = dp.rdp.RdpAccountant(list(orders))
    for (sampling_rate, noise_multiplier), count in sorted(Counter(events).items()):
        accountant.compose(dp.PoissonSampledDpEvent(sampling_rate, dp.GaussianDpEvent(noise_multiplier)), count)
    return float(accountant.get_epsilon(delta))


def noise_for(target_epsilon: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier (to 0.1%) whose epsilon after `rounds` rounds is at most target_epsilon."""
    if target_epsilon <= 0:
        raise ConfigError(f"privacy.dp.target_epsilon: must be > 0 (got {target_epsilon})")
    _check(1.0, sampling_rate, max(rounds, 1), delta)
    low, high = 1e-3, 1.0
    while epsilon(high, sampling_rate, rounds, delta) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ConfigError(f"privacy.dp.target_epsilon {target_epsilon}: not reachable in {rounds} rounds")
    while (high - low) / high > 1e-3:
        middle = (low + high) / 2
        if epsilon(middle, sampling_rate, rounds, delta) > target_epsilon:
            low = middle
        else:
            high = middle
    return high

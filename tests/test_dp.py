"""DP-FedAvg (aggregator.dp, aggregator.dp_strategy): noise scale, clipping, the fixed denominator,
adaptive clipping, ε against dp-accounting called directly, refusals, and resume."""
from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from edgetrain.aggregator.cli import dp_config_from_args
from edgetrain.aggregator.dp import (RDP_ORDERS, DPConfig, PrivacyAccountant, adapted_clip, clip_to_norm,
                                     update_noise_multiplier)
from edgetrain.aggregator.dp_strategy import DPFedAvg
from edgetrain.aggregator.strategy import FedAvg, FedAvgM
from edgetrain.sdk.errors import ConfigError

LIVE = [f"dev-{i:02d}" for i in range(10)]


def run_round(strategy: DPFedAvg, params: np.ndarray, updates: dict[str, np.ndarray] | None = None,
              round_id: int = 1, live: list[str] = LIVE, seed: int = 0):
    """Configure, feed ``updates`` (default: zeros from every selected device), aggregate."""
    plan = strategy.configure_round(round_id, live, np.random.default_rng(seed))
    strategy.begin_round(params)
    if updates is None:
        updates = {device: np.zeros_like(params) for device in plan.selected}
    for device, update in updates.items():
        strategy.accumulate(update, 10, device)
    return plan, *strategy.aggregate(params)


# -- noise ---------------------------------------------------------------------------------
@pytest.mark.parametrize("clip, z", [(2.0, 1.5), (0.1, 0.7)])
def test_noise_on_zero_updates_has_the_configured_scale(clip: float, z: float) -> None:
    # 4 of 10 devices send zeros: the new parameters are pure noise N(0, (z·S/m)²) per coordinate, m = 4.
    n = 50_000
    strategy = DPFedAvg(FedAvg(fraction=0.4, min_devices=2), DPConfig(clip, z), rng=np.random.default_rng(7))
    plan, new, info = run_round(strategy, np.zeros(n, dtype=np.float32))
    m = len(plan.selected)
    assert m == 4
    expected_std = z * clip / m
    noise = new.astype(np.float64)
    # The exact distribution (KS) and the variance (chi-square: (n-1)s²/σ² ~ χ²(n-1)), two-sided at 1e-3.
    assert stats.kstest(noise, "norm", args=(0.0, expected_std)).pvalue > 1e-3
    chi2 = (n - 1) * noise.var(ddof=1) / expected_std ** 2
    assert 1e-3 < stats.chi2.cdf(chi2, n - 1) < 1 - 1e-3
    # The same test rejects a scale 3 % off, so it has the power to catch a wrong denominator or σ.
    assert stats.kstest(noise, "norm", args=(0.0, 1.03 * expected_std)).pvalue < 1e-3
    assert info.privacy is not None and info.privacy.noise_stddev == pytest.approx(z * clip)


def test_adaptive_clipping_noise_uses_the_reduced_multiplier() -> None:
    # Andrew et al. 2021: z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2) on the updates so that the whole round costs z.
    n, clip, z, count_stddev = 50_000, 1.0, 1.0, 2.0
    config = DPConfig(clip, z, target_quantile=0.5, clip_count_stddev=count_stddev)
    strategy = DPFedAvg(FedAvg(fraction=0.4, min_devices=2), config, rng=np.random.default_rng(3))
    plan, new, _ = run_round(strategy, np.zeros(n, dtype=np.float32))
    z_delta = (z ** -2 - (2 * count_stddev) ** -2) ** -0.5
    assert z_delta == pytest.approx(update_noise_multiplier(z, count_stddev)) and z_delta > z
    assert stats.kstest(new.astype(np.float64), "norm", args=(0.0, z_delta * clip / len(plan.selected))).pvalue > 1e-3


# -- clipping and the estimator ------------------------------------------------------------
def test_clip_to_norm_equals_its_definition() -> None:
    rng = np.random.default_rng(1)
    for scale in (0.01, 1.0, 100.0):
        update = (scale * rng.standard_normal(257)).astype(np.float32)
        clipped, norm = clip_to_norm(update, 1.5)
        reference = update.astype(np.float64) * min(1.0, 1.5 / np.linalg.norm(update.astype(np.float64)))
        np.testing.assert_allclose(clipped, reference, rtol=1e-12)
        assert norm == pytest.approx(np.linalg.norm(update.astype(np.float64)))
        assert np.linalg.norm(clipped) <= 1.5 * (1 + 1e-12)
    with pytest.raises(ConfigError, match="non-finite"):
        clip_to_norm(np.array([np.inf, 0.0], dtype=np.float32), 1.0)


def test_round_is_the_fixed_denominator_mean_of_clipped_updates_with_uniform_weights() -> None:
    # z tiny: what is left is the estimator itself. 4 devices asked, 3 answer: divide by 4 (McMahan et
    # al. 2018's f_f), every device weighs the same whatever example count it claims.
    clip = 1.0
    strategy = DPFedAvg(FedAvg(fraction=0.4, min_devices=2), DPConfig(clip, 1e-9), rng=np.random.default_rng(0))
    plan = strategy.configure_round(1, LIVE, np.random.default_rng(0))
    params = np.full(64, 0.5, dtype=np.float32)
    strategy.begin_round(params)
    rng = np.random.default_rng(2)
    updates = [rng.standard_normal(64).astype(np.float32) * s for s in (0.01, 3.0, 40.0)]
    for device, update, examples in zip(plan.selected, updates, (1, 100, 10_000)):
        strategy.accumulate(update, examples, device)
    new, info = strategy.aggregate(params)
    reference = sum(u.astype(np.float64) * min(1.0, clip / np.linalg.norm(u.astype(np.float64))) for u in updates) / 4
    np.testing.assert_allclose(new, params + reference, atol=1e-6)
    assert (info.num_updates, info.total_examples, info.privacy.updates_clipped) == (3, 10_101, 2)


def test_server_optimizer_of_the_wrapped_strategy_applies_the_noised_mean() -> None:
    # FedAvgM's momentum is post-processing: the wrapper hands it the (near noiseless) clipped mean.
    strategy = DPFedAvg(FedAvgM(server_lr=1.0, server_momentum=0.5, fraction=1.0), DPConfig(10.0, 1e-9))
    params = np.zeros(8, dtype=np.float32)
    delta = np.full(8, 0.25, dtype=np.float32)
    for round_id, expected in ((1, 0.25), (2, 0.25 + 0.25 * 1.5)):
        plan = strategy.configure_round(round_id, LIVE[:2], np.random.default_rng(0))
        strategy.begin_round(params)
        for device in plan.selected:
            strategy.accumulate(delta, 1, device)
        params, _ = strategy.aggregate(params)
        np.testing.assert_allclose(params, expected, atol=1e-6)


def test_adaptive_clip_follows_andrew_et_al_geometric_update() -> None:
    clip, gamma, lr, sigma_b, m, unclipped = 2.0, 0.5, 0.2, 0.3, 8, 6
    draw = np.random.default_rng(11).normal(0.0, sigma_b)
    expected = clip * math.exp(-lr * ((unclipped + draw) / m - gamma))
    assert adapted_clip(clip, unclipped, sigma_b, m, gamma, lr, np.random.default_rng(11)) == pytest.approx(expected)


def test_adaptive_clip_moves_towards_the_target_quantile() -> None:
    # Every update has norm 10, far above S = 0.1 and target median: S grows round after round.
    config = DPConfig(0.1, 0.5, target_quantile=0.5, clip_count_stddev=1.0)
    strategy = DPFedAvg(FedAvg(fraction=1.0), config, rng=np.random.default_rng(5))
    params = np.zeros(16, dtype=np.float32)
    bounds = []
    for round_id in range(1, 16):
        updates = {d: np.full(16, 2.5, dtype=np.float32) for d in LIVE}  # norm 10
        _, _, info = run_round(strategy, params, updates, round_id)
        bounds.append(info.privacy.clip_norm)
    assert bounds[0] == 0.1 and bounds[-1] > 0.1 * math.exp(0.2 * 0.3 * 14)  # ≈ e^(η·γ) per round, noisy


# -- accounting ------------------------------------------------------------------------------
def _epsilon_directly(rounds: list[float], z: float, delta: float) -> float:
    accountant = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    for q in rounds:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    return accountant.get_epsilon(delta)


def test_epsilon_each_round_matches_dp_accounting_called_directly() -> None:
    z, delta = 1.1, 1e-5
    strategy = DPFedAvg(FedAvg(fraction=0.3, min_devices=2), DPConfig(1.0, z, delta))
    params = np.zeros(4, dtype=np.float32)
    rates, epsilons = [], []
    for round_id in range(1, 6):
        live = LIVE if round_id < 4 else LIVE[:5]  # half the fleet leaves: q goes from 3/10 to 2/5
        plan, params, info = run_round(strategy, params, None, round_id, live)
        rates.append(len(plan.selected) / len(live))
        assert info.privacy.sampling_rate == pytest.approx(rates[-1])
        assert info.privacy.epsilon == pytest.approx(_epsilon_directly(rates, z, delta), rel=1e-12)
        epsilons.append(info.privacy.epsilon)
    assert rates == [0.3, 0.3, 0.3, 0.4, 0.4]
    assert all(a < b for a, b in zip(epsilons, epsilons[1:]))  # privacy spent only grows
    # Integer orders only: within 2 % of dp-accounting's default orders here (a valid, slightly looser bound).
    default = dp_accounting.rdp.RdpAccountant()
    for q in rates:
        default.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    assert default.get_epsilon(delta) <= epsilons[-1] <= 1.02 * default.get_epsilon(delta)


def test_resumed_strategy_continues_clip_and_epsilon() -> None:
    config = DPConfig(0.5, 0.8, 1e-6, target_quantile=0.3, clip_count_stddev=1.0)
    first = DPFedAvg(FedAvg(fraction=0.5), config, rng=np.random.default_rng(1))
    params = np.zeros(8, dtype=np.float32)
    for round_id in (1, 2):
        _, params, _ = run_round(first, params, None, round_id)
    meta = json.loads(json.dumps(first.state_meta()))  # as a checkpoint stores it
    second = DPFedAvg(FedAvg(fraction=0.5), config)
    second.load_state_dict(first.state_dict(), meta)
    assert second.clip_norm == first.clip_norm and second.accountant.rounds == 2
    _, _, info = run_round(second, params, None, 3)
    assert info.privacy.epsilon == pytest.approx(_epsilon_directly([0.5] * 3, 0.8, 1e-6), rel=1e-12)
    with pytest.raises(ConfigError, match="DP settings"):
        DPFedAvg(FedAvg(fraction=0.5), DPConfig(0.5, 0.9, 1e-6, 0.3, clip_count_stddev=1.0)).load_state_dict({}, meta)
    with pytest.raises(ConfigError, match="accountant history entry"):
        second.load_state_dict({}, {**meta, "accountant": [[2.0, 1]]})


# -- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(clip_norm=0.0, noise_multiplier=1.0), "--dp-clip must be a finite number > 0"),
    (dict(clip_norm=math.inf, noise_multiplier=1.0), "--dp-clip must be a finite number > 0"),
    (dict(clip_norm=1.0, noise_multiplier=0.0), "--dp-noise-multiplier must be a finite number > 0"),
    (dict(clip_norm=1.0, noise_multiplier=-1.0), "--dp-noise-multiplier must be a finite number > 0"),
    (dict(clip_norm=1.0, noise_multiplier=math.nan), "--dp-noise-multiplier must be a finite number > 0"),
    (dict(clip_norm=1.0, noise_multiplier=1.0, delta=1.0), "--dp-delta must be in (0, 1)"),
    (dict(clip_norm=1.0, noise_multiplier=1.0, delta=0.0), "--dp-delta must be in (0, 1)"),
    (dict(clip_norm=1.0, noise_multiplier=1.0, target_quantile=1.0), "target quantile must be in (0, 1)"),
    (dict(clip_norm=1.0, noise_multiplier=1.0, clip_count_stddev=5.0), "is for adaptive clipping"),
    (dict(clip_norm=1.0, noise_multiplier=1.0, target_quantile=0.5, clip_count_stddev=0.5),
     "must exceed z/2"),
])
def test_dp_config_refuses_what_cannot_hold(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        DPConfig(**kwargs)
    assert message in str(error.value)


def test_adaptive_default_count_noise_too_small_for_the_round_is_refused_before_training() -> None:
    # σ_b defaults to m/20: with 4 devices per round 0.2, below z/2 = 0.5.
    strategy = DPFedAvg(FedAvg(fraction=0.4), DPConfig(1.0, 1.0, target_quantile=0.5))
    with pytest.raises(ConfigError, match="must exceed z/2"):
        strategy.configure_round(1, LIVE, np.random.default_rng(0))


class _Args:
    def __init__(self, **kwargs: object) -> None:
        defaults = dict(dp_clip=None, dp_noise_multiplier=None, dp_delta=1e-5, dp_adaptive_clip=None,
                        dp_clip_lr=0.2, dp_clip_count_stddev=None, strategy="fedavg")
        self.__dict__.update({**defaults, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    (dict(dp_noise_multiplier=1.0), "noise without clipping"),
    (dict(dp_clip=1.0), "clipping alone is no privacy guarantee"),
    (dict(dp_adaptive_clip=0.5), "--dp-adaptive-clip needs --dp-clip"),
    (dict(dp_clip=1.0, dp_noise_multiplier=1.0, strategy="large-batch"), "large-batch"),
    (dict(dp_clip=1.0, dp_noise_multiplier=1.0, aggregation="median"), "--aggregation median"),
])
def test_cli_refuses_dp_flags_that_cannot_hold(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dp_config_from_args(_Args(**kwargs))


def test_no_dp_flag_means_no_dp_and_epsilon_zero_before_any_round() -> None:
    assert dp_config_from_args(_Args()) is None
    assert PrivacyAccountant(1.0, 1e-5).epsilon() == 0.0

"""The noised metric release: pure maths (sums, noise, cost, calibration) and the server's pooling."""

from __future__ import annotations

import numpy as np
import pytest

from privatune.client.metrics_release import (
    LOSS_BOUND,
    EvalSums,
    exact_sums,
    noised_sums,
    planned_releases,
    release_mechanism,
)
from privatune.client.randomness import SeededRandomness, SiteRandomness
from privatune.common.accounting import epsilon_of
from privatune.common.config import ConfigError, RunConfig
from privatune.server.aggregation import equal_mean, pool_noised_eval


def test_exact_sums_clip_each_loss_so_one_record_moves_the_loss_sum_by_at_most_the_bound():
    losses = np.array([0.1, 2.0, 40.0, np.inf])
    correct = np.array([True, False, True, False])
    s = exact_sums(losses, correct)
    assert s == EvalSums(correct=2.0, loss_sum=0.1 + 2.0 + LOSS_BOUND + LOSS_BOUND, count=4.0)
    # Adding any one record changes each sum by at most its stated sensitivity (1, LOSS_BOUND, 1).
    more = exact_sums(np.append(losses, 1e9), np.append(correct, True))
    assert more.correct - s.correct == 1 and more.count - s.count == 1
    assert more.loss_sum - s.loss_sum == pytest.approx(LOSS_BOUND)
    with pytest.raises(ValueError, match="1-D"):
        exact_sums(np.zeros(3), np.zeros(2, dtype=bool))


def test_noise_has_the_stated_scale_per_sum():
    rng = SeededRandomness(0)
    base = EvalSums(correct=50.0, loss_sum=30.0, count=100.0)
    draws = np.array([[d.correct, d.loss_sum, d.count] for d in (noised_sums(base, 4.0, rng) for _ in range(4000))])
    assert np.mean(draws, axis=0) == pytest.approx([50.0, 30.0, 100.0], abs=1.5)
    assert np.std(draws, axis=0) == pytest.approx([4.0, 4.0 * LOSS_BOUND, 4.0], rel=0.06)


def test_two_releases_from_the_site_randomness_differ():
    base = EvalSums(correct=5.0, loss_sum=3.0, count=10.0)
    a, b = noised_sums(base, 20.0, SiteRandomness()), noised_sums(base, 20.0, SiteRandomness())
    assert a != b and a != base


def test_a_release_costs_three_gaussian_mechanisms_on_all_validation_records():
    assert release_mechanism(20.0) == (20.0, 1.0, 3)
    with pytest.raises(ValueError, match="metrics-noise-multiplier"):
        release_mechanism(0.0)
    # The default (20) over 5 rounds: epsilon below 1 at delta 1e-5 on its own.
    assert epsilon_of([release_mechanism(20.0)] * 5, 1e-5) < 1.0
    cfg = RunConfig.create(preset="digits", num_server_rounds=4, release_metrics=True)
    assert planned_releases(cfg) == [(20.0, 1.0, 3)] * 4
    assert planned_releases(RunConfig.create(preset="digits")) == []
    with pytest.raises(ConfigError, match="metrics-noise-multiplier"):
        RunConfig.create(preset="digits", metrics_noise_multiplier=0.0)
    with pytest.raises(ConfigError, match="weighting"):
        RunConfig.create(preset="digits", weighting="by-size")


def test_server_pools_noised_sums_into_ratios_clamped_to_their_range():
    pooled = pool_noised_eval([(40.0, 20.0, 50.0), (45.0, 10.0, 50.0)])
    assert pooled == {"eval-accuracy": pytest.approx(0.85), "eval-loss": pytest.approx(0.3), "eval-count-noised": 100.0}
    assert pool_noised_eval([(60.0, -5.0, 50.0)])["eval-accuracy"] == 1.0  # noise pushed it above 1
    assert pool_noised_eval([(60.0, -5.0, 50.0)])["eval-loss"] == 0.0
    assert pool_noised_eval([(3.0, 1.0, -2.0)]) is None
    assert pool_noised_eval([]) is None


def test_equal_weighting_is_the_plain_mean():
    a = {"w": np.array([1.0, 3.0], np.float32)}
    b = {"w": np.array([3.0, 5.0], np.float32)}
    out = equal_mean([a, b])
    assert out["w"].dtype == np.float32 and out["w"].tolist() == [2.0, 4.0]

"""White-box one-run audit: the maths it adds to common/canary.py, the planted bugs it must catch, and the real
DP-SGD step code it must clear (simulations/whitebox_audit.py, `privatune whitebox-audit`)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from privatune.client.randomness import SeededRandomness
from privatune.common.canary import (
    epsilon_lower_bound,
    fit_noise_scale,
    guesses_for_claim,
    perfect_guess_bound,
    subsampled_gaussian_llr,
)
from privatune.simulations.whitebox_audit import (
    HalfNoise,
    NoiseReplay,
    WhiteboxAuditError,
    WhiteboxSettings,
    canary_coordinates,
    run_whitebox_audit,
)

# Claim 2 with 5000 canaries: the perfect-guessing cap (3.35) leaves room above the claim. The site's noise is a
# seeded source the adversary is not given (its seed is not the run seed), so every run here is reproducible.
CLAIM = 2.0
M = 5000


def _site(seed: int = 1001) -> SeededRandomness:
    return SeededRandomness(seed)


def _audit(plant: str, **kw):
    settings = WhiteboxSettings(epsilon=CLAIM, canaries=M, plant=plant, auditor_seed=kw.pop("auditor_seed", 1), **kw)
    return run_whitebox_audit(settings, site=_site())


# ------------------------------------------------------------------------------------------------------ maths


def test_perfect_guess_bound_is_the_bound_for_all_correct():
    assert perfect_guess_bound(1000, 200, 1e-5) == epsilon_lower_bound(1000, 200, 200, 1e-5)
    assert perfect_guess_bound(1000, 200, 1e-5) > epsilon_lower_bound(1000, 200, 190, 1e-5)


@pytest.mark.parametrize("fraction", [0.02, 0.1])
def test_perfect_guess_cap_is_monotone_in_m(fraction):
    caps = [perfect_guess_bound(m, max(int(m * fraction), 1), 1e-5) for m in (100, 300, 1000, 3000, 10_000, 30_000)]
    assert all(b > a for a, b in itertools.pairwise(caps)), caps
    assert caps[0] < 2.0 < caps[-1]


def test_guesses_for_claim_leave_room_above_the_claim():
    assert guesses_for_claim(5000, 2.0, 1e-5) == 100  # m / 50: its cap, 3.35, is already 1.2 x above
    r4 = guesses_for_claim(10_000, 4.0, 1e-5)
    assert r4 > 200 and perfect_guess_bound(10_000, r4, 1e-5) >= 4.8
    # epsilon 8 is out of reach at delta 1e-5 (the 2 m delta term caps every bound): the highest cap is chosen
    r8 = guesses_for_claim(10_000, 8.0, 1e-5)
    assert r8 == 2000 and perfect_guess_bound(10_000, r8, 1e-5) < 8.0


def test_llr_is_the_sum_at_full_sampling_and_increasing_when_subsampled():
    x = np.linspace(-3, 4, 29)
    full = subsampled_gaussian_llr(x, 1.0, 2.0)
    np.testing.assert_allclose(full, (x - 0.5) / 4.0)
    sub = subsampled_gaussian_llr(x, 0.02, 0.8)
    assert np.all(np.diff(sub) > 0)
    # far below the canary's mean the step says "no canary" with the weight of log(1 - q)
    assert subsampled_gaussian_llr(np.array([-20.0]), 0.02, 0.8)[0] == pytest.approx(np.log1p(-0.02), abs=1e-9)
    with pytest.raises(ValueError):
        subsampled_gaussian_llr(x, 0.0, 1.0)
    with pytest.raises(ValueError):
        subsampled_gaussian_llr(x, 0.5, 0.0)


def test_fit_noise_scale_ignores_the_few_sampled_canaries():
    rng = np.random.default_rng(0)
    obs = rng.standard_normal(20_000) * 0.7
    obs[:200] += 1.0  # 1 % of the coordinates carry a canary
    assert fit_noise_scale(obs) == pytest.approx(0.7, rel=0.03)
    assert fit_noise_scale(np.zeros(10)) == 1e-3  # the floor: noise removed by a replay
    with pytest.raises(ValueError):
        fit_noise_scale(np.array([np.nan]))


def test_canary_coordinates_are_distinct_and_outside_the_data_columns():
    features, coords = canary_coordinates(1003, 10, 16)
    assert features == 16 + 101
    assert len(set(coords.tolist())) == 1003
    assert np.all(coords % features >= 16) and coords.max() < 10 * features


def test_half_noise_halves_the_standard_deviation():
    a = SeededRandomness(5).gaussian((1000,), 2.0, device="cpu", dtype=torch.float64)
    b = HalfNoise(SeededRandomness(5)).gaussian((1000,), 2.0, device="cpu", dtype=torch.float64)
    torch.testing.assert_close(b, 0.5 * a)


def test_noise_replay_regenerates_the_seeded_draws_in_order():
    site = SeededRandomness(42)
    coords = np.array([0, 7, 11])
    replay = NoiseReplay(42, records=30, shapes=[(3, 4), (3,)], weight_index=0)
    for _ in range(3):  # per step: the Poisson mask, then the weight's noise, then the bias's
        site.uniform(30)
        w = site.gaussian((3, 4), 1.5, device="cpu", dtype=torch.float32)
        site.gaussian((3,), 1.5, device="cpu", dtype=torch.float32)
        np.testing.assert_array_equal(replay.next_step(1.5, coords), w.reshape(-1).numpy()[coords])


# --------------------------------------------------------------------------------------------- planted bugs


@pytest.mark.parametrize("plant", ["noise-half", "noise-seeded", "no-clip"])
def test_every_planted_bug_is_caught(plant):
    res = _audit(plant)
    assert res.epsilon_claimed <= CLAIM
    assert res.violation, (plant, res.epsilon_lower_bound, res.correct)
    assert res.epsilon_lower_bound > res.epsilon_claimed
    assert res.epsilon_lower_bound <= res.epsilon_max_for_m + 1e-9
    assert res.replay_used == (plant == "noise-seeded")


def test_real_code_stays_at_or_below_its_claim():
    for seed in (1, 2):
        res = _audit("none", auditor_seed=seed)
        assert res.steps == 250 and res.sample_rate == pytest.approx(0.02)
        assert not res.violation
        assert res.epsilon_lower_bound <= 0.6 * res.epsilon_claimed, res.epsilon_lower_bound
        assert res.mean_score_in > res.mean_score_out  # the attack works, within what DP allows
        assert not res.replay_used and res.replay_energy_ratio > 1.5  # the replay explains nothing


def test_real_code_with_the_site_csprng():
    res = run_whitebox_audit(WhiteboxSettings(epsilon=CLAIM, canaries=2000, auditor_seed=3))
    assert not res.violation and not res.replay_used


def test_a_blind_adversary_misses_seeded_noise():
    """What the black-box audit could not see: without the replay the seeded run looks like a correct one."""
    res = _audit("noise-seeded", adversary="blind")
    assert not res.violation and not res.replay_used


def test_bad_settings_are_refused_with_the_option_named():
    for kw, word in (
        ({"plant": "typo"}, "--plant"),
        ({"canaries": 1}, "--canaries"),
        ({"epsilon": 0.0}, "--epsilon"),
        ({"canary_norm": 0.5}, "--canary-norm"),
        ({"k_plus": 0, "k_minus": 0}, "--k-plus"),
    ):
        with pytest.raises(WhiteboxAuditError, match=word):
            run_whitebox_audit(WhiteboxSettings(**kw))


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_exit_codes_and_json(tmp_path):
    from typer.testing import CliRunner

    from privatune.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["whitebox-audit", "--plant", "typo"])
    assert bad.exit_code == 2 and "--plant" in bad.output
    out = tmp_path / "wb.json"
    caught = runner.invoke(
        app, ["whitebox-audit", "--epsilon", "2", "--canaries", "2000", "--plant", "no-clip", "--json", str(out)]
    )
    assert caught.exit_code == 1, caught.output
    assert "BUG" in caught.output and "most m allows" in caught.output
    data = json.loads(out.read_text())
    assert data["violation"] is True and data["settings"]["canaries"] == 2000
    assert data["epsilon_lower_bound"] > data["epsilon_claimed"]
    clean = runner.invoke(app, ["whitebox-audit", "--epsilon", "2", "--canaries", "2000"])
    assert clean.exit_code == 0, clean.output


def test_bench_table_has_a_row_per_claim_and_a_column_per_plant():
    from privatune.simulations.benchmarks.whitebox import bench, table

    results = bench([1.0], [200])
    assert [r.settings["plant"] for r in results] == ["none", "noise-half", "noise-seeded", "no-clip"]
    lines = table(results).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == 9
    assert lines[2].startswith("| 1 | 0.99 | 200 (")

"""A simulation skips the federated evaluation only when its results could reach no one (simulations/simulate.py
``skip_unseen_evaluation``): no released metrics, no --verbose, the default fraction-evaluate, no personalisation."""

from __future__ import annotations

from privatune.common.config import RunConfig
from privatune.simulations.simulate import UNSEEN_EVALUATION, skip_unseen_evaluation


def _cfg(**overrides) -> RunConfig:
    return RunConfig.create(preset="digits", **overrides)


def test_the_default_simulation_skips_it_and_says_why():
    cfg, note = skip_unseen_evaluation(_cfg(), verbose=False)
    assert cfg.fraction_evaluate == 0 and note == UNSEEN_EVALUATION
    # Nothing else about the run changes: training, sampling, DP and the central evaluation are the same.
    assert cfg == _cfg(fraction_evaluate=0.0)


def test_it_runs_when_someone_can_see_it():
    for cfg, verbose in [
        (_cfg(), True),  # --verbose shows the sites' validation lines
        (_cfg(release_metrics=True), False),  # the noised sums reach the server
        (_cfg(personalise_epochs=1), False),  # personalisation runs in the last evaluation
        (_cfg(fraction_evaluate=0.5), False),  # asked for explicitly
    ]:
        kept, note = skip_unseen_evaluation(cfg, verbose)
        assert kept == cfg and note.startswith("on: fraction-evaluate=")


def test_an_evaluation_already_off_stays_off():
    cfg, note = skip_unseen_evaluation(_cfg(fraction_evaluate=0.0), verbose=True)
    assert cfg.fraction_evaluate == 0 and note == "off: fraction-evaluate=0"

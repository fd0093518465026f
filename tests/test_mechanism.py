"""DPMechanism: one value from training to the audit, with its own conversions (wire records, ledger columns)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from privatune.common import protocol as wire
from privatune.common.mechanism import DPMechanism, MechanismError

MECH = DPMechanism(noise_multiplier=1.1, sample_rate=0.05, steps=40, max_grad_norm=1.0, delta=1e-5, accountant="prv")


def test_round_trips_through_the_reply_records_and_the_ledger_columns():
    assert DPMechanism.from_reply(MECH.to_metrics(), MECH.to_status()) == MECH
    assert DPMechanism.from_columns({**MECH.columns(), "epsilon_run": 3.0}) == MECH
    assert MECH.gaussian == (1.1, 0.05, 40)


def test_the_wire_keys_are_the_protocols():
    assert set(MECH.to_metrics()) == set(wire.TRAIN_MECHANISM_KEYS) - {wire.KEY_EPSILON, wire.KEY_EPSILON_DATASET}
    assert MECH.to_status() == {wire.KEY_ACCOUNTANT: "prv"}


def test_numpy_and_integral_float_values_normalise_to_python_types():
    m = DPMechanism.from_reply(
        {**MECH.to_metrics(), wire.KEY_STEPS: 40.0, wire.KEY_NOISE_MULTIPLIER: np.float32(1.5)}, MECH.to_status()
    )
    assert type(m.noise_multiplier) is float and m.steps == 40 and type(m.steps) is int
    assert hash(m) == hash(dataclasses.replace(m))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("noise_multiplier", -1.0),
        ("noise_multiplier", float("nan")),
        ("sample_rate", 0.0),
        ("sample_rate", 1.5),
        ("steps", -1),
        ("steps", 2.5),
        ("steps", True),
        ("max_grad_norm", 0.0),
        ("delta", 1.0),
        ("delta", 0.0),
        ("accountant", "gdp"),
    ],
)
def test_a_bad_value_names_its_field(field, value):
    with pytest.raises(MechanismError, match=field):
        dataclasses.replace(MECH, **{field: value})


def test_a_bad_or_missing_reply_value_names_its_wire_key():
    with pytest.raises(MechanismError, match="sample-rate"):
        DPMechanism.from_reply({**MECH.to_metrics(), wire.KEY_SAMPLE_RATE: 2.0}, MECH.to_status())
    metrics = MECH.to_metrics()
    del metrics[wire.KEY_DELTA]
    with pytest.raises(MechanismError, match="'delta'"):
        DPMechanism.from_reply(metrics, MECH.to_status())
    with pytest.raises(MechanismError, match="accountant"):
        DPMechanism.from_reply(MECH.to_metrics(), {})

"""The engine's view of a fact: every finite float reaches the real engine in a form it reads (ENGINE_NOTES: an
exponent with no fraction, `3e-05` or `1e+16`, is error 204), and compares as the value it stands for."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.engine import RulesEngine
from monitor.facts import Fact, engine_number

RULE = {"low": {"all": [{"m": {"$and": [{"fact": "baseline_lab"}, {"$lt": {"value": 1.5}}]}}], "run": "LOW"}}
MAGNITUDES = [3e-05, -3e-06, 1e-05, 1e-300, 5e-324, -5e-324, 1e16, 1e17, 1e308, -1e308, 2.5, 0.0, -0.0, 1.5e-05]


@pytest.fixture(scope="module")
def engine() -> RulesEngine:
    return RulesEngine(definition=RULE, version="facts")


def post(engine: RulesEngine, subject: str, value: float) -> bool:
    fact = Fact("baseline_lab", "ANC", {"at": "2025-01-06T08:00:00+01:00", "analyte": "ANC", "value": value})
    engine.sync(subject, {fact.fact_id: fact.message()})
    return ("LOW", fact.fact_id) in engine.matches(subject)


@pytest.mark.parametrize("value", MAGNITUDES, ids=repr)
def test_every_magnitude_is_read_and_compares_as_its_value(engine, value):
    assert post(engine, f"S-{value!r}", value) == (value < 1.5)


@settings(max_examples=200, deadline=None)
@given(value=st.floats(allow_nan=False, allow_infinity=False))
def test_any_finite_float_is_read_and_stays_within_two_ulps(engine, value):
    sent = engine_number(value)
    assert sent == value or abs(sent - value) <= 2 * math.ulp(value) + 5e-324
    assert (sent < 1.5) == (value < 1.5)
    assert post(engine, "S-any", value) == (value < 1.5)


def test_values_without_an_exponent_are_passed_unchanged():
    for value in (37.5, 0.0001, 123456.0, 1e15, -4.2):
        assert engine_number(value) is value

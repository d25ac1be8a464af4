"""Normalisation of raw clinical values (RULES_SPEC §2.1, §2.7): the spec's worked examples.

The factors and offsets come from the bundled rules/parameters.yaml, so these tests also check that the shipped
parameters say what the spec says.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor import normalise as nm
from monitor.rules import load_rules

PARIS = ZoneInfo("Europe/Paris")


@pytest.fixture(scope="module")
def params():
    return load_rules().parameters


def _temp(params, *, temperature_c=None, value=None, unit=None, site="oral"):
    t = params.temperature
    return nm.temperature(
        temperature_c=temperature_c,
        value=value,
        unit=unit,
        site=site,
        site_offsets_c=t.site_offsets_c,
        plausible_c=tuple(t.plausible_c),
    )


# ---- bedside Schwartz eGFR ----------------------------------------------------------------------------------------


def test_parameters_match_the_spec_constants(params):
    assert params.schwartz_k == pytest.approx(0.413)
    assert nm.convert(88.4, "umol/L", params.units.creatinine_to_mg_dl) == pytest.approx(1.0)
    assert nm.convert(1.6, "mg/dL", params.units.creatinine_to_mg_dl) == pytest.approx(1.6)


def test_schwartz_150_umol_per_l_110_cm_is_26_8(params):
    scr = nm.convert(150, "umol/L", params.units.creatinine_to_mg_dl)
    assert round(scr, 3) == 1.697
    egfr = nm.schwartz_egfr(height_cm=110, creatinine_mg_dl=scr, k=params.schwartz_k)
    assert round(egfr, 1) == 26.8
    assert egfr < 30  # excluded (ELIG-RENAL)


def test_schwartz_1_60_mg_dl_105_cm_is_27_1(params):
    egfr = nm.schwartz_egfr(height_cm=105, creatinine_mg_dl=1.60, k=params.schwartz_k)
    assert round(egfr, 1) == 27.1
    assert egfr < 30


def test_schwartz_0_35_mg_dl_80_cm_is_94_4(params):
    egfr = nm.schwartz_egfr(height_cm=80, creatinine_mg_dl=0.35, k=params.schwartz_k)
    assert round(egfr, 1) == 94.4
    assert egfr >= 30  # eligible


@pytest.mark.parametrize("height, scr", [(110, 0.0), (110, -1.0), (0, 1.0), (-5, 1.0)])
def test_schwartz_refuses_non_positive_inputs(height, scr):
    assert nm.schwartz_egfr(height_cm=height, creatinine_mg_dl=scr, k=0.413) is None


# ---- ANC unit conversion ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, unit, expected",
    [
        (1.2, "10*9/L", 1.2),
        (1.2, "10^9/L", 1.2),
        (1.2, "G/L", 1.2),
        (1.2, "10*3/uL", 1.2),
        (1.2, "K/uL", 1.2),
        (1.2, "10^3/µL", 1.2),  # micro sign U+00B5
        (1.2, "10^3/μL", 1.2),  # Greek mu U+03BC
        (1200, "/uL", 1.2),
        (1200, "cells/uL", 1.2),
        (1200, "cells/µL", 1.2),
        (1200, "/mm3", 1.2),
        (1200, "/mm^3", 1.2),
    ],
)
def test_anc_conversion_to_10e9_per_l(params, value, unit, expected):
    assert nm.convert(value, unit, params.units.anc_to_10e9_per_l) == pytest.approx(expected)


@pytest.mark.parametrize("unit", ["%", "mmol/L", "10*9/mL", "", None, "g/L"])
def test_anc_unknown_or_percent_unit_is_not_an_anc(params, unit):
    assert nm.convert(45.0, unit, params.units.anc_to_10e9_per_l) is None


def test_anc_conversion_does_not_fold_case():
    # UCUM is case-sensitive: "g/l" is not "G/L" (giga per litre); only the micro sign and spaces are folded.
    assert nm.convert(1.0, "g/l", {"G/L": 1}) is None
    assert nm.convert(1.0, " G/L ", {"G/L": 1}) == 1.0


# ---- temperature --------------------------------------------------------------------------------------------------


def test_fahrenheit_value_and_unit_is_converted(params):
    t = _temp(params, value=100.4, unit="[degF]", site="oral")
    assert t.valid
    assert t.celsius == pytest.approx(38.0)
    assert nm.is_febrile(t.corrected_c, params.temperature.febrile_at_or_above_c)
    t2 = _temp(params, value=98.6, unit="[degF]", site="tympanic")
    assert t2.corrected_c == pytest.approx(37.0)
    assert not nm.is_febrile(t2.corrected_c, params.temperature.febrile_at_or_above_c)


def test_celsius_value_and_unit(params):
    t = _temp(params, value=38.4, unit="Cel", site="rectal")
    assert t.valid and t.corrected_c == pytest.approx(38.4)


def test_fahrenheit_typed_into_celsius_field_is_suspect_and_never_converted(params):
    t = _temp(params, temperature_c=100.4, site="oral")
    assert t.problem == "unit_suspect"
    assert not t.valid
    assert t.corrected_c is None  # not silently converted to 38.0


@pytest.mark.parametrize("celsius, ok", [(30.0, True), (44.0, True), (29.9, False), (44.1, False), (3.8, False)])
def test_plausible_range_is_30_to_44_inclusive(params, celsius, ok):
    t = _temp(params, temperature_c=celsius, site="oral")
    assert t.valid is ok
    if not ok:
        assert t.problem == "unit_suspect"


@pytest.mark.parametrize(
    "site, offset",
    [("axillary", 0.5), ("tympanic", 0.0), ("oral", 0.0), ("rectal", 0.0), ("Axillary", 0.5), (" oral ", 0.0)],
)
def test_site_correction(params, site, offset):
    t = _temp(params, temperature_c=37.2, site=site)
    assert t.valid
    assert t.corrected_c == pytest.approx(37.2 + offset)


@pytest.mark.parametrize("site", ["temporal_artery", "temporal artery", "forehead", "skin", "other", None, ""])
def test_non_protocol_or_missing_site_is_excluded(params, site):
    t = _temp(params, temperature_c=38.5, site=site)
    assert t.problem == "nonprotocol_site"
    assert t.corrected_c is None


@pytest.mark.parametrize("unit", ["K", "kelvin", None, "mg"])
def test_unknown_temperature_unit_is_unrecognized(params, unit):
    t = _temp(params, value=37.0, unit=unit)
    assert t.problem == "unit_unrecognized"
    assert t.celsius is None and t.corrected_c is None


def test_no_value_at_all_is_unrecognized(params):
    assert _temp(params).problem == "unit_unrecognized"


def test_febrile_exactly_at_38_is_febrile(params):
    threshold = params.temperature.febrile_at_or_above_c
    assert threshold == 38.0
    assert nm.is_febrile(38.0, threshold)
    assert not nm.is_febrile(37.99, threshold)
    assert nm.is_febrile(38.01, threshold)


def test_axillary_37_5_corrects_to_febrile(params):
    t = _temp(params, temperature_c=37.5, site="axillary")
    assert t.valid
    assert nm.is_febrile(t.corrected_c, params.temperature.febrile_at_or_above_c)


@pytest.mark.parametrize("reading", [37.49, 37.45])
def test_axillary_below_37_5_stays_afebrile(params, reading):
    t = _temp(params, temperature_c=reading, site="axillary")
    assert not nm.is_febrile(t.corrected_c, params.temperature.febrile_at_or_above_c)


def test_oral_37_99_is_not_febrile(params):
    t = _temp(params, temperature_c=37.99, site="oral")
    assert not nm.is_febrile(t.corrected_c, params.temperature.febrile_at_or_above_c)


# ---- calendar months and age ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "day, months, expected",
    [
        (dt.date(2024, 11, 30), 3, dt.date(2025, 2, 28)),
        (dt.date(2023, 11, 30), 3, dt.date(2024, 2, 29)),
        (dt.date(2024, 1, 31), 1, dt.date(2024, 2, 29)),
        (dt.date(2024, 2, 29), 12, dt.date(2025, 2, 28)),
        (dt.date(2024, 1, 15), 3, dt.date(2024, 4, 15)),
        (dt.date(2024, 10, 15), 3, dt.date(2025, 1, 15)),
        (dt.date(2024, 3, 31), -1, dt.date(2024, 2, 29)),
        (dt.date(2025, 1, 15), -1, dt.date(2024, 12, 15)),
        (dt.date(2025, 3, 31), -13, dt.date(2024, 2, 29)),
        (dt.date(2025, 2, 10), -12, dt.date(2024, 2, 10)),
        (dt.date(2025, 2, 10), 0, dt.date(2025, 2, 10)),
    ],
)
def test_add_months_clamps_to_month_end(day, months, expected):
    assert nm.add_months(day, months) == expected


def test_exactly_three_months_is_eligible_boundary():
    birth = dt.date(2024, 1, 15)
    assert nm.completed_months(birth, dt.date(2024, 4, 15)) == 3
    assert nm.completed_months(birth, dt.date(2024, 4, 14)) == 2


def test_three_months_from_30_november_is_end_of_february():
    birth = dt.date(2024, 11, 30)
    assert nm.completed_months(birth, dt.date(2025, 2, 28)) == 3
    assert nm.completed_months(birth, dt.date(2025, 2, 27)) == 2


def test_eighteenth_birthday_is_216_months():
    birth = dt.date(2007, 3, 10)
    assert nm.completed_months(birth, dt.date(2025, 3, 10)) == 216  # not eligible (< 216 required)
    assert nm.completed_months(birth, dt.date(2025, 3, 9)) == 215


def test_completed_months_before_birth_is_negative():
    assert nm.completed_months(dt.date(2024, 5, 1), dt.date(2024, 4, 30)) < 0


@settings(max_examples=300, deadline=None)
@given(
    birth=st.dates(min_value=dt.date(1990, 1, 1), max_value=dt.date(2030, 12, 31)),
    days=st.integers(min_value=0, max_value=30 * 366),
)
def test_completed_months_is_largest_m_with_add_months_not_after(birth, days):
    on = birth + dt.timedelta(days=days)
    m = nm.completed_months(birth, on)
    assert m >= 0
    assert nm.add_months(birth, m) <= on
    assert nm.add_months(birth, m + 1) > on


# ---- time anchors ---------------------------------------------------------------------------------------------------

T0 = dt.datetime.fromisoformat("2025-01-06T09:00:00+01:00")


@pytest.mark.parametrize(
    "hours, day",
    [(0, 1), (-5, 1), (-6, 1), (-6.01, 0), (17.99, 1), (18, 2), (23.5, 2), (24, 2), (41.99, 2), (42, 3)],
)
def test_dosing_day_windows(hours, day):
    assert nm.dosing_day(T0, T0 + dt.timedelta(hours=hours)) == day


def test_dosing_day_uses_elapsed_time_across_timezones():
    # T0 + 23.5 h expressed in UTC is still day 2
    at = (T0 + dt.timedelta(hours=23.5)).astimezone(dt.timezone.utc)
    assert nm.dosing_day(T0, at) == 2


def test_study_day_across_paris_dst_change():
    t0 = dt.datetime.fromisoformat("2025-03-29T22:00:00+01:00")
    assert nm.study_day(t0, t0, PARIS) == 1
    assert nm.study_day(t0, dt.datetime.fromisoformat("2025-03-30T14:00:00+02:00"), PARIS) == 2
    assert nm.study_day(t0, dt.datetime.fromisoformat("2025-03-29T23:59:00+01:00"), PARIS) == 1
    # 23:30 UTC on the 29th is 00:30+01:00 on the 30th in Paris: already study day 2
    assert nm.study_day(t0, dt.datetime(2025, 3, 29, 23, 30, tzinfo=dt.timezone.utc), PARIS) == 2


def test_local_date_is_site_local():
    at = dt.datetime.fromisoformat("2025-01-06T23:30:00+00:00")
    assert nm.local_date(at, PARIS) == dt.date(2025, 1, 7)


def test_hours_between_across_dst_with_explicit_offsets():
    start = dt.datetime.fromisoformat("2025-03-29T22:00:00+01:00")
    end = dt.datetime.fromisoformat("2025-03-30T14:00:00+02:00")
    assert nm.hours_between(start, end) == pytest.approx(15.0)
    # H15 in elapsed time is 14:00 local on the next day, not 13:00
    assert (start + dt.timedelta(hours=15)).astimezone(PARIS) == end
    assert (start + dt.timedelta(hours=15)).astimezone(PARIS).hour == 14


def test_hours_between_across_dst_with_zoneinfo_datetimes():
    start = dt.datetime(2025, 3, 29, 22, 0, tzinfo=PARIS)
    end = dt.datetime(2025, 3, 30, 14, 0, tzinfo=PARIS)
    assert nm.hours_between(start, end) == pytest.approx(15.0)


def test_dosing_day_across_dst_with_zoneinfo_datetimes():
    t0 = dt.datetime(2025, 3, 29, 22, 0, tzinfo=PARIS)
    at = dt.datetime(2025, 3, 30, 16, 0, tzinfo=PARIS)  # 17 h elapsed
    assert nm.dosing_day(t0, at) == 1

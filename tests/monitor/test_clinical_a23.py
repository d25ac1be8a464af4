"""Regression tests for RULES_SPEC A-23 (clarifications of 2026-12-01), written from the spec text.

Each case is one subject: the compliant `anakinra` timeline of rules/tests/bases.yaml (13.2 kg child, 92 cm,
T0 = 2025-01-13 09:00 Paris, enrolled at T0-1h, febrile until H8 and afebrile from H12, 4 mg/kg once a day on
days 1-14, every visit in its window) with the changes the case names. It runs alone through the real replay, the
real Monitor, the bundled rules and the durable_rules engine, and `expect` is the COMPLETE final alert set.

The cases are the boundaries where the monitor and an independent implementation of the spec disagreed
(issue 14): values rounded before a comparison (A-23.1), an empty 24-h window read as `unknown` (A-23.2), a
discontinuation before T0 (A-23.3), the LASTESC anchor and a start dose above 4.4 (A-23.4), one DOSE-DURATION
per extra day (A-23.5), one alert per dosing day (A-23.6), the closed 24-h window (A-23.7), the baseline weight
(A-23.8) and a live vaccine between enrollment and T0 (A-23.9).
"""

from __future__ import annotations

from typing import Any

import pytest

from monitor.engine import RulesEngine
from monitor.facts import standard_catalogue
from monitor.rules import DEFAULT_RULES_DIR, RuleSet, compile_condition
from monitor.ruletest import Base, RuleTest, load_suite, run_test

DAYS = range(1, 15)


@pytest.fixture(scope="module")
def bases() -> dict[str, Base]:
    return load_suite(DEFAULT_RULES_DIR / "tests").bases


def check(bases: dict[str, Base], rules: RuleSet, name: str, *, expect: list[dict[str, Any]],
          change: dict[str, dict[str, Any]] | None = None, add: list[dict[str, Any]] | None = None,
          drop: list[str] | None = None, until: str | None = None) -> None:
    test = RuleTest(name=name, base="anakinra", change=change or {}, add=add or [], drop=drop or [], until=until,
                    expect=expect)
    result = run_test(test, bases["anakinra"], rules)
    assert result.ok, f"{name}:\n  " + "\n  ".join(result.problems)


def temp(name: str, at: str, c: float) -> dict[str, Any]:
    return {"name": name, "type": "vital_sign", "at": at, "code": "8310-5", "temperature_c": c, "site": "tympanic"}


def dose(name: str, at: str, mg_per_kg: float, weight: float | None = 13.2) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "type": "drug_administration", "at": at, "drug": "anakinra",
                           "atc": "L04AC03", "route": "subcutaneous", "study_drug": True,
                           "dose_mg_per_kg": mg_per_kg, "weight_kg": weight}
    if weight is not None:
        out["dose_mg"] = round(mg_per_kg * weight, 6)
    return out


def missed(day: int) -> dict[str, Any]:
    """DOSE-MISSED-DAY for dosing day `day`: at the end of its window, T0 + 24(d-1) h + 18 h."""
    return {"rule": "DOSE-MISSED-DAY", "at": f"T0+{day - 1}d18h", "severity": "major"}


# ---------------------------------------------------------------------------------------------------------------
# A-23.1: no rounding before a comparison (eGFR, ANC, g/kg, mg/kg/day, hours); the 1e-9 tolerance of §2.7 only


def egfr_change(height_cm: float, value: float, unit: str) -> dict[str, dict[str, Any]]:
    loinc = "2160-0" if unit == "mg/dL" else "14682-9"
    return {"enrollment": {"height_cm": height_cm}, "height": {"value": height_cm},
            "creat_pre": {"value": value, "unit": unit, "loinc": loinc}}


RENAL = [
    # 0.413 x 106 / (129 / 88.4) = 29.99981: below 30 as computed, "30.00" once rounded to 2 decimals (issue 14)
    ("umol/L just under 30 (106 cm, 129 umol/L: 29.9998)", 106, 129, "umol/L", True),
    # 0.413 x 75 x 88.4 / 91.273 = 30 exactly; floating point lands within 1e-9 of 30: not < 30
    ("umol/L at 30 (75 cm, 91.273 umol/L)", 75, 91.273, "umol/L", False),
    ("umol/L just over 30 (75 cm, 91.27 umol/L: 30.001)", 75, 91.27, "umol/L", False),
    ("mg/dL just under 30 (75 cm, 1.03251 mg/dL: 29.9997)", 75, 1.03251, "mg/dL", True),
    ("mg/dL at 30 (75 cm, 1.0325 mg/dL)", 75, 1.0325, "mg/dL", False),
    ("mg/dL just over 30 (75 cm, 1.0324 mg/dL: 30.003)", 75, 1.0324, "mg/dL", False),
]


@pytest.mark.parametrize("op, threshold, value, holds", [
    ("lt", 30, 29.999999999999996, False),   # within 1e-9 of 30: equal, not below
    ("lt", 30, 29.9999999, True),
    ("gte", 38, 37.99999999999999, True),     # exactly 38.0 is febrile (§2.7), also after a float conversion
    ("gt", 8.8, 8.800000000000001, False),
    ("gt", 8.8, 8.8000001, True),
    ("lte", 1.1, 1.1000000000000003, True),
    ("gt", 0, 0.0, False),                   # 0 + 1e-9 is posted in a form the engine reads (ENGINE_NOTES)
    ("gt", 0, 0.001, True),
])
def test_rule_thresholds_compare_with_the_spec_tolerance_in_the_engine(op, threshold, value, holds):
    problems: list[str] = []
    expr = compile_condition({"value": {op: threshold}}, standard_catalogue()["baseline_lab"], problems)
    assert not problems
    engine = RulesEngine(definition={"r": {"all": [{"m": expr}], "run": "r"}}, version=f"tol{op}{threshold}{holds}")
    engine.sync("s", {"f": {"value": value}})
    assert (("r", "f") in engine.matches("s")) is holds


@pytest.mark.parametrize("label, height, value, unit, excluded", RENAL, ids=[r[0] for r in RENAL])
def test_elig_renal_compares_egfr_as_computed(bases, rules, label, height, value, unit, excluded):
    expect = [{"rule": "ELIG-RENAL", "at": "T0-1h", "severity": "major"}] if excluded else []
    check(bases, rules, f"ELIG-RENAL {label}", change=egfr_change(height, value, unit), expect=expect)


def test_elig_renal_message_rounds_for_display_only(bases, rules):
    test = RuleTest(name="display", base="anakinra", change=egfr_change(106, 129, "umol/L"),
                    expect=[{"rule": "ELIG-RENAL"}])
    result = run_test(test, bases["anakinra"], rules)
    assert result.ok, result.problems
    (alert,) = result.alerts
    assert "eGFR 29.9998 mL/min" in alert.message
    assert alert.evidence["values"]["value"] == pytest.approx(29.99981, abs=1e-5)
    assert alert.evidence["values"]["value"] < 30


@pytest.mark.parametrize("at, excluded", [("T0-1m", True), ("T0", False)])
def test_height_for_egfr_is_observed_before_t0(bases, rules, at, excluded):
    # §2.7: enrollment height, else the latest 8302-2 observation before T0; without a height no ELIG-RENAL
    expect = [{"rule": "ELIG-RENAL", "at": "T0-1h"}] if excluded else []
    check(bases, rules, f"height observed at {at}, 300 umol/L",
          change={"enrollment": {"height_cm": None}, "height": {"at": at},
                  "creat_pre": {"value": 300, "unit": "umol/L"}}, expect=expect)


@pytest.mark.parametrize("fahrenheit, febrile", [(100.3999993, False), (100.4, True)])
def test_corrected_temperature_is_not_rounded_before_the_febrile_test(bases, rules, fahrenheit, febrile):
    # 100.3999993 F = 37.9999996 C: below 38.0 beyond the 1e-9 tolerance (it read 38.0 after rounding to 6 places)
    expect = [{"rule": "DOSE-H12-MISSED-ESCALATION", "at": "T0+15h"}] if febrile else []
    check(bases, rules, f"H12 reading {fahrenheit} F",
          change={"temp_h12": {"temperature_c": None, "value": fahrenheit, "unit": "[degF]"}}, expect=expect)


@pytest.mark.parametrize("value, unit, excluded", [
    (1499.99, "/uL", True),       # 1.49999 x10^9/L: was 1.5 after rounding to 4 decimals
    (1500, "/uL", False),         # 1.5 exactly is eligible (scenario 15)
    (1.5, "10*9/L", False),
    (1.4999999, "10*9/L", True),
])
def test_elig_neutropenia_compares_anc_as_computed(bases, rules, value, unit, excluded):
    expect = [{"rule": "ELIG-NEUTROPENIA", "at": "T0-1h"}] if excluded else []
    check(bases, rules, f"ANC {value} {unit}", change={"anc_pre": {"value": value, "unit": unit}}, expect=expect)


@pytest.mark.parametrize("mgkgday, fires", [(50.0004, True), (50.0, False), (50.0000000001, False)])
def test_aspirin_dose_compares_mg_per_kg_per_day_as_computed(bases, rules, mgkgday, fires):
    expect = [{"rule": "CONMED-ASPIRIN-DOSE", "at": "T0", "severity": "minor"}] if fires else []
    check(bases, rules, f"aspirin {mgkgday}", change={"aspirin": {"dose_mg_per_kg_per_day": mgkgday}},
          expect=expect)


@pytest.mark.parametrize("delay, fires", [("24h0.25m", True), ("24h", False)])
def test_sae_late_report_compares_the_delay_as_computed(bases, rules, delay, fires):
    sae = {"name": "sae", "type": "adverse_event", "at": "T0+3d", "recorded": f"T0+3d{delay}", "term": "dehydration",
           "meddra_pt": "dehydration", "grade": 3, "serious": True, "serious_criteria": ["hospitalization"],
           "related_to_study_drug": False, "investigator_aware_at": "T0+3d"}
    expect = [{"rule": "SAFE-SAE-LATE-REPORT", "at": "T0+4d"}] if fires else []
    check(bases, rules, f"SAE reported {delay} after awareness", add=[sae], expect=expect)


def test_fever_secondary_compares_the_afebrile_hours_as_computed(bases, rules):
    # the last febrile reading is at H8; a febrile reading 1.2 s short of 24 h later is not after >= 24 h afebrile
    check(bases, rules, "febrile 23.9997 h after the last febrile reading",
          change={"temp_h32": {"at": "T0+31h59.98m", "temperature_c": 38.2}}, expect=[])
    check(bases, rules, "febrile exactly 24 h after the last febrile reading",
          change={"temp_h32": {"temperature_c": 38.2}}, expect=[{"rule": "FEVER-SECONDARY", "at": "T0+32h"}])


# ---------------------------------------------------------------------------------------------------------------
# A-23.3: only a serious AE, a withdrawal or a rescue switch documented after T0 discontinues treatment, and it
# excuses only the dosing days whose window starts after it


def sae(at: str, serious: bool = True) -> dict[str, Any]:
    return {"name": "ae", "type": "adverse_event", "at": at, "term": "dehydration", "meddra_pt": "dehydration",
            "grade": 3 if serious else 2, "serious": serious, "serious_criteria": ["hospitalization"] if serious else [],
            "related_to_study_drug": False}


def test_a_serious_ae_before_t0_excuses_no_missed_day(bases, rules):
    check(bases, rules, "SAE the evening before T0, days 5-8 without a dose",
          add=[sae("T0-14h")], drop=["dose_d5", "dose_d6", "dose_d7", "dose_d8"],
          expect=[missed(5), missed(6), missed(7), missed(8)])


def test_a_serious_ae_on_day_3_excuses_only_the_later_days(bases, rules):
    # the SAE at T0+2d2h falls inside day 3's window [T0+42h, T0+66h): day 3 is still checked, day 4 on excused
    check(bases, rules, "SAE on day 3 after its dose, no dose after",
          add=[sae("T0+2d2h")], drop=[f"dose_d{d}" for d in range(4, 15)], expect=[])
    check(bases, rules, "SAE on day 3, day 2 and day 3 without a dose: both still checked",
          add=[sae("T0+2d2h")], drop=[f"dose_d{d}" for d in range(2, 15)], expect=[missed(2), missed(3)])


def test_a_serious_ae_on_day_10_excuses_days_11_to_14_only(bases, rules):
    check(bases, rules, "SAE on day 10, day 8 missed before it, no dose after",
          add=[sae("T0+9d3h")], drop=["dose_d8", "dose_d11", "dose_d12", "dose_d13", "dose_d14"],
          expect=[missed(8)])


def test_a_non_serious_ae_does_not_discontinue(bases, rules):
    check(bases, rules, "non-serious AE on day 3, no dose after",
          add=[sae("T0+2d2h", serious=False)], drop=[f"dose_d{d}" for d in range(4, 15)],
          expect=[*(missed(d) for d in range(4, 15)),
                  {"rule": "DOSE-DURATION", "at": "T0+13d18h", "severity": "major"}])


def test_a_rescue_switch_after_t0_discontinues(bases, rules):
    rescue = {"name": "rescue", "type": "drug_administration", "at": "T0+4d3h", "drug": "methylprednisolone",
              "atc": "H02AB04", "route": "intravenous", "dose_mg_per_kg": 30, "dose_mg": 396, "weight_kg": 13.2,
              "study_drug": False, "purpose": "rescue"}
    check(bases, rules, "IV methylprednisolone on day 5, no anakinra after",
          add=[rescue], drop=[f"dose_d{d}" for d in range(6, 15)], expect=[])


# ---------------------------------------------------------------------------------------------------------------
# A-23.4: the start dose is not an escalation; A′ is the last injection of the initial-ladder escalation


@pytest.mark.parametrize("start, expect", [
    (4.4, []),
    (4.5, [{"rule": "DOSE-START", "at": "T0", "severity": "major"}]),
    (6.0, [{"rule": "DOSE-START", "at": "T0", "severity": "major"}]),
])
def test_a_start_dose_above_4_4_is_dose_start_only(bases, rules, start, expect):
    check(bases, rules, f"start dose {start} mg/kg, afebrile at H12",
          change={"dose_d1": {"dose_mg_per_kg": start, "dose_mg": round(start * 13.2, 6)}}, expect=expect)


def febrile_until(hours: int) -> dict[str, dict[str, Any]]:
    """Every base reading from H0 up to `hours` made febrile (38.5 C)."""
    names = ["temp_h0", "temp_h4", "temp_h8", "temp_h12", "temp_h16", "temp_h20", "temp_h24", "temp_h28",
             "temp_h32", "temp_h36", "temp_h40", "temp_h44", "temp_h48", "temp_h60", "temp_h72"]
    return {n: {"temperature_c": 38.5} for n in names if int(n[6:]) <= hours}


def test_a_start_dose_of_6_is_no_escalation_and_gives_no_lastesc(bases, rules):
    # febrile to H60 with a start of 6 mg/kg and no ladder step: the primary endpoint fails at T0+48h; a start dose
    # is no escalation, so LASTESC is not evaluated (it would duplicate the primary endpoint at T0+48h)
    check(bases, rules, "start 6 mg/kg, febrile to H60, no supplement, day 2 at 6",
          change={**febrile_until(60), "dose_d1": {"dose_mg_per_kg": 6, "dose_mg": 79.2},
                  "dose_d2": {"dose_mg_per_kg": 6, "dose_mg": 79.2}},
          expect=[{"rule": "DOSE-START", "at": "T0"},
                  {"rule": "DOSE-H12-MISSED-ESCALATION", "at": "T0+15h"},
                  {"rule": "DOSE-H24-MISSED-ESCALATION", "at": "T0+27h"},
                  {"rule": "ENDPOINT-PRIMARY-FAILURE", "at": "T0+48h"}])


def test_a_split_h12_supplement_anchors_lastesc_on_its_last_injection(bases, rules):
    # febrile to H60, H12 supplement split 1 + 1.2 mg/kg at H12 and H14 (both in [H11, H15]); no H24 reading, so
    # no H24 verdict, and day 2 stays at the day-1 level. A′ = H14, LASTESC at H14 + 48 h = T0+62h.
    change = {**febrile_until(60), "dose_d2": {"dose_mg_per_kg": 6.2, "dose_mg": 81.84}}
    del change["temp_h24"]
    check(bases, rules, "split H12 supplement", change=change, drop=["temp_h24"],
          add=[dose("supp_a", "T0+12h", 1.0), dose("supp_b", "T0+14h", 1.2)],
          expect=[{"rule": "FEVER-ASSESSMENT-MISSING", "at": "T0+25h"},
                  {"rule": "ENDPOINT-PRIMARY-FAILURE", "at": "T0+48h"},
                  {"rule": "ENDPOINT-PRIMARY-FAILURE-LASTESC", "at": "T0+62h"}])


def test_a_split_day_2_escalation_anchors_lastesc_on_its_last_injection(bases, rules):
    # febrile to H72; H12 supplement 2 mg/kg at H12 (level 6), day-2 escalation to 8 split 7 + 1 at H24 and H25:
    # A′ = H25 (the first injection alone already crosses 6 x 1.1), LASTESC at T0+73h
    change = {**febrile_until(72), "dose_d2": {"dose_mg_per_kg": 7, "dose_mg": 92.4}}
    change.update({f"dose_d{d}": {"dose_mg_per_kg": 8, "dose_mg": 105.6} for d in range(3, 15)})
    check(bases, rules, "split day-2 escalation",
          change=change,
          add=[dose("supp", "T0+12h", 2.0), dose("d2b", "T0+25h", 1.0), temp("temp_h73", "T0+73h", 38.3),
               temp("temp_h80", "T0+80h", 37.2)],
          expect=[{"rule": "ENDPOINT-PRIMARY-FAILURE", "at": "T0+48h"},
                  {"rule": "ENDPOINT-PRIMARY-FAILURE-LASTESC", "at": "T0+73h"}])


# ---------------------------------------------------------------------------------------------------------------
# A-23.2 and A-23.7: from day 3, an escalation needs a febrile reading in [dose - 24 h, dose]; none is none


DAY3 = {"dose_d3": {"at": "T0+60h", "dose_mg_per_kg": 6, "dose_mg": 79.2}}  # day 3 = [T0+42h, T0+66h)
WINDOW = ["temp_h36", "temp_h40", "temp_h44", "temp_h48", "temp_h60"]     # the base readings in [T0+36h, T0+60h]
UNJUSTIFIED = {"rule": "DOSE-ESCALATION-WITHOUT-FEVER", "at": "T0+60h", "severity": "major"}


@pytest.mark.parametrize("label, keep, expect", [
    ("no reading at all in the 24 h", {}, [UNJUSTIFIED]),
    ("one afebrile reading (37.6 at H48)", {"temp_h48": 37.6}, [UNJUSTIFIED]),
    ("a febrile reading at H48", {"temp_h48": 38.5}, [{"rule": "FEVER-SECONDARY", "at": "T0+48h"}]),
    ("a febrile reading exactly at dose - 24 h", {"temp_h36": 38.5}, [{"rule": "FEVER-SECONDARY", "at": "T0+36h"}]),
    ("a febrile reading exactly at the dose", {"temp_h60": 38.5}, [{"rule": "FEVER-SECONDARY", "at": "T0+60h"}]),
    ("an afebrile reading at H48 and a febrile one exactly at the dose", {"temp_h48": 37.6, "temp_h60": 38.5},
     [{"rule": "FEVER-SECONDARY", "at": "T0+60h"}]),
])
def test_day_3_escalation_needs_a_febrile_reading_in_the_closed_24h_window(bases, rules, label, keep, expect):
    change = {**DAY3, **{n: {"temperature_c": c} for n, c in keep.items()}}
    check(bases, rules, f"day-3 escalation, {label}", change=change,
          drop=[n for n in WINDOW if n not in keep], expect=expect)


def test_day_3_escalation_with_a_febrile_reading_just_before_the_window(bases, rules):
    check(bases, rules, "day-3 escalation, febrile reading 1 min before dose - 24 h",
          change=DAY3, drop=WINDOW, add=[temp("early", "T0+35h59m", 38.5)],
          expect=[UNJUSTIFIED, {"rule": "FEVER-SECONDARY", "at": "T0+35h59m"}])


def test_one_alert_per_dosing_day_at_the_first_crossing_administration(bases, rules):
    # A-23.6: day 3 gets 4 + 5 + 1 mg/kg: the 5 crosses both 4.4 (no fever) and 8.8; the last 1 adds nothing
    check(bases, rules, "three administrations on day 3",
          add=[dose("d3b", "T0+2d6h", 5), dose("d3c", "T0+2d8h", 1)],
          expect=[{"rule": "DOSE-ESCALATION-WITHOUT-FEVER", "at": "T0+2d6h"},
                  {"rule": "DOSE-MAX-EXCEEDED", "at": "T0+2d6h", "severity": "critical"}])


def test_dose_duration_one_alert_per_extra_day(bases, rules):
    # A-23.5: doses on dosing days 15 and 16 are two deviations, each at its first administration
    check(bases, rules, "anakinra on days 15 and 16",
          add=[dose("d15", "T0+14d", 4), dose("d15b", "T0+14d2h", 0.1), dose("d16", "T0+15d", 4)],
          expect=[{"rule": "DOSE-DURATION", "at": "T0+14d", "severity": "minor"},
                  {"rule": "DOSE-DURATION", "at": "T0+15d", "severity": "minor"}])


# ---------------------------------------------------------------------------------------------------------------
# A-23.8: baseline weight = enrollment weight, else the latest 29463-7 observation before T0


def no_baseline(dose_weight: float | None) -> dict[str, dict[str, Any]]:
    change: dict[str, dict[str, Any]] = {"enrollment": {"weight_kg": None}, "ivig1": {"weight_kg": None}}
    for d in DAYS:
        change[f"dose_d{d}"] = {"weight_kg": dose_weight,
                                "dose_mg": round(4 * dose_weight, 6) if dose_weight else None}
    return change


MISSING = {"rule": "DQ-WEIGHT-MISSING", "at": "T0-1h", "severity": "major"}
UNDER = {"rule": "ELIG-WEIGHT", "at": "T0-1h", "severity": "major"}


@pytest.mark.parametrize("kg", [4.8, 5.2])
def test_a_weight_only_on_dose_records_is_no_baseline_weight(bases, rules, kg):
    check(bases, rules, f"weight {kg} kg only on the dose records", change=no_baseline(kg), drop=["weight"],
          expect=[MISSING])


@pytest.mark.parametrize("kg", [4.8, 5.2])
def test_a_weight_only_after_t0_is_no_baseline_weight(bases, rules, kg):
    check(bases, rules, f"first weight {kg} kg on day 3", change={**no_baseline(None), "weight": {"at": "T0+2d", "value": kg}},
          expect=[MISSING])


@pytest.mark.parametrize("kg", [4.8, 5.2])
def test_a_weight_observed_exactly_at_t0_is_not_before_t0(bases, rules, kg):
    check(bases, rules, f"weight {kg} kg observed at T0", change={**no_baseline(None), "weight": {"at": "T0", "value": kg}},
          expect=[MISSING])


@pytest.mark.parametrize("kg, expect", [(4.8, [UNDER]), (5.0, []), (5.2, [])])
def test_a_weight_observed_just_before_t0_is_the_baseline(bases, rules, kg, expect):
    check(bases, rules, f"weight {kg} kg observed at T0-1m",
          change={**no_baseline(None), "weight": {"at": "T0-1m", "value": kg}}, expect=expect)


def test_the_enrollment_weight_comes_first(bases, rules):
    check(bases, rules, "enrollment 4.8 kg, observation 13.2 kg before T0",
          change={"enrollment": {"weight_kg": 4.8}}, expect=[UNDER])


# ---------------------------------------------------------------------------------------------------------------
# A-16, A-23.9: a live vaccine after enrollment_date - 1 month and before T0 is ELIG-LIVE-VACCINE (at enrollment);
# from T0 on it is CONMED-LIVE-VACCINE


def vaccine(at: str) -> dict[str, Any]:
    return {"name": "mmr", "type": "immunization", "at": at, "vaccine": "MMR", "atc": "J07BD52",
            "live_attenuated": True, "route": "subcutaneous"}


ELIG_VACCINE = {"rule": "ELIG-LIVE-VACCINE", "at": "T0-1h", "severity": "major"}


@pytest.mark.parametrize("label, at, expect", [
    # enrollment is 2025-01-13 08:00 Paris: enrollment_date - 1 month = 2024-12-13
    ("exactly a month before enrollment (2024-12-13)", "T0-31d", []),
    ("a day less than a month before (2024-12-14)", "T0-30d", [ELIG_VACCINE]),
    ("on the enrollment day before the enrollment instant", "T0-2h", [ELIG_VACCINE]),
    ("on the enrollment day after the enrollment instant", "T0-30m", [ELIG_VACCINE]),
    ("exactly at T0", "T0", [{"rule": "CONMED-LIVE-VACCINE", "at": "T0", "severity": "critical"}]),
    ("on day 3", "T0+2d", [{"rule": "CONMED-LIVE-VACCINE", "at": "T0+2d", "severity": "critical"}]),
])
def test_live_vaccine_between_the_lookback_and_t0(bases, rules, label, at, expect):
    check(bases, rules, f"live vaccine {label}", add=[vaccine(at)], expect=expect)


def test_live_vaccine_on_a_later_date_than_enrollment_but_before_t0(bases, rules):
    # enrolled the day before T0: a vaccine on the T0 date, before T0, is still before the first dose
    check(bases, rules, "enrolled at T0-1d, live vaccine at T0-2h",
          change={"enrollment": {"at": "T0-1d", "consent_signed_at": "T0-2d"}}, add=[vaccine("T0-2h")],
          expect=[{"rule": "ELIG-LIVE-VACCINE", "at": "T0-1d", "severity": "major"}])

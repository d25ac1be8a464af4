"""Plausibility ranges (rules/tables/plausibility.yaml): a record with a number no child could have is refused as
`implausible` (field, value and range in the detail, never the subject); a real but ineligible record, or one a
data-quality rule reports, is not; every range is data a rule author edits, and `rules validate` refuses a range
written backwards with its file and line. Everything runs the real rules, the real engine and the real replay."""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from connectors.base import RawRecord
from connectors.memory import ListSink, MemorySource
from monitor.clock import ReplayClock
from monitor.config import Settings
from monitor.errors import EventRejected, RuleFileError
from monitor.evaluator import Monitor
from monitor.events import decode, parse_event
from monitor.metrics import Metrics
from monitor.replay import replay
from monitor.rules import DEFAULT_RULES_DIR, PlausibleRange, RuleSet, load_rules
from monitor.ruletest import RuleTest, build_events, load_suite
from monitor.service import MonitorService

SUBJECT = "KD-PLAUS-7731"
TABLE = "tables/plausibility.yaml"


@pytest.fixture(scope="module")
def base():
    return load_suite(DEFAULT_RULES_DIR / "tests").bases["anakinra"]


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, target)
    return target


def timeline(base, *, change: dict[str, dict[str, Any]] | None = None, add: list[dict[str, Any]] | None = None,
             subject: str = SUBJECT, until: str = "T0+16d") -> tuple[list[dict[str, Any]], dt.datetime]:
    """The rule tests' compliant anakinra timeline (rules/tests/bases.yaml), changed, cut at `until`."""
    test = RuleTest(name="plausibility", base="anakinra", subject=subject, change=change or {}, add=add or [],
                    until=until)
    events, horizon = build_events(test, base)
    return [e for e in events if dt.datetime.fromisoformat(e["occurred_at"]) <= horizon], horizon


def run(events: list[dict[str, Any]], horizon: dt.datetime, rules: RuleSet) -> tuple[list, list]:
    """Replay through a fresh monitor: (final alerts, rejects as (record, EventRejected))."""
    clock = ReplayClock()
    monitor = Monitor.create(rules=rules, clock=clock)
    alerts, rejects = ListSink(), ListSink()
    replay(source=MemorySource(events=events), monitor=monitor, clock=clock, alerts=alerts, rejects=rejects,
           until=horizon)
    withdrawn = {a.alert_id for a in alerts.items if a.status == "retracted"}
    return [a for a in alerts.items if a.status == "raised" and a.alert_id not in withdrawn], rejects.items


def admit(rules: RuleSet, payload: dict[str, Any]) -> None:
    """decode → parse_event → Monitor.admit, as replay and the service do."""
    monitor = Monitor.create(rules=rules, clock=ReplayClock())
    monitor.admit(parse_event(decode(json.dumps(payload).encode())))


def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"event_id": "EV-1", "subject_id": SUBJECT, "site_id": "FR-BIC-01", "arm": "anakinra", "type": kind,
            "occurred_at": "2025-01-14T09:00:00+01:00", "recorded_at": "2025-01-14T09:10:00+01:00", **fields}


def shown(x: float) -> str:
    return format(x, ".10g")


def range_text(entry: PlausibleRange) -> str:
    return f"[{shown(entry.range[0])}, {shown(entry.range[1])}]"


# ---- hostile values -------------------------------------------------------------------------------------------

HOSTILE: list[tuple[str, dict[str, Any], list[tuple[str, str, str]]]] = [
    # (case, payload, [(field, value as shown, table entry)])
    ("anakinra weight 1e308, dose -1 mg/kg",
     event("drug_administration", drug="anakinra", atc="L04AC03", study_drug=True, weight_kg=1e308,
           dose_mg_per_kg=-1),
     [("weight_kg", "1e+308", "weight_kg"), ("dose_mg_per_kg", "-1", "dose_mg_per_kg")]),
    ("temperature 1e308 in the Celsius field",
     event("vital_sign", code="8310-5", temperature_c=1e308, site="oral"),
     [("temperature_c", "1e+308", "temperature_cel")]),
    ("temperature -500 in the Celsius field",
     event("vital_sign", code="8310-5", temperature_c=-500, site="oral"),
     [("temperature_c", "-500", "temperature_cel")]),
    ("temperature -500 [degF]",
     event("vital_sign", code="8310-5", value=-500, unit="[degF]", site="oral"),
     [("value", "-500", "temperature_degf")]),
    ("dose 1e308 mg/kg",
     event("drug_administration", drug="anakinra", atc="L04AC03", study_drug=True, dose_mg_per_kg=1e308),
     [("dose_mg_per_kg", "1e+308", "dose_mg_per_kg")]),
    ("IVIG 1e308 g/kg",
     event("drug_administration", drug="IVIG", atc="J06BA02", dose_g_per_kg=1e308),
     [("dose_g_per_kg", "1e+308", "dose_g_per_kg")]),
    ("aspirin -40 mg/kg/day",
     event("concomitant_medication", drug="aspirin", atc="N02BA01", dose_mg_per_kg_per_day=-40),
     [("dose_mg_per_kg_per_day", "-40", "dose_mg_per_kg_per_day")]),
    ("weight 600 lb (272 kg after weight_to_kg)",
     event("vital_sign", code="29463-7", analyte="body_weight", value=600, unit="[lb_av]"),
     [("value", "600 [lb_av]", "weight_kg")]),
    ("ANC 5,000,000 /uL (5000 x10^9/L)",
     event("lab_result", analyte="ANC", loinc="751-8", value=5e6, unit="/uL"),
     [("value", "5000000 /uL", "labs.ANC")]),
    ("creatinine 1e-300 mg/dL (eGFR would be 1e302)",
     event("lab_result", analyte="creatinine", value=1e-300, unit="mg/dL"),
     [("value", "1e-300", "labs.creatinine")]),
    ("ALT reference high 1e-300 (the ULN the hepatitis ratio divides by)",
     event("lab_result", analyte="ALT", loinc="1742-6", value=50, unit="U/L",
           reference_range={"low": 0, "high": 1e-300, "unit": "U/L"}),
     [("reference_range.high", "1e-300", "labs.ALT.reference_high")]),
    ("a value in an unlisted unit beyond any unit",
     event("lab_result", analyte="ANC", value=1e300, unit="%"),
     [("value", "1e+300 %", "unrecognized_unit")]),
    ("worst Z 1e308 and a coronary Z of -1e308",
     event("echocardiogram", visit="D14", worst_z=1e308, coronary_z_scores={"LAD": -1e308}),
     [("worst_z", "1e+308", "coronary_z"), ("coronary_z_scores.LAD", "-1e+308", "coronary_z")]),
    ("activity score 11",
     event("visit", visit="D2", nominal_day=2, physician_activity_score=11),
     [("physician_activity_score", "11", "activity_score")]),
    ("AE grade with 400 digits",
     event("adverse_event", term="rash", grade=10**400),
     [("grade", "an integer of 401 digits", "ae_grade")]),
    ("KD fever days 10**30 (float() of it would overflow the engine)",
     event("enrollment", birth_date="2021-05-03", kd_diagnosis={"fever_days_at_first_ivig": 10**30}),
     [("kd_diagnosis.fever_days_at_first_ivig", "an integer of 31 digits", "kd_fever_days")]),
    ("gestational age 1e308 weeks",
     event("enrollment", birth_date="2021-05-03", gestational_age_at_birth_weeks=1e308),
     [("gestational_age_at_birth_weeks", "1e+308", "gestational_age_weeks")]),
]


def _entry(rules: RuleSet, name: str) -> PlausibleRange:
    table = rules.tables.plausibility
    if name.startswith("labs."):
        parts = name.split(".")
        lab = table.labs[parts[1]]
        if len(parts) == 3:
            assert lab.reference_high is not None
            return PlausibleRange(range=lab.reference_high, unit=lab.unit, why=lab.why)
        return lab
    entry = getattr(table, name)
    assert isinstance(entry, PlausibleRange)
    return entry


@pytest.mark.parametrize("payload,expected", [(p, e) for _, p, e in HOSTILE], ids=[c for c, _, _ in HOSTILE])
def test_a_hostile_value_is_refused_naming_field_value_and_range(rules, payload, expected):
    with pytest.raises(EventRejected) as info:
        admit(rules, payload)
    assert info.value.reason == "implausible"
    detail = info.value.detail
    assert detail.startswith(f"{payload['type']} event: ")
    for field, value, entry_name in expected:
        assert f"{field} = {value}" in detail, detail
        assert range_text(_entry(rules, entry_name)) in detail, detail
        assert entry_name in detail
    assert TABLE in detail
    assert SUBJECT not in detail and SUBJECT not in str(info.value)


@pytest.mark.parametrize("raw,field,reason", [
    (b'"reference_range": {"low": 0, "high": "n/a", "unit": "U/L"}', "reference_range.high", "bad_number"),
    (b'"reference_range": {"low": 0, "high": NaN}', "reference_range.high", "bad_number"),
    (b'"reference_range": {"low": "-Infinity", "high": 40}', "reference_range.low", "bad_number"),
    (b'"reference_range": {"high": true}', "reference_range.high", "invalid_field"),  # as for any number field
], ids=["n/a", "NaN", "-Infinity as text", "true"])
def test_an_unusable_reference_range_is_refused_at_parsing(raw, field, reason):
    payload = json.dumps(event("lab_result", analyte="ALT", value=50, unit="U/L"))[:-1].encode() + b", " + raw + b"}"
    with pytest.raises(EventRejected) as info:
        parse_event(decode(payload))
    assert info.value.reason == reason
    assert f"'{field}'" in info.value.detail and SUBJECT not in info.value.detail


@pytest.mark.parametrize("raw", [b'"worst_z": Infinity', b'"coronary_z_scores": {"LAD": NaN}',
                                 b'"coronary_z_scores": {"RCA": "high"}'])
def test_non_finite_or_text_z_scores_are_refused_at_parsing(raw):
    payload = json.dumps(event("echocardiogram", visit="D14"))[:-1].encode() + b", " + raw + b"}"
    with pytest.raises(EventRejected) as info:
        parse_event(decode(payload))
    assert info.value.reason == "bad_number"


def test_a_numeric_reference_range_in_text_is_read_as_a_number(rules):
    parsed = parse_event(event("lab_result", analyte="ALT", value=50, unit="U/L",
                               reference_range={"low": "0", "high": " 45 "}))
    assert parsed.reference_range is not None and parsed.reference_range.high == 45.0
    admit(rules, event("lab_result", analyte="ALT", value=50, unit="U/L", reference_range={"high": "45"}))


# ---- edges: the bounds themselves are plausible, one step beyond is not ---------------------------------------

def _targets(rules: RuleSet) -> dict[str, Callable[[float], dict[str, Any]]]:
    """One event per table entry that puts a value into that entry's range."""
    kd = {"birth_date": "2021-05-03"}
    out: dict[str, Callable[[float], dict[str, Any]]] = {
        "weight_kg": lambda v: event("enrollment", **kd, weight_kg=v),
        "height_cm": lambda v: event("enrollment", **kd, height_cm=v),
        "gestational_age_weeks": lambda v: event("enrollment", **kd, gestational_age_at_birth_weeks=v),
        "temperature_cel": lambda v: event("vital_sign", code="8310-5", temperature_c=v, site="oral"),
        "temperature_degf": lambda v: event("vital_sign", code="8310-5", value=v, unit="[degF]", site="oral"),
        "dose_mg": lambda v: event("drug_administration", drug="anakinra", dose_mg=v),
        "dose_mg_per_kg": lambda v: event("drug_administration", drug="anakinra", dose_mg_per_kg=v),
        "dose_g": lambda v: event("drug_administration", drug="IVIG", dose_g=v),
        "dose_g_per_kg": lambda v: event("drug_administration", drug="IVIG", dose_g_per_kg=v),
        "dose_mg_per_kg_per_day": lambda v: event("concomitant_medication", drug="aspirin",
                                                  dose_mg_per_kg_per_day=v),
        "dose_iu": lambda v: event("concomitant_medication", drug="cholecalciferol", dose_iu=v),
        "coronary_z": lambda v: event("echocardiogram", visit="D14", coronary_z_scores={"LAD": v}),
        "activity_score": lambda v: event("visit", visit="D2", parent_activity_score=v),
        "ae_grade": lambda v: event("adverse_event", term="rash", grade=v),
        "visit_nominal_day": lambda v: event("visit", visit="D2", nominal_day=v),
        "kd_crp_mg_dl": lambda v: event("enrollment", **kd, kd_diagnosis={"crp_mg_dl": v}),
        "kd_esr_mm_h": lambda v: event("enrollment", **kd, kd_diagnosis={"esr_mm_h": v}),
        "kd_fever_days": lambda v: event("enrollment", **kd, kd_diagnosis={"signs_present_by_fever_day": v}),
        "other_lab_value": lambda v: event("lab_result", analyte="base excess", value=v, unit="mmol/L"),
        "other_vital_value": lambda v: event("vital_sign", code="8867-4", value=v, unit="/min"),
        "unrecognized_unit": lambda v: event("lab_result", analyte="ANC", value=v, unit="%"),
    }
    for analyte, lab in rules.tables.plausibility.labs.items():
        out[f"labs.{analyte}"] = (lambda a, u: lambda v: event("lab_result", analyte=a, value=v, unit=u))(
            analyte, lab.unit)
    return out


INTEGER_FIELDS = {"ae_grade", "visit_nominal_day", "kd_fever_days"}


def _edges(rules: RuleSet):
    table = rules.tables.plausibility
    names = [n for n in type(table).model_fields if n != "labs"] + [f"labs.{a}" for a in table.labs]
    return names


def test_every_table_entry_has_an_edge_test(rules):
    assert set(_edges(rules)) == set(_targets(rules))


@pytest.mark.parametrize("name", _edges(load_rules()))
def test_the_bounds_are_accepted_and_one_step_beyond_is_refused(rules, name):
    make = _targets(rules)[name]
    low, high = _entry(rules, name).range
    if name in INTEGER_FIELDS:
        inside, outside = [int(low), int(high)], [int(low) - 1, int(high) + 1]
    else:
        inside, outside = [low, high], [math.nextafter(low, -math.inf), math.nextafter(high, math.inf)]
    for value in inside:
        admit(rules, make(value))
    for value in outside:
        with pytest.raises(EventRejected) as info:
            admit(rules, make(value))
        assert info.value.reason == "implausible" and name in info.value.detail, info.value.detail


# ---- plausible but ineligible, or a data-quality finding: never refused ----------------------------------------

def test_a_4_kg_child_is_accepted_and_elig_weight_fires(rules, base):
    four = {"weight_kg": 4.0}
    change = {"enrollment": four, "weight": {"value": 4.0}, "ivig1": four,
              **{f"dose_d{d}": four for d in range(1, 15)}}
    alerts, rejects = run(*timeline(base, change=change), rules)
    assert rejects == []
    weight = [a for a in alerts if a.rule == "ELIG-WEIGHT"]
    assert len(weight) == 1 and "weight 4 kg" in weight[0].message
    _, rejects = run(*timeline(base, change={"enrollment": {"weight_kg": 0.29}}), rules)
    assert [e.reason for _, e in rejects] == ["implausible"]


@pytest.mark.parametrize("reading", [{"temperature_c": 100.0}, {"temperature_c": 375.0},
                                     {"value": 37.2, "unit": "[degF]"}],
                         ids=["100 F in the Celsius field", "decimal point lost", "Celsius sent as degF"])
def test_a_temperature_typo_is_dq_temp_unit_suspect_not_a_refusal(rules, base, reading):
    add = [{"name": "typo", "type": "vital_sign", "at": "T0+6h", "code": "8310-5", "site": "oral", **reading}]
    alerts, rejects = run(*timeline(base, add=add), rules)
    assert rejects == []
    assert [a.rule for a in alerts if a.evidence.get("events") == [f"{SUBJECT}-typo"]] == ["DQ-TEMP-UNIT-SUSPECT"]


def test_a_value_in_an_unlisted_unit_is_dq_unit_unrecognized_not_a_refusal(rules, base):
    add = [{"name": "anc_pct", "type": "lab_result", "at": "T0+2d", "analyte": "ANC", "loinc": "751-8",
            "value": 45.0, "unit": "%"}]
    alerts, rejects = run(*timeline(base, add=add), rules)
    assert rejects == []
    assert "DQ-UNIT-UNRECOGNIZED" in {a.rule for a in alerts if a.evidence.get("events") == [f"{SUBJECT}-anc_pct"]}


def test_a_zero_dose_and_a_negative_z_score_are_plausible(rules):
    admit(rules, event("drug_administration", drug="anakinra", study_drug=True, dose_mg_per_kg=0.0))
    admit(rules, event("echocardiogram", visit="D14", worst_z=-2.1, coronary_z_scores={"LAD": -2.1}))


def test_a_refused_record_changes_nothing_the_rules_see(rules, base):
    clean, rejects = run(*timeline(base), rules)
    assert rejects == []
    add = [{"name": "absurd", "type": "vital_sign", "at": "T0+12h", "code": "8310-5", "temperature_c": 1e308,
            "site": "oral"}]
    alerts, rejects = run(*timeline(base, add=add), rules)
    assert [(e.reason, e.event_id) for _, e in rejects] == [("implausible", f"{SUBJECT}-absurd")]
    assert sorted(a.alert_id for a in alerts) == sorted(a.alert_id for a in clean)


# ---- any float, anywhere: accepted and evaluated, or refused; never anything else -----------------------------

def _with(ev: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(ev)
    node = out
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return out


# (base event to change, field path; the value may also be read in the unit named)
NUMERIC_FIELDS: list[tuple[str, str, dict[str, Any]]] = [
    ("enrollment", "weight_kg", {}), ("enrollment", "height_cm", {}),
    ("enrollment", "gestational_age_at_birth_weeks", {}), ("enrollment", "kd_diagnosis.crp_mg_dl", {}),
    ("enrollment", "kd_diagnosis.esr_mm_h", {}), ("enrollment", "kd_diagnosis.fever_days_at_first_ivig", {}),
    ("enrollment", "kd_diagnosis.signs_present_by_fever_day", {}),
    ("temp_h12", "temperature_c", {}), ("temp_h12", "value", {"temperature_c": None, "unit": "[degF]"}),
    ("temp_h12", "value", {"temperature_c": None, "unit": "Cel"}),
    ("temp_h12", "value", {"temperature_c": None, "unit": "K"}),
    ("weight", "value", {}), ("weight", "value", {"unit": "[lb_av]"}), ("height", "value", {"unit": "m"}),
    ("dose_d1", "dose_mg_per_kg", {}), ("dose_d2", "dose_mg", {"dose_mg_per_kg": None}),
    ("dose_d2", "weight_kg", {}), ("ivig1", "dose_g_per_kg", {}), ("ivig1", "dose_g", {"dose_g_per_kg": None}),
    ("aspirin", "dose_mg_per_kg_per_day", {}), ("aspirin", "dose_iu", {}),
    ("anc_d3", "value", {}), ("anc_d3", "value", {"unit": "/uL"}), ("anc_pre", "value", {}),
    ("creat_pre", "value", {}), ("inr_pre", "value", {}), ("crp_d3", "value", {}),
    ("alt_d7", "value", {}), ("alt_d7", "reference_range.high", {}), ("alt_d7", "reference_range.low", {}),
    ("ast_pre", "reference_range.high", {}),
    ("visit_d2", "physician_activity_score", {}), ("visit_d2", "parent_activity_score", {}),
    ("visit_d2", "nominal_day", {}),
    ("echo_d14", "worst_z", {}), ("echo_d14", "coronary_z_scores.LAD", {}),
]
HOSTILE_FLOATS = st.one_of(
    st.floats(),  # every float: nan, ±inf, ±1e308, subnormals, -0.0 ...
    st.sampled_from([1e308, -1e308, 1e-300, -1e-300, 5e-324, 1e16, 3e-05, 0.0, -1.0, 1e-05]),
    st.integers(min_value=-(10**40), max_value=10**40),
)


def _field(name: str, path: str, **extra: Any) -> tuple[str, str, dict[str, Any]]:
    return next(t for t in NUMERIC_FIELDS if t[:2] == (name, path) and all(t[2].get(k) == v for k, v in extra.items()))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.sampled_from(NUMERIC_FIELDS), value=HOSTILE_FLOATS)
# where only the ranges keep a derived value finite: ALT / ULN, eGFR = k x height / creatinine, float(fever days)
@example(target=_field("alt_d7", "reference_range.high"), value=5e-324)
@example(target=_field("creat_pre", "value"), value=5e-324)
@example(target=_field("enrollment", "kd_diagnosis.fever_days_at_first_ivig"), value=10**400)
@example(target=_field("temp_h12", "temperature_c"), value=1e308)
def test_any_number_in_any_numeric_field_is_evaluated_or_refused_never_anything_else(rules, base, target, value):
    name, path, extra = target
    events, horizon = timeline(base, until="T0+16d")
    hit = next(e for e in events if e["event_id"] == f"{SUBJECT}-{name}")
    changed = _with({**hit, **extra}, path, value)
    events = [changed if e is hit else e for e in events]
    # replay: decode → parse_event → admit (EventRejected goes to rejects) → ingest and evaluation, with the real
    # engine; any other exception fails the test
    _, rejects = run(events, horizon, rules)
    assert all(isinstance(err, EventRejected) for _, err in rejects)
    assert [err.event_id for _, err in rejects] in ([], [changed["event_id"]])
    if rejects:
        err = rejects[0][1]
        assert err.reason in ("implausible", "bad_number") and SUBJECT not in err.detail


# ---- the ranges are data ---------------------------------------------------------------------------------------

def plant(path: Path, old: str, new: str) -> int:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    index = text.index(old)
    path.write_text(text[:index] + new + text[index + len(old):], encoding="utf-8")
    return text[:index].count("\n") + 1


def test_a_range_written_backwards_is_refused_with_file_and_line(rules_dir):
    table = rules_dir / TABLE
    line = plant(table, "{range: [0.3, 250]", "{range: [250, 0.3]")
    with pytest.raises(RuleFileError) as info:
        load_rules(rules_dir)
    assert [(p, n) for p, n, _ in info.value.problems] == [(str(table), line)]
    assert "low end 250 is above the high end 0.3" in info.value.problems[0][2]
    assert info.value.problems[0][2].startswith("weight_kg.range")
    out = subprocess.run([sys.executable, "-m", "monitor", "rules", "validate", str(rules_dir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and f"plausibility.yaml:{line}:" in out.stdout + out.stderr


@pytest.mark.parametrize("old,new,says", [
    ("ae_grade:               {range: [0, 5]", "ae_grade:               {range: [0, five]", "valid number"),
    ("ae_grade:               {range: [0, 5]", "ae_grade:               {range: [0, \"5\"]", "valid number"),
    ("ae_grade:               {range: [0, 5]", "ae_grade:               {range: [0, .inf]", "finite"),
    ("ae_grade:               {range: [0, 5]", "ae_grade:               {range: [0]", "range.1: Field required"),
    ("ae_grade:               {range: [0, 5], unit: CTCAE, why:", "ae_grade:               {unit: CTCAE, why:",
     "ae_grade.range: Field required"),
    ("  INR:           {range", "  INR_x:         {range", "analyte 'INR'"),
    ("unit: \"{INR}\"", "unit: \"1/L\"", "labs.INR.unit"),
], ids=["word", "quoted number", "infinite", "one bound", "no range", "analyte missing", "lab unit not converted to"])
def test_a_non_numeric_or_missing_bound_is_refused(rules_dir, old, new, says):
    line = plant(rules_dir / TABLE, old, new)
    with pytest.raises(RuleFileError) as info:
        load_rules(rules_dir)
    problems = info.value.problems
    assert any(says in m for _, _, m in problems), problems
    assert all(p == str(rules_dir / TABLE) for p, _, _ in problems)
    assert any(n == line for _, n, _ in problems) or "analyte" in says, problems


def test_editing_a_range_changes_the_verdict(rules_dir, base):
    add = [{"name": "weight_late", "type": "vital_sign", "at": "T0+3d", "code": "29463-7",
            "analyte": "body_weight", "value": 13.4, "unit": "kg"}]
    events, horizon = timeline(base, add=add)
    _, rejects = run(events, horizon, load_rules(rules_dir))
    assert rejects == []
    plant(rules_dir / TABLE, "{range: [0.3, 250]", "{range: [0.3, 13.3]")
    _, rejects = run(events, horizon, load_rules(rules_dir))
    assert [(e.event_id, e.reason) for _, e in rejects] == [(f"{SUBJECT}-weight_late", "implausible")]
    assert "[0.3, 13.3] kg" in rejects[0][1].detail


# ---- the service: a refused record is a dead letter with its bytes, counted by reason ---------------------------

class _Source:
    def __init__(self, records: list) -> None:
        self.batches = [records]
        self.commits: list = []

    def poll(self, timeout_ms: int) -> list:
        return self.batches.pop(0) if self.batches else []

    def commit(self, offsets: dict) -> None:
        self.commits.append(dict(offsets))

    def assignment(self) -> set:
        return {TopicPartition("events", 0)}

    def lag(self) -> dict:
        return {}


def test_the_service_dead_letters_an_implausible_record_with_its_bytes_and_counts_it(rules, base, caplog):
    add = [{"name": "absurd", "type": "drug_administration", "at": "T0+1d", "drug": "anakinra", "atc": "L04AC03",
            "study_drug": True, "weight_kg": 1e308, "dose_mg_per_kg": -1}]
    events, _ = timeline(base, add=add, until="T0+3d")
    raw = [json.dumps(e, default=str).encode() for e in events]
    records = [RawRecord(value=v, origin=f"events/0@{i}", topic="events", partition=0, offset=i, timestamp_ms=None)
               for i, v in enumerate(raw)]
    clock = ReplayClock()
    alerts, dead = ListSink(), ListSink()
    metrics = Metrics(registry=CollectorRegistry())
    svc = MonitorService(settings=Settings(clock="stream", rules_watch_seconds=0), clock=clock, alerts=alerts,
                         dead_letters=dead, monitor=Monitor.create(rules=rules, clock=clock), published=set(),
                         metrics=metrics)
    svc.attach(_Source(records))
    with caplog.at_level("WARNING"):
        svc.run_once(threading.Event())
    [(record, error)] = dead.items
    assert record.value == raw[next(i for i, e in enumerate(events) if e["event_id"].endswith("-absurd"))]
    assert error.reason == "implausible" and "weight_kg = 1e+308" in error.detail
    assert metrics.registry.get_sample_value("protocol_monitor_events_rejected_total", {"reason": "implausible"}) == 1
    assert SUBJECT not in caplog.text and SUBJECT not in error.detail
    assert len(svc.monitor.subjects[SUBJECT].events) == len(events) - 1

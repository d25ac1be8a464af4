"""A rule author's one-file data edits change verdicts with no Python change (README, "Changing the rules")."""

from __future__ import annotations

import datetime as dt
import shutil

import pytest

from monitor.rules import DEFAULT_RULES_DIR, load_rules
from tests.conftest import SHARED, final_alerts, load_scenario, run_events

SCENARIO_18 = SHARED / "scenarios" / "18_excl_cyp_inhibitors.jsonl"


@pytest.fixture()
def rules_copy(tmp_path):
    target = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, target)
    return target


@pytest.mark.skipif(not SCENARIO_18.is_file(), reason="published scenarios not found")
def test_adding_a_cyp450_drug_to_the_table_makes_it_exclude(rules_copy, tmp_path):
    header, events = load_scenario(SCENARIO_18)
    before = {(a.rule, a.subject_id) for a in final_alerts(run_events(events, rules=load_rules(), tmp_path=tmp_path)[0])}
    assert ("ELIG-CYP-INTERACTOR", "ANA-018B") not in before  # azithromycin is not listed

    table = rules_copy / "tables" / "cyp450.yaml"
    table.write_text(table.read_text() + "  - {drug: azithromycin, atc: [J01FA10], role: inhibitor, enzymes: [3A4], "
                     "strength: weak, lookback_days: 7}\n")
    edited = load_rules(rules_copy)
    alerts = final_alerts(run_events(events, rules=edited, tmp_path=tmp_path)[0])
    hits = [a for a in alerts if (a.rule, a.subject_id) == ("ELIG-CYP-INTERACTOR", "ANA-018B")]
    assert len(hits) == 1 and hits[0].severity == "minor"  # weak interactor → minor, as the rule maps it
    assert edited.version != load_rules().version


def test_changing_the_max_daily_dose_threshold_changes_the_verdict(rules_copy, tmp_path):
    from monitor.ruletest import load_suite, run_test

    suite = load_suite(DEFAULT_RULES_DIR / "tests")
    base = suite.bases["anakinra"]
    from monitor.ruletest import RuleTest

    test = RuleTest(name="8 mg/kg on day 3", base="anakinra", change={"dose_d3": {"dose_mg_per_kg": 8}},
                    expect=[])
    shipped = run_test(test, base, load_rules())
    assert not any(a.rule == "DOSE-MAX-EXCEEDED" for a in shipped.alerts)

    # the maximum is a level in parameters.yaml (dosing.max_mg_per_kg_day); the rule reads max x (1 + tolerance)
    params = rules_copy / "parameters.yaml"
    text = params.read_text()
    assert text.count("max_mg_per_kg_day: 8.0") == 1
    params.write_text(text.replace("max_mg_per_kg_day: 8.0", "max_mg_per_kg_day: 7.0"))  # 7.7 with the tolerance
    edited = run_test(test, base, load_rules(rules_copy))
    assert [a.rule for a in edited.alerts if a.rule == "DOSE-MAX-EXCEEDED"] == ["DOSE-MAX-EXCEEDED"]


# ---- thresholds taken from parameters.yaml ({param: name}): one number for the rule and the derivation ----------

SCENARIO_07 = SHARED / "scenarios" / "07_escalation_without_fever.jsonl"
SCENARIO_38 = SHARED / "scenarios" / "38_secondary_fever_permitted_escalation.jsonl"


def _set_parameter(rules_dir, name: str, value: str) -> None:
    path = rules_dir / "parameters.yaml"
    lines = path.read_text().splitlines()
    hits = [i for i, line in enumerate(lines) if line.startswith(f"{name}:")]
    assert len(hits) == 1, name
    comment = lines[hits[0]].partition("#")[2]
    lines[hits[0]] = f"{name}: {value}" + (f"   #{comment}" if comment else "")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.skipif(not SCENARIO_07.is_file(), reason="published scenarios not found")
def test_the_escalation_ratio_is_one_parameter_for_the_rule_and_the_ladder(rules_copy, tmp_path):
    header, events = load_scenario(SCENARIO_07)
    rule = "DOSE-ESCALATION-WITHOUT-FEVER"
    before = [a for a in final_alerts(run_events(events, rules=load_rules(), tmp_path=tmp_path)[0]) if a.rule == rule]
    assert before and "1.1 (escalation_ratio)" in before[0].evidence["rule_condition"]
    _set_parameter(rules_copy, "escalation_ratio", "3.0")  # no dose of this timeline triples the day's base
    edited = load_rules(rules_copy)
    compiled = str(edited.rules[rule].definitions)
    assert "3.000000001" in compiled and "1.100000001" not in compiled
    after = [a for a in final_alerts(run_events(events, rules=edited, tmp_path=tmp_path)[0]) if a.rule == rule]
    assert after == []


@pytest.mark.skipif(not SCENARIO_38.is_file(), reason="published scenarios not found")
def test_the_secondary_fever_afebrile_hours_parameter_drives_fever_secondary(rules_copy, tmp_path):
    header, events = load_scenario(SCENARIO_38)
    until = header["evaluation_horizon"]
    before = {a.rule for a in final_alerts(run_events(events, until=until, rules=load_rules(), tmp_path=tmp_path)[0])}
    assert "FEVER-SECONDARY" in before
    _set_parameter(rules_copy, "secondary_fever_afebrile_hours", "2000")
    after = {a.rule for a in final_alerts(run_events(events, until=until, rules=load_rules(rules_copy),
                                                     tmp_path=tmp_path)[0])}
    assert "FEVER-SECONDARY" not in after


def test_an_unknown_parameter_in_a_rule_is_refused_with_file_and_line(rules_copy):
    from monitor.errors import RuleFileError

    path = rules_copy / "dosing.yaml"
    path.write_text(path.read_text().replace("{param: escalation_ratio}", "{param: escalaton_ratio}", 1))
    with pytest.raises(RuleFileError) as caught:
        load_rules(rules_copy)
    (where, line, message), = caught.value.problems
    assert where.endswith("dosing.yaml") and line is not None
    assert "escalaton_ratio" in message and "did you mean 'escalation_ratio'" in message


SCENARIO_04 = SHARED / "scenarios" / "04_missed_escalation_h12.jsonl"
SCENARIO_43 = SHARED / "scenarios" / "43_missing_h12_temperature.jsonl"
SCENARIO_39 = SHARED / "scenarios" / "39_ivig_retreatment_dose_error.jsonl"


def _alerts(path, rules, tmp_path, prefix=("DOSE-H12", "FEVER-ASSESSMENT")):
    header, events = load_scenario(path)
    alerts = final_alerts(run_events(events, until=header["evaluation_horizon"], rules=rules, tmp_path=tmp_path)[0])
    return sorted((a.rule, dt.datetime.fromisoformat(a.at)) for a in alerts if a.rule.startswith(prefix))


@pytest.mark.skipif(not SCENARIO_04.is_file(), reason="published scenarios not found")
def test_moving_h12_to_h10_is_a_parameter_edit_that_moves_the_alerts(rules_copy, tmp_path):
    """ladder_steps in parameters.yaml: the H12 step at T0 + 10 h judges the reading closest to H10 and fires at
    H10 + 3 h, two hours earlier; a subject with no reading near H12 but one near H10 becomes assessable."""
    path = rules_copy / "parameters.yaml"
    path.write_text(path.read_text().replace("{name: H12, hours: 12,", "{name: H12, hours: 10,"))
    edited = load_rules(rules_copy)
    before = _alerts(SCENARIO_04, load_rules(), tmp_path)
    after = _alerts(SCENARIO_04, edited, tmp_path)
    assert [r for r, _ in before] == [r for r, _ in after] == ["DOSE-H12-MISSED-ESCALATION"]
    assert before[0][1] - after[0][1] == dt.timedelta(hours=2)
    assert [r for r, _ in _alerts(SCENARIO_43, load_rules(), tmp_path)] == ["FEVER-ASSESSMENT-MISSING"]
    assert [r for r, _ in _alerts(SCENARIO_43, edited, tmp_path)] == ["DOSE-H12-MISSED-ESCALATION"]


@pytest.mark.skipif(not SCENARIO_39.is_file(), reason="published scenarios not found")
def test_how_the_ivig_arm_t0_is_identified_is_a_parameter(rules_copy, tmp_path):
    """A site that codes the retreatment purpose differently: with the code added to ivig_retreatment_purposes
    the subject's alerts are those of the published coding; without it the subject has no T0 and they differ."""
    header, events = load_scenario(SCENARIO_39)
    recoded = [dict(e, purpose="retraitement_ivig") if e.get("purpose") == "study_treatment_retreatment" else e
               for e in events]
    assert recoded != events

    def run(evts, rules):
        alerts = run_events(evts, until=header["evaluation_horizon"], rules=rules, tmp_path=tmp_path)[0]
        return sorted((a.rule, a.at) for a in final_alerts(alerts))

    published = run(events, load_rules())
    assert run(recoded, load_rules()) != published
    path = rules_copy / "parameters.yaml"
    path.write_text(path.read_text().replace("ivig_retreatment_purposes: [study_treatment_retreatment]",
                                             "ivig_retreatment_purposes: [study_treatment_retreatment, "
                                             "retraitement_ivig]"))
    assert run(recoded, load_rules(rules_copy)) == published


SCENARIO_03 = SHARED / "scenarios" / "03_correct_escalation_h12_h24.jsonl"


def _t0(events: list[dict]) -> dt.datetime:
    return min(dt.datetime.fromisoformat(e["occurred_at"]) for e in events
               if e["type"] == "drug_administration" and e.get("study_drug") and "anakinra" in e["drug"].lower())


@pytest.mark.skipif(not SCENARIO_03.is_file(), reason="published scenarios not found")
def test_changing_the_base_dose_is_a_parameter_edit_that_moves_dose_start(rules_copy, tmp_path):
    """dosing.start_mg_per_kg: the accepted start range follows it (± tolerance), in the rule and in the escalation
    base the derivation uses. A correct 4 mg/kg start is wrong for a protocol that starts at 3 (4 > 3.3)."""
    header, events = load_scenario(SCENARIO_03)
    before = _alerts(SCENARIO_03, load_rules(), tmp_path, prefix="DOSE-START")
    assert before == []
    path = rules_copy / "parameters.yaml"
    text = path.read_text()
    assert "start_mg_per_kg: 4.0" in text
    path.write_text(text.replace("start_mg_per_kg: 4.0", "start_mg_per_kg: 3.0"))
    after = _alerts(SCENARIO_03, load_rules(rules_copy), tmp_path, prefix="DOSE-START")
    assert after == [("DOSE-START", _t0(events))]
    edited = load_rules(rules_copy)
    assert edited.parameters.dosing.start_low_mg_per_kg == pytest.approx(2.7)
    assert edited.parameters.dosing.start_high_mg_per_kg == pytest.approx(3.3)


@pytest.mark.skipif(not SCENARIO_03.is_file(), reason="published scenarios not found")
def test_adding_a_ladder_step_is_a_parameter_edit_that_adds_its_assessment(rules_copy, tmp_path):
    """A new ladder step (an H36 assessment of the day-2 level) adds its assessment window: with no reading in
    [H36 - 2 h, H36 + 1 h], FEVER-ASSESSMENT-MISSING fires for H36 at H36 + 1 h, and only with the step added."""
    header, events = load_scenario(SCENARIO_03)
    t0 = _t0(events)
    gap = [e for e in events if not (e["type"] == "vital_sign" and e.get("temperature_c") is not None
                                     and t0 + dt.timedelta(hours=33) <= dt.datetime.fromisoformat(e["occurred_at"])
                                     <= t0 + dt.timedelta(hours=38))]
    assert len(gap) < len(events)

    def run(rules):
        alerts = run_events(gap, until=header["evaluation_horizon"], rules=rules, tmp_path=tmp_path)[0]
        return sorted((a.rule, dt.datetime.fromisoformat(a.at), a.evidence["values"].get("window"))
                      for a in final_alerts(alerts))

    assert [a for a in run(load_rules()) if a[0] == "FEVER-ASSESSMENT-MISSING"] == []
    path = rules_copy / "parameters.yaml"
    text = path.read_text()
    h24 = next(line for line in text.splitlines() if "{name: H24," in line)
    path.write_text(text.replace(h24, h24 + "\n  - {name: H36, hours: 36, given: day_total, dosing_day: 2, "
                                             "levels_mg_per_kg: {4: 6, 6: 8}}"))
    added = [a for a in run(load_rules(rules_copy)) if a[0] == "FEVER-ASSESSMENT-MISSING"]
    assert added == [("FEVER-ASSESSMENT-MISSING", t0 + dt.timedelta(hours=37), "H36")]


def test_the_arm_codes_are_data(rules_copy, tmp_path):
    """parameters.yaml `arms`: a protocol that codes the anakinra arm `ANA` gets the same alerts from records
    carrying `ANA` as this one does from `anakinra`; a code that is not an arm is refused with the codes known."""
    from tests.conftest import SCENARIOS

    path = next(p for p in SCENARIOS if p.name.startswith("04_"))
    header, events = load_scenario(path)
    recoded = [dict(e, arm="ANA") if e.get("arm") == "anakinra" else e for e in events]

    def run(evts, rules):
        alerts, rejects, _ = run_events(evts, until=header["evaluation_horizon"], rules=rules, tmp_path=tmp_path)
        return sorted((a.rule, a.at) for a in final_alerts(alerts)), rejects

    published, _ = run(events, load_rules())
    assert published
    refused, rejects = run(recoded, load_rules())
    assert rejects and all("parameters.yaml arms" in str(r) for r in rejects)
    target = rules_copy / "parameters.yaml"
    target.write_text(target.read_text().replace("  anakinra: anakinra ", "  anakinra: ANA "))
    assert run(recoded, load_rules(rules_copy)) == (published, [])

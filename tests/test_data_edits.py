"""A rule author's one-file data edits change verdicts with no Python change (README, "Changing the rules")."""

from __future__ import annotations

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

    dosing = rules_copy / "dosing.yaml"
    text = dosing.read_text()
    assert text.count("{lte: 8.8}") == 1 and text.count("{gt: 8.8}") == 1
    dosing.write_text(text.replace("{lte: 8.8}", "{lte: 7.5}").replace("{gt: 8.8}", "{gt: 7.5}"))
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

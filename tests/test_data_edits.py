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

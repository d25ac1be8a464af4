"""`rules diff` on the published scenarios between the shipped rules and variants."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import sys

import pytest

from monitor.diff import diff_rules
from monitor.rules import DEFAULT_RULES_DIR, load_rules
from tests.conftest import SCENARIOS

DEADLINE_RULES = {"DOSE-H12-MISSED-ESCALATION", "DOSE-H24-MISSED-ESCALATION", "DOSE-MISSED-DAY", "DOSE-DURATION",
                  "ENDPOINT-PRIMARY-FAILURE", "ENDPOINT-PRIMARY-FAILURE-LASTESC", "FEVER-ASSESSMENT-MISSING",
                  "SCHED-VISIT-MISSED", "SCHED-CRP-MISSING", "SCHED-ECHO-D45-MISSING"}
pytestmark = pytest.mark.skipif(not SCENARIOS, reason="published scenarios not found")


def variant(tmp_path, name, old, new, file="parameters.yaml"):
    target = tmp_path / name
    shutil.copytree(DEFAULT_RULES_DIR, target)
    path = target / file
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    return load_rules(target)


def per_scenario(tmp_path, old, new):
    for scenario in SCENARIOS:
        lines = scenario.read_text().splitlines()
        import json

        horizon = json.loads(lines[0]).get("evaluation_horizon")
        events = tmp_path / f"{scenario.stem}.jsonl"
        events.write_text("\n".join(lines[1:]) + "\n")
        yield scenario.stem, diff_rules(old=old, new=new, paths=[events],
                                        until=dt.datetime.fromisoformat(horizon) if horizon else None)


def test_a_six_hour_grace_only_delays_deadline_alerts(tmp_path):
    shipped = load_rules()
    six = variant(tmp_path, "grace6", "deadline_grace_hours: 2 ", "deadline_grace_hours: 6 ")
    delayed = 0
    for name, d in per_scenario(tmp_path, shipped, six):
        assert not d.added and not d.removed, f"{name}: the grace changed a verdict"
        for old, new, changes in d.changed:
            assert set(changes) == {"detected_at"} and old.rule in DEADLINE_RULES, (name, old.rule, changes)
            before, after = (dt.datetime.fromisoformat(x) for x in changes["detected_at"])
            assert after > before
            delayed += 1
        # a later grace can only spare provisional alerts, never create them
        assert not d.provisional_added, (name, [a.rule for a in d.provisional_added])
    assert delayed > 0, "some deadline alert should be detected later with a 6 h grace"


def test_a_lower_anc_threshold_removes_exactly_the_neutropenia_exclusions(tmp_path):
    shipped = load_rules()
    lower = variant(tmp_path, "anc1", "value: {lt: 1.5}", "value: {lt: 1.0}", file="eligibility.yaml")
    removed = {}
    for name, d in per_scenario(tmp_path, shipped, lower):
        assert not d.added and not d.changed
        removed[name] = sorted((a.rule, a.subject_id) for a in d.removed)
    hits = {k: v for k, v in removed.items() if v}
    assert hits and all(v == [("ELIG-NEUTROPENIA", v[0][1])] for v in hits.values()), hits
    assert {"13_excl_neutropenia_si_units", "14_excl_neutropenia_cells_per_uL"} <= set(hits)


def test_the_command_prints_changes_per_rule_and_site(tmp_path):
    lower = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, lower)
    (lower / "eligibility.yaml").write_text((lower / "eligibility.yaml").read_text().replace(
        "value: {lt: 1.5}", "value: {lt: 1.0}"))
    events = tmp_path / "13.jsonl"
    scenario = next(p for p in SCENARIOS if p.stem.startswith("13_"))
    events.write_text("\n".join(scenario.read_text().splitlines()[1:]) + "\n")
    out = subprocess.run([sys.executable, "-m", "monitor", "rules", "diff", "--old", str(DEFAULT_RULES_DIR),
                          "--new", str(lower), str(events)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "- ELIG-NEUTROPENIA" in out.stdout and "removed" in out.stdout and "FR-" in out.stdout

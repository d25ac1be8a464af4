"""The synthetic cohort generator (monitor/generate.py) and a replay of what it produces."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from monitor.errors import EventRejected
from monitor.events import parse_event
from monitor.generate import EXPECTED_RULES, cohort_plan, generate, write_cohort
from monitor.rules import load_rules

ROOT = Path(__file__).resolve().parents[2]
PARIS = ZoneInfo("Europe/Paris")
INFO_RULES = {"ENDPOINT-PRIMARY-FAILURE", "ENDPOINT-PRIMARY-FAILURE-LASTESC", "ENDPOINT-CORONARY-D45",
              "FEVER-SECONDARY"}


def _cohort(**kw) -> list[dict]:
    args = {"subjects": 24, "days": 20, "seed": 7, "sites": 4, "deviation_rate": 0.5} | kw
    return list(generate(**args))


@pytest.fixture(scope="module")
def cohort() -> list[dict]:
    return _cohort(subjects=40, days=60, seed=11, deviation_rate=1.0)


def test_same_seed_same_cohort() -> None:
    assert _cohort() == _cohort()


def test_different_seeds_differ() -> None:
    assert _cohort(seed=7) != _cohort(seed=8)


def test_every_event_parses(cohort: list[dict]) -> None:
    for event in cohort:
        try:
            parse_event(event)
        except EventRejected as exc:  # pragma: no cover - the message is the useful part
            pytest.fail(f"{event['event_id']} rejected: {exc}")


def test_delivery_order_and_times(cohort: list[dict]) -> None:
    previous = None
    for event in cohort:
        occurred = dt.datetime.fromisoformat(event["occurred_at"])
        recorded = dt.datetime.fromisoformat(event["recorded_at"])
        assert previous is None or recorded >= previous, event["event_id"]
        assert recorded >= occurred, event["event_id"]
        for value in (occurred, recorded):  # site-local Paris time with the offset in force at that instant
            assert value.utcoffset() == value.astimezone(PARIS).utcoffset(), event["event_id"]
        previous = recorded
    offsets = Counter(e["occurred_at"][-6:] for e in cohort)
    assert set(offsets) == {"+01:00", "+02:00"}


def test_ids_unique_except_retransmissions(cohort: list[dict]) -> None:
    seen: dict[str, dict] = {}
    repeats = 0
    for event in cohort:
        held = seen.setdefault(event["event_id"], event)
        if held is not event:
            assert held == event, "a repeated event_id must be a byte-identical retransmission"
            repeats += 1
    planted = sum(1 for p in cohort_plan(subjects=40, seed=11, deviation_rate=1.0) if p.deviation == "duplicate")
    assert repeats == planted


def test_arms_sites_and_subject_shape(cohort: list[dict]) -> None:
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for event in cohort:
        by_subject[event["subject_id"]].append(event)
    arms = Counter(events[0]["arm"] for events in by_subject.values())
    assert arms["anakinra"] >= 10 and arms["ivig"] >= 10
    for subject, events in by_subject.items():
        arm = events[0]["arm"]
        assert subject.startswith("ANA-" if arm == "anakinra" else "IVG-")
        assert {e["arm"] for e in events} == {arm} and len({e["site_id"] for e in events}) == 1
        kinds = Counter(e["type"] for e in events)
        assert kinds["enrollment"] == 1
        visits = [e["visit"] for e in events if e["type"] == "visit"]
        assert visits == ["D2", "D3", "D4", "D6", "D7", "D14", "D30", "D45", "D60"]
        study = list({e["event_id"]: e for e in events  # a planted retransmission counts once
                      if e["type"] == "drug_administration" and e["study_drug"]}.values())
        if arm == "ivig":
            assert len(study) == 1 and study[0]["purpose"] == "study_treatment_retreatment"
        else:
            assert {e["drug"] for e in study} == {"anakinra"} and len(study) >= 14
    assert 70 <= len(cohort) / len(by_subject) <= 140  # about 100 events per subject over 60 days


def test_write_cohort(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cohort.jsonl"
    assert write_cohort(subjects=6, days=10, seed=3, sites=2, deviation_rate=0.5, output=str(out)) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    expected = [json.dumps(e, separators=(",", ":")) for e in generate(subjects=6, days=10, seed=3, sites=2,
                                                                       deviation_rate=0.5)]
    assert lines == expected
    assert f"generated {len(lines)} events, 6 subjects" in capsys.readouterr().err


# ---- replay through the real command ------------------------------------------------------------------------
def _replay_events(path: Path, events: Iterable[dict], rules: Path | None = None) -> list[dict]:
    """`protocol-monitor replay` of `events` (written to `path`), with `--rules` if given; the alert records."""
    with path.open("w", encoding="utf-8") as handle:
        for event in events:
            handle.write(json.dumps(event, separators=(",", ":")) + "\n")
    argv = [sys.executable, "-m", "monitor", "replay", str(path), *(["--rules", str(rules)] if rules else [])]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)  # noqa: S603
    assert proc.returncode == 0, proc.stderr
    assert "rejected: 0" in proc.stderr, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def _replay(tmp_path: Path, name: str, **kw) -> tuple[list[dict], list]:
    alerts = _replay_events(tmp_path / f"{name}.jsonl", generate(**kw))
    plans = cohort_plan(subjects=kw["subjects"], seed=kw["seed"], sites=kw.get("sites", 5),
                        deviation_rate=kw["deviation_rate"])
    return alerts, plans


def test_replay_planted_deviations_raise_their_alerts(tmp_path: Path) -> None:
    alerts, plans = _replay(tmp_path, "deviations", subjects=30, days=20, seed=2, deviation_rate=1.0)
    assert {p.deviation for p in plans} == set(EXPECTED_RULES)  # this seed plants every kind
    rules = Counter(a["rule"] for a in alerts if a["status"] == "raised")
    assert rules["DOSE-MAX-EXCEEDED"] + rules["ELIG-NEUTROPENIA"] >= 1, rules
    # each planted deviation ends with the alert it was planted for, on its own subject
    final: dict[str, Counter[str]] = defaultdict(Counter)
    for a in alerts:
        final[a["subject_id"]][a["rule"]] += 1 if a["status"] == "raised" else -1
    for plan in plans:
        open_rules = {r for r, n in final[plan.subject_id].items() if n > 0}
        for rule in EXPECTED_RULES[plan.deviation]:
            assert rule in open_rules, (plan.subject_id, plan.deviation, sorted(open_rules))
        if plan.deviation == "late_dose_record":  # provisional H12 alert, withdrawn when the late record lands
            assert any(a["subject_id"] == plan.subject_id and a["status"] == "retracted"
                       and a["rule"] == "DOSE-H12-MISSED-ESCALATION" for a in alerts)


def test_replay_clean_cohort_has_no_dosing_or_eligibility_alerts(tmp_path: Path) -> None:
    alerts, _ = _replay(tmp_path, "clean", subjects=30, days=20, seed=3, deviation_rate=0.0)
    wrong = [(a["rule"], a["subject_id"], a["status"]) for a in alerts
             if a["rule"].startswith(("DOSE-", "ELIG-", "CONMED-", "DQ-", "SAFE-", "FEVER-ASSESSMENT"))]
    assert wrong == []
    # what remains: info notices, and visits after study day 20 that a 20-day follow-up cannot contain
    for a in alerts:
        assert a["rule"] in INFO_RULES or (a["rule"] == "SCHED-VISIT-MISSED"
                                           and a.get("evidence", {}).get("values", {}).get("visit") in ("D30", "D45", "D60")), a


def _h12_supplements(events: list[dict]) -> int:
    return sum(1 for e in events if e["type"] == "drug_administration" and e.get("dose_mg_per_kg") == 2)


def test_a_parameter_edit_changes_the_cohort_and_the_monitor_alike(tmp_path: Path) -> None:
    """The generator reads parameters.yaml as the monitor does: with the febrile threshold raised to 39.0 C the
    ladder gives fewer H12 supplements, the monitor under the same edited rules finds that cohort compliant, and
    the monitor under the bundled rules (38.0 C) sees the supplements missing."""
    edited = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", edited)
    params = edited / "parameters.yaml"
    text = params.read_text(encoding="utf-8")
    assert "febrile_at_or_above_c: 38.0" in text
    params.write_text(text.replace("febrile_at_or_above_c: 38.0", "febrile_at_or_above_c: 39.0"), encoding="utf-8")
    kw = {"subjects": 16, "days": 20, "seed": 3, "sites": 2, "deviation_rate": 0.0}
    default, hotter = _cohort(**kw), _cohort(**kw, parameters=load_rules(edited).parameters)
    assert 0 < _h12_supplements(hotter) < _h12_supplements(default)
    assert _cohort(**kw, parameters=load_rules().parameters) == default  # the default is the bundled parameters

    def dosing(alerts: list[dict]) -> set[str]:
        return {a["rule"] for a in alerts if a["rule"].startswith("DOSE-") and a["status"] == "raised"}

    assert dosing(_replay_events(tmp_path / "edited.jsonl", hotter, rules=edited)) == set()
    assert "DOSE-H12-MISSED-ESCALATION" in dosing(_replay_events(tmp_path / "bundled.jsonl", hotter))

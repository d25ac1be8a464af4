"""Hot reload of the rules (issue 15): the service rebuilds every subject under the new rules and publishes only
what the new version changes. The rebuild sees each event's latest version and every past deadline at once, so
it cannot reproduce the occurrence numbers of the live history; the new book takes the old one over by condition
(rule, subject, fact), never by alert_id. In-memory source and topics (tests/monitor/test_service.py); the same
switch against the real broker is tests/connectors/test_hot_reload.py."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import threading
from collections import Counter

import pytest

from connectors.base import RawRecord
from monitor.clock import ReplayClock
from monitor.diff import diff_rules
from monitor.evaluator import Monitor
from monitor.rules import DEFAULT_RULES_DIR, load_rules
from tests.conftest import SHARED, final_alerts, load_scenario
from tests.monitor.test_service import Source, Topic
from tests.support.services import stream_service

if not (SHARED / "scenarios").is_dir():
    pytest.skip("published scenarios not found (../shared)", allow_module_level=True)


def _records(events: list[dict]) -> list[RawRecord]:
    return [RawRecord(value=json.dumps(e).encode(), origin=f"events/0@{i}", topic="events", partition=0, offset=i,
                      timestamp_ms=None) for i, e in enumerate(events)]


def _overdose_that_comes_back() -> list[dict]:
    """Scenario 06 (DOSE-MAX-EXCEEDED on the 140 mg dose), then that dose amended to 56 mg (the alert is withdrawn)
    and back to 140 mg (raised again: occurrence 1, a new alert_id). A rebuild holds only the last version, so it
    raises the condition once, as occurrence 0: an id the topic already holds, raised and withdrawn."""
    _, events = load_scenario(SHARED / "scenarios" / "06_overdose_above_8mgkg.jsonl")
    dose = next(e for e in events if e["event_id"] == "ANA-006-E043")
    last = max(dt.datetime.fromisoformat(e["recorded_at"]) for e in events)
    amended = [dict(dose, dose_mg=56.0, recorded_at=(last + dt.timedelta(hours=1)).isoformat()),
               dict(dose, recorded_at=(last + dt.timedelta(hours=2)).isoformat())]
    return events + amended


def _service(rules_dir, events):
    alerts, dead = Topic(), Topic()
    svc = stream_service(alerts=alerts, dead_letters=dead, rules=rules_dir, refresh_published=alerts.keys,
                         retry_s=0.01)
    svc.attach(Source([_records(events)]))
    svc.run_once(threading.Event())
    return svc, alerts


def _open(alerts: Topic) -> dict[str, dict]:
    """The open alerts a deduplicating consumer of the topic holds: (alert_id, status) once, raised minus withdrawn."""
    seen: dict[tuple[str, str], object] = {}
    for a in alerts.records:
        seen.setdefault((a.alert_id, a.status), a)
    withdrawn = {k[0] for k in seen if k[1] == "retracted"}
    return {k[0]: a for k, a in seen.items() if k[1] == "raised" and k[0] not in withdrawn}


def test_a_reload_that_changes_nothing_for_a_subject_publishes_nothing_for_it_and_keeps_its_alerts_open(tmp_path):
    rules_dir = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, rules_dir)
    svc, alerts = _service(rules_dir, _overdose_that_comes_back())
    history = Counter((a.rule, a.status) for a in alerts.records)
    assert history[("DOSE-MAX-EXCEEDED", "raised")] == 2 and history[("DOSE-MAX-EXCEEDED", "retracted")] == 1
    open_before = _open(alerts)
    assert [a.rule for a in open_before.values()].count("DOSE-MAX-EXCEEDED") == 1
    published = len(alerts.records)

    # a change that matters to nobody in this stream: neutropenia below 1.4 instead of 1.5 (ANC here is 4.2)
    path = rules_dir / "eligibility.yaml"
    path.write_text(path.read_text().replace("value: {lt: 1.5}", "value: {lt: 1.4}", 1))
    assert svc.reload_rules()
    svc.run_once(threading.Event())
    assert svc.monitor.rules.version == load_rules(rules_dir).version
    assert alerts.records[published:] == [], "a reload that changes nothing for the subject published for it"
    assert _open(alerts) == open_before
    assert {a.alert_id for a in svc.monitor.book.open_alerts()} == set(open_before)


def test_a_reload_changing_one_threshold_publishes_what_rules_diff_predicts(tmp_path):
    """The daily maximum lowered to 7 mg/kg (7.7 with the tolerance): the switch withdraws and raises the alerts
    `rules diff` lists for the same events, no more, and the consumer ends with the new rules' final alerts."""
    events = []
    for name in ("06_overdose_above_8mgkg", "03_correct_escalation_h12_h24", "05_missed_escalation_h24",
                 "13_excl_neutropenia_si_units"):
        events += load_scenario(SHARED / "scenarios" / f"{name}.jsonl")[1]
    events.sort(key=lambda e: e["recorded_at"])
    rules_dir = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, rules_dir)
    old = load_rules(rules_dir)
    svc, alerts = _service(rules_dir, events)
    published = len(alerts.records)

    path = rules_dir / "parameters.yaml"
    path.write_text(path.read_text().replace("max_mg_per_kg_day: 8.0", "max_mg_per_kg_day: 7.0"))
    new = load_rules(rules_dir)
    stream = tmp_path / "events.jsonl"
    stream.write_text("".join(json.dumps(e) + "\n" for e in events))
    until = max(dt.datetime.fromisoformat(e["recorded_at"]) for e in events)  # the stream clock's end
    predicted = diff_rules(old=old, new=new, paths=[stream], until=until)
    assert predicted.added or predicted.removed, "the edit must change something for this test to mean anything"

    assert svc.reload_rules()
    svc.run_once(threading.Event())
    switch = alerts.records[published:]
    raised = sorted((a.rule, a.subject_id, a.at) for a in switch if a.status == "raised")
    withdrawn = sorted((a.rule, a.subject_id, a.at) for a in switch if a.status == "retracted")
    assert raised == sorted((a.rule, a.subject_id, a.at) for a in predicted.added)
    assert withdrawn == sorted((a.rule, a.subject_id, a.at) for a in predicted.removed)
    replayed = Monitor.create(rules=new, clock=ReplayClock())
    from connectors.file import JsonLinesSource
    from connectors.memory import ListSink
    from monitor.replay import replay
    sink = ListSink()
    replay(source=JsonLinesSource(paths=[stream]), monitor=replayed, clock=replayed.clock, alerts=sink,
           rejects=ListSink(), until=until)
    assert sorted((a.rule, a.subject_id, a.at) for a in _open(alerts).values()) == sorted(
        (a.rule, a.subject_id, a.at) for a in final_alerts(sink.items))

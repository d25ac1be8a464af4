"""A restarted monitor loads its partitions' committed history without evaluating each batch, then evaluates the
end state once. What was already published must be taken over: here the open alert is the condition's second
occurrence (raised, withdrawn, raised again), and when the condition goes after the restart that very alert must be
withdrawn (real broker, real service processes). The live clock is far past the scenario, so other alerts (missed
days, visits) stay open: only the H12 escalation alert is checked."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from monitor.broker import LocalBroker
from tests.conftest import SHARED, load_scenario
from tests.support.kafkatools import (
    ServiceProcess, alert_records, create_topics, events_as_records, final_pairs, produce, read_topic,
    wait_until_consumed)

SCENARIO = SHARED / "scenarios" / "21_late_dose_record_retracts_alert.jsonl"
LATE_DOSE = "ANA-021-E043"  # the supplementary dose charted three days late: it removes the H12 alert's condition
RULE = "DOSE-H12-MISSED-ESCALATION"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with LocalBroker(log_path=tmp_path_factory.mktemp("broker") / "broker.log") as b:
        yield b


def _run_to_end(broker, topics, group, log):
    service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=log).start()
    try:
        assert wait_until_consumed(broker.bootstrap, group, topics["events"], 120), log.read_text()[-3000:]
    finally:
        assert service.stop() == 0, log.read_text()[-3000:]


def _h12(topics, broker) -> list[dict]:
    return [r for r in alert_records(read_topic(broker.bootstrap, topics["alerts"])) if r["rule"] == RULE]


@pytest.mark.skipif(not SCENARIO.is_file(), reason="published scenarios not found")
def test_restart_withdraws_the_open_occurrence_when_the_condition_goes(broker, tmp_path):
    _, events = load_scenario(SCENARIO)
    late = next(e for e in events if e["event_id"] == LATE_DOSE)
    last = max(dt.datetime.fromisoformat(e["recorded_at"]) for e in events)
    at = lambda hours: (last + dt.timedelta(hours=hours)).isoformat()  # noqa: E731
    moved = (dt.datetime.fromisoformat(late["occurred_at"]) + dt.timedelta(hours=8)).isoformat()
    history = sorted([e for e in events if e["event_id"] != LATE_DOSE] + [dict(late, recorded_at=at(0.5))],
                     key=lambda e: e["recorded_at"])
    too_late = dict(late, occurred_at=moved, recorded_at=at(1), status="amended")  # the dose was given too late
    restored = dict(late, recorded_at=at(2), status="corrected")  # no: it was on time after all
    tag = uuid.uuid4().hex[:8]
    topics = {"events": f"wd-events-{tag}", "alerts": f"wd-alerts-{tag}", "dead": f"wd-dead-{tag}"}
    create_topics(broker.bootstrap, {topics["events"]: 3, topics["alerts"]: 3, topics["dead"]: 1})
    group = f"wd-{tag}"

    # 1. Raised, withdrawn by the late dose record, raised again (a new alert id) by the amendment moving it.
    produce(broker.bootstrap, topics["events"], events_as_records(history + [too_late]))
    _run_to_end(broker, topics, group, tmp_path / "first.log")
    first = _h12(topics, broker)
    assert [r["status"] for r in first] == ["raised", "retracted", "raised"]
    second_occurrence = first[-1]["alert_id"]
    assert second_occurrence != first[0]["alert_id"]

    # 2. The correction arrives while no monitor runs; the restarted one rebuilds, then reads the correction.
    produce(broker.bootstrap, topics["events"], events_as_records([restored]))
    _run_to_end(broker, topics, group, tmp_path / "second.log")
    assert "partition" in (tmp_path / "second.log").read_text()
    records = _h12(topics, broker)
    assert (second_occurrence, "retracted") in {(r["alert_id"], r["status"]) for r in records}, \
        "the open occurrence was not withdrawn after the restart"
    assert final_pairs(records) == []
    keys = [(r["alert_id"], r["status"]) for r in records]
    assert len(keys) == len(set(keys)), "an alert record was published twice"

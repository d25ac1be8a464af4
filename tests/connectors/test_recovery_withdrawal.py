"""A rebuild evaluates only the end state of a partition's history; an alert that is open on the alerts topic but
whose condition is gone in that end state must still be withdrawn (real broker, real service processes). The live clock is far past the scenario, so other alerts (missed days,
visits) stay open: only the withdrawn one is checked."""

from __future__ import annotations

import uuid

import pytest

from monitor.broker import LocalBroker
from tests.conftest import SHARED, load_scenario
from tests.connectors.kafkatools import (
    ServiceProcess, alert_records, create_topics, events_as_records, final_pairs, produce, read_topic,
    wait_until_consumed)

SCENARIO = SHARED / "scenarios" / "21_late_dose_record_retracts_alert.jsonl"
LATE_DOSE = "ANA-021-E043"  # the supplementary dose charted three days late: it removes the H12 alert's condition


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


@pytest.mark.skipif(not SCENARIO.is_file(), reason="published scenarios not found")
def test_rebuild_withdraws_an_open_alert_whose_condition_went(broker, tmp_path):
    header, events = load_scenario(SCENARIO)
    assert {"rule": "DOSE-H12-MISSED-ESCALATION", "subject": "ANA-021"} in header["expected_no_alerts"]
    tag = uuid.uuid4().hex[:8]
    topics = {"events": f"wd-events-{tag}", "alerts": f"wd-alerts-{tag}", "dead": f"wd-dead-{tag}"}
    create_topics(broker.bootstrap, {topics["events"]: 3, topics["alerts"]: 3, topics["dead"]: 1})

    # 1. Without the late dose record the H12 escalation is missed: the alert is raised and published.
    produce(broker.bootstrap, topics["events"], events_as_records([e for e in events if e["event_id"] != LATE_DOSE]))
    _run_to_end(broker, topics, f"first-{tag}", tmp_path / "first.log")
    first = final_pairs(alert_records(read_topic(broker.bootstrap, topics["alerts"])))
    assert "DOSE-H12-MISSED-ESCALATION" in {r["rule"] for r in first}

    # 2. The late record arrives while no monitor runs; a new group rebuilds the whole history (end state only).
    produce(broker.bootstrap, topics["events"], events_as_records([e for e in events if e["event_id"] == LATE_DOSE]))
    _run_to_end(broker, topics, f"second-{tag}", tmp_path / "second.log")
    records = alert_records(read_topic(broker.bootstrap, topics["alerts"]))
    h12 = [r for r in first if r["rule"] == "DOSE-H12-MISSED-ESCALATION"]
    still_open = {r["alert_id"] for r in final_pairs(records)}
    assert not still_open & {r["alert_id"] for r in h12}, "the H12 alert whose condition went was never withdrawn"
    assert "DOSE-H12-MISSED-ESCALATION" not in {r["rule"] for r in final_pairs(records)}
    keys = [(r["alert_id"], r["status"]) for r in records]
    assert len(keys) == len(set(keys)), "an alert record was published twice"

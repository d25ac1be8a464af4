"""A QTL breach through the real service (`protocol-monitor run` against the test broker on loopback): with
`qtl_alerts` on, the scheduled site-risk recomputation publishes the breach on the alerts topic like any rule's
alert (keyed, with its headers), and withdraws it when a late correction brings the trial back within the limit.
Storing, routing and auditing that record is the notifier's job, shown in tests/monitor/test_kri.py."""

from __future__ import annotations

import json
import uuid

from monitor.broker import LocalBroker
from tests.support.kafkatools import ServiceProcess, create_topics, events_as_records, produce, read_topic
from tests.support.kri_cohort import qtl_cohort

RULE = "QTL-INELIGIBLE-RANDOMISED"


def _qtl(messages: list) -> list[dict]:
    return [r for r in (json.loads(m.value) for m in messages) if r["rule"] == RULE]


def test_the_service_raises_a_qtl_breach_on_the_alerts_topic_and_withdraws_it_after_late_data(tmp_path):
    events, ineligible, correction = qtl_cohort()
    tag = uuid.uuid4().hex[:8]
    topics = {"events": f"kri-events-{tag}", "alerts": f"kri-alerts-{tag}", "dead": f"kri-dead-{tag}"}
    with LocalBroker(log_path=tmp_path / "broker.log") as broker:
        create_topics(broker.bootstrap, {topics["events"]: 2, topics["alerts"]: 2, topics["dead"]: 1})
        produce(broker.bootstrap, topics["events"], events_as_records(events))
        service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=f"kri-{tag}",
                                 log=tmp_path / "service.log", extra=["--clock", "stream"],
                                 env={"PROTOCOL_MONITOR_QTL_ALERTS": "true",
                                      "PROTOCOL_MONITOR_KRI_INTERVAL_SECONDS": "1"}).start()
        try:
            raised = _qtl(read_topic(broker.bootstrap, topics["alerts"], timeout_s=90,
                                     until=lambda m: len(_qtl(m)) >= 1))
            assert [r["status"] for r in raised] == ["raised"], (tmp_path / "service.log").read_text()[-3000:]
            alert = raised[0]
            assert alert["category"] == "quality_tolerance" and alert["subject_id"] == "trial"
            assert alert["evidence"]["participants"] == [ineligible]
            assert alert["evidence"]["values"]["figure"] == 0.125 and alert["evidence"]["values"]["limit"] == 0.02
            produce(broker.bootstrap, topics["events"], events_as_records([correction]))
            messages = read_topic(broker.bootstrap, topics["alerts"], timeout_s=90, until=lambda m: len(_qtl(m)) >= 2)
            records = _qtl(messages)
            assert [r["status"] for r in records] == ["raised", "retracted"]
            assert records[1]["retracts"] == alert["alert_id"]
            headers = {k: v.decode() for k, v in next(m for m in messages if json.loads(m.value)["rule"] == RULE
                                                      and json.loads(m.value)["status"] == "retracted").headers}
            assert headers["rule"] == RULE and headers["status"] == "retracted"
        finally:
            assert service.stop() == 0

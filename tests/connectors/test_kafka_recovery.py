"""Crash, restart and rebalance against a real broker: alerts are never lost and never published twice."""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter

import pytest

from monitor.broker import LocalBroker
from monitor.generate import generate
from tests.support.kafkatools import (
    ServiceProcess, alert_records, create_topics, events_as_records, final_pairs, produce, read_topic,
    wait_until_consumed)

PARTITIONS = 3


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with LocalBroker(log_path=tmp_path_factory.mktemp("broker") / "broker.log") as b:
        yield b


@pytest.fixture(scope="module")
def cohort(broker):
    """At least 10,000 events of a synthetic cohort with planted deviations, on one events topic."""
    events = list(generate(subjects=100, days=60, seed=11, sites=4, deviation_rate=0.6))
    assert len(events) >= 10_000
    topic = f"cohort-{uuid.uuid4().hex[:8]}"
    create_topics(broker.bootstrap, {topic: PARTITIONS})
    produce(broker.bootstrap, topic, events_as_records(events))
    return topic, len(events)


def _run_to_end(broker, topics, group, log, timeout_s=240.0):
    service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=log).start()
    try:
        assert wait_until_consumed(broker.bootstrap, group, topics["events"], timeout_s), log.read_text()[-3000:]
    finally:
        assert service.stop() == 0, log.read_text()[-3000:]


def _topics(events: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {"events": events, "alerts": f"alerts-{tag}", "dead": f"dead-{tag}"}


@pytest.fixture(scope="module")
def clean_run(broker, cohort, tmp_path_factory):
    topics = _topics(cohort[0])
    create_topics(broker.bootstrap, {topics["alerts"]: PARTITIONS, topics["dead"]: 1})
    _run_to_end(broker, topics, f"clean-{uuid.uuid4().hex[:6]}", tmp_path_factory.mktemp("clean") / "service.log")
    records = alert_records(read_topic(broker.bootstrap, topics["alerts"]))
    assert records, "the cohort raised no alert at all"
    return records


def test_sigkill_at_several_points_loses_and_duplicates_nothing(broker, cohort, clean_run, tmp_path):
    topics = _topics(cohort[0])
    create_topics(broker.bootstrap, {topics["alerts"]: PARTITIONS, topics["dead"]: 1})
    group = f"crash-{uuid.uuid4().hex[:6]}"
    log = tmp_path / "service.log"
    for wait in (2.0, 4.0, 6.5, 9.0):  # from start-up to mid-stream
        service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=log).start()
        time.sleep(wait)
        assert service.stop(signal.SIGKILL) == -signal.SIGKILL
    _run_to_end(broker, topics, group, log)
    records = alert_records(read_topic(broker.bootstrap, topics["alerts"]))
    counts = Counter((r["alert_id"], r["status"]) for r in records)
    twice = [k for k, n in counts.items() if n > 1]
    assert not twice, f"published more than once: {twice[:5]}"
    assert set(counts) == {(r["alert_id"], r["status"]) for r in clean_run}


def test_rebalance_hands_subjects_over_and_keeps_the_alert_set(broker, cohort, clean_run, tmp_path):
    topics = _topics(cohort[0])
    create_topics(broker.bootstrap, {topics["alerts"]: PARTITIONS, topics["dead"]: 1})
    group = f"rebalance-{uuid.uuid4().hex[:6]}"
    first = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=tmp_path / "a.log").start()
    second = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=tmp_path / "b.log").start()
    try:
        time.sleep(8.0)  # both joined and split the partitions, part of the stream is done
        assert second.stop() == 0
        assert wait_until_consumed(broker.bootstrap, group, topics["events"], 240), (tmp_path / "a.log").read_text()[-3000:]
    finally:
        second.stop()
        assert first.stop() == 0
    assert "assigned partitions" in (tmp_path / "b.log").read_text(), "the second instance never got partitions"
    records = alert_records(read_topic(broker.bootstrap, topics["alerts"]))
    counts = Counter((r["alert_id"], r["status"]) for r in records)
    assert not [k for k, n in counts.items() if n > 1], "an alert record was published twice"
    final = {(r["alert_id"], r["rule"], r["subject_id"]) for r in final_pairs(records)}
    assert final == {(r["alert_id"], r["rule"], r["subject_id"]) for r in final_pairs(clean_run)}

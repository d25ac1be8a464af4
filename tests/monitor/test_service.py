"""The service loop when its outputs fail: alerts wait (are held and retried), offsets are never committed past an
alert or dead letter the broker did not acknowledge, nothing is published twice, and SIGTERM while waiting stops
without committing. An in-memory source and sinks that fail on demand stand in for Kafka here; the same
behaviour against the real broker is in tests/connectors/test_faults.py."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter

import pytest
from kafka import TopicPartition
from kafka.errors import KafkaTimeoutError

from connectors.base import RawRecord
from connectors.kafka_acked import PublishError, PublishWaiting
from monitor.clock import ReplayClock
from monitor.config import Settings
from monitor.evaluator import Monitor
from monitor.rules import load_rules
from monitor.service import MonitorService
from tests.conftest import SHARED, load_scenario
from tests.support.services import stream_service

TP = TopicPartition("events", 0)


class Source:
    """Polls the given batches in order, then nothing; records every commit."""

    def __init__(self, batches: list[list[RawRecord]]) -> None:
        self.batches = list(batches)
        self.polls = 0
        self.commits: list[dict[TopicPartition, int]] = []
        self.commit_fails = 0  # this many commits raise first (a broker that does not answer)

    def poll(self, timeout_ms: int) -> list[RawRecord]:
        self.polls += 1
        return self.batches.pop(0) if self.batches else []

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.commit_fails:
            self.commit_fails -= 1
            raise KafkaTimeoutError("offset commit not answered")
        if offsets:
            self.commits.append(dict(offsets))

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def lag(self) -> dict[TopicPartition, int]:
        return {}


class Topic:
    """A sink whose broker can be down: `mode` None (acknowledges), "waiting" (records stay in the producer),
    "failed" (the producer gives up), or "lost-ack" (the first half of the records reach the topic but every
    acknowledgement is lost)."""

    def __init__(self) -> None:
        self.records: list = []  # what reached the topic
        self.pending: list = []
        self.mode: str | None = None
        self.flushes = 0

    def add(self, item, error=None) -> None:  # alerts: add(alert); dead letters: add(record, error)
        self.pending.append(item)

    def flush(self) -> None:
        self.flushes += 1
        if not self.pending:
            return
        if self.mode == "waiting":
            raise PublishWaiting("records not yet acknowledged")
        if self.mode == "lost-ack":
            self.records.extend(self.pending[:len(self.pending) // 2])
        if self.mode in ("failed", "lost-ack"):
            self.pending = []
            raise PublishError("records not acknowledged by the broker")
        self.records.extend(self.pending)
        self.pending = []

    def keys(self) -> set[tuple[str, str]]:
        return {(a.alert_id, a.status) for a in self.records}


def records_of(*names: str) -> list[RawRecord]:
    out = []
    for name in names:
        _, events = load_scenario(SHARED / "scenarios" / name)
        for e in events:
            out.append(RawRecord(value=json.dumps(e).encode(), origin=f"events/0@{len(out)}", topic="events",
                                 partition=0, offset=len(out), timestamp_ms=None))
    out.append(RawRecord(value=b"{not json", origin=f"events/0@{len(out)}", topic="events", partition=0,
                         offset=len(out), timestamp_ms=None))  # one dead letter
    return out


def service(batches: list[list[RawRecord]]) -> tuple[MonitorService, Source, Topic, Topic]:
    alerts, dead = Topic(), Topic()
    svc = stream_service(alerts=alerts, dead_letters=dead, refresh_published=alerts.keys, retry_s=0.01)
    source = Source(batches)
    svc.attach(source)
    return svc, source, alerts, dead


if not (SHARED / "scenarios").is_dir():
    pytest.skip("published scenarios not found (../shared)", allow_module_level=True)
RECORDS = records_of("06_overdose_above_8mgkg.jsonl", "21_late_dose_record_retracts_alert.jsonl")


@pytest.fixture(scope="module")
def expected() -> Counter:
    """The alert records of the same batch when nothing fails."""
    svc, source, alerts, dead = service([RECORDS])
    svc.run_once(threading.Event())
    assert source.commits == [{TP: len(RECORDS)}] and len(dead.records) == 1
    keys = Counter((a.alert_id, a.status) for a in alerts.records)
    assert keys and any(status == "retracted" for _, status in keys)
    return keys


@pytest.mark.parametrize("mode", ["waiting", "failed"])
def test_alerts_wait_while_the_alerts_topic_does_not_acknowledge(mode, expected, caplog):
    svc, source, alerts, dead = service([RECORDS])
    stop = threading.Event()
    alerts.mode = mode
    with caplog.at_level(logging.WARNING, logger="monitor.service"):
        for _ in range(4):
            svc.run_once(stop)
    assert source.commits == [], "offsets were committed past alerts the broker did not acknowledge"
    assert source.polls == 1, "the service went on polling while holding a batch"
    assert not svc.state.ready
    assert "did not acknowledge alert records" in caplog.text and "nothing is committed past them" in caplog.text
    alerts.mode = None
    svc.run_once(stop)
    assert Counter((a.alert_id, a.status) for a in alerts.records) == expected  # every alert, once
    assert source.commits == [{TP: len(RECORDS)}]
    assert svc.state.ready and "acknowledges again" in caplog.text
    svc.run_once(stop)  # and the loop goes on polling
    assert source.polls == 2


def test_lost_acknowledgements_publish_nothing_twice(expected):
    """The producer gave up, but some records did reach the topic: the topic is read back before sending again."""
    svc, source, alerts, dead = service([RECORDS])
    stop = threading.Event()
    alerts.mode = "lost-ack"
    svc.run_once(stop)
    assert source.commits == [] and 0 < len(alerts.records) < sum(expected.values())
    alerts.mode = None
    svc.run_once(stop)
    assert Counter((a.alert_id, a.status) for a in alerts.records) == expected
    assert source.commits == [{TP: len(RECORDS)}]


def test_dead_letters_and_the_commit_are_retried_without_publishing_alerts_again(expected):
    svc, source, alerts, dead = service([RECORDS])
    stop = threading.Event()
    dead.mode = "waiting"
    svc.run_once(stop)
    svc.run_once(stop)
    assert source.commits == [] and dead.records == []
    dead.mode = None
    source.commit_fails = 2
    for _ in range(3):
        svc.run_once(stop)
    assert len(dead.records) == 1
    assert Counter((a.alert_id, a.status) for a in alerts.records) == expected
    assert source.commits == [{TP: len(RECORDS)}]


def test_sigterm_while_alerts_wait_stops_without_committing(caplog):
    svc, source, alerts, dead = service([RECORDS])
    alerts.mode = "waiting"
    stop = threading.Event()
    with caplog.at_level(logging.INFO, logger="monitor.service"):
        runner = threading.Thread(target=svc.run, args=(stop,))
        runner.start()
        try:
            deadline = time.monotonic() + 30
            while alerts.flushes < 3 and runner.is_alive() and time.monotonic() < deadline:
                stop.wait(0.01)
            assert runner.is_alive(), "the service loop died while the alerts topic did not acknowledge"
        finally:
            stop.set()  # what the SIGTERM handler does
            runner.join(timeout=10)
    assert not runner.is_alive()
    assert source.commits == [] and alerts.records == []
    assert "stopping with a batch the broker did not acknowledge" in caplog.text
    assert "offsets are not committed" in caplog.text


def test_alerts_of_a_rules_switch_wait_too(expected, tmp_path):
    """Alerts published by a hot reload are held like any other batch."""
    import shutil

    from monitor.rules import DEFAULT_RULES_DIR

    rules_dir = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, rules_dir)
    alerts, dead = Topic(), Topic()
    svc = stream_service(alerts=alerts, dead_letters=dead, rules=rules_dir, refresh_published=alerts.keys,
                         retry_s=0.01)
    source = Source([RECORDS])
    svc.attach(source)
    stop = threading.Event()
    svc.run_once(stop)
    before = len(alerts.records)
    victim = next(p for p in sorted(rules_dir.glob("*.yaml")) if "DOSE-MAX-EXCEEDED" in p.read_text())
    victim.write_text(victim.read_text().replace("DOSE-MAX-EXCEEDED", "DOSE-MAX-EXCEEDED-V2"))
    alerts.mode = "failed"
    svc.reload_requested.set()
    svc.run_once(stop)
    svc.run_once(stop)
    assert len(alerts.records) == before and source.polls == 1 and not svc.state.ready
    alerts.mode = None
    svc.run_once(stop)
    changed = Counter((a.rule, a.status) for a in alerts.records[before:])
    assert changed[("DOSE-MAX-EXCEEDED", "retracted")] >= 1 and changed[("DOSE-MAX-EXCEEDED-V2", "raised")] >= 1
    assert max(Counter((a.alert_id, a.status) for a in alerts.records).values()) == 1


def test_an_audit_store_that_cannot_be_written_keeps_the_rules_in_force_and_the_alerts_flowing(tmp_path, caplog):
    """`run --store` records every rules switch in the audit trail. If it cannot (here SQLite is made genuinely
    full with max_page_count), the new version is not used, the old one stays in force, and alerts keep flowing;
    once the store has room, the next reload switches."""
    import shutil

    from monitor.rules import DEFAULT_RULES_DIR
    from monitor.store import AlertStore, StoreUnavailable

    rules_dir = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, rules_dir)
    first, second = RECORDS[:40], RECORDS[40:]
    alerts, dead = Topic(), Topic()
    svc = stream_service(alerts=alerts, dead_letters=dead, rules=rules_dir, refresh_published=alerts.keys)
    store = AlertStore(url=f"sqlite:///{tmp_path / 'audit.db'}")
    svc.audit_store = store
    source = Source([first, second])
    svc.attach(source)
    stop = threading.Event()
    svc.run_once(stop)
    version = svc.monitor.rules.version
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StoreUnavailable):  # fill what room is left in those pages
        for i in range(1000):
            store.record_event(actor="test", action="filler", data={"n": i, "pad": "x" * 200})
    victim = next(p for p in sorted(rules_dir.glob("*.yaml")) if "DOSE-MAX-EXCEEDED" in p.read_text())
    victim.write_text(victim.read_text().replace("DOSE-MAX-EXCEEDED", "DOSE-MAX-EXCEEDED-V2"))
    with caplog.at_level(logging.ERROR, logger="monitor.service"):
        assert svc.reload_rules() is False
    assert svc.monitor.rules.version == version
    assert "NOT switched" in caplog.text and "database or disk is full" in caplog.text
    published = len(alerts.records)
    svc.run_once(stop)  # the next batch is processed and published under the rules in force
    assert source.commits[-1] == {TP: len(RECORDS)} and len(alerts.records) > published
    assert {a.rule_version for a in alerts.records} == {version}
    store._conn.execute(f"PRAGMA max_page_count = {pages * 100}")
    assert svc.reload_rules() is True and svc.monitor.rules.version != version
    assert [e.action for e in store.audit_entries()].count("rules_switched") == 1 and store.verify_audit() == []
    store.close()


def test_withdrawals_are_counted_by_rule_and_cause_without_subject_ids():
    """Flapping is visible (issue 16): scenario 21's H12 alert is withdrawn by a dose charted 3 days late."""
    from prometheus_client import CollectorRegistry, generate_latest

    from monitor.metrics import Metrics

    svc, source, alerts, dead = service([RECORDS])
    svc.outbox.metrics = Metrics(registry=CollectorRegistry())
    svc.run_once(threading.Event())
    text = generate_latest(svc.outbox.metrics.registry).decode()
    assert ('protocol_monitor_alerts_withdrawn_total{cause="late_data",rule="DOSE-H12-MISSED-ESCALATION"} 1.0'
            in text), [line for line in text.splitlines() if "withdrawn" in line]
    assert "ANA-021" not in text


def test_a_record_stamped_in_the_future_does_not_move_the_wall_clock_past_now():
    """Clock skew (issue 16): a producer whose clock runs 3 days ahead (CreateTime) must not fire deadlines early.
    In `wall` mode a partition's clock is its records' broker timestamps while it has a backlog, but never ahead
    of the wall clock. Scenario 04 up to T0 + 4 h, moved so its last record is an hour old: the H12 escalation is
    not due for hours, and nothing is raised for it."""
    import datetime as dt

    from tests.support.kafkatools import shift_events

    _, events = load_scenario(SHARED / "scenarios" / "04_missed_escalation_h12.jsonl")
    events = [e for e in events if e["recorded_at"] <= "2025-02-10T12:42:00+01:00"]
    now = dt.datetime.now(dt.timezone.utc)
    last = max(dt.datetime.fromisoformat(e["recorded_at"]) for e in events)
    events = shift_events(events, (now - dt.timedelta(hours=1) - last) / dt.timedelta(days=1))
    future_ms = int((now + dt.timedelta(days=3)).timestamp() * 1000)
    records = [RawRecord(value=json.dumps(e).encode(), origin=f"events/0@{i}", topic="events", partition=0,
                         offset=i, timestamp_ms=future_ms) for i, e in enumerate(events)]
    clock = ReplayClock()
    alerts = Topic()
    svc = MonitorService(settings=Settings(clock="wall", rules_watch_seconds=0), clock=clock, alerts=alerts,
                         dead_letters=Topic(), monitor=Monitor.create(rules=load_rules(), clock=clock),
                         published=set(), refresh_published=alerts.keys)
    svc.attach(Source([records]))
    svc.run_once(threading.Event())
    assert svc.clocks.now_of(TP) <= dt.datetime.now(dt.timezone.utc)
    early = [(a.rule, a.at) for a in alerts.records if dt.datetime.fromisoformat(a.at) + dt.timedelta(hours=2) > now]
    assert not early, f"deadlines fired by a timestamp from the future: {early}"
    assert svc.monitor.deadlines.pending(), "the H12 deadline waits for its time"

"""Resource limits in the running service, against the real broker: a configured message size, the bound on events
held per subject and the bound on records per poll. At each limit the outcome is defined (dead letter with a
reason, or back-pressure left on the broker), logged without subject ids, and counted."""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.request
import uuid

import pytest

from monitor.broker import LocalBroker, free_port
from monitor.config import Settings
from tests.conftest import SHARED, load_scenario
from tests.support.kafkatools import ServiceProcess, create_topics, events_as_records, produce, read_topic

SCENARIO = SHARED / "scenarios" / "13_excl_neutropenia_si_units.jsonl"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with LocalBroker(log_path=tmp_path_factory.mktemp("broker") / "broker.log") as b:
        yield b


@pytest.mark.skipif(not SCENARIO.is_file(), reason="published scenarios not found")
def test_events_past_the_subject_limit_and_the_size_limit_go_to_the_dead_letters(broker, tmp_path, monkeypatch):
    tag = uuid.uuid4().hex[:8]
    topics = {"events": f"lim-events-{tag}", "alerts": f"lim-alerts-{tag}", "dead": f"lim-dead-{tag}"}
    create_topics(broker.bootstrap, {name: 1 for name in topics.values()})
    header, events = load_scenario(SCENARIO)
    subject = header["expected_alerts"][0]["subject"]
    mine = [e for e in events if e["subject_id"] == subject]
    extra = [{**mine[-1], "event_id": f"{mine[-1]['event_id']}-X{n}"} for n in range(2)]  # new events: refused
    later = dt.datetime.fromisoformat(max(e["recorded_at"] for e in events)) + dt.timedelta(minutes=1)
    amended = {**mine[-1], "recorded_at": later.isoformat(), "comment": "amended"}  # held event_id: applied
    big = {**mine[0], "event_id": "BIG", "comment": "x" * 5000}
    produce(broker.bootstrap, topics["events"], events_as_records(events + extra + [amended, big]))
    monkeypatch.setenv("PROTOCOL_MONITOR_MAX_EVENTS_PER_SUBJECT", str(len(mine)))
    monkeypatch.setenv("PROTOCOL_MONITOR_MAX_MESSAGE_BYTES", "4096")
    port = free_port()
    log = tmp_path / "service.log"
    service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=f"g-{tag}", log=log,
                             extra=["--metrics-port", str(port)]).start()
    try:
        dead = read_topic(broker.bootstrap, topics["dead"], until=lambda m: len(m) >= 3, timeout_s=60)
        alerts = read_topic(broker.bootstrap, topics["alerts"], until=lambda m: any(
            json.loads(x.value)["rule"] == "ELIG-NEUTROPENIA" for x in m), timeout_s=60)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        assert service.stop() == 0, log.read_text()[-2000:]
    reasons = [dict(m.headers)["reason"].decode() for m in dead]
    assert reasons == ["subject_limit", "subject_limit", "too_large"]
    assert [m.value for m in dead][:2] == [r[1] for r in events_as_records(extra)]  # the original bytes
    assert 'protocol_monitor_events_rejected_total{reason="subject_limit"} 2.0' in metrics
    assert 'protocol_monitor_events_rejected_total{reason="too_large"} 1.0' in metrics
    assert any(json.loads(x.value)["rule"] == "ELIG-NEUTROPENIA" for x in alerts)  # the held events still count
    text = log.read_text()
    assert text.count("subject_limit") >= 2 and subject not in text


def test_a_poll_never_hands_more_than_the_configured_records_to_the_monitor(broker):
    """Back-pressure, not an unbounded queue: the rest waits on the broker (and shows as consumer lag)."""
    from connectors.kafka_events import KafkaEventSource

    tag = uuid.uuid4().hex[:8]
    topic = f"lim-poll-{tag}"
    create_topics(broker.bootstrap, {topic: 1})
    produce(broker.bootstrap, topic, [(None, json.dumps({"n": n}).encode()) for n in range(60)])
    settings = Settings(bootstrap_servers=broker.bootstrap, events_topic=topic, group_id=f"g-{tag}",
                        poll_max_records=7, session_timeout_ms=6000, heartbeat_interval_ms=1000)
    source = KafkaEventSource(settings=settings, on_assigned=lambda tps: None, on_revoked=lambda tps: None)
    sizes: list[int] = []
    lag_seen = 0
    try:
        deadline = time.monotonic() + 60
        while sum(sizes) < 60 and time.monotonic() < deadline:
            records = source.poll(500)
            if records:
                sizes.append(len(records))
                lag_seen = max(lag_seen, sum(source.lag().values()))
    finally:
        source.close()
    assert sum(sizes) == 60 and max(sizes) <= 7
    assert lag_seen > 0

"""Faults around the broker: unreachable at start (retries with back-off, not ready, a clear log line, then it
works when the broker appears), SIGTERM while waiting, the broker gone mid-stream and back (through a proxy that
is cut: Tansu loses everything on restart), and SIGTERM during a batch."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter

from kafka import KafkaProducer

from monitor.broker import LocalBroker, free_port
from monitor.generate import generate
from tests.conftest import SHARED, load_scenario
from tests.support.kafkatools import (
    ServiceProcess, alert_records, committed_offsets, create_topics, end_offsets, events_as_records, produce,
    read_topic, wait_until_consumed)
from tests.support.tcpproxy import TcpProxy


def status(url: str) -> int:
    try:
        return urllib.request.urlopen(url, timeout=3).status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_for(path, text, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never logged:\n{path.read_text()[-2000:] if path.exists() else ''}")


def test_broker_unreachable_at_start_then_available(tmp_path):
    port, metrics = free_port(), free_port()
    tag = uuid.uuid4().hex[:8]
    topics = {"events": f"f-events-{tag}", "alerts": f"f-alerts-{tag}", "dead": f"f-dead-{tag}"}
    log = tmp_path / "service.log"
    service = ServiceProcess(bootstrap=f"127.0.0.1:{port}", topics=topics, group=f"f-{tag}", log=log,
                             extra=["--metrics-port", str(metrics)]).start()
    try:
        wait_for(log, f"Kafka broker unreachable at 127.0.0.1:{port}")
        assert status(f"http://127.0.0.1:{metrics}/healthz") == 200
        assert status(f"http://127.0.0.1:{metrics}/readyz") == 503
        with LocalBroker(port=port, log_path=tmp_path / "broker.log") as broker:
            create_topics(broker.bootstrap, {topics["events"]: 1, topics["alerts"]: 1, topics["dead"]: 1})
            header, events = load_scenario(SHARED / "scenarios" / "13_excl_neutropenia_si_units.jsonl")
            produce(broker.bootstrap, topics["events"], events_as_records(events))
            wait_for(log, "connected to")
            got = read_topic(broker.bootstrap, topics["alerts"], timeout_s=60, until=lambda m: any(
                json.loads(x.value)["rule"] == "ELIG-NEUTROPENIA" for x in m))
            assert any(json.loads(x.value)["rule"] == "ELIG-NEUTROPENIA" for x in got)
            deadline = time.monotonic() + 30
            while status(f"http://127.0.0.1:{metrics}/readyz") != 200 and time.monotonic() < deadline:
                time.sleep(0.3)
            assert status(f"http://127.0.0.1:{metrics}/readyz") == 200
            assert service.stop() == 0
    finally:
        service.stop()


def test_sigterm_while_the_broker_is_unreachable_stops_cleanly(tmp_path):
    port = free_port()
    log = tmp_path / "service.log"
    service = ServiceProcess(bootstrap=f"127.0.0.1:{port}", topics={"events": "e", "alerts": "a", "dead": "d"},
                             group="g", log=log).start()
    wait_for(log, "Kafka broker unreachable")
    assert service.stop() == 0
    assert "Traceback" not in log.read_text()


# ---- broker gone mid-stream and back ------------------------------------------------------------------------------
PRODUCER = "faults-test-producer"  # the proxy never cuts this client: events go on arriving during the outage


def produce_direct(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, client_id=PRODUCER, acks="all")
    for key, value in records:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def with_bad_records(events: list[dict], every: int) -> list[tuple[bytes | None, bytes]]:
    """The events as records, with an unparseable record after every `every`-th (each becomes a dead letter)."""
    out: list[tuple[bytes | None, bytes]] = []
    for i, record in enumerate(events_as_records(events)):
        out.append(record)
        if i % every == every - 1:
            out.append((b"bad", b'{"this is": "not an event", "n": %d}' % i))
    return out


def wait_status(url: str, code: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while (got := status(url)) != code and time.monotonic() < deadline:
        time.sleep(0.2)
    return got


def test_broker_gone_mid_stream_and_back_loses_and_duplicates_nothing(tmp_path):
    """The service reaches the broker only through a proxy that is cut for several seconds while it is publishing:
    it holds the batch (not ready, a clear log line, no commit), reconnects by itself, consumes what arrived
    meanwhile, and the alerts topic ends with every alert of a clean run, each exactly once."""
    events = list(generate(subjects=150, days=60, seed=5, sites=4, deviation_rate=0.6))
    third = len(events) // 3
    before, during = with_bad_records(events[:2 * third], 500), with_bad_records(events[2 * third:], 500)
    proxy_port, metrics = free_port(), free_port()
    tag = uuid.uuid4().hex[:8]
    topics = {"events": f"mid-events-{tag}", "alerts": f"mid-alerts-{tag}", "dead": f"mid-dead-{tag}"}
    log = tmp_path / "service.log"
    with LocalBroker(advertised_port=proxy_port, log_path=tmp_path / "broker.log") as broker, \
            TcpProxy(upstream_port=broker.port, port=proxy_port, bypass=frozenset({PRODUCER})) as proxy:
        create_topics(broker.bootstrap, {topics["events"]: 3, topics["alerts"]: 3, topics["dead"]: 1})
        produce_direct(broker.bootstrap, topics["events"], before)
        service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=f"mid-{tag}", log=log,
                                 extra=["--metrics-port", str(metrics)]).start()
        try:
            deadline = time.monotonic() + 60
            while consumed(metrics) < 1000 and time.monotonic() < deadline:
                time.sleep(0.05)
            proxy.cut()  # mid-stream: the service still has most of its backlog to process and publish
            cut_at = time.monotonic()
            produce_direct(broker.bootstrap, topics["events"], during)  # events go on arriving meanwhile
            wait_for(log, "did not acknowledge alert records")  # it holds a batch instead of crashing
            assert "nothing is committed past them" in log.read_text()
            assert status(f"http://127.0.0.1:{metrics}/readyz") == 503
            assert status(f"http://127.0.0.1:{metrics}/healthz") == 200
            time.sleep(max(0.0, 8.0 - (time.monotonic() - cut_at)))
            assert service.proc is not None and service.proc.poll() is None, "the service died during the outage"
            proxy.restore()
            wait_for(log, "Kafka broker acknowledges again")
            assert wait_until_consumed(broker.bootstrap, f"mid-{tag}", topics["events"], 120), log.read_text()[-3000:]
            assert wait_status(f"http://127.0.0.1:{metrics}/readyz", 200) == 200
            assert service.stop() == 0
        finally:
            service.stop()
        assert "Traceback" not in log.read_text()
        assert proxy.refused > 0, "the proxy never refused the service: the outage did not happen"
        records = alert_records(read_topic(broker.bootstrap, topics["alerts"]))
        counts = Counter((r["alert_id"], r["status"]) for r in records)
        assert not [k for k, n in counts.items() if n > 1], "an alert record was published twice"
        dead = read_topic(broker.bootstrap, topics["dead"])
        origins = Counter((int(dict(m.headers)["source_partition"]), int(dict(m.headers)["source_offset"]))
                          for m in dead)
        assert set(origins) == bad_records(broker.bootstrap, topics["events"]), "a dead letter is missing"

        assert set(counts) == {(r["alert_id"], r["status"]) for r in clean_run(broker, topics["events"], tmp_path)}


def clean_run(broker: LocalBroker, events_topic: str, tmp_path) -> list[dict]:
    """The alert records of the same events through a service that never lost the broker."""
    tag = uuid.uuid4().hex[:8]
    clean = {"events": events_topic, "alerts": f"clean-alerts-{tag}", "dead": f"clean-dead-{tag}"}
    create_topics(broker.bootstrap, {clean["alerts"]: 3, clean["dead"]: 1})
    reference = ServiceProcess(bootstrap=broker.bootstrap, topics=clean, group=f"clean-{tag}",
                               log=tmp_path / f"clean-{tag}.log").start()
    try:
        assert wait_until_consumed(broker.bootstrap, f"clean-{tag}", events_topic, 120)
    finally:
        assert reference.stop() == 0
    return alert_records(read_topic(broker.bootstrap, clean["alerts"]))


def test_alerts_topic_down_then_sigterm_stops_without_committing(tmp_path):
    """Only the alerts producer loses the broker (the consumer still reads): the service holds the batch (a clear
    log line, no commit) instead of going on; SIGTERM then stops it promptly (exit 0, no traceback) without
    committing that batch; restarted once the broker takes alerts again, it publishes every alert of a clean run
    exactly once."""
    events = list(generate(subjects=80, days=60, seed=7, sites=4, deviation_rate=0.6))
    proxy_port, metrics = free_port(), free_port()
    tag = uuid.uuid4().hex[:8]
    topics = {"events": f"held-events-{tag}", "alerts": f"held-alerts-{tag}", "dead": f"held-dead-{tag}"}
    group, log = f"held-{tag}", tmp_path / "service.log"
    with LocalBroker(advertised_port=proxy_port, log_path=tmp_path / "broker.log") as broker, \
            TcpProxy(upstream_port=broker.port, port=proxy_port, bypass=frozenset({PRODUCER})) as proxy:
        create_topics(broker.bootstrap, {topics["events"]: 3, topics["alerts"]: 3, topics["dead"]: 1})
        produce_direct(broker.bootstrap, topics["events"], events_as_records(events))
        service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=log,
                                 extra=["--metrics-port", str(metrics)]).start()
        try:
            deadline = time.monotonic() + 60
            while consumed(metrics) < 1000 and time.monotonic() < deadline:
                time.sleep(0.05)  # mid-stream: most of the events are still to be processed and published
            proxy.cut(only=frozenset({"protocol-monitor-alerts"}))  # the service's alerts producer
            wait_for(log, "did not acknowledge alert records")
            held_at = committed_offsets(broker.bootstrap, group, topics["events"])
            code = service.stop()
        finally:
            service.stop()
            proxy.restore()
        assert committed_offsets(broker.bootstrap, group, topics["events"]) == held_at, "the held batch was committed"
        text = log.read_text()
        assert code == 0 and "Traceback" not in text, text[-3000:]
        assert "stopping with a batch the broker did not acknowledge" in text and "not committed" in text
        assert "stopping: offsets committed" not in text

        service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=log).start()
        try:
            assert wait_until_consumed(broker.bootstrap, group, topics["events"], 120), log.read_text()[-3000:]
        finally:
            assert service.stop() == 0
        counts = Counter((r["alert_id"], r["status"]) for r in alert_records(read_topic(broker.bootstrap,
                                                                                        topics["alerts"])))
        assert max(counts.values()) == 1, "an alert record was published twice"
        assert set(counts) == {(r["alert_id"], r["status"]) for r in clean_run(broker, topics["events"], tmp_path)}


def bad_records(bootstrap: str, topic: str) -> set[tuple[int, int]]:
    """(partition, offset) of every record on the events topic that is not an event."""
    return {(m.partition, m.offset) for m in read_topic(bootstrap, topic) if m.key == b"bad"}


# ---- SIGTERM during a batch ---------------------------------------------------------------------------------------
def test_sigterm_during_a_large_batch_exits_cleanly_and_loses_nothing(tmp_path, monkeypatch):
    """SIGTERM while the service works through a backlog in large polls: it finishes the batch in hand (publishes
    its alerts, then commits), exits 0 without a traceback, and has committed no offset whose alerts are not on
    the topic; a restart completes the stream with every alert of a clean run exactly once."""
    monkeypatch.setenv("PROTOCOL_MONITOR_POLL_MAX_RECORDS", "3000")  # large batches (the default is 500)
    events = list(generate(subjects=50, days=60, seed=23, sites=4, deviation_rate=0.6))
    head, backlog = events[:500], events[500:]
    tag, metrics = uuid.uuid4().hex[:8], free_port()
    topics = {"events": f"term-events-{tag}", "alerts": f"term-alerts-{tag}", "dead": f"term-dead-{tag}"}
    group, log = f"term-{tag}", tmp_path / "service.log"
    with LocalBroker(log_path=tmp_path / "broker.log") as broker:
        create_topics(broker.bootstrap, {topics["events"]: 3, topics["alerts"]: 3, topics["dead"]: 1})
        produce(broker.bootstrap, topics["events"], events_as_records(head))
        service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=log,
                                 extra=["--metrics-port", str(metrics)]).start()
        try:
            assert wait_until_consumed(broker.bootstrap, group, topics["events"], 120), log.read_text()[-3000:]
            before = committed_offsets(broker.bootstrap, group, topics["events"])
            produce(broker.bootstrap, topics["events"], events_as_records(backlog))
            deadline = time.monotonic() + 60
            while consumed(metrics) <= len(head) and time.monotonic() < deadline:
                time.sleep(0.05)  # until it is inside a batch of the backlog
            code = service.stop()
        finally:
            service.stop()
        text = log.read_text()
        assert code == 0 and "Traceback" not in text, text[-3000:]
        assert "stopping after the current batch" in text and "stopping: offsets committed" in text
        at_stop = committed_offsets(broker.bootstrap, group, topics["events"])
        ends = end_offsets(broker.bootstrap, topics["events"])
        assert sum(at_stop.values()) < sum(ends.values()), "the backlog was done before SIGTERM: nothing was tested"
        assert sum(at_stop.values()) > sum(before.values()), "no batch of the backlog was committed"
        published = alert_records(read_topic(broker.bootstrap, topics["alerts"]))
        assert max(Counter((r["alert_id"], r["status"]) for r in published).values()) == 1

        service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=log).start()
        try:
            assert wait_until_consumed(broker.bootstrap, group, topics["events"], 120), log.read_text()[-3000:]
        finally:
            assert service.stop() == 0
        final = Counter((r["alert_id"], r["status"]) for r in alert_records(read_topic(broker.bootstrap,
                                                                                       topics["alerts"])))
        assert max(final.values()) == 1, "an alert record was published twice"

        expected = clean_run(broker, topics["events"], tmp_path)
        assert set(final) == {(r["alert_id"], r["status"]) for r in expected}

        # nothing was committed past an alert that was not yet published: the events below the committed offsets,
        # on their own through a clean service, raise only alerts that were on the topic when the service stopped
        prefix = f"term-prefix-{tag}"
        create_topics(broker.bootstrap, {prefix: 3})
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        for m in sorted(read_topic(broker.bootstrap, topics["events"]), key=lambda m: (m.partition, m.offset)):
            if m.offset < at_stop.get(m.partition, 0):
                producer.send(prefix, key=m.key, value=m.value, partition=m.partition)
        producer.flush()
        producer.close()
        owed = {(r["alert_id"], r["status"]) for r in clean_run(broker, prefix, tmp_path)}
        assert owed, "no alert came from the committed part of the stream"
        missing = owed - {(r["alert_id"], r["status"]) for r in published}
        assert not missing, f"offsets were committed past {len(missing)} alerts not yet published"


def consumed(metrics_port: int) -> float:
    """Events the service has taken in so far (its events-consumed counter; it counts inside a batch)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=3).read().decode()
    except OSError:  # not up yet
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("protocol_monitor_events_consumed_total"))

"""Faults around the broker: unreachable at start (retries with back-off, not ready, a clear log line, then it
works when the broker appears), and SIGTERM while waiting."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid

from monitor.broker import LocalBroker, free_port
from tests.conftest import SHARED, load_scenario
from tests.connectors.kafkatools import ServiceProcess, create_topics, events_as_records, produce, read_topic


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

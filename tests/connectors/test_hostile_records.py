"""Well-formed records with absurd values, ahead of a published scenario, against the real service and a real
broker (issue 13): the service stays up and ready, the scenario's alerts arrive, every hostile record is on the
dead-letter topic with its reason and original bytes; and the same with a restart in the middle (no crash loop)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from typing import Any

import pytest

from monitor.broker import LocalBroker, free_port
from tests.conftest import SHARED, final_alerts, load_scenario, run_events
from tests.support.kafkatools import (
    ServiceProcess, alert_records, create_topics, events_as_records, final_pairs, produce, read_topic,
    wait_until_consumed)

SCENARIO = SHARED / "scenarios" / "13_excl_neutropenia_si_units.jsonl"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with LocalBroker(log_path=tmp_path_factory.mktemp("broker") / "broker.log") as b:
        yield b


def hostile(events: list[dict[str, Any]]) -> list[tuple[bytes, str]]:
    """Records of the scenario's own subject, valid JSON events of known types, with values no child can have.
    Each with the reason it must be dead-lettered with."""
    base = {k: events[0][k] for k in ("subject_id", "site_id", "occurred_at", "recorded_at")}
    anakinra = {**base, "type": "drug_administration", "drug": "anakinra", "atc": "L04AC03",
                "route": "subcutaneous", "study_drug": True, "arm": "anakinra"}
    out = [
        ({**anakinra, "event_id": "H-1", "weight_kg": 1e308, "dose_mg_per_kg": -1}, "implausible"),
        ({**anakinra, "event_id": "H-2", "dose_mg_per_kg": -4}, "implausible"),
        ({**anakinra, "event_id": "H-3", "dose_mg_per_kg": 1e308}, "implausible"),
        ({**base, "event_id": "H-4", "type": "vital_sign", "code": "8310-5", "temperature_c": 1e308,
          "site": "tympanic"}, "implausible"),
        ({**base, "event_id": "H-5", "type": "lab_result", "analyte": "ALT", "value": 40, "unit": "U/L",
          "reference_range": {"low": 0, "high": "n/a"}}, "bad_number"),  # a number that does not parse
    ]
    return [(json.dumps(e).encode(), reason) for e, reason in out]


def _ready(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_ready(service: ServiceProcess, port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert service.proc is not None and service.proc.poll() is None, "the service exited"
        if _ready(port):
            return
        time.sleep(0.2)
    raise AssertionError("the service never became ready")


def _check(broker, topics, header, events, bad, tmp_path) -> None:
    """The alerts topic ends as a clean file replay of the scenario alone (the service runs on the stream's clock,
    as the replay does), which holds the scenario's expected alerts; the dead letters hold each hostile record."""
    dead = read_topic(broker.bootstrap, topics["dead"], until=lambda m: len(m) >= len(bad), timeout_s=60)
    messages = read_topic(broker.bootstrap, topics["alerts"], timeout_s=20)
    records = alert_records(messages)
    assert Counter((r["alert_id"], r["status"]) for r in records).most_common(1)[0][1] == 1, "a record twice"
    final = Counter((r["rule"], r["subject_id"], r["at"]) for r in final_pairs(records))
    clean, _, _ = run_events(events, tmp_path=tmp_path)
    assert final == Counter((a.rule, a.subject_id, a.at) for a in final_alerts(clean))
    assert {(a["rule"], a["subject"]) for a in header["expected_alerts"]} <= {(r, s) for r, s, _ in final}
    assert sorted(m.value for m in dead) == sorted(v for v, _ in bad)  # each once, with its original bytes
    by_value = {m.value: dict(m.headers) for m in dead}
    for value, reason in bad:
        headers = by_value[value]
        assert headers["reason"].decode() == reason, (value, headers)
        assert headers["detail"] and header["expected_alerts"][0]["subject"].encode() not in headers["detail"]


@pytest.mark.skipif(not SCENARIO.is_file(), reason="published scenarios not found")
@pytest.mark.parametrize("restart", [False, True], ids=["straight", "restart-in-the-middle"])
def test_absurd_values_never_stop_the_service(broker, tmp_path, restart):
    header, events = load_scenario(SCENARIO)
    tag = uuid.uuid4().hex[:8]
    topics = {"events": f"hostile-events-{tag}", "alerts": f"hostile-alerts-{tag}", "dead": f"hostile-dead-{tag}"}
    create_topics(broker.bootstrap, {topics["events"]: 1, topics["alerts"]: 1, topics["dead"]: 1})
    bad = hostile(events)
    good = events_as_records(events)
    key = events[0]["subject_id"].encode()
    half = len(good) // 2
    produce(broker.bootstrap, topics["events"], [(key, v) for v, _ in bad] + good[:half])
    group = f"g-{uuid.uuid4().hex[:6]}"
    port = free_port()
    log = tmp_path / "service.log"
    service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=log,
                             extra=["--metrics-port", str(port), "--clock", "stream"]).start()
    try:
        _wait_ready(service, port)
        assert wait_until_consumed(broker.bootstrap, group, topics["events"], timeout_s=60)
        if restart:
            assert service.stop() == 0, log.read_text()[-2000:]
            service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=log,
                                     extra=["--metrics-port", str(port), "--clock", "stream"]).start()
            _wait_ready(service, port)
        produce(broker.bootstrap, topics["events"], good[half:])
        assert wait_until_consumed(broker.bootstrap, group, topics["events"], timeout_s=60)
        assert service.proc is not None and service.proc.poll() is None and _ready(port)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        _check(broker, topics, header, events, bad, tmp_path)
    finally:
        assert service.stop() == 0, log.read_text()[-2000:]
    text = log.read_text()
    assert "Traceback" not in text
    assert events[0]["subject_id"] not in text  # no subject id in the log
    if not restart:  # a restart's counters start again from zero
        for reason, n in Counter(r for _, r in bad).items():
            assert f'protocol_monitor_events_rejected_total{{reason="{reason}"}} {float(n)}' in metrics

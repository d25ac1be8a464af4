"""The service against a real Kafka-protocol broker on loopback (Tansu, started and stopped by the tests)."""

from __future__ import annotations

import datetime as dt
import json
import urllib.request
import uuid
from collections import Counter

import pytest

from monitor.broker import LocalBroker, free_port
from tests.conftest import SHARED, load_scenario
from tests.support.kafkatools import (
    ServiceProcess, alert_records, assert_scenarios_alerted, create_topics, events_as_records, final_pairs, produce, read_topic, same_local_clock,
    shift_events, wait_until_consumed)

GRACE = dt.timedelta(hours=2)
LIVE_SCENARIOS = sorted(p.stem for p in (SHARED / "scenarios").glob("*.jsonl"))


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with LocalBroker(log_path=tmp_path_factory.mktemp("broker") / "broker.log") as b:
        yield b


def _age_boundary(header) -> bool:
    """Ages exactly at a month boundary depend on month lengths, which a move by days changes."""
    return any(a["rule"] in ("ELIG-AGE", "ELIG-WEIGHT") for a in header["expected_alerts"]
               + header.get("expected_no_alerts", []))


def _topics(prefix: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {"events": f"{prefix}-events-{tag}", "alerts": f"{prefix}-alerts-{tag}", "dead": f"{prefix}-dead-{tag}"}


@pytest.mark.skipif(not (SHARED / "scenarios").is_dir(), reason="published scenarios not found")
def test_published_scenarios_through_kafka_with_live_deadlines(broker, tmp_path):
    """Each scenario is moved by whole days so its evaluation horizon lies within the last day: the live clock
    must fire every deadline up to the horizon (and may fire later ones, which are then after the horizon)."""
    topics = _topics("live")
    create_topics(broker.bootstrap, {topics["events"]: 3, topics["alerts"]: 3, topics["dead"]: 1})
    now = dt.datetime.now(dt.timezone.utc)
    plans = []
    records = []
    for name in LIVE_SCENARIOS:
        header, events = load_scenario(SHARED / "scenarios" / f"{name}.jsonl")
        horizon = dt.datetime.fromisoformat(header["evaluation_horizon"])
        days = (now - (horizon + GRACE)).days
        if not same_local_clock(events, days) or _age_boundary(header):
            continue  # a whole-day move across a daylight-saving change shifts local midnights by an hour
        shifted = shift_events(events, days)
        plans.append((name, header, horizon + dt.timedelta(days=days), dt.timedelta(days=days)))
        records += events_as_records(shifted)
    assert len(plans) >= 5, f"only {len(plans)} scenarios could be moved to now without a clock change"
    produce(broker.bootstrap, topics["events"], records)

    def complete(messages):
        final = {(r["rule"], r["subject_id"]) for r in final_pairs(alert_records(messages))}
        return all((a["rule"], a["subject"]) in final for _, h, _, _ in plans for a in h["expected_alerts"])

    group = f"g-{uuid.uuid4().hex[:6]}"
    service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group,
                             log=tmp_path / "service.log").start()
    try:
        read_topic(broker.bootstrap, topics["alerts"], until=complete, timeout_s=120)
        # a provisional alert (raised on part of a timeline, withdrawn by a later event) may still be waiting for
        # its withdrawal: read the final topic only once every event is consumed (its alerts are published first)
        assert wait_until_consumed(broker.bootstrap, group, topics["events"], timeout_s=120)
        messages = read_topic(broker.bootstrap, topics["alerts"], timeout_s=30)
    finally:
        assert service.stop() == 0, (tmp_path / "service.log").read_text()[-2000:]
    records_out = alert_records(messages)
    assert Counter((r["alert_id"], r["status"]) for r in records_out).most_common(1)[0][1] == 1, "a record twice"
    assert_scenarios_alerted(final_pairs(records_out), plans, records_out)


def test_bad_input_goes_to_the_dead_letter_topic_and_good_events_go_on(broker, tmp_path):
    topics = _topics("bad")
    create_topics(broker.bootstrap, {topics["events"]: 1, topics["alerts"]: 1, topics["dead"]: 1})
    header, events = load_scenario(SHARED / "scenarios" / "13_excl_neutropenia_si_units.jsonl")
    bad = [
        (b"S1", b"{not json", "malformed_json"),
        (b"S2", json.dumps({**events[0], "value": "abc", "type": "lab_result", "analyte": "ANC"}).encode(),
         "bad_number"),
        (b"S3", json.dumps({**events[0], "type": "teleportation"}).encode(), "unknown_type"),
        (b"S4", b'{"pad": "' + b"x" * 1_100_000 + b'"}', "too_large"),
    ]
    good = events_as_records(events)
    produce(broker.bootstrap, topics["events"], good[:5] + [(k, v) for k, v, _ in bad] + good[5:])
    port = free_port()
    store = f"sqlite:///{tmp_path / 'alerts.db'}"
    service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=f"g-{uuid.uuid4().hex[:6]}",
                             log=tmp_path / "service.log", extra=["--metrics-port", str(port), "--store", store]).start()
    try:
        dead = read_topic(broker.bootstrap, topics["dead"], until=lambda m: len(m) >= len(bad), timeout_s=60)
        alerts = read_topic(broker.bootstrap, topics["alerts"], until=lambda m: any(
            json.loads(x.value)["rule"] == "ELIG-NEUTROPENIA" for x in m), timeout_s=60)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        assert service.stop() == 0
    for _, _, reason in bad:
        assert f'protocol_monitor_events_rejected_total{{reason="{reason}"}} 1.0' in metrics
    assert 'protocol_monitor_alerts_raised_total{category="eligibility",rule="ELIG-NEUTROPENIA"' in metrics
    assert header["expected_alerts"][0]["subject"] not in metrics  # no subject id in any label
    assert header["expected_alerts"][0]["subject"] not in (tmp_path / "service.log").read_text()  # nor in logs
    from monitor.store import AlertStore

    entries = AlertStore(url=store).audit_entries()
    assert [e.action for e in entries] == ["rules_loaded"] and entries[0].data["rules"] == 47
    assert [m.value for m in dead] == [v for _, v, _ in bad]
    for message, (_, _, reason) in zip(dead, bad):
        headers = dict(message.headers)
        assert headers["reason"].decode() == reason
        assert headers["source_topic"].decode() == topics["events"]
        assert headers["source_partition"] == b"0" and int(headers["source_offset"]) >= 5
        assert headers["detail"]
    assert any(json.loads(m.value)["rule"] == "ELIG-NEUTROPENIA" for m in alerts)


def test_a_restart_does_not_dead_letter_the_same_record_twice(broker, tmp_path):
    """Rebuilding a partition reads its history again; records dead-lettered before the commit stay single."""

    topics = _topics("dl-restart")
    create_topics(broker.bootstrap, {topics["events"]: 1, topics["alerts"]: 1, topics["dead"]: 1})
    header, events = load_scenario(SHARED / "scenarios" / "13_excl_neutropenia_si_units.jsonl")
    good = events_as_records(events)
    produce(broker.bootstrap, topics["events"], good[:3] + [(b"S1", b"{not json")] + good[3:])
    group = f"g-{uuid.uuid4().hex[:6]}"
    first = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=tmp_path / "one.log").start()
    try:
        assert wait_until_consumed(broker.bootstrap, group, topics["events"], timeout_s=60)
    finally:
        assert first.stop() == 0
    second = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=tmp_path / "two.log").start()
    try:
        produce(broker.bootstrap, topics["events"], [(b"S2", b"[1, 2]")])
        assert wait_until_consumed(broker.bootstrap, group, topics["events"], timeout_s=60)
        dead = read_topic(broker.bootstrap, topics["dead"], timeout_s=10)
    finally:
        assert second.stop() == 0
    assert [m.value for m in dead] == [b"{not json", b"[1, 2]"]

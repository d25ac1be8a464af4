"""Metric names and labels: Prometheus naming, bounded labels only, never a subject id."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import Counter

from prometheus_client import CollectorRegistry

from monitor.metrics import LABELS, HealthServer, Metrics
from tests.conftest import SHARED, final_alerts, load_scenario, run_events

SCENARIO = SHARED / "scenarios" / "21_late_dose_record_retracts_alert.jsonl"  # raises, then withdraws

REQUIRED = {
    "protocol_monitor_events_consumed_total": {"site", "type"},
    "protocol_monitor_events_rejected_total": {"reason"},
    "protocol_monitor_alerts_raised_total": {"site", "rule", "severity", "category"},
    "protocol_monitor_alerts_retracted_total": {"site", "rule"},
    "protocol_monitor_open_alerts": {"site", "severity"},
    "protocol_monitor_event_to_alert_seconds_bucket": {"le"},
    "protocol_monitor_consumer_lag_messages": {"topic", "partition"},
    "protocol_monitor_deadlines_pending": {"site"},
    "protocol_monitor_subjects": {"site", "arm"},
    "protocol_monitor_rules_info": {"version"},
}


def exercised(tmp_path) -> Metrics:
    m = Metrics(registry=CollectorRegistry())
    header, events = load_scenario(SCENARIO)
    alerts, _, monitor = run_events(events, tmp_path=tmp_path)
    for e in events:
        m.events_consumed.labels(e["site_id"], e["type"]).inc()
    m.events_rejected.labels("malformed_json").inc()
    for a in alerts:
        m.alert_published(a, 0.02)
    m.set_gauge(m.open_alerts, "open", Counter((a.site_id, a.severity) for a in final_alerts(alerts)) or
                Counter({("FR-BIC-01", "major"): 0}))
    m.set_gauge(m.subjects, "subjects", Counter((s.site_id, s.arm) for s in monitor.subjects.values()))
    m.set_gauge(m.deadlines_pending, "deadlines", Counter({("FR-BIC-01",): 1}))
    m.set_gauge(m.consumer_lag, "lag", Counter({("clinical-events", "0"): 3}))
    m.rules.info({"version": "abc123"})
    return m


def test_every_required_metric_exists_with_exactly_its_labels(tmp_path):
    m = exercised(tmp_path)
    seen: dict[str, set[str]] = {}
    for family in m.registry.collect():
        for sample in family.samples:
            seen.setdefault(sample.name, set()).update(sample.labels)
    for name, labels in REQUIRED.items():
        assert name in seen, f"{name} missing"
        assert seen[name] == labels, (name, seen[name])
    for name, labels in seen.items():
        assert labels <= LABELS | {"le"}, f"{name} has a label outside the allowed set: {labels - LABELS}"


def test_no_subject_id_reaches_any_label(tmp_path):
    m = exercised(tmp_path)
    header, events = load_scenario(SCENARIO)
    subjects = {e["subject_id"] for e in events}
    for family in m.registry.collect():
        for sample in family.samples:
            assert not subjects & set(sample.labels.values()), sample


def test_health_endpoints(tmp_path):
    ready = [False]
    server = HealthServer(registry=exercised(tmp_path).registry, host="127.0.0.1", port=0,
                          ready=lambda: ready[0]).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
        try:
            urllib.request.urlopen(base + "/readyz", timeout=5)
            raise AssertionError("readyz must be 503 before the state is rebuilt")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503
        ready[0] = True
        assert urllib.request.urlopen(base + "/readyz", timeout=5).status == 200
        text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        assert "protocol_monitor_rules_info{version=\"abc123\"} 1.0" in text
    finally:
        server.shutdown()


def test_the_endpoint_listens_only_on_the_configured_address():
    """The default is loopback; a deployment chooses its interface explicitly (here another loopback address)."""
    from monitor.config import Settings

    assert Settings().metrics_host == "127.0.0.1"
    server = HealthServer(registry=CollectorRegistry(), host="127.0.0.2", port=0, ready=lambda: True).start()
    try:
        assert urllib.request.urlopen(f"http://127.0.0.2:{server.port}/healthz", timeout=5).status == 200
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
            raise AssertionError("the endpoint answered on an address it was not configured for")
        except urllib.error.URLError as exc:
            assert isinstance(exc.reason, ConnectionRefusedError)
    finally:
        server.shutdown()

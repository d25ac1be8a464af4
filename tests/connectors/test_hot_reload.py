"""Hot reload on a running service (test broker): a threshold change switches versions without a restart,
alerts before and after carry the right versions, and no event is lost or evaluated twice; an invalid version
is refused with its file and line while the old one keeps running."""

from __future__ import annotations

import shutil
import signal
import time
import urllib.request
import uuid
from collections import Counter

import pytest

from monitor.broker import LocalBroker, free_port
from monitor.rules import DEFAULT_RULES_DIR, load_rules
from monitor.store import AlertStore
from tests.conftest import SHARED, load_scenario
from tests.support.kafkatools import (
    ServiceProcess, alert_records, create_topics, events_as_records, produce, read_topic, wait_until_consumed)


def wait_for(path, text, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return True
        time.sleep(0.3)
    raise AssertionError(f"{text!r} never appeared in {path}:\n{path.read_text()[-2000:]}")


@pytest.mark.skipif(not (SHARED / "scenarios").is_dir(), reason="published scenarios not found")
def test_threshold_change_on_a_running_service(tmp_path):
    rules_dir = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, rules_dir)
    old_version = load_rules(rules_dir).version
    _, first = load_scenario(SHARED / "scenarios" / "06_overdose_above_8mgkg.jsonl")   # ANC 4.2, an overdose
    _, second = load_scenario(SHARED / "scenarios" / "04_missed_escalation_h12.jsonl")  # ANC 4.2, missed H12
    tag = uuid.uuid4().hex[:8]
    topics = {"events": f"hr-events-{tag}", "alerts": f"hr-alerts-{tag}", "dead": f"hr-dead-{tag}"}
    log, port, store = tmp_path / "service.log", free_port(), f"sqlite:///{tmp_path / 'alerts.db'}"
    with LocalBroker(log_path=tmp_path / "broker.log") as broker:
        create_topics(broker.bootstrap, {topics["events"]: 2, topics["alerts"]: 2, topics["dead"]: 1})
        group = f"hr-{tag}"
        service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=log,
                                 extra=["--rules", str(rules_dir), "--metrics-port", str(port), "--store", store,
                                        "--clock", "stream"]).start()
        try:
            produce(broker.bootstrap, topics["events"], events_as_records(first))
            assert wait_until_consumed(broker.bootstrap, group, topics["events"], 60)
            # the author raises the neutropenia threshold (a one-line data edit) and the file is saved
            path = rules_dir / "eligibility.yaml"
            path.write_text(path.read_text().replace("value: {lt: 1.5}", "value: {lt: 5.0}"))
            new_version = load_rules(rules_dir).version
            wait_for(log, f"rules version {new_version} in force (was {old_version})")
            produce(broker.bootstrap, topics["events"], events_as_records(second))
            assert wait_until_consumed(broker.bootstrap, group, topics["events"], 60)
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            # an invalid version is refused with file and line; the new version stays in force
            path.write_text(path.read_text().replace("severity: major", "severity: catastrophic", 1))
            service.proc.send_signal(signal.SIGHUP)
            wait_for(log, "new rules refused")
        finally:
            assert service.stop() == 0
        records = alert_records(read_topic(broker.bootstrap, topics["alerts"]))
    consumed = sum(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("protocol_monitor_events_consumed_total{"))
    assert consumed == len(first) + len(second), "an event was lost or evaluated twice across the switch"
    assert f'protocol_monitor_rules_info{{version="{new_version}"}} 1.0' in metrics
    assert Counter((r["alert_id"], r["status"]) for r in records).most_common(1)[0][1] == 1
    by = {(r["rule"], r["subject_id"], r["status"]): r["rule_version"] for r in records}
    assert by[("DOSE-MAX-EXCEEDED", "ANA-006", "raised")] == old_version           # before the switch
    assert by[("ELIG-NEUTROPENIA", "ANA-006", "raised")] == new_version            # the rebuild under the new one
    assert by[("ELIG-NEUTROPENIA", "ANA-004", "raised")] == new_version            # events after the switch
    assert by[("DOSE-H12-MISSED-ESCALATION", "ANA-004", "raised")] == new_version
    text = log.read_text()
    assert "eligibility.yaml:" in text and "catastrophic" in text
    actions = [e.action for e in AlertStore(url=store).audit_entries()]
    # the file watcher and the SIGHUP may both try the invalid version: each refusal is recorded, nothing switches
    assert actions[:3] == ["rules_loaded", "rules_switched", "rules_refused"] and set(actions[3:]) <= {"rules_refused"}

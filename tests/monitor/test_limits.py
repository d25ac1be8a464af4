"""The bound on events held per subject: what happens at the limit is defined (the event is refused as
`subject_limit`, like any other rejected event), amendments still apply, and other subjects are unaffected."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from monitor.clock import ReplayClock
from monitor.errors import EventRejected
from monitor.evaluator import Monitor
from monitor.events import decode, parse_event


def _temperature(subject: str, n: int, value: float = 37.0, recorded: str | None = None) -> dict:
    at = f"2025-01-0{1 + n // 24}T{n % 24:02d}:00:00+00:00"
    return {"event_id": f"{subject}-T{n}", "subject_id": subject, "site_id": "FR-01", "type": "vital_sign",
            "occurred_at": at, "recorded_at": recorded or at, "measure": "temperature", "value": value,
            "unit": "Cel", "site": "axillary"}


@pytest.fixture()
def monitor(rules):
    return Monitor.create(rules=rules, clock=ReplayClock(), max_events_per_subject=3)


def _ingest(monitor, payload):
    event = parse_event(payload)
    monitor.admit(event)
    monitor.clock.advance_to(event.recorded_at)
    monitor.ingest([(event, payload)])


def test_a_new_event_past_the_limit_is_refused_with_a_reason(monitor):
    for n in range(3):
        _ingest(monitor, _temperature("S-1", n))
    with pytest.raises(EventRejected) as info:
        _ingest(monitor, _temperature("S-1", 3))
    assert info.value.reason == "subject_limit"
    assert "max_events_per_subject" in info.value.detail and info.value.event_id == "S-1-T3"
    assert len(monitor.subjects["S-1"].events) == 3


def test_amendments_and_retries_pass_at_the_limit_and_other_subjects_are_unaffected(monitor):
    for n in range(3):
        _ingest(monitor, _temperature("S-1", n))
    _ingest(monitor, _temperature("S-1", 0))  # a transport retry
    _ingest(monitor, _temperature("S-1", 0, value=38.5, recorded="2025-01-02T00:00:00+00:00"))  # an amendment
    assert monitor.subjects["S-1"].events["S-1-T0"].event.value == 38.5
    _ingest(monitor, _temperature("S-2", 0))
    assert len(monitor.subjects["S-2"].events) == 1


def test_the_limit_counts_new_events_still_waiting_in_the_same_batch(monitor):
    items = [(parse_event(p), p) for p in (_temperature("S-1", n, recorded="2025-01-03T00:00:00+00:00")
                                           for n in range(4))]
    admitted = []
    for item in items:
        try:
            monitor.admit(item[0], admitted)
        except EventRejected as exc:
            assert exc.reason == "subject_limit"
            continue
        admitted.append(item)
    assert [e.event_id for e, _ in admitted] == ["S-1-T0", "S-1-T1", "S-1-T2"]


def test_the_message_size_limit_is_configurable():
    raw = json.dumps({"pad": "x" * 5000}).encode()
    assert decode(raw)["pad"]
    with pytest.raises(EventRejected) as info:
        decode(raw, max_bytes=4096)
    assert info.value.reason == "too_large" and "4096" in info.value.detail


def test_replay_reports_refused_events_in_its_summary(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(_temperature("S-1", n)) + "\n" for n in range(5)))
    out = subprocess.run([sys.executable, "-m", "monitor", "replay", str(path), "--max-events-per-subject", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("subject_limit") >= 3, out.stderr

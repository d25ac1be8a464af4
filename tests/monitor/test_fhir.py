"""FHIR R4 in (issue 18): every published scenario, converted to FHIR Bundles by the test converter, gives the
same final alerts as its flat form; bad FHIR goes to the dead letters with a path and a reason."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from connectors.file import JsonLinesSource
from connectors.memory import ListSink
from monitor.clock import ReplayClock
from monitor.evaluator import Monitor
from monitor.fhir import FhirMapper
from monitor.replay import replay
from tests.conftest import SCENARIOS, final_alerts, load_scenario, run_events
from tests.fhirconv import to_fhir_lines


def run_fhir(lines: list[str], *, until: str | None, rules, tmp_path: Path):
    path = tmp_path / "fhir.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    clock = ReplayClock()
    monitor = Monitor.create(rules=rules, clock=clock)
    alerts, rejects = ListSink(), ListSink()
    summary = replay(source=JsonLinesSource(paths=[path]), monitor=monitor, clock=clock, alerts=alerts,
                     rejects=rejects, until=dt.datetime.fromisoformat(until) if until else None,
                     mapper=FhirMapper())
    return alerts.items, rejects.items, summary, monitor


def _key(a):
    return (a.alert_id, a.rule, a.subject_id, a.at)


@pytest.mark.skipif(not SCENARIOS, reason="../shared/scenarios not found beside the checkout")
@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_as_fhir_gives_the_same_alerts_as_flat(path, rules, tmp_path):
    header, events = load_scenario(path)
    until = header.get("evaluation_horizon")
    flat, flat_rejects, _ = run_events(events, until=until, rules=rules, tmp_path=tmp_path)
    alerts, rejects, summary, _ = run_fhir(to_fhir_lines(events), until=until, rules=rules, tmp_path=tmp_path)
    assert not rejects, [(r[1].reason, r[1].detail) for r in rejects]
    assert sorted(map(_key, final_alerts(alerts))) == sorted(map(_key, final_alerts(flat)))
    withdrawn = sorted((a.rule, a.subject_id) for a in alerts if a.status == "retracted")
    assert withdrawn == sorted((a.rule, a.subject_id) for a in flat if a.status == "retracted")

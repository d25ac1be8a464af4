"""No record can stop the monitor (issue 13): whatever raises while one subject is evaluated (a derivation, the
engine, building an alert), that subject's batch is undone, its records are rejected as `evaluation_error`, and every
other subject goes on exactly as in a clean run. Everything here runs the real Monitor, rules and engine."""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.base import RawRecord
from connectors.memory import ListSink
from monitor.alerts import AlertBook
from monitor.clock import ReplayClock
from monitor.derive import Deriver
from monitor.engine import RulesEngine
from monitor.errors import EngineError
from monitor.evaluator import Monitor
from monitor.events import decode, parse_event
from monitor.generate import generate
from monitor.replay import replay
from monitor.rules import RuleSet
from tests.conftest import SCENARIOS, final_alerts, load_scenario


class _Records:
    """A Source over in-memory JSON lines (each record keeps its exact bytes, as the dead letters must)."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def __iter__(self):
        for i, line in enumerate(self.lines, 1):
            yield RawRecord(value=line.encode("utf-8"), origin=f"stream:{i}")


def run(lines: list[str], rules: RuleSet, until: dt.datetime | None) -> tuple[list, list, Monitor]:
    clock = ReplayClock()
    monitor = Monitor.create(rules=rules, clock=clock)
    alerts, rejects = ListSink(), ListSink()
    replay(source=_Records(lines), monitor=monitor, clock=clock, alerts=alerts, rejects=rejects, until=until)
    return alerts.items, rejects.items, monitor


def by_subject(alerts: list) -> dict[str, set[tuple[str, str, str]]]:
    out: dict[str, set[tuple[str, str, str]]] = {}
    for a in final_alerts(alerts):
        out.setdefault(a.subject_id, set()).add((a.rule, a.at, a.alert_id))
    return out


def _stream() -> tuple[list[dict[str, Any]], dt.datetime | None]:
    """The published scenarios and a generated cohort, in delivery (recorded_at) order, and the latest horizon."""
    events: list[dict[str, Any]] = []
    horizons: list[dt.datetime] = []
    for path in SCENARIOS:
        header, scenario = load_scenario(path)
        events += scenario
        if header.get("evaluation_horizon"):
            horizons.append(dt.datetime.fromisoformat(header["evaluation_horizon"]))
    cohort = list(generate(subjects=6, days=30, seed=13))
    events += cohort
    events.sort(key=lambda e: dt.datetime.fromisoformat(e["recorded_at"]))
    return events, max(horizons) if horizons else None


@pytest.fixture(scope="module")
def stream() -> tuple[list[dict[str, Any]], dt.datetime | None]:
    if not SCENARIOS:
        pytest.skip("published scenarios not found (../shared is not beside the checkout)")
    return _stream()


@pytest.fixture(scope="module")
def clean(stream, rules) -> dict[str, set[tuple[str, str, str]]]:
    events, until = stream
    alerts, rejects, _ = run([json.dumps(e) for e in events], rules, until)
    return by_subject(alerts)


def _victim(events: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """A subject with alerts in the clean run, and one of its lab results after its first events."""
    labs = [e for e in events if e["type"] == "lab_result" and e["subject_id"].startswith("ANA-000")]
    return labs[len(labs) // 2]["subject_id"], labs[len(labs) // 2]


# ---- a derivation that raises for one subject -----------------------------------------------------------------


def test_a_derivation_that_raises_undoes_the_batch_and_spares_every_other_subject(stream, clean, rules, monkeypatch,
                                                                                caplog):
    events, until = stream
    subject, poisoned = _victim(events)
    original = Deriver._lab_signals

    def planted(self, v, deadline):  # raises while the poisoned lab is in the subject's history
        if any(e.event_id == poisoned["event_id"] for e in v.ev.get("lab_result", [])):
            raise ZeroDivisionError("planted")
        return original(self, v, deadline)

    monkeypatch.setattr(Deriver, "_lab_signals", planted)
    lines = [json.dumps(e) for e in events]
    alerts, rejects, monitor = run(lines, rules, until)

    batch = [e for e in events if e["subject_id"] == subject and e["recorded_at"] == poisoned["recorded_at"]]
    dead = {json.loads(rec.value)["event_id"]: err for rec, err in rejects}
    assert {e["event_id"] for e in batch} <= set(dead)
    err = dead[poisoned["event_id"]]
    assert err.reason == "evaluation_error"
    assert "derivation _lab_signals" in err.detail and "ZeroDivisionError" in err.detail
    assert subject not in err.detail
    assert [r for r in caplog.messages if "evaluation failed in derivation _lab_signals" in r]
    assert not [r for r in caplog.messages if subject in r]
    # the subject's state holds none of the undone batch; its later events were applied
    held = monitor.subjects[subject].events
    assert not {e["event_id"] for e in batch} & set(held)
    later = [e for e in events if e["subject_id"] == subject and e["recorded_at"] > poisoned["recorded_at"]]
    assert later and {e["event_id"] for e in later} <= set(held)
    # every other subject ends exactly as in the clean run
    got = by_subject(alerts)
    for other in set(clean) | set(got):
        if other != subject:
            assert got.get(other) == clean.get(other), other
    assert monitor.stats.events["evaluation_error"] == len(batch)


def test_the_undone_subject_state_equals_a_run_without_the_batch(stream, rules, monkeypatch):
    """Oracle for the undo: the subject's history after the failed batch equals its history in a run that never had
    that batch (canonical payloads compared)."""
    events, until = stream
    subject, poisoned = _victim(events)
    batch_ids = {e["event_id"] for e in events
                 if e["subject_id"] == subject and e["recorded_at"] == poisoned["recorded_at"]}
    original = Deriver._lab_signals

    def planted(self, v, deadline):
        if any(e.event_id == poisoned["event_id"] for e in v.ev.get("lab_result", [])):
            raise RuntimeError("planted")
        return original(self, v, deadline)

    mine = [e for e in events if e["subject_id"] == subject]
    monkeypatch.setattr(Deriver, "_lab_signals", planted)
    _, _, failed = run([json.dumps(e) for e in mine], rules, until)
    monkeypatch.setattr(Deriver, "_lab_signals", original)
    _, _, without = run([json.dumps(e) for e in mine if e["event_id"] not in batch_ids], rules, until)
    assert ({k: s.canonical for k, s in failed.subjects[subject].events.items()}
            == {k: s.canonical for k, s in without.subjects[subject].events.items()})
    assert failed.subjects[subject].arm == without.subjects[subject].arm


# ---- the engine, and building an alert -------------------------------------------------------------------------


def test_an_engine_failure_for_one_subject_is_isolated(stream, clean, rules, monkeypatch):
    events, until = stream
    subject, poisoned = _victim(events)
    original = RulesEngine.sync

    def failing(self, subject_id, facts):
        if subject_id == subject and any(poisoned["event_id"] in fid for fid in facts):
            raise EngineError("engine call assert_fact failed on a fact: Could not assert fact, error code: 204")
        return original(self, subject_id, facts)

    monkeypatch.setattr(RulesEngine, "sync", failing)
    alerts, rejects, _ = run([json.dumps(e) for e in events], rules, until)
    reasons = {json.loads(rec.value)["event_id"]: err for rec, err in rejects}
    if poisoned["event_id"] in reasons:  # the lab becomes a fact of its own only if a derivation uses it
        assert "rules engine" in reasons[poisoned["event_id"]].detail
    got = by_subject(alerts)
    for other in set(clean) | set(got):
        if other != subject:
            assert got.get(other) == clean.get(other), other


def test_an_alert_that_cannot_be_built_leaves_the_book_unchanged(stream, clean, rules, monkeypatch):
    events, until = stream
    import monitor.alerts as alerts_mod

    original = alerts_mod.make_alert
    victim = sorted(s for s in clean if s.startswith("ANA-000") and clean[s])[0]

    def failing(**kw):
        if kw["subject_id"] == victim:
            raise KeyError("planted template field")
        return original(**kw)

    monkeypatch.setattr(alerts_mod, "make_alert", failing)
    alerts, rejects, monitor = run([json.dumps(e) for e in events], rules, until)
    assert not [a for a in alerts if a.subject_id == victim]
    assert monitor.book.open_alerts(victim) == []
    assert any(err.reason == "evaluation_error" and "alert for rule" in err.detail for _, err in rejects)
    got = by_subject(alerts)
    for other in set(clean) | set(got):
        if other != victim:
            assert got.get(other) == clean.get(other), other


def test_reconcile_builds_every_alert_before_changing_the_book(rules):
    """The book is all-or-nothing: one failing alert and none of the others are booked."""
    from monitor.facts import Fact

    book = AlertBook()
    rule_ids = sorted(rules.rules)[:3]
    facts = {f"f{i}": Fact("adverse_event", str(i), {"at": "2025-01-01T00:00:00+00:00"}) for i in range(3)}
    matches = {(rule_ids[i], f"f{i}") for i in range(3)}

    class Bad(dict):
        def get(self, key, default=None):
            if key == rule_ids[2]:
                return object()  # not a Rule: building its alert raises
            return super().get(key, default)

    with pytest.raises(Exception):
        book.reconcile(subject_id="S", site_id="X", matches=matches, facts=facts, rules=Bad(rules.rules),
                       detected_at="2025-01-01T00:00:00+00:00", version="v")
    assert book.open_alerts("S") == []
    assert book.reconcile(subject_id="S", site_id="X", matches=set(), facts={}, rules=rules.rules,
                          detected_at="2025-01-01T00:00:00+00:00", version="v") == []


# ---- a rebuild whose history holds a record that failed before ------------------------------------------------


def test_a_rebuild_leaves_out_the_batch_that_failed_and_evaluates_the_rest(stream, rules, monkeypatch):
    events, until = stream
    subject, poisoned = _victim(events)
    mine = [e for e in events if e["subject_id"] == subject]
    original = Deriver._lab_signals

    def planted(self, v, deadline):
        if any(e.event_id == poisoned["event_id"] for e in v.ev.get("lab_result", [])):
            raise RuntimeError("planted")
        return original(self, v, deadline)

    monkeypatch.setattr(Deriver, "_lab_signals", planted)
    live_alerts, _, live = run([json.dumps(e) for e in mine], rules, until)
    clock = ReplayClock()
    rebuilt = Monitor.create(rules=rules, clock=clock)
    for e in mine:  # a restart loads the committed history quietly, the failed batch included
        clock.advance_to(dt.datetime.fromisoformat(e["recorded_at"]))
        rebuilt.load((parse_event(e), e))
    if until is not None:
        clock.advance_to(max(clock.now(), until))
    out = rebuilt.evaluate_rebuilt([subject], published=set(), open_alerts={})
    assert rebuilt.take_failures() == []
    assert set(rebuilt.subjects[subject].events) == set(live.subjects[subject].events)
    assert {(a.rule, a.at) for a in out if a.status == "raised"} == {
        (a.rule, a.at) for a in final_alerts(live_alerts)}


# ---- hostile values through the whole path (property) ---------------------------------------------------------

HOSTILE = st.one_of(
    st.sampled_from([1e308, -1e308, -1, -0.0, 0, 1e-320, "n/a", "", "1e309", "NaN", True, None, [1, 2],
                     {"nested": {"x": 1}}, {"high": "n/a"}]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-10**20, 10**20),
    st.text(max_size=12),
)


@st.composite
def mutations(draw, events: list[dict[str, Any]]) -> list[tuple[int, tuple[str, ...], Any]]:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, len(events) - 1))
        event = events[index]
        paths = [(k,) for k in event if k not in ("subject_id",)]
        paths += [(k, sub) for k, v in event.items() if isinstance(v, dict) for sub in v]
        paths += [("reference_range", "high"), ("weight_kg",), ("dose_mg_per_kg",), ("value",)]
        out.append((index, draw(st.sampled_from(paths)), draw(HOSTILE)))
    return out


def _encode(event: dict[str, Any]) -> str:
    return json.dumps(event, allow_nan=True)  # NaN and Infinity as senders write them; the parser must cope


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_events_never_escape_and_untouched_subjects_end_as_the_clean_run(stream, clean, rules, data):
    events, until = stream
    changes = data.draw(mutations(events))
    mutated = [dict(e) for e in events]
    touched = set()
    for index, path, value in changes:
        event = mutated[index] = json.loads(json.dumps(mutated[index]))
        touched.add(event["subject_id"])
        node = event
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = value
    lines = [_encode(e) for e in mutated]
    alerts, rejects, monitor = run(lines, rules, until)  # no exception may escape
    for rec, err in rejects:
        assert err.reason and err.detail
    got = by_subject(alerts)
    for subject in (set(clean) | set(got)) - touched:
        assert got.get(subject) == clean.get(subject), (subject, changes)
    for subject, state in monitor.subjects.items():  # nothing non-finite was kept
        for stored in state.events.values():
            for value in stored.event.model_dump().values():
                assert not (isinstance(value, float) and not math.isfinite(value))


def test_hostile_lines_are_rejected_with_a_reason_and_never_raise(rules):
    """Each hostile value in a numeric field of a real event: decode + parse + admit refuse it or accept it; either
    way nothing else escapes (the whole-path property above then runs it through the engine)."""
    event = {"event_id": "E1", "subject_id": "S1", "site_id": "FR-01", "type": "drug_administration",
             "occurred_at": "2025-01-06T08:00:00+01:00", "recorded_at": "2025-01-06T08:10:00+01:00",
             "drug": "anakinra", "atc": "L04AC03", "route": "subcutaneous", "study_drug": True, "arm": "anakinra"}
    monitor = Monitor.create(rules=rules, clock=ReplayClock())
    for field in ("weight_kg", "dose_mg_per_kg", "dose_mg"):
        for value in (1e308, -1e308, float("nan"), float("inf"), "n/a", {"x": 1}, [1]):
            raw = json.dumps({**event, field: value}, allow_nan=True)
            try:
                parsed = parse_event(decode(raw))
                monitor.admit(parsed)
            except Exception as exc:
                assert type(exc).__name__ == "EventRejected", (field, value, exc)

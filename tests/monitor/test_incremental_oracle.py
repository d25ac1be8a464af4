"""The deriver's memo (re-running only derivations whose inputs changed) against a from-scratch oracle: after every
batch, the memoised facts of each subject equal a derivation of its whole history without a memo. Streams are the
published scenarios, transformed the ways real feeds differ: the arm arrives late on an unrelated record, the
site id changes, records are duplicated, amended and delivered out of order."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.clock import ReplayClock
from monitor.evaluator import Monitor
from monitor.events import parse_event
from tests.conftest import SCENARIOS, final_alerts, load_scenario


def _facts(monitor: Monitor, subject_id: str, *, scratch: bool) -> list[tuple[str, str]]:
    state = monitor.subjects[subject_id]
    if scratch:
        derived = monitor.deriver.derive(monitor.deriver.view(state, scratch=True), monitor.cutoff())
        facts = derived.facts
    else:
        facts = [f for name in monitor.deriver.INPUTS for f in state.memo[name][0]]
    return sorted((f.fact_id, json.dumps(f.values, sort_keys=True, default=str)) for f in facts)


def _check_synced(monitor: Monitor, subject_id: str) -> None:
    """The facts by id and the engine messages kept up to date from the derivations that re-ran (Monitor._facts_of,
    RulesEngine.sync with `changed`) equal those built from the whole fact list, and the engine holds them."""
    state = monitor.subjects[subject_id]
    everything = [f for name in monitor.deriver.INPUTS for f in state.memo[name][0]]
    expected = {f.fact_id: f for f in everything}
    _, facts, messages, _ = state.memo["_synced"]
    assert facts == expected
    read = monitor.rules.facts_read()
    assert messages == {fid: f.message() for fid, f in expected.items() if f.name in read}
    assert monitor.engine._asserted[subject_id] == messages


def _batches(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = []
    for e in events:
        if out and out[-1][0]["recorded_at"] == e["recorded_at"]:
            out[-1].append(e)
        else:
            out.append([e])
    return out


def run_checked(events: list[dict[str, Any]], rules, until: dt.datetime | None) -> Monitor:
    clock = ReplayClock()
    monitor = Monitor.create(rules=rules, clock=clock)
    for batch in _batches(events):
        clock.advance_to(dt.datetime.fromisoformat(batch[0]["recorded_at"]))
        monitor.tick()
        monitor.ingest([(parse_event(e), e) for e in batch])
        assert monitor.take_failures() == []
        for subject_id in {e["subject_id"] for e in batch}:
            if subject_id not in monitor.subjects:
                continue
            assert _facts(monitor, subject_id, scratch=False) == _facts(monitor, subject_id, scratch=True), (
                subject_id, batch[0]["recorded_at"])
            _check_synced(monitor, subject_id)
    monitor.finish(until)
    return monitor


def restart_alerts(events: list[dict[str, Any]], rules, until: dt.datetime) -> list:
    """A restart: the whole stream loaded without evaluating (clock at each record's `recorded_at`, never back),
    then every subject evaluated once on its end state at `until`; the final alerts."""
    clock = ReplayClock()
    restarted = Monitor.create(rules=rules, clock=clock)
    for e in events:
        clock.advance_to(max(clock.now(), dt.datetime.fromisoformat(e["recorded_at"])))
        restarted.load((parse_event(e), e))
    clock.advance_to(max(clock.now(), until))
    return final_alerts(restarted.evaluate_rebuilt(list(restarted.subjects), published=set(), open_alerts={}))


@st.composite
def variants(draw, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = [json.loads(json.dumps(e)) for e in events]
    if draw(st.booleans()):  # each subject's arm only on one of its records, anywhere in the stream
        for subject in sorted({e["subject_id"] for e in out}):
            arm = next((e["arm"] for e in out if e["subject_id"] == subject and e.get("arm")), None)
            mine = [e for e in out if e["subject_id"] == subject]
            for e in mine:
                e.pop("arm", None)
            if arm is not None:
                mine[draw(st.integers(0, len(mine) - 1))]["arm"] = arm
    if draw(st.booleans()):  # the site id changes from some record on
        k = draw(st.integers(0, len(out) - 1))
        for e in out[k:]:
            e["site_id"] = e["site_id"] + "-B"
    for _ in range(draw(st.integers(0, 3))):  # transport retries
        out.insert(draw(st.integers(0, len(out))), dict(out[draw(st.integers(0, len(out) - 1))]))
    for _ in range(draw(st.integers(0, 2))):  # an amendment, recorded a day later, delivered at the end
        e = dict(out[draw(st.integers(0, len(out) - 1))])
        e["recorded_at"] = (dt.datetime.fromisoformat(e["recorded_at"]) + dt.timedelta(days=1)).isoformat()
        for name in ("temperature_c", "value", "dose_mg_per_kg", "weight_kg"):
            if isinstance(e.get(name), (int, float)):
                e[name] = round(e[name] * 1.05, 3)
                break
        out.append(e)
    if draw(st.booleans()):  # two records delivered out of order
        i, j = draw(st.integers(0, len(out) - 1)), draw(st.integers(0, len(out) - 1))
        out[i], out[j] = out[j], out[i]
    return out


@pytest.mark.skipif(not SCENARIOS, reason="published scenarios not found")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_memoised_facts_equal_a_from_scratch_derivation_after_every_batch(rules, data):
    path = data.draw(st.sampled_from(SCENARIOS))
    header, events = load_scenario(path)
    stream = data.draw(variants(events))
    horizon = header.get("evaluation_horizon")
    run_checked(stream, rules, dt.datetime.fromisoformat(horizon) if horizon else None)


@pytest.mark.skipif(not SCENARIOS, reason="published scenarios not found")
@pytest.mark.parametrize("name", ["03_correct_escalation_h12_h24", "36_hepatitis_and_late_serious_infection",
                                  "20_excl_live_vaccine"])
def test_an_arm_that_arrives_after_the_last_dose_gives_the_same_alerts_live_and_after_a_restart(rules, name):
    """Issue 15's stale-fact case: every record without an arm except one after the last drug administration.
    Batch by batch (live) and loaded at once then evaluated (a restart) end with the same alerts, and those are
    the alerts of the original stream, where every record carried the arm."""
    from tests.conftest import SHARED

    header, events = load_scenario(SHARED / "scenarios" / f"{name}.jsonl")
    horizon = dt.datetime.fromisoformat(header["evaluation_horizon"])
    late = [{k: v for k, v in e.items() if k != "arm"} for e in events]
    for subject in {e["subject_id"] for e in events}:
        arm = next((e["arm"] for e in events if e["subject_id"] == subject and e.get("arm")), None)
        mine = [i for i, e in enumerate(late) if e["subject_id"] == subject]
        drugs = [i for i in mine if late[i]["type"] == "drug_administration"]
        if arm is not None:  # on the subject's first record after its last drug administration (or its last)
            late[next((i for i in mine if drugs and i > drugs[-1]), mine[-1])]["arm"] = arm

    def live(stream):
        monitor = run_checked(stream, rules, horizon)
        return sorted((a.rule, a.subject_id, a.at) for a in monitor.book.open_alerts())

    after_restart = sorted((a.rule, a.subject_id, a.at) for a in restart_alerts(late, rules, horizon))
    assert live(late) == live(events)
    assert sorted(x for x in after_restart if dt.datetime.fromisoformat(x[2]) <= horizon) == sorted(
        x for x in live(events) if dt.datetime.fromisoformat(x[2]) <= horizon)


# ---- generated cohorts across the Europe/Paris daylight-saving changes ----------------------------------------------

DST_CHANGES = [dt.datetime(2025, 3, 30, 1, 0, tzinfo=dt.timezone.utc),    # 02:00 CET -> 03:00 CEST
               dt.datetime(2025, 10, 26, 1, 0, tzinfo=dt.timezone.utc)]   # 03:00 CEST -> 02:00 CET


def _shifted(events: list[dict[str, Any]], delta: dt.timedelta) -> list[dict[str, Any]]:
    """The same instants moved by `delta`, written in the Paris offset in force at the new instant (as a site's
    system would write them), for every time field of every event."""
    from zoneinfo import ZoneInfo

    paris = ZoneInfo("Europe/Paris")
    out = []
    for e in events:
        moved = dict(e)
        for name, value in e.items():
            if isinstance(value, str) and len(value) >= 19 and value[10:11] == "T" and value[4:5] == "-":
                try:
                    at = dt.datetime.fromisoformat(value)
                except ValueError:
                    continue
                if at.tzinfo is not None:
                    moved[name] = (at + delta).astimezone(paris).isoformat()
        out.append(moved)
    return out


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_memoised_facts_equal_a_from_scratch_derivation_on_generated_cohorts_across_dst(rules, data):
    """Generated subjects (monitor.generate: deviations, amendments, late records) whose T0 is put within three
    days of a daylight-saving change, then transformed like the published ones (late arm, site change, retries,
    amendments, out-of-order): after every batch the memoised facts equal a from-scratch derivation, and the
    batch-by-batch alerts equal those of a restart (the history loaded at once and evaluated on its end state)."""
    from monitor.generate import generate

    seed = data.draw(st.integers(0, 10_000), label="seed")
    events = list(generate(subjects=3, days=data.draw(st.integers(5, 20), label="days"), seed=seed, sites=2,
                           deviation_rate=0.5))
    t0 = min(dt.datetime.fromisoformat(e["occurred_at"]) for e in events if e["type"] == "drug_administration")
    change = data.draw(st.sampled_from(DST_CHANGES), label="dst")
    offset = dt.timedelta(hours=data.draw(st.integers(-72, 24), label="hours from T0 to the change"))
    stream = data.draw(variants(_shifted(events, change - offset - t0)))
    stream.sort(key=lambda e: e["recorded_at"]) if data.draw(st.booleans(), label="sorted") else None
    monitor = run_checked(stream, rules, None)
    # with `at`: a late record that moves an open alert's anchor (a late first dose moving T0, and with it a visit
    # window) withdraws it and raises it at the moved instant, as a restart derives it
    live = sorted((a.rule, a.subject_id, a.at, a.severity) for a in monitor.book.open_alerts())

    assert sorted((a.rule, a.subject_id, a.at, a.severity)
                  for a in restart_alerts(stream, rules, monitor.clock.now())) == live


@pytest.mark.skipif(not SCENARIOS, reason="published scenarios not found")
@pytest.mark.parametrize("name", ["26_missed_visit_window_d30", "20_excl_live_vaccine", "03_correct_escalation_h12_h24"])
def test_a_site_change_to_another_time_zone_gives_the_same_alerts_live_and_after_a_restart(tmp_path, name):
    """Issue 15's second stale-fact case: the site id (which selects the time zone of calendar-day logic: study
    days, visit windows, vaccine months) changes half-way through the stream, to a site 13 hours ahead. After every
    batch the memoised facts equal a from-scratch derivation (run_checked), and batch by batch (live) and loaded at
    once then evaluated (a restart) end with the same alerts."""
    import shutil

    from monitor.rules import DEFAULT_RULES_DIR, load_rules
    from tests.conftest import SHARED

    rules_dir = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, rules_dir)
    path = rules_dir / "parameters.yaml"
    path.write_text(path.read_text().replace("  default: Europe/Paris", "  default: Europe/Paris\n  MOVED: Pacific/Kiritimati"))
    rules = load_rules(rules_dir)
    header, events = load_scenario(SHARED / "scenarios" / f"{name}.jsonl")
    horizon = dt.datetime.fromisoformat(header["evaluation_horizon"])
    half = len(events) // 2
    moved = events[:half] + [dict(e, site_id="MOVED") for e in events[half:]]

    monitor = run_checked(moved, rules, horizon)
    live = sorted((a.rule, a.subject_id, a.at) for a in monitor.book.open_alerts())
    assert {s.site_id for s in monitor.subjects.values()} == {"MOVED"}

    assert sorted((a.rule, a.subject_id, a.at) for a in restart_alerts(moved, rules, monitor.clock.now())) == live


@st.composite
def temperature_stream(draw) -> list[dict[str, Any]]:
    """A small generated cohort whose temperatures are late, amended (in value and in time) and delivered out of
    order: each kind of change the deriver's temperature windows must see."""
    from monitor.generate import generate

    out = list(generate(subjects=draw(st.integers(1, 3)), days=draw(st.integers(3, 20)), seed=draw(st.integers(0, 99)),
                        sites=2, deviation_rate=draw(st.sampled_from([0.0, 0.5, 1.0]))))
    temps = [i for i, e in enumerate(out) if e["type"] == "vital_sign" and e.get("temperature_c") is not None]
    labs = [i for i, e in enumerate(out) if e["type"] == "lab_result"]
    if not temps:
        return out
    last = out[-1]["recorded_at"]
    for _ in range(draw(st.integers(0, 4)) if labs else 0):  # lab results amended in value, time or analyte
        e = json.loads(json.dumps(out[draw(st.sampled_from(labs))]))
        e["recorded_at"] = last
        change = draw(st.sampled_from(["value", "time", "analyte"]))
        if change == "value" and isinstance(e.get("value"), (int, float)):
            e["value"] = round(e["value"] * draw(st.sampled_from([0.2, 3.0, 10.0])), 3)
        elif change == "time":
            at = dt.datetime.fromisoformat(e["occurred_at"]) + dt.timedelta(hours=draw(st.integers(-72, 72)))
            e["occurred_at"] = at.isoformat()
        else:
            e["analyte"], e["loinc"] = draw(st.sampled_from([("CRP", "1988-5"), ("ANC", "751-8"), ("ALT", "1742-6"),
                                                            ("ferritin", "2276-4"), ("INR", "6301-6")]))
        out.append(e)
    for _ in range(draw(st.integers(0, 6))):
        e = json.loads(json.dumps(out[draw(st.sampled_from(temps))]))
        e["recorded_at"] = last
        change = draw(st.sampled_from(["value", "time", "late"]))
        if change == "value":  # amended to the other side of 38.0
            e["temperature_c"] = 36.8 if e["temperature_c"] >= 38.0 else 39.1
        elif change == "time":  # the event time corrected by some hours
            at = dt.datetime.fromisoformat(e["occurred_at"]) + dt.timedelta(hours=draw(st.integers(-30, 30)))
            e["occurred_at"] = at.isoformat()
        else:  # a new reading typed in late, somewhere in the history
            e["event_id"] += "-late"
            at = dt.datetime.fromisoformat(e["occurred_at"]) + dt.timedelta(minutes=draw(st.integers(-600, 600)))
            e["occurred_at"] = at.isoformat()
            e["temperature_c"] = draw(st.sampled_from([36.5, 38.4, 39.5]))
        out.append(e)
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(stream=temperature_stream())
def test_temperature_windows_and_incremental_state_equal_a_from_scratch_derivation(rules, stream):
    """Derivations reused because a changed temperature lies outside the intervals they read (Deriver.
    TEMPERATURE_WINDOWS), and any incremental state kept in the memo, against the from-scratch derivation."""
    run_checked(stream, rules, None)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 4), st.sampled_from([36.0, 38.5, 60.0])),
                    max_size=40))
def test_temperature_index_equals_a_sorted_build(ops):
    """TemperatureIndex updated version by version (add, replace, remove; equal times; invalid values) holds what
    sorting the current versions gives."""
    from types import SimpleNamespace

    from monitor.derive import TemperatureIndex
    from monitor.normalise import Temperature

    base = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    index, held = TemperatureIndex(), {}
    for add, n, hours, celsius in ops:
        eid = f"e{n}"
        if eid in held:
            index.remove(held.pop(eid)[0])
        if add:
            e = SimpleNamespace(event_id=eid, occurred_at=base + dt.timedelta(hours=hours))
            t = Temperature(celsius=celsius, corrected_c=celsius, site="axillary",
                            problem=None if celsius < 45 else "implausible")
            index.add(e, t)
            held[eid] = (e, t)
    expected = sorted(held.values(), key=lambda x: (x[0].occurred_at, x[0].event_id))
    assert index.temperatures == expected
    assert index.keys == [(e.occurred_at, e.event_id) for e, _ in expected]
    valid = [(e, t) for e, t in expected if t.valid]
    assert [(r.event_id, r.at, r.corrected_c) for r in index.readings] == [
        (e.event_id, e.occurred_at, t.corrected_c) for e, t in valid]
    assert index.times == [e.occurred_at for e, _ in valid]
    assert index.rkeys == [(e.occurred_at, e.event_id) for e, _ in valid]


@pytest.mark.skipif(not SCENARIOS, reason="published scenarios not found")
@pytest.mark.parametrize("hours", [-30, 30])
def test_a_late_first_dose_that_moves_an_open_alert_moves_it_live_as_after_a_restart(hours):
    """The D30 visit was missed and its alert is open when the first dose is amended, at the end of the stream, to
    a time a day or so away: T0 moves, and with it the visit window. Live, the open alert is withdrawn and raised
    again at the moved instant, which is what a restart derives from the same records."""
    from monitor.rules import load_rules
    from tests.conftest import SHARED

    rules = load_rules()
    header, events = load_scenario(SHARED / "scenarios" / "26_missed_visit_window_d30.jsonl")
    horizon = dt.datetime.fromisoformat(header["evaluation_horizon"])
    first = min((e for e in events if e.get("drug") == "anakinra"), key=lambda e: e["occurred_at"])  # T0
    amended = dict(first, recorded_at=max(e["recorded_at"] for e in events),
                   occurred_at=(dt.datetime.fromisoformat(first["occurred_at"]) + dt.timedelta(hours=hours)).isoformat())
    before = run_checked(events, rules, horizon)
    was = {(a.rule, a.at) for a in before.book.open_alerts()}
    stream = events + [amended]

    monitor = run_checked(stream, rules, horizon)
    live = sorted((a.rule, a.subject_id, a.at, a.severity) for a in monitor.book.open_alerts())

    assert {(r, at) for r, _, at, _ in live} != was, "the amendment should move an open alert"
    assert sorted((a.rule, a.subject_id, a.at, a.severity)
                  for a in restart_alerts(stream, rules, monitor.clock.now())) == live

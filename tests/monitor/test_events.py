"""Event decoding and validation (RULES_SPEC §5): every bad input ends in EventRejected with a reason and a detail
a data manager can act on; every realistic scenario event parses to its class."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor import events
from monitor.errors import EventRejected

SCENARIOS = Path("/work/shared/scenarios")

CLASSES = {
    "enrollment": events.Enrollment,
    "vital_sign": events.VitalSign,
    "lab_result": events.LabResult,
    "drug_administration": events.DrugAdministration,
    "concomitant_medication": events.ConcomitantMedication,
    "immunization": events.Immunization,
    "adverse_event": events.AdverseEvent,
    "visit": events.Visit,
    "echocardiogram": events.Echocardiogram,
}

LAB = {
    "event_id": "ANA-013-E008",
    "subject_id": "ANA-013",
    "site_id": "FR-BIC-01",
    "arm": "anakinra",
    "type": "lab_result",
    "occurred_at": "2025-01-06T06:00:00+01:00",
    "recorded_at": "2025-01-06T07:40:00+01:00",
    "analyte": "ANC",
    "loinc": "751-8",
    "value": 1.2,
    "unit": "10*9/L",
}


def _scenario_lines() -> list[tuple[str, int, bytes]]:
    out = []
    for path in sorted(SCENARIOS.glob("*.jsonl")):
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            if number == 1 or not line.strip():
                continue  # line 1 is the scenario header, not an event
            out.append((path.name, number, line))
    return out


def _first_line_per_type() -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for _name, _number, line in _scenario_lines():
        found.setdefault(json.loads(line)["type"], line)
    return found


pytestmark = pytest.mark.skipif(not SCENARIOS.is_dir(), reason="shared scenarios not available")


def _reject(data) -> EventRejected:
    with pytest.raises(EventRejected) as info:
        events.parse_event(events.decode(data) if isinstance(data, (bytes, str)) else data)
    return info.value


def _with(**changes) -> dict:
    data = dict(LAB)
    for key, value in changes.items():
        if value is _DROP:
            data.pop(key)
        else:
            data[key] = value
    return data


_DROP = object()


# ---- rejections ---------------------------------------------------------------------------------------------------


def test_the_baseline_lab_event_is_valid():
    event = events.parse_event(events.decode(json.dumps(LAB).encode()))
    assert isinstance(event, events.LabResult)
    assert event.value == 1.2 and event.unit == "10*9/L"
    assert event.occurred_at == dt.datetime.fromisoformat("2025-01-06T06:00:00+01:00")


@pytest.mark.parametrize("raw", [b'{"event_id": "E1", "type": "lab_result",', b"not json", b"", b"\xff\xfe\x00garbage"])
def test_malformed_json(raw):
    exc = _reject(raw)
    assert exc.reason == "malformed_json"
    assert "JSON" in exc.detail


@pytest.mark.parametrize("raw, kind", [(b"[1, 2]", "list"), (b'"text"', "str"), (b"42", "int"), (b"null", "NoneType")])
def test_json_that_is_not_an_object(raw, kind):
    exc = _reject(raw)
    assert exc.reason == "not_an_object"
    assert kind in exc.detail


def test_unknown_type_lists_the_valid_types():
    exc = _reject(_with(type="lab_results"))
    assert exc.reason == "unknown_type"
    assert "lab_results" in exc.detail
    for kind in events.EVENT_TYPES:
        assert kind in exc.detail
    assert exc.event_id == "ANA-013-E008"


@pytest.mark.parametrize("value", [_DROP, None])
def test_missing_type(value):
    exc = _reject(_with(type=value))
    assert exc.reason == "missing_field"
    assert "'type'" in exc.detail


def test_missing_subject_id_names_the_field():
    exc = _reject(_with(subject_id=_DROP))
    assert exc.reason == "missing_field"
    assert "subject_id" in exc.detail
    assert exc.event_id == "ANA-013-E008"  # the reject can be traced back to its record


@pytest.mark.parametrize("field", ["occurred_at", "recorded_at"])
def test_unparseable_time(field):
    exc = _reject(_with(**{field: "06/01/2025 06:00"}))
    assert exc.reason == "bad_time"
    assert field in exc.detail


@pytest.mark.parametrize("value", [70368744177663, 1736146800, 1736146800.5])
def test_a_time_given_as_a_number_is_rejected_on_both_parse_paths(value):
    """Seconds or milliseconds since 1970 cannot be told apart; 70368744177663 read as milliseconds is the year
    4199, which would move a replay's clock and fire every other subject's deadlines."""
    raw = json.dumps(_with(recorded_at=value))
    for parse in (lambda: events.parse_event(events.decode(raw)), lambda: events.parse_record(raw.encode())):
        with pytest.raises(EventRejected) as caught:
            parse()
        assert caught.value.reason == "bad_time"
        assert "recorded_at" in caught.value.detail and "ISO 8601" in caught.value.detail


def test_time_without_utc_offset_is_rejected_and_says_so():
    exc = _reject(_with(occurred_at="2025-01-06T06:00:00"))
    assert exc.reason == "bad_time"
    assert "occurred_at" in exc.detail
    assert "offset" in exc.detail


@pytest.mark.parametrize("value", ["abc", [1.2], {"v": 1.2}])
def test_lab_value_not_a_number(value):
    exc = _reject(_with(value=value))
    assert exc.reason == "bad_number"
    assert "'value'" in exc.detail


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_lab_value_nan_or_infinite(literal):
    raw = json.dumps(LAB).replace('"value": 1.2', f'"value": {literal}').encode()
    assert literal.encode() in raw
    exc = _reject(raw)
    assert exc.reason == "bad_number"
    assert "value" in exc.detail


def test_nan_in_a_temperature_is_rejected():
    data = {**LAB, "type": "vital_sign", "code": "8310-5", "temperature_c": float("nan"), "site": "oral"}
    exc = _reject(data)
    assert exc.reason == "bad_number"
    assert "temperature_c" in exc.detail


def test_oversized_event_is_too_large():
    padding = "x" * (events.MAX_EVENT_BYTES + 10)
    raw = json.dumps({**LAB, "source": padding}).encode()
    exc = _reject(raw)
    assert exc.reason == "too_large"
    assert str(events.MAX_EVENT_BYTES) in exc.detail


def test_event_just_under_the_limit_is_accepted():
    raw = json.dumps({**LAB, "source": ""}).encode()
    pad = events.MAX_EVENT_BYTES - len(raw)
    raw = json.dumps({**LAB, "source": "x" * pad}).encode()
    assert len(raw) == events.MAX_EVENT_BYTES
    assert isinstance(events.parse_event(events.decode(raw)), events.LabResult)


def test_deeply_nested_json_is_rejected_not_a_crash():
    raw = b"[" * 100_000 + b"]" * 100_000  # 200 kB, well under MAX_EVENT_BYTES
    with pytest.raises(EventRejected):
        events.decode(raw)


def test_size_limit_counts_bytes_for_text_input():
    text = json.dumps({**LAB, "source": "€" * 400_000}, ensure_ascii=False)
    assert len(text.encode("utf-8")) > events.MAX_EVENT_BYTES
    with pytest.raises(EventRejected) as info:
        events.decode(text)
    assert info.value.reason == "too_large"


# ---- valid events -------------------------------------------------------------------------------------------------

FIRST_PER_TYPE = _first_line_per_type() if SCENARIOS.is_dir() else {}


def test_scenarios_hold_every_event_type():
    assert set(FIRST_PER_TYPE) == set(events.EVENT_TYPES)


@pytest.mark.parametrize("kind", events.EVENT_TYPES)
def test_a_scenario_event_of_each_type_parses_to_its_class(kind):
    raw = FIRST_PER_TYPE[kind]
    data = json.loads(raw)
    event = events.parse_event(events.decode(raw))
    assert type(event) is CLASSES[kind]
    assert event.type == kind
    assert event.event_id == data["event_id"]
    assert event.subject_id == data["subject_id"]
    assert event.occurred_at == dt.datetime.fromisoformat(data["occurred_at"])
    assert event.occurred_at.utcoffset() is not None


def test_every_scenario_event_is_accepted():
    rejected = []
    for name, number, line in _scenario_lines():
        try:
            events.parse_event(events.decode(line))
        except EventRejected as exc:
            rejected.append(f"{name}:{number}: {exc}")
    assert rejected == []


def test_canonical_ignores_key_order_but_not_values():
    a = {"x": 1, "y": [1, 2]}
    assert events.canonical(a) == events.canonical({"y": [1, 2], "x": 1})
    assert events.canonical(a) != events.canonical({"x": 1, "y": [2, 1]})


# ---- properties: nothing but an event or EventRejected ------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)


def _decode_and_parse(raw):
    try:
        event = events.parse_event(events.decode(raw))
    except EventRejected as exc:
        assert exc.reason and exc.detail
        return None
    assert type(event) in CLASSES.values()
    return event


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_arbitrary_json_gives_an_event_or_a_rejection(value):
    _decode_and_parse(json.dumps(value).encode())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_an_event_or_a_rejection(raw):
    _decode_and_parse(raw)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_gives_an_event_or_a_rejection(raw):
    _decode_and_parse(raw)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(events.EVENT_TYPES),
    field=st.sampled_from(sorted({k for line in FIRST_PER_TYPE.values() for k in json.loads(line)}) + ["type"]),
    value=json_values,
)
def test_a_realistic_event_with_one_field_replaced_gives_an_event_or_a_rejection(kind, field, value):
    data = json.loads(FIRST_PER_TYPE[kind])
    data[field] = value
    _decode_and_parse(json.dumps(data).encode())

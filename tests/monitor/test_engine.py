"""The durable_rules adapter and its workarounds (ENGINE_NOTES): sid hash collisions, constant-only conditions,
session isolation, sharding, fact retraction, no background threads."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import monitor.engine as engine_mod
from monitor.engine import RulesEngine, check_definition, sid_hash
from monitor.errors import EngineError
from monitor.rules import load_rules, references_other_message

LOW = {"low": {"all": [{"m": {"$and": [{"fact": "baseline_lab"}, {"$lt": {"value": 1.5}}]}}], "run": "LOW"}}
TWO_RULES = {
    **LOW,
    "renal": {"all": [{"m": {"$and": [{"fact": "baseline_lab"}, {"analyte": "eGFR"}, {"$lt": {"value": 30}}]}}],
              "run": "RENAL"},
}


def lab(value: float, analyte: str = "ANC") -> dict[str, Any]:
    return {"fact": "baseline_lab", "analyte": analyte, "value": value, "at": "2025-01-06T08:00:00+01:00"}


def make(definition=None, **kw) -> RulesEngine:
    return RulesEngine(definition=definition or LOW, version="test", **kw)


# ---- (a) sid hashes -------------------------------------------------------------------------------------------------


def test_documented_sid_hash_collision():
    assert sid_hash("KD-0329599") == sid_hash("KD-0532382")
    assert sid_hash("1") != sid_hash("2")


def test_sid_hash_is_32_bit_fnv1a():
    # reference values of 32-bit FNV-1a
    assert sid_hash("") == 0x811C9DC5
    assert sid_hash("a") == 0xE40C292C
    assert sid_hash("foobar") == 0xBF9CF968


def test_colliding_subject_ids_get_separate_sessions():
    e = make()
    e.sync("KD-0329599", {"baseline_lab:ANC": lab(1.0)})
    e.sync("KD-0532382", {"baseline_lab:ANC": lab(4.0)})
    assert e.matches("KD-0329599") == {("LOW", "baseline_lab:ANC")}
    assert e.matches("KD-0532382") == set()
    assert [f["value"] for f in e.engine_facts("KD-0532382")] in ([], [4.0])
    assert [f["value"] for f in e.engine_facts("KD-0329599")] == [1.0]


# two fact ids of one subject whose 32-bit FNV-1a hashes collide (found by a birthday search over visit ids)
COLLIDING_FACTS = ("visit:D70948", "visit:D342922")


def test_colliding_fact_ids_of_one_subject_both_fire():
    """durable_rules finds a session's stored facts by the hash of their id: the second of two colliding ids
    looked already held and silently never fired. Both fire, in one sync or one after the other, and both go."""
    a, b = COLLIDING_FACTS
    assert sid_hash(a) == sid_hash(b)
    for steps in ([{a: lab(0.5), b: lab(0.5)}], [{a: lab(0.5)}, {a: lab(0.5), b: lab(0.7)}],
                  [{b: lab(0.5)}, {a: lab(0.5), b: lab(0.5)}]):
        e = make()
        for facts in steps:
            e.sync("A", facts)
        assert e.matches("A") == {("LOW", a), ("LOW", b)}, steps
        assert sorted(f["value"] for f in e.engine_facts("A")) == sorted(v["value"] for v in steps[-1].values())
        e.sync("A", {a: lab(0.5)})  # b goes: a stays
        assert e.matches("A") == {("LOW", a)}
        assert [f["value"] for f in e.engine_facts("A")] == [0.5]
        e.sync("A", {})
        assert e.engine_facts("A") == []


def test_an_evicted_subject_with_a_renamed_fact_leaves_its_session_empty():
    a, b = COLLIDING_FACTS
    e = make(max_sessions=1)
    e.sync("A", {a: lab(0.5), b: lab(0.5)})
    e.sync("B", {b: lab(0.6)})  # takes A's session: A's facts are retracted, whatever id they were posted under
    assert e.matches("B") == {("LOW", b)}
    assert [f["value"] for f in e.engine_facts("B")] == [0.6]


def _hashes_unique_per_registration(e: RulesEngine, subjects: list[str], hash_fn) -> dict[str, list[str]]:
    by_shard: dict[str, list[str]] = defaultdict(list)
    for s in subjects:
        name, sid = e.session_of(s)
        by_shard[name].append(sid)
    for name, sids in by_shard.items():
        assert len(set(sids)) == len(sids), f"two subjects share a sid in {name}"
        hashes = [hash_fn(sid) for sid in sids]
        assert len(set(hashes)) == len(hashes), f"two sids with equal hash in {name}"
    return by_shard


def test_200_subjects_get_sids_with_unique_hashes_per_registration():
    e = make()
    subjects = [f"KD-{i:07d}" for i in range(200)]
    by_shard = _hashes_unique_per_registration(e, subjects, sid_hash)
    assert sum(len(v) for v in by_shard.values()) == 200
    # stable: asking again gives the same session
    assert e.session_of(subjects[17]) == e.session_of(subjects[17])


def test_sids_skip_hash_collisions_under_a_coarse_hash(monkeypatch):
    real = engine_mod.sid_hash
    coarse = lambda sid: real(sid) % 512  # noqa: E731 - forces many collisions among 200 sids
    monkeypatch.setattr(engine_mod, "sid_hash", coarse)
    e = make()
    subjects = [f"S{i}" for i in range(200)]
    by_shard = _hashes_unique_per_registration(e, subjects, coarse)
    sids = [int(s) for v in by_shard.values() for s in v]
    assert max(sids) > 200  # some sids were skipped because their hash was taken


def test_forced_collision_skips_to_the_next_sid(monkeypatch):
    real = engine_mod.sid_hash
    monkeypatch.setattr(engine_mod, "sid_hash", lambda sid: real("1") if sid == "2" else real(sid))
    e = make()
    assert e.session_of("A")[1] == "1"
    assert e.session_of("B")[1] == "3"
    assert e.session_of("C")[1] == "4"
    e.sync("A", {"f": lab(1.0)})
    e.sync("B", {"f": lab(9.0)})
    assert e.matches("A") == {("LOW", "f")}
    assert e.matches("B") == set()
    assert all(f["sid"] == "3" for f in e.engine_facts("B"))


# ---- (b) constant-only conditions -----------------------------------------------------------------------------------

JOIN = {"r": {"all": [{"first": {"t": "a"}}, {"second": {"$lt": {"ts": {"first": "ts"}}}}], "run": "r"}}


@pytest.mark.parametrize(
    "definition",
    [
        JOIN,
        {"r": {"all": [{"m": {"$lt": {"value": {"$m": "other"}}}}], "run": "r"}},
        {"r": {"all": [{"m": {"$and": [{"fact": "x"}, {"$gt": {"value": {"$s": "limit"}}}]}}], "run": "r"}},
        {"r": {"all": [{"m": {"$lt": {"value": {"$add": {"$l": {"first": "ts"}, "$r": 3600}}}}}], "run": "r"}},
        {"r": {"any": [{"a": {"t": "x"}}, {"b": {"t": "y"}}], "run": "r"}},
        {"r": {"all": [{"x": {"t": "x"}}], "run": "r"}},
        {"r": {"run": "r"}},
    ],
    ids=["join", "$m", "$s", "$add", "any-two-messages", "not-m", "no-condition"],
)
def test_check_definition_refuses_references_to_other_messages(definition):
    with pytest.raises(EngineError):
        check_definition(definition)
    with pytest.raises(EngineError):
        RulesEngine(definition=definition, version="bad")


def test_check_definition_accepts_constant_comparisons():
    check_definition(TWO_RULES)
    check_definition({"r": {"all": [{"m": {"$or": [{"a": 1}, {"$gte": {"b": 2.5}}, {"c": True}]}}], "run": "r"}})


def _field_values_are_scalars(expr: Any, path: str = "") -> list[str]:
    bad = []
    if isinstance(expr, dict):
        for key, value in expr.items():
            if not key.startswith("$") and isinstance(value, (dict, list)):
                bad.append(f"{path}/{key}")
            bad.extend(_field_values_are_scalars(value, f"{path}/{key}"))
    elif isinstance(expr, list):
        for i, v in enumerate(expr):
            bad.extend(_field_values_are_scalars(v, f"{path}[{i}]"))
    return bad


def test_every_bundled_rule_compiles_to_constant_comparisons_on_one_message():
    rules = load_rules()
    definition = rules.engine_definition()
    assert len(definition) >= len(rules.rules) >= 10
    check_definition(definition)
    assert {rule["run"] for rule in definition.values()} == set(rules.rules)
    for rule_id, rule in definition.items():
        (cond,) = rule["all"]
        assert set(cond) == {"m"}
        assert _field_values_are_scalars(cond["m"]) == [], rule_id
        assert not references_other_message(cond["m"]), rule_id
    RulesEngine(definition=definition, version="bundled")  # registers without complaint


# ---- (c) session isolation ------------------------------------------------------------------------------------------


def test_subjects_are_isolated():
    e = make()
    e.sync("A", {"baseline_lab:ANC": lab(1.2)})
    e.sync("B", {"baseline_lab:ANC": lab(2.0)})
    assert e.matches("A") == {("LOW", "baseline_lab:ANC")}
    assert e.matches("B") == set()
    a_facts = e.engine_facts("A")
    assert [f["value"] for f in a_facts] == [1.2]
    b_facts = e.engine_facts("B")
    assert all(f["value"] != 1.2 for f in b_facts)
    assert all(f["sid"] == e.session_of("B")[1] for f in b_facts)
    assert e.session_of("A") != e.session_of("B")


def test_unknown_subject_has_no_matches():
    e = make()
    e.sync("A", {"f": lab(1.0)})
    assert e.matches("nobody") == set()


# ---- (d) sharding ---------------------------------------------------------------------------------------------------


def test_subjects_are_sharded_over_registrations():
    e = make(shard_size=3)
    subjects = [f"S{i}" for i in range(7)]
    for i, s in enumerate(subjects):
        e.sync(s, {f"baseline_lab:{s}": lab(1.0 if i % 2 == 0 else 3.0)})
    assert e.shard_count == 3
    names = [e.session_of(s)[0] for s in subjects]
    assert [names.count(n) for n in dict.fromkeys(names)] == [3, 3, 1]
    for i, s in enumerate(subjects):
        expected = {("LOW", f"baseline_lab:{s}")} if i % 2 == 0 else set()
        assert e.matches(s) == expected, s
        assert all(f["id"] == f"baseline_lab:{s}" for f in e.engine_facts(s))


@pytest.mark.parametrize("size", [0, -1, engine_mod.MAX_SESSIONS_PER_REGISTRATION, 5000])
def test_shard_size_must_stay_under_the_engine_limit(size):
    with pytest.raises(EngineError):
        make(shard_size=size)


def test_default_shard_size_is_under_the_session_limit():
    assert 0 < engine_mod.DEFAULT_SHARD_SIZE < engine_mod.MAX_SESSIONS_PER_REGISTRATION


# ---- (e) sync semantics ---------------------------------------------------------------------------------------------


def test_retracting_a_fact_removes_its_match():
    e = make()
    e.sync("A", {"f1": lab(1.0), "f2": lab(1.1)})
    assert e.matches("A") == {("LOW", "f1"), ("LOW", "f2")}
    e.sync("A", {"f2": lab(1.1)})
    assert e.matches("A") == {("LOW", "f2")}
    assert [f["id"] for f in e.engine_facts("A")] == ["f2"]
    e.sync("A", {})
    assert e.matches("A") == set()
    assert e.engine_facts("A") == []


def test_changing_a_value_re_evaluates():
    e = make()
    e.sync("A", {"f": lab(1.0)})
    assert e.matches("A") == {("LOW", "f")}
    e.sync("A", {"f": lab(2.0)})
    assert e.matches("A") == set()
    e.sync("A", {"f": lab(1.4)})
    assert e.matches("A") == {("LOW", "f")}
    assert [f["value"] for f in e.engine_facts("A")] == [1.4]


def test_a_fact_that_starts_high_then_drops_low_fires():
    e = make()
    e.sync("A", {"f": lab(3.0)})
    assert e.matches("A") == set()
    e.sync("A", {"f": lab(0.9)})
    assert e.matches("A") == {("LOW", "f")}


def test_resync_with_the_same_facts_is_stable():
    e = make()
    facts = {"f": lab(1.0), "g": lab(5.0)}
    e.sync("A", facts)
    e.sync("A", dict(facts))
    assert e.matches("A") == {("LOW", "f")}


def test_a_fact_matching_no_rule_is_no_match_and_no_error():
    e = make()
    e.sync("A", {"x": {"fact": "weight_status", "weight_known": False}})
    assert e.matches("A") == set()
    assert e.action_errors == 0


def test_one_fact_can_fire_two_rules():
    e = make(TWO_RULES)
    e.sync("A", {"egfr": lab(1.0, analyte="eGFR")})
    assert e.matches("A") == {("LOW", "egfr"), ("RENAL", "egfr")}
    e.sync("A", {"egfr": lab(20.0, analyte="eGFR")})
    assert e.matches("A") == {("RENAL", "egfr")}


def test_matches_across_many_subjects_stay_their_own():
    e = make(shard_size=10)
    for i in range(40):
        e.sync(f"S{i}", {"f": lab(1.0 if i % 3 == 0 else 2.0)})
    for i in range(40):
        assert e.matches(f"S{i}") == ({("LOW", "f")} if i % 3 == 0 else set())
    assert e.shard_count == 4


# ---- (f) no threads -------------------------------------------------------------------------------------------------


def test_engine_starts_no_threads():
    before = threading.active_count()
    e = make()
    e.sync("A", {"f": lab(1.0)})
    e.sync("B", {"f": lab(2.0)})
    RulesEngine(definition=load_rules().engine_definition(), version="bundled").session_of("X")
    assert threading.active_count() == before


# ---- (g) session pool -----------------------------------------------------------------------------------------------


def test_least_recently_used_subject_gives_up_its_session_and_gets_its_matches_back():
    e = make(max_sessions=2)
    e.sync("A", {"f": lab(1.0)})
    e.sync("B", {"f": lab(2.0)})
    e.sync("A", {"f": lab(1.0)})  # A used last: B is the least recently used
    a_session, b_session = e.session_of("A"), e.session_of("B")
    e.sync("C", {"f": lab(1.1), "g": lab(9.0)})
    assert e.evictions >= 1
    c_session = e.session_of("C")
    assert c_session in (a_session, b_session)
    assert sorted(f["id"] for f in e.engine_facts("C")) == ["f"]  # nothing of the evicted subject is left
    assert e.matches("C") == {("LOW", "f")}
    for s, value, expected in (("A", 1.0, {("LOW", "f")}), ("B", 2.0, set())):
        e.sync(s, {"f": lab(value)})
        assert e.matches(s) == expected, s
    assert len({e.session_of(s) for s in "ABC"}) <= 2


def test_a_reused_session_holds_no_unmatched_fact_of_its_previous_subject():
    """A fact that matched nothing for the previous subject must not make the same fact id of the next one look
    like a duplicate (the engine would then never fire for it)."""
    e = make(max_sessions=1)
    e.sync("A", {"f": lab(5.0), "x": {"fact": "weight_status", "weight_known": False}})
    e.sync("B", {"f": lab(1.0), "x": lab(0.5)})
    assert e.matches("B") == {("LOW", "f"), ("LOW", "x")}
    e.sync("A", {"f": lab(5.0)})
    assert e.matches("A") == set()
    assert [f["value"] for f in e.engine_facts("A")] in ([], [5.0])


def test_released_sessions_are_reused_without_new_sids():
    e = make(max_sessions=None)
    for s in ("A", "B"):
        e.sync(s, {"f": lab(1.0)})
    e.release("A")
    e.sync("C", {"f": lab(3.0)})
    assert e.evictions == 0
    assert e.matches("C") == set()
    assert {e.session_of(s)[1] for s in ("B", "C")} == {"1", "2"}


def test_many_subjects_through_a_small_pool_keep_their_own_matches():
    e = make(max_sessions=5, shard_size=3)
    for rnd in range(3):
        for i in range(23):
            e.sync(f"S{i}", {"f": lab(1.0 if (i + rnd) % 3 == 0 else 2.0)})
            assert e.matches(f"S{i}") == ({("LOW", "f")} if (i + rnd) % 3 == 0 else set())
    assert e.shard_count == 2  # 5 sessions, 3 per registration
    _hashes_unique_per_registration(e, [f"S{i}" for i in range(18, 23)], sid_hash)  # the five holding a session


@pytest.mark.parametrize("size", [0, -3])
def test_pool_size_must_be_positive(size):
    with pytest.raises(EngineError):
        make(max_sessions=size)


# ---- (e) numbers the engine can read (ENGINE_NOTES: 1e-05 and 1e+16 are error 204, Infinity 202, NaN never matches) --


def _magnitudes() -> list[float]:
    """Every single-digit exponent form Python writes (1e-05 ... 9e+15), neighbours with a fraction, and the
    plain decimals in between, from 1e-9 to 1e15; negatives of some of them."""
    values: list[float] = []
    for exponent in range(-9, 16):
        for digit in range(1, 10):
            values.append(float(f"{digit}e{exponent}"))
        values.append(float(f"1.5e{exponent}"))
        values.append(float(f"1e{exponent}") * (1 + 1e-12))
    values += [1e16, 1e17, 5e-300, 1e308, 0.0, -1e-05, -3e+16, 2**70]
    return values


def test_engine_number_writes_every_float_exactly_with_a_fraction():
    from monitor.engine import engine_number

    for value in _magnitudes():
        text = engine_number(value)
        assert float(text) == value
        mantissa, _, _ = text.partition("e")
        assert "." in mantissa or text.lstrip("-").isdigit(), text


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_number_is_refused_naming_the_fact_and_field(bad):
    engine = make()
    with pytest.raises(EngineError, match=r"fact lab:1.*value.*finite"):
        engine.sync("S1", {"lab:1": lab(bad)})
    assert engine.matches("S1") == set()


def test_numbers_across_magnitudes_compare_as_python_does():
    """Each value is posted as a fact, each threshold is a rule constant (thresholds go through the same writer at
    registration); every match must equal the Python comparison of the same condition."""
    values = _magnitudes()
    thresholds = sorted({1e-9, 1e-05, 5e-07, 1.5e-05, 0.5, 30.0, 1e+15, 1e+16, 1e-300} |
                        {float(f"{d}e{e}") for d in (1, 9) for e in range(-9, 16, 3)})
    definition: dict[str, Any] = {}
    for i, t in enumerate(thresholds):
        for op in ("$gt", "$lt", "$gte"):
            definition[f"r{i}{op}"] = {"all": [{"m": {"$and": [{"fact": "baseline_lab"}, {op: {"value": t}}]}}],
                                       "run": f"r{i}{op}"}
    engine = make(definition)
    facts = {f"lab:{i}": lab(v) for i, v in enumerate(values)}
    engine.sync("S1", facts)
    got = engine.matches("S1")
    python = {"$gt": lambda v, t: v > t, "$lt": lambda v, t: v < t, "$gte": lambda v, t: v >= t}
    expected = {(f"r{i}{op}", f"lab:{j}") for i, t in enumerate(thresholds) for op, cmp in python.items()
                for j, v in enumerate(values) if cmp(v, t)}
    assert got == expected


# ---- (h) the fast writer and batches ---------------------------------------------------------------------------------


def _edge_floats() -> list[float]:
    """Where Python's repr switches to an exponent (1e-4, 1e16) and its neighbours, both signs."""
    import math

    edges = []
    for edge in (1e-4, 1e16):
        for v in (edge, math.nextafter(edge, 0), math.nextafter(edge, math.inf)):
            edges += [v, -v]
    return edges


_scalars = st.one_of(
    st.none(), st.booleans(), st.text(), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(_magnitudes() + _edge_floats()),
    st.integers(), st.sampled_from([2**63 - 1, 2**63, -(2**63) + 1, -(2**63), 10**18, 10**19]))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), _scalars, max_size=8))
def test_engine_json_writes_a_fact_as_the_exact_writer_does(fact):
    from monitor.engine import engine_json_exact, message_json, engine_json

    assert engine_json(fact) == engine_json_exact(fact, where="value")
    assert message_json(fact, "7", "f:1") == engine_json_exact(dict(fact, sid="7", id="f:1"), where="value")


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_the_fast_writer_refuses_a_non_finite_number_naming_the_field(bad):
    from monitor.engine import engine_json

    with pytest.raises(EngineError, match=r"fact x\.temp.*finite"):
        engine_json({"fact": "vital", "temp": bad}, where="fact x")


def test_a_fact_the_session_already_holds_does_not_stop_the_rest_of_its_batch():
    e = make()
    e.sync("A", {"f": lab(1.0)})
    name, sid = e.session_of("A")
    e._host.assert_fact(name, dict(lab(1.0), sid=sid, id="g"))  # held by the engine, unknown to the adapter
    e.sync("A", {"f": lab(1.0), "g": lab(1.0), "h": lab(1.0), "i": lab(9.0)})
    assert {("LOW", "f"), ("LOW", "h")} <= e.matches("A")
    assert ("LOW", "i") not in e.matches("A")


def test_a_failed_engine_call_gives_the_session_up(monkeypatch):
    e = make(max_sessions=2)
    e.sync("A", {"f": lab(1.0)})
    first = e.session_of("A")

    native = engine_mod.native

    class Failing:
        def __getattr__(self, name):
            real = getattr(native, name)
            if name != "assert_facts":
                return real

            def assert_facts(handle, text):
                raise RuntimeError("Could not assert facts, error code: 204")

            return assert_facts

    monkeypatch.setattr(engine_mod, "native", Failing())
    with pytest.raises(EngineError, match=r"assert_facts failed on .*error code: 204"):
        e.sync("A", {"f": lab(1.0), "g": lab(0.5)})
    monkeypatch.setattr(engine_mod, "native", native)
    e.sync("A", {"f": lab(1.0), "g": lab(0.5)})
    assert e.matches("A") == {("LOW", "f"), ("LOW", "g")}
    assert e.session_of("A") != first
    e.sync("B", {"f": lab(2.0)})
    assert e.session_of("B") != first  # never handed to another subject


def test_a_batch_holds_every_fact_whatever_its_strings_hold():
    """The engine reads a batch message by message and silently drops the rest of it at the first message it can
    not parse: every fact must arrive, with strings holding JSON's own punctuation."""
    notes = ['a"b', "a\\b", "é中😀", "x\ny\t", "}{,][", 'a\\"}', "'", "\\u0041", "", "\u2028"]
    e = make()
    e.sync("A", {f"f{i},{{}}": dict(lab(1.0), note=note) for i, note in enumerate(notes)})
    held = {f["id"]: f["note"] for f in e.engine_facts("A")}
    assert held == {f"f{i},{{}}": note for i, note in enumerate(notes)}
    assert e.matches("A") == {("LOW", f"f{i},{{}}") for i in range(len(notes))}

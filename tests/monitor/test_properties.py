"""Property-based tests: whatever the input, the loader and the normalisation either accept it or say why, and a
rejected event never changes a subject's state."""

from __future__ import annotations

import copy
import json
import shutil

import yaml
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor import normalise as nm
from monitor.errors import EventRejected, RuleFileError
from monitor.events import decode, parse_event
from monitor.rules import DEFAULT_RULES_DIR, load_rules
from tests.conftest import SHARED, load_scenario, run_events

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
RULE_FILE = yaml.safe_load((DEFAULT_RULES_DIR / "dosing.yaml").read_text())


def mutate(doc, path, value):
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def paths(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,)
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield prefix + (i,)
            yield from paths(v, prefix + (i,))


ALL_PATHS = list(paths(RULE_FILE))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(ALL_PATHS), value=st.one_of(SCALARS, st.lists(SCALARS, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), SCALARS, max_size=3)))
def test_any_mutation_of_a_rule_file_is_accepted_or_refused_with_a_reason(tmp_path_factory, where, value):
    target = tmp_path_factory.mktemp("rules") / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, target)
    doc = mutate(copy.deepcopy(RULE_FILE), where, value)
    (target / "dosing.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True))
    try:
        load_rules(target)
    except RuleFileError as exc:
        assert exc.problems and all(p[0].endswith(".yaml") for p in exc.problems)


@given(temperature_c=st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False, width=32)),
       value=st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False, width=32)),
       unit=st.one_of(st.none(), st.sampled_from(["Cel", "[degF]", "K", "", "degC"]), st.text(max_size=5)),
       site=st.one_of(st.none(), st.text(max_size=12), st.sampled_from(["axillary", "rectal", "forehead"])))
def test_temperature_normalisation_never_raises_and_valid_means_plausible(temperature_c, value, unit, site):
    t = nm.temperature(temperature_c=temperature_c, value=value, unit=unit, site=site,
                       site_offsets_c={"axillary": 0.5, "tympanic": 0.0, "oral": 0.0, "rectal": 0.0},
                       plausible_c=(30.0, 44.0))
    if t.valid:
        assert 30.0 - 1e-9 <= t.celsius <= 44.0 + 1e-9 and t.corrected_c is not None
    else:
        assert t.problem in ("unit_suspect", "nonprotocol_site", "unit_unrecognized")


ANC_FACTORS = load_rules().parameters.units.anc_to_10e9_per_l


@given(value=st.floats(allow_nan=False, allow_infinity=False, width=32), unit=st.text(max_size=10))
def test_anc_conversion_knows_a_unit_or_says_none(value, unit):
    factors = ANC_FACTORS
    converted = nm.convert(value, unit, factors)
    assert converted is None or nm.unit_key(unit) in {nm.unit_key(k) for k in factors}


SCENARIO_06 = SHARED / "scenarios" / "06_overdose_above_8mgkg.jsonl"
EVENTS = load_scenario(SCENARIO_06)[1] if SCENARIO_06.is_file() else [{}]


@pytest.mark.skipif(not SCENARIO_06.is_file(), reason="published scenarios not found (../shared)")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(0, len(EVENTS) - 1), field=st.sampled_from(["occurred_at", "value", "type", "subject_id",
                                                                   "dose_mg_per_kg", "temperature_c", "arm"]),
       value=SCALARS)
def test_a_rejected_event_never_changes_subject_state(tmp_path_factory, index, field, value):
    bad = dict(EVENTS[index], **{field: value})
    try:
        parse_event(decode(json.dumps(bad)))
        return  # still a valid event: nothing to check
    except EventRejected:
        pass
    tmp = tmp_path_factory.mktemp("ev")
    clean, _, m1 = run_events(EVENTS, tmp_path=tmp)
    with_bad, rejects, m2 = run_events(EVENTS[:index] + [bad] + EVENTS[index:], tmp_path=tmp)
    assert len(rejects) == 1
    assert [a.to_json() for a in clean] == [a.to_json() for a in with_bad]
    assert {k: sorted(s.events) for k, s in m1.subjects.items()} == {k: sorted(s.events) for k, s in m2.subjects.items()}

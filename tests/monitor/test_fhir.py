"""FHIR R4 in (issue 18): every published scenario, converted to FHIR Bundles by the test converter, gives the
same final alerts as its flat form; bad FHIR goes to the dead letters with a path and a reason."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from connectors.file import JsonLinesSource
from connectors.memory import ListSink
from monitor.clock import ReplayClock
from monitor.evaluator import Monitor
from monitor.fhir import FhirMapper
from monitor.replay import replay
from tests.conftest import SCENARIOS, final_alerts, load_scenario, run_events
from tests.support.fhirconv import to_fhir_lines


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


def _scenario(name: str):
    path = next((p for p in SCENARIOS if p.name.startswith(name)), None)
    if path is None:
        pytest.skip(f"published scenario {name} not found")
    return load_scenario(path)


def test_versions_amend_and_entered_in_error_withdraws_like_the_flat_form(rules, tmp_path):
    """Scenario 21: the late H12 dose withdraws DOSE-H12-MISSED-ESCALATION. Sent again changed (meta.versionId 2)
    it stays an amendment; then entered-in-error (version 3) withdraws the dose, so the alert is raised again. The
    flat form (same event id, status entered-in-error) gives exactly the same alerts."""
    header, events = _scenario("21_")
    dose = next(e for e in events if e["event_id"] == "ANA-021-E043")
    amended = {**dose, "dose_mg": 27.3, "recorded_at": "2025-02-08T12:00:00+01:00", "status": "amended"}
    withdrawn = {**amended, "recorded_at": "2025-02-08T13:00:00+01:00", "status": "entered-in-error"}
    events = [*events, amended, withdrawn]
    until = header["evaluation_horizon"]
    lines = to_fhir_lines(events)
    last = json.loads(lines[-1])["entry"][0]["resource"]
    assert (last["meta"]["versionId"], last["status"]) == ("3", "entered-in-error")
    flat, flat_rejects, _ = run_events(events, until=until, rules=rules, tmp_path=tmp_path)
    alerts, rejects, summary, monitor = run_fhir(lines, until=until, rules=rules, tmp_path=tmp_path)
    assert not rejects and not flat_rejects
    assert monitor.stats.events["amended"] == 2
    final = final_alerts(alerts)
    assert ("DOSE-H12-MISSED-ESCALATION", "ANA-021") in {(a.rule, a.subject_id) for a in final}
    assert sorted(map(_key, final)) == sorted(map(_key, final_alerts(flat)))


def test_evidence_names_the_fhir_resource_type_id_and_version(rules, tmp_path):
    header, events = _scenario("04_")
    alerts, _, _, _ = run_fhir(to_fhir_lines(events), until=header["evaluation_horizon"], rules=rules,
                               tmp_path=tmp_path)
    alert = next(a for a in final_alerts(alerts) if a.rule == "DOSE-H12-MISSED-ESCALATION")
    sources = alert.evidence["sources"]
    assert set(alert.evidence["events"]) <= set(sources)
    first = sources[alert.evidence["events"][0]]
    assert first["resource_type"] in ("Observation", "MedicationAdministration")
    assert first["resource_id"] == alert.evidence["events"][0]
    assert first["version"] == "1"
    assert first["fhir"] == f"{first['resource_type']}/{first['resource_id']}/_history/1"


# ---- bad FHIR: dead letters with path and reason; what the rules do not need is ignored and counted ----------------
SUBJECT = {"reference": "Patient/ANA-900"}
META = {"versionId": "1", "lastUpdated": "2025-02-10T09:00:00+01:00",
        "tag": [{"system": "urn:anacomp:site", "code": "FR-BIC-01"}]}


def _obs(code: str, value: float, unit: str, **more):
    return {"resourceType": "Observation", "id": f"o-{code}", "meta": META, "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]}, "subject": SUBJECT,
            "effectiveDateTime": "2025-02-10T08:30:00+01:00",
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
            **more}


def _bundle(*resources):
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


BAD = [
    ("invalid JSON", b'{"resourceType": "Observation", ', "malformed_json", "$"),
    ("wrong resourceType", {**_obs("751-8", 1.2, "10*9/L"), "resourceType": "Observatoin"}, "fhir_resource_type",
     "resourceType"),
    ("missing subject", {k: v for k, v in _obs("751-8", 1.2, "10*9/L").items() if k != "subject"},
     "fhir_no_subject", "Observation.subject"),
    ("unknown LOINC", _obs("99999-9", 1.2, "10*9/L"), "fhir_unknown_code", "Observation.code.coding"),
    ("wrong units", _obs("751-8", 1.2, "mg/dL"), "fhir_unit", "Observation.valueQuantity.code"),
    ("percentage without WBC", _obs("770-8", 40, "%", specimen={"reference": "Specimen/s1"}),
     "fhir_unpaired_percentage", "Observation.specimen"),
    ("R5-only shape", {"resourceType": "MedicationStatement", "id": "m1", "meta": META, "status": "recorded",
                       "subject": SUBJECT, "medication": {"concept": {"coding": [
                           {"system": "http://www.whocc.no/atc", "code": "N02BA01"}]}}},
     "fhir_not_r4", "MedicationStatement.medication"),
    ("not a number", _obs("751-8", "lots", "10*9/L"), "fhir_invalid", "Observation.valueQuantity.value"),
]


@pytest.mark.parametrize("raw,reason,path", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_fhir_is_refused_with_its_path_and_reason(raw, reason, path):
    data = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    for record in (data, json.dumps(_bundle(json.loads(data))).encode() if not isinstance(raw, bytes) else data):
        mapped = FhirMapper().map_record(record)
        assert not mapped.events
        assert [(r.reason, r.path) for r in mapped.rejected] == [(reason, path)]
        assert mapped.rejected[0].detail.startswith(path + ": ")


def test_a_percentage_with_the_wbc_of_the_same_specimen_is_an_anc():
    pct = _obs("770-8", 40, "%", specimen={"reference": "Specimen/s1"})
    wbc = {**_obs("6690-2", 3.0, "10*9/L", specimen={"reference": "Specimen/s1"}), "id": "o-wbc"}
    mapped = FhirMapper().map_record(json.dumps(_bundle(pct, wbc)))
    assert not mapped.rejected
    [(event, ref)] = mapped.events
    assert (event["analyte"], event["value"], event["unit"]) == ("ANC", 1.2, "10*9/L")
    assert ref == "Observation/o-770-8/_history/1"
    other = {**wbc, "specimen": {"reference": "Specimen/s2"}}
    mapped = FhirMapper().map_record(json.dumps(_bundle(pct, other)))
    assert [r.reason for r in mapped.rejected] == ["fhir_unpaired_percentage"]


def test_resources_the_rules_do_not_need_are_ignored_and_counted_not_dead_lettered():
    patient = {"resourceType": "Patient", "id": "p1", "birthDate": "2022-01-01",
               "address": [{"line": ["1 rue de la Paix"], "city": "Paris"}], "name": [{"family": "Martin"}]}
    not_given = {"resourceType": "Immunization", "id": "i1", "meta": META, "status": "not-done", "patient": SUBJECT,
                 "vaccineCode": {"text": "MMR"}, "occurrenceDateTime": "2025-02-10T08:30:00+01:00"}
    mapped = FhirMapper().map_record(json.dumps(_bundle(patient, not_given, _obs("751-8", 1.2, "10*9/L"))))
    assert not mapped.rejected
    assert [e["analyte"] for e, _ in mapped.events] == ["ANC"]
    assert sum(mapped.ignored.values()) == 2
    assert "Martin" not in json.dumps(mapped.events) and "Paris" not in json.dumps(mapped.events)


def test_replay_cli_reports_bad_fhir_with_path_and_counts_ignored(tmp_path):
    import subprocess
    import sys

    lines = [b[1] if isinstance(b[1], bytes) else json.dumps(b[1]).encode() for b in BAD]
    lines.append(json.dumps({"resourceType": "Patient", "id": "p1", "address": [{"city": "Paris"}]}).encode())
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    proc = subprocess.run([sys.executable, "-m", "monitor", "replay", "--input-format", "fhir", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for _, _, reason, where in BAD:
        assert f"{reason}: {where}: " in proc.stderr, (reason, proc.stderr)
    assert "FHIR resources ignored (not needed by the rules): 1 (Patient 1)" in proc.stderr


CHECK_TOOL = Path(__file__).resolve().parents[2].parent / "shared" / "tools" / "check_scenarios.py"


@pytest.mark.skipif(not SCENARIOS or not CHECK_TOOL.is_file(), reason="../shared scenarios or check tool not found")
def test_the_shared_check_tool_passes_every_scenario_replayed_as_fhir():
    """The shared tools/check_scenarios.py, run with a --cmd that converts each scenario to FHIR Bundles and calls
    `protocol-monitor replay --input-format fhir`: every published scenario passes, as it does in the flat form."""
    import subprocess
    import sys

    shim = Path(__file__).resolve().parents[1] / "support" / "fhir_replay_shim.py"
    proc = subprocess.run([sys.executable, str(CHECK_TOOL), "--cmd", f"{sys.executable} {shim}",
                           *map(str, SCENARIOS)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == f"{len(SCENARIOS)}/{len(SCENARIOS)} scenarios pass"


def test_the_code_map_validates_against_its_schema_and_a_broken_one_is_refused(tmp_path):
    import shutil
    import subprocess
    import sys

    import jsonschema
    import yaml

    from monitor.rules import DEFAULT_RULES_DIR

    codes = DEFAULT_RULES_DIR / "fhir" / "codes.yaml"
    schema = json.loads((DEFAULT_RULES_DIR / "schema" / "fhir_codes.schema.json").read_text())
    assert codes.read_text().splitlines()[0] == "# yaml-language-server: $schema=../schema/fhir_codes.schema.json"
    jsonschema.validate(yaml.safe_load(codes.read_text()), schema)
    rules = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, rules)
    broken = rules / "fhir" / "codes.yaml"
    broken.write_text(broken.read_text().replace("mg/kg: dose_mg_per_kg", "mg/kg: dose_per_kilo"))
    proc = subprocess.run([sys.executable, "-m", "monitor", "rules", "validate", str(rules)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"{broken}:?: dose_units.mg/kg: Input should be" in proc.stderr


def test_the_rule_authors_guide_local_code_example_maps_a_local_crp(tmp_path):
    import re

    import yaml

    from monitor.fhir import DEFAULT_CODE_MAP, load_code_map

    guide = (Path(__file__).resolve().parents[2] / "docs" / "RULE_AUTHORS.md").read_text()
    [block] = re.findall(r"```yaml fhir:observations\n(.*?)```", guide, flags=re.S)
    data = yaml.safe_load(DEFAULT_CODE_MAP.read_text())
    data["observations"] += yaml.safe_load(block)
    path = tmp_path / "codes.yaml"
    path.write_text(yaml.safe_dump(data))
    obs = _obs("x", 45, "mg/L")
    obs["code"] = {"coding": [{"system": "urn:oid:1.2.250.1.999.1.2", "code": "CRP-LOC"}]}
    assert [r.reason for r in FhirMapper().map_record(json.dumps(obs)).rejected] == ["fhir_unknown_code"]
    mapped = FhirMapper(code_map=load_code_map(path)).map_record(json.dumps(obs))
    assert not mapped.rejected
    [(event, _)] = mapped.events
    assert (event["analyte"], event["value"], event["unit"]) == ("CRP", 45.0, "mg/L")


def test_an_r5_research_subject_is_refused_as_not_r4():
    r5 = {"resourceType": "ResearchSubject", "id": "r", "meta": META, "status": "active",
          "study": {"reference": "ResearchStudy/NCT04656184"}, "subject": SUBJECT,
          "assignedComparisonGroup": "anakinra"}
    [refusal] = FhirMapper().map_record(json.dumps(r5)).rejected
    assert refusal.reason == "fhir_not_r4" and refusal.path in ("ResearchSubject.subject",
                                                                 "ResearchSubject.assignedComparisonGroup")


def test_site_specific_codes_names_rxnorm_and_medication_requests_map():
    axillary = _obs("8328-7", 37.6, "Cel")
    [(temp, _)] = FhirMapper().map_record(json.dumps(axillary)).events
    assert (temp["type"], temp["code"], temp["site"], temp["temperature_c"]) == ("vital_sign", "8310-5", "axillary",
                                                                                   37.6)
    request = {"resourceType": "MedicationRequest", "id": "rq1", "meta": META, "status": "active", "intent": "order",
               "subject": SUBJECT, "authoredOn": "2025-02-10T08:00:00+01:00",
               "medicationCodeableConcept": {"text": "Aspirin"},
               "dosageInstruction": [{"timing": {"code": {"text": "q6h"}, "repeat": {"boundsPeriod": {
                   "start": "2025-02-10T08:00:00+01:00"}}},
                   "doseAndRate": [{"doseQuantity": {"value": 30, "unit": "mg/kg/d",
                                                     "system": "http://unitsofmeasure.org", "code": "mg/kg/d"}}]}]}
    [(conmed, ref)] = FhirMapper().map_record(json.dumps(request)).events
    assert (conmed["type"], conmed["atc"], conmed["dose_mg_per_kg_per_day"], conmed["frequency"]) == (
        "concomitant_medication", "N02BA01", 30.0, "q6h")
    assert ref == "MedicationRequest/rq1/_history/1"
    unknown = {**request, "medicationCodeableConcept": {"text": "a local herbal remedy"}}
    [refusal] = FhirMapper().map_record(json.dumps(unknown)).rejected
    assert (refusal.reason, refusal.path) == ("fhir_unknown_code", "MedicationRequest.medicationCodeableConcept")


def test_any_json_and_any_mutation_of_a_resource_gives_events_or_refusals_never_an_exception():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    header, events = _scenario("45_")
    samples = [json.loads(line) for line in to_fhir_lines(events)[:12]]
    values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                      max_size=3), max_leaves=8)
    mapper = FhirMapper()

    def paths(node, prefix=()):
        yield prefix
        if isinstance(node, dict):
            for k, v in node.items():
                yield from paths(v, (*prefix, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from paths(v, (*prefix, i))

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.integers(0, len(samples) - 1), st.integers(0, 10_000), values, st.booleans())
    def check(which, where, value, delete):
        doc = json.loads(json.dumps(samples[which]))
        spots = [p for p in paths(doc) if p]
        target = spots[where % len(spots)]
        parent = doc
        for step in target[:-1]:
            parent = parent[step]
        if delete and isinstance(parent, dict):
            del parent[target[-1]]
        else:
            parent[target[-1]] = value
        mapped = mapper.map_record(json.dumps(doc))
        assert all(r.detail and r.reason for r in mapped.rejected)
        assert all(isinstance(p, dict) for p, _ in mapped.events)

    check()
    for raw in (b"", b"null", b"[]", b"42", b'"x"', b"{}", b'{"resourceType": 5}', b"\xff\xfe"):
        assert FhirMapper().map_record(raw).rejected


def test_entered_in_error_is_held_so_a_late_older_copy_stays_superseded():
    from monitor.events import parse_event
    from monitor.state import Applied, SubjectState

    base = {"event_id": "E1", "subject_id": "S", "site_id": "X", "type": "vital_sign", "code": "8310-5",
            "temperature_c": 38.4, "site": "tympanic", "occurred_at": "2025-02-10T08:00:00+01:00",
            "recorded_at": "2025-02-10T08:10:00+01:00"}
    withdrawn = {**base, "status": "entered-in-error", "recorded_at": "2025-02-10T09:00:00+01:00"}
    state = SubjectState("S", "X")
    assert state.apply(parse_event(base), json.dumps(base)) is Applied.NEW
    assert [e.event_id for e in state.by_type()["vital_sign"]] == ["E1"]
    assert state.apply(parse_event(withdrawn), json.dumps(withdrawn)) is Applied.AMENDED
    assert state.by_type().get("vital_sign") == []
    late = {**base, "temperature_c": 38.5}
    assert state.apply(parse_event(late), json.dumps(late)) is Applied.SUPERSEDED
    assert not state.by_type().get("vital_sign")
    fresh = SubjectState("S", "X")
    fresh.apply(parse_event(base), json.dumps(base))
    fresh.apply(parse_event(withdrawn), json.dumps(withdrawn))
    fresh._by_type = None  # built again from the held versions: still without the withdrawn event
    assert not fresh.by_type().get("vital_sign")


def test_the_alert_email_names_the_fhir_resource(rules, tmp_path):
    from connectors.email import format_email

    header, events = _scenario("04_")
    alerts, _, _, _ = run_fhir(to_fhir_lines(events), until=header["evaluation_horizon"], rules=rules,
                               tmp_path=tmp_path)
    alert = next(a for a in final_alerts(alerts) if a.rule == "DOSE-H12-MISSED-ESCALATION")
    _, body = format_email(alert)
    first = alert.evidence["events"][0]
    ref = alert.evidence["sources"][first]["fhir"]
    assert f"FHIR {ref}" in body and "?/?@?" not in body

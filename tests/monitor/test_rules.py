"""The rules loader: every planted error is refused with its file and 1-based line; the version hash follows the
bytes; a threshold edit in a rule file changes a verdict end to end."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest

from connectors.file import JsonLinesSource
from monitor.clock import ReplayClock
from monitor.engine import RulesEngine
from monitor.errors import RuleFileError
from monitor.evaluator import Monitor
from monitor.replay import replay
from monitor.rules import DEFAULT_RULES_DIR, load_rules

SCENARIO_13 = Path("/work/shared/scenarios/13_excl_neutropenia_si_units.jsonl")


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, target)
    return target


def plant(path: Path, old: str, new: str, *, after: str | None = None) -> int:
    """Replace the first `old` (after the text `after`, e.g. a rule's id line) with `new`; return the 1-based line
    where it starts."""
    text = path.read_text(encoding="utf-8")
    start = text.index(after) if after is not None else 0
    assert old in text[start:], f"{old!r} not in {path}" + (f" after {after!r}" if after else "")
    index = text.index(old, start)
    path.write_text(text[:index] + new + text[index + len(old):], encoding="utf-8")
    return text[:index].count("\n") + 1


def line_of(path: Path, needle: str, start: int = 1) -> int:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if number >= start and needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def refused(directory: Path) -> list[tuple[str, int | None, str]]:
    with pytest.raises(RuleFileError) as info:
        load_rules(directory)
    problems = info.value.problems
    assert problems
    # the exception text names every problem as file:line: message
    for path, line, msg in problems:
        assert f"{path}:{line if line is not None else '?'}: {msg}" in str(info.value)
    return problems


def only_problems_in(problems, path: Path):
    found = [(line, msg) for p, line, msg in problems if Path(p) == path]
    assert found, f"no problem reported for {path}: {problems}"
    assert all(Path(p) == path for p, _, _ in problems), problems
    return found


# ---- the bundled set ------------------------------------------------------------------------------------------------


def test_bundled_rules_load():
    rs = load_rules()
    assert {"ELIG-NEUTROPENIA", "ELIG-RENAL", "DQ-TEMP-UNIT-SUSPECT"} <= set(rs.rules)
    neutro = rs.rules["ELIG-NEUTROPENIA"]
    assert Path(neutro.path).name == "eligibility.yaml"
    assert neutro.line == line_of(Path(neutro.path), "id: ELIG-NEUTROPENIA")
    assert neutro.category == "eligibility"
    assert rs.engine_definition()["ELIG-NEUTROPENIA"]["run"] == "ELIG-NEUTROPENIA"


# ---- planted errors -------------------------------------------------------------------------------------------------


def test_unknown_field_in_a_rule(rules_dir):
    f = rules_dir / "concomitant.yaml"
    line = plant(f, "    severity: {field", "    severty: major\n    severity: {field",
                 after="- id: CONMED-CYP-INTERACTOR")
    problems = only_problems_in(refused(rules_dir), f)
    assert any(l == line and "severty" in msg and "did you mean 'severity'" in msg for l, msg in problems), problems


def test_bad_severity_value(rules_dir):
    f = rules_dir / "data_quality.yaml"
    line = plant(f, "    severity: minor\n", "    severity: urgent\n", after="- id: DQ-TEMP-UNIT-SUSPECT")
    problems = only_problems_in(refused(rules_dir), f)
    assert problems
    for l, msg in problems:
        assert l == line
        assert "severity" in msg
    assert any("critical" in msg and "minor" in msg for _, msg in problems)  # says what is allowed


def test_unknown_fact_name_suggests_the_closest(rules_dir):
    f = rules_dir / "concomitant.yaml"
    rule_line = line_of(f, "- id: CONMED-CYP-INTERACTOR")
    fact_line = plant(f, "    fact: medication_exposure", "    fact: medication_exposur",
                      after="- id: CONMED-CYP-INTERACTOR")
    ((line, msg),) = only_problems_in(refused(rules_dir), f)
    assert rule_line <= line <= fact_line
    assert "medication_exposur'" in msg
    assert "did you mean 'medication_exposure'" in msg


def test_unknown_condition_field_suggests_the_closest(rules_dir):
    f = rules_dir / "concomitant.yaml"
    when_line = line_of(f, "    when:", line_of(f, "- id: CONMED-CYP-INTERACTOR"))
    field_line = plant(f, "      cyp_listed: true", "      cyp_lsted: true", after="- id: CONMED-CYP-INTERACTOR")
    ((line, msg),) = only_problems_in(refused(rules_dir), f)
    assert when_line <= line <= field_line
    assert "cyp_lsted" in msg
    assert "did you mean 'cyp_listed'" in msg


def test_bool_field_compared_with_a_number(rules_dir):
    f = rules_dir / "concomitant.yaml"
    when_line = line_of(f, "    when:", line_of(f, "- id: CONMED-CYP-INTERACTOR"))
    field_line = plant(f, "      systemic: true", "      systemic: 1", after="- id: CONMED-CYP-INTERACTOR")
    ((line, msg),) = only_problems_in(refused(rules_dir), f)
    assert when_line <= line <= field_line
    assert "systemic" in msg and "bool" in msg


def test_unknown_operator_is_refused(rules_dir):
    f = rules_dir / "eligibility.yaml"
    plant(f, "      value: {lt: 1.5}", "      value: {less: 1.5}", after="- id: ELIG-NEUTROPENIA")
    ((_, msg),) = only_problems_in(refused(rules_dir), f)
    assert "less" in msg


def test_duplicate_rule_id_across_two_files(rules_dir):
    first = rules_dir / "concomitant.yaml"
    second = rules_dir / "eligibility.yaml"
    first_line = plant(first, "  - id: CONMED-CYP-INTERACTOR", "  - id: ELIG-NEUTROPENIA")
    second_line = line_of(second, "- id: ELIG-NEUTROPENIA")
    problems = refused(rules_dir)
    dups = [(p, l, m) for p, l, m in problems if "duplicate" in m]
    assert len(dups) == 1, problems
    path, line, msg = dups[0]
    # files load in name order: concomitant.yaml first, so eligibility.yaml holds the duplicate
    assert Path(path) == second and line == second_line
    assert "ELIG-NEUTROPENIA" in msg
    assert f"{first}:{first_line}" in msg  # points at the first definition


def test_invalid_yaml_syntax_reports_the_line(rules_dir):
    f = rules_dir / "concomitant.yaml"
    line = plant(f, "    title: CYP450 interactor started on study", "    title: CYP450: interactor: x",
                 after="- id: CONMED-CYP-INTERACTOR")
    ((l, msg),) = only_problems_in(refused(rules_dir), f)
    assert l == line
    assert "YAML" in msg


def test_python_tag_is_refused_and_never_executed(rules_dir, tmp_path):
    marker = tmp_path / "executed"
    f = rules_dir / "concomitant.yaml"
    line = plant(f, "    severity: {field", f'    priority: !!python/object/apply:os.system ["touch {marker}"]\n'
                 "    severity: {field", after="- id: CONMED-CYP-INTERACTOR")
    ((l, msg),) = only_problems_in(refused(rules_dir), f)
    assert l == line
    assert "python/object/apply" in msg
    assert not marker.exists()


def test_missing_tables_file(rules_dir):
    (rules_dir / "tables" / "cyp450.yaml").unlink()
    problems = refused(rules_dir)
    assert any(Path(p) == rules_dir / "tables" / "cyp450.yaml" and "missing" in m for p, _, m in problems), problems


def test_missing_directory():
    with pytest.raises(RuleFileError):
        load_rules("/nonexistent/rules/dir")


def test_every_problem_is_reported_not_only_the_first(rules_dir):
    plant(rules_dir / "concomitant.yaml", "    fact: medication_exposure", "    fact: medication_exposur",
          after="- id: CONMED-CYP-INTERACTOR")
    plant(rules_dir / "data_quality.yaml", "    severity: minor\n", "    severity: urgent\n",
          after="- id: DQ-TEMP-UNIT-SUSPECT")
    files = {Path(p).name for p, _, _ in refused(rules_dir)}
    assert files == {"concomitant.yaml", "data_quality.yaml"}


def test_empty_operator_mapping_is_refused(rules_dir):
    f = rules_dir / "eligibility.yaml"
    plant(f, "      value: {lt: 1.5}", "      value: {}", after="- id: ELIG-NEUTROPENIA")
    try:
        rs = load_rules(rules_dir)
    except RuleFileError:
        return
    # what a user sees if it loads: a normal ANC of 5.0 raises ELIG-NEUTROPENIA
    e = RulesEngine(definition={"n": rs.engine_definition()["ELIG-NEUTROPENIA"]}, version="t")
    e.sync("A", {"f": {"fact": "baseline_lab", "analyte": "ANC", "value": 5.0}})
    assert e.matches("A") == set(), "the rule fired for ANC 5.0"


# ---- version hash ---------------------------------------------------------------------------------------------------


def test_version_is_stable_for_the_same_bytes(rules_dir):
    v = load_rules().version
    assert load_rules().version == v
    assert load_rules(rules_dir).version == v  # a copy elsewhere is the same version


def test_version_changes_with_a_threshold_and_back(rules_dir):
    v = load_rules(rules_dir).version
    f = rules_dir / "eligibility.yaml"
    plant(f, "value: {lt: 1.5}", "value: {lt: 1.0}", after="- id: ELIG-NEUTROPENIA")
    changed = load_rules(rules_dir)
    assert changed.version != v
    neutro = "ELIG-NEUTROPENIA"
    assert changed.engine_definition()[neutro] != load_rules().engine_definition()[neutro]
    plant(f, "value: {lt: 1.0}", "value: {lt: 1.5}", after="- id: ELIG-NEUTROPENIA")
    assert load_rules(rules_dir).version == v


def test_version_changes_with_a_parameter_or_table(rules_dir):
    v = load_rules(rules_dir).version
    plant(rules_dir / "parameters.yaml", "schwartz_k: 0.413", "schwartz_k: 0.414")
    v2 = load_rules(rules_dir).version
    assert v2 != v
    plant(rules_dir / "tables" / "live_vaccines.yaml", "BCG", "BCG vaccine")
    assert load_rules(rules_dir).version not in (v, v2)


# ---- a threshold edit changes a verdict -----------------------------------------------------------------------------


class Collect:
    def __init__(self) -> None:
        self.items: list = []

    def add(self, *item) -> None:
        self.items.append(item)

    def flush(self) -> None:
        pass


@pytest.fixture(scope="module")
def scenario_13(tmp_path_factory):
    if not SCENARIO_13.exists():
        pytest.skip("shared scenarios not available")
    lines = SCENARIO_13.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    assert "event_id" not in header
    path = tmp_path_factory.mktemp("s13") / "events.jsonl"
    path.write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")
    return header, path


def run_scenario(rules, header, events_path):
    clock = ReplayClock()
    monitor = Monitor.create(rules=rules, clock=clock)
    alerts, rejects = Collect(), Collect()
    summary = replay(source=JsonLinesSource(paths=[events_path]), monitor=monitor, clock=clock, alerts=alerts,
                     rejects=rejects, until=dt.datetime.fromisoformat(header["evaluation_horizon"]))
    assert rejects.items == []
    assert summary.records == len(events_path.read_text().splitlines())
    return [a for (a,) in alerts.items]


def test_scenario_13_header_expects_neutropenia(scenario_13):
    header, _ = scenario_13
    assert [a["rule"] for a in header["expected_alerts"]] == ["ELIG-NEUTROPENIA"]


def test_anc_threshold_edit_changes_the_verdict_for_anc_1_2(scenario_13, rules_dir):
    header, events_path = scenario_13
    expected = header["expected_alerts"][0]

    bundled = run_scenario(load_rules(), header, events_path)
    raised = [(a.rule, a.subject_id, a.at) for a in bundled if a.status == "raised"]
    assert (expected["rule"], expected["subject"], expected["at"]) in raised
    neutro = [a for a in bundled if a.rule == "ELIG-NEUTROPENIA"]
    assert len(neutro) == 1 and neutro[0].evidence["values"]["value"] == pytest.approx(1.2)

    plant(rules_dir / "eligibility.yaml", "value: {lt: 1.5}", "value: {lt: 1.0}", after="- id: ELIG-NEUTROPENIA")
    lowered = load_rules(rules_dir)
    edited = run_scenario(lowered, header, events_path)
    assert [a for a in edited if a.rule == "ELIG-NEUTROPENIA"] == []
    assert all(a.rule_version == lowered.version for a in edited)


def test_the_fact_catalogue_is_passed_in_not_read_from_a_global():
    """load_rules checks rule files against the catalogue it is given: without `ladder_step` in it, the dosing
    rules that name it are refused with their file and line."""
    from monitor.errors import RuleFileError
    from monitor.facts import FactCatalogue, standard_catalogue
    from monitor.rules import load_rules

    standard = standard_catalogue()
    assert load_rules(facts=standard).facts is standard
    reduced = FactCatalogue(t for name, t in standard.items() if name != "ladder_step")
    with pytest.raises(RuleFileError) as refused:
        load_rules(facts=reduced)
    assert any(path.endswith("dosing.yaml") and line and "unknown derived fact 'ladder_step'" in message
               for path, line, message in refused.value.problems)

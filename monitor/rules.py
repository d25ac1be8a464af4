"""Rule files, protocol parameters and reference tables: loading, validation and compilation.

Everything under `rules/` is data. This module reads it with a safe YAML loader, validates it with pydantic,
reports every problem with its file and line, and compiles the rules into durable_rules ruleset definitions
(plain dicts) whose conditions compare fields of one derived fact with constants only (ENGINE_NOTES, upstream #381).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from monitor.errors import RuleFileError
from monitor.facts import FactCatalogue, FactType, standard_catalogue
from monitor.yamlfiles import closest, line_for, load_yaml, pydantic_problems

Severity = Literal["critical", "major", "minor", "info"]
Category = Literal["eligibility", "dosing", "concomitant", "endpoint", "schedule", "safety", "data_quality"]
SEVERITIES: tuple[str, ...] = ("critical", "major", "minor", "info")
OPERATORS = {"eq", "ne", "lt", "lte", "gt", "gte", "in"}
DEFAULT_RULES_DIR = Path(__file__).resolve().parent.parent / "rules"

# --------------------------------------------------------------------------------------------------------------
# Models of the files


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SeverityMap(_Strict):
    """Severity chosen from a fact field, e.g. CYP strength → major/minor."""

    field: str
    map: dict[str, Severity]
    default: Severity


class Alternative(_Strict):
    """Another fact and condition that raises the same rule (e.g. SAFE-HEPATITIS: a reported AE or a lab signal)."""

    fact: str
    when: Any
    at: str = "at"
    message: str


class RuleSpec(_Strict):
    id: str = Field(pattern=r"^[A-Z][A-Z0-9]*(-[A-Z0-9]+)+$")
    title: str
    fact: str
    when: Any
    alternatives: list[Alternative] = Field(default_factory=list)
    severity: Severity | SeverityMap
    category: Category | None = None
    at: str = "at"
    message: str
    expects: str = ""
    source: str = ""
    priority: int = 0


class RuleFile(_Strict):
    category: Category
    description: str = ""
    rules: list[RuleSpec]


class TemperatureParams(_Strict):
    febrile_at_or_above_c: float
    plausible_c: tuple[float, float]
    site_offsets_c: dict[str, float]
    codes: list[str]


class UnitParams(_Strict):
    anc_to_10e9_per_l: dict[str, float]
    creatinine_to_mg_dl: dict[str, float]
    weight_to_kg: dict[str, float]
    height_to_cm: dict[str, float]
    lab_conversions: dict[str, dict[str, float]] = Field(default_factory=dict)


class IvigFailureParams(_Strict):
    fever_from_hours_after_e1: float
    tolerance_hours: float
    first_course_purposes: list[str]


class KdCriteriaParams(_Strict):
    complete_min_signs: int
    complete_min_fever_days: int
    early_min_fever_days: int
    early_signs_by_fever_day: int
    incomplete_signs: list[int]
    incomplete_min_fever_days: int
    infant_max_months: int
    infant_min_fever_days: int
    crp_mg_dl_at_least: float
    esr_mm_h_at_least: float
    supplemental_at_least: int


class VisitWindow(_Strict):
    days: tuple[int, int]
    assessments: list[str] = Field(default_factory=list)


class AssessmentWindow(_Strict):
    assessment: str
    days: tuple[int, int]
    visits: list[str]


class SafetyParams(_Strict):
    neutropenia_below: float
    neutropenia_critical_below: float
    hepatitis_uln_multiple: float
    hepatitis_baseline_multiple: float
    default_uln_u_per_l: dict[str, float]
    mas_ferritin_above: float
    mas_platelets_at_or_below: float
    mas_ast_above: float
    mas_triglycerides_above_mg_dl: float
    mas_fibrinogen_at_or_below_mg_dl: float
    mas_min_criteria: int
    mas_lab_window_hours: float
    mas_fever_window_hours: float
    sae_report_hours: float


class LadderStep(_Strict):
    """One step of the anakinra escalation ladder (A-1, A-18): fever is assessed at T0 + `hours`; if febrile, the
    escalation judged is either a `supplement` given on `dosing_day` inside the escalation window around the step,
    or the `day_total` of `dosing_day` given by the end of that window."""

    name: str = Field(min_length=1)
    hours: float = Field(gt=0)
    given: Literal["supplement", "day_total"]
    dosing_day: int = Field(ge=1)
    supplement_mg_per_kg: float | None = Field(default=None, gt=0, description=(
        "`supplement` steps: the supplementary dose the step requires (A-1: 2 mg/kg at H12)"))
    levels_mg_per_kg: dict[float, float] | None = Field(default=None, description=(
        "`day_total` steps: the previous day's level → the level the step requires (A-1: 4 → 6, 6 → 8); a level in "
        "between is judged by the nearest one (a tie by the higher)"))

    @model_validator(mode="after")
    def _target(self) -> "LadderStep":
        if self.given == "supplement" and self.supplement_mg_per_kg is None:
            raise ValueError(f"ladder step {self.name}: a `supplement` step needs supplement_mg_per_kg")
        if self.given == "day_total" and not self.levels_mg_per_kg:
            raise ValueError(f"ladder step {self.name}: a `day_total` step needs levels_mg_per_kg "
                             "(previous level: required level)")
        return self

    def required_mg_per_kg(self, previous_level: float | None) -> float | None:
        """What the step requires when febrile: the supplement, or the level for the nearest previous level."""
        if self.given == "supplement":
            return self.supplement_mg_per_kg
        if previous_level is None or not self.levels_mg_per_kg:
            return None
        nearest = min(self.levels_mg_per_kg, key=lambda level: (abs(level - previous_level), -level))
        return self.levels_mg_per_kg[nearest]


class DosingParams(_Strict):
    """The anakinra and IVIG dose levels (A-1, §4.2). The accepted ranges are the levels ± `tolerance`; rule
    files read them as `{param: dosing.start_low_mg_per_kg}` and the like, so a new level is one edit here."""

    start_mg_per_kg: float = Field(gt=0, description="A-1: the starting dose, and the escalation base of day 1")
    max_mg_per_kg_day: float = Field(gt=0, description="A-1: the most anakinra per dosing day")
    tolerance: float = Field(ge=0, lt=1, description="§4.2: the accepted deviation from a level, as a fraction")
    ivig_retreatment_g_per_kg: float = Field(gt=0, description="the IVIG retreatment total")

    @property
    def start_low_mg_per_kg(self) -> float:
        return self.start_mg_per_kg * (1 - self.tolerance)

    @property
    def start_high_mg_per_kg(self) -> float:
        return self.start_mg_per_kg * (1 + self.tolerance)

    @property
    def max_high_mg_per_kg_day(self) -> float:
        return self.max_mg_per_kg_day * (1 + self.tolerance)

    @property
    def accepted_low_ratio(self) -> float:
        """A ladder step's dose is enough from this share of what it requires (1 - tolerance)."""
        return 1 - self.tolerance

    @property
    def ivig_low_g_per_kg(self) -> float:
        return self.ivig_retreatment_g_per_kg * (1 - self.tolerance)

    @property
    def ivig_high_g_per_kg(self) -> float:
        return self.ivig_retreatment_g_per_kg * (1 + self.tolerance)


class ArmParams(_Strict):
    """The arm codes records carry (`arm`), by the role the derivations give them (§2.1)."""

    anakinra: str = Field(min_length=1, description="the anakinra arm: T0 is the first study-drug anakinra, ladder")
    ivig: str = Field(min_length=1, description="the IVIG arm: T0 is the first IVIG retreatment infusion")


class DrugNames(_Strict):
    """Names (lower case, matched as substrings of the drug text) that identify a study drug without an ATC code."""

    anakinra: list[str] = Field(min_length=1)
    ivig: list[str] = Field(min_length=1)


class Parameters(_Strict):
    """Numbers and windows the derived facts are computed with (rules/parameters.yaml)."""

    site_timezones: dict[str, str]
    temperature: TemperatureParams
    units: UnitParams
    lab_analytes: dict[str, list[str]]
    schwartz_k: float
    schwartz_validated_from_months: float
    weight_codes: list[str]
    height_codes: list[str]
    deadline_grace_hours: float
    assessment_window_hours: tuple[float, float]
    escalation_window_hours: tuple[float, float]
    dosing_day_early_hours: float
    eligibility_lab_after_enrollment_hours: float
    endpoint_window_hours: float
    endpoint_late_window_hours: float
    secondary_fever_afebrile_hours: float
    secondary_fever_lookback_hours: float
    treatment_days: int
    ivig_arm_restricted_hours: float
    live_vaccine_lookback_months: int
    systemic_routes: list[str]
    systemic_steroid_atc_prefixes: list[str]
    biologic_atc_prefixes: list[str]
    anakinra_atc: list[str]
    ivig_atc: list[str]
    ivig_failure: IvigFailureParams
    kd_criteria: KdCriteriaParams
    visit_windows: dict[str, VisitWindow]
    assessment_windows: dict[str, AssessmentWindow]
    coronary_z_category_bounds: list[float]
    d45_echo_days: tuple[int, int]
    rescue_atc_prefixes: list[str]
    rescue_names: list[str]
    escalation_ratio: float
    arms: ArmParams
    study_drug_names: DrugNames
    dosing: DosingParams
    ladder_steps: list[LadderStep] = Field(min_length=1)
    ivig_retreatment_purposes: list[str] = Field(min_length=1)
    rescue_for_sae_words: list[str]
    antipyretic_atc_prefixes: list[str]
    antipyretic_names: list[str]
    aspirin_atc: list[str]
    aspirin_names: list[str]
    doses_per_day: dict[str, float]
    safety: SafetyParams


class CypEntry(_Strict):
    drug: str
    names: list[str] = Field(default_factory=list)
    atc: list[str] = Field(default_factory=list)
    role: Literal["inhibitor", "inducer"]
    enzymes: list[str] = Field(default_factory=list)
    strength: Literal["strong", "moderate", "weak", "unclassified"]
    lookback_days: float
    note: str = ""


class CypTable(_Strict):
    version_date: str
    source: str
    excluded_atc_prefixes: list[str] = Field(default_factory=list)
    interactors: list[CypEntry]


class ImmunosuppressantEntry(_Strict):
    drug: str
    names: list[str] = Field(default_factory=list)
    atc: list[str] = Field(default_factory=list)
    half_life_hours: float = Field(gt=0)
    minimum_washout_days: float | None = None
    note: str = ""


class ImmunosuppressantTable(_Strict):
    washout_half_lives: float = Field(gt=0)
    drugs: list[ImmunosuppressantEntry]


class LiveVaccineTable(_Strict):
    atc: list[str]
    names: list[str] = Field(default_factory=list)


Bound = Annotated[float, Field(strict=True, allow_inf_nan=False)]
"""A bound of a plausibility range: a finite number written as a number (a quoted "45" or `.inf` is refused)."""


def _ordered(bounds: tuple[float, float]) -> tuple[float, float]:
    if bounds[0] > bounds[1]:
        raise ValueError(f"the low end {bounds[0]:g} is above the high end {bounds[1]:g}; write [low, high]")
    return bounds


Interval = Annotated[tuple[Bound, Bound], AfterValidator(_ordered)]


class PlausibleRange(_Strict):
    """The values of one quantity that can be real for a child 0-18 years, or that a data-quality rule handles."""

    range: Interval
    unit: str = ""
    why: str = Field(min_length=1)


class LabRange(PlausibleRange):
    """A lab analyte, in the unit its conversion table in parameters.yaml converts to (factor 1).
    `reference_high` bounds the upper end of a reference range where the monitor divides by it (ALT, AST)."""

    reference_high: Interval | None = None


class PlausibilityTable(_Strict):
    """rules/tables/plausibility.yaml: a record with a value outside its range is refused (`implausible`)."""

    weight_kg: PlausibleRange
    height_cm: PlausibleRange
    gestational_age_weeks: PlausibleRange
    temperature_cel: PlausibleRange
    temperature_degf: PlausibleRange
    dose_mg: PlausibleRange
    dose_mg_per_kg: PlausibleRange
    dose_g: PlausibleRange
    dose_g_per_kg: PlausibleRange
    dose_mg_per_kg_per_day: PlausibleRange
    dose_iu: PlausibleRange
    coronary_z: PlausibleRange
    activity_score: PlausibleRange
    ae_grade: PlausibleRange
    visit_nominal_day: PlausibleRange
    kd_crp_mg_dl: PlausibleRange
    kd_esr_mm_h: PlausibleRange
    kd_fever_days: PlausibleRange
    labs: dict[str, LabRange]
    other_lab_value: PlausibleRange
    other_vital_value: PlausibleRange
    unrecognized_unit: PlausibleRange


class Tables(_Strict):
    cyp450: CypTable
    immunosuppressants: ImmunosuppressantTable
    live_vaccines: LiveVaccineTable
    plausibility: PlausibilityTable


# --------------------------------------------------------------------------------------------------------------
# Conditions


class ParamValue(float):
    """A threshold a rule file takes from parameters.yaml (`{param: escalation_ratio}`): the number itself, which
    also remembers its name, so the rule catalogue and an alert's `rule_condition` show `1.1 (escalation_ratio)`.
    One number, one place: the rule and the derivation that use it read the same parameter."""

    name: str

    def __new__(cls, value: float, name: str) -> "ParamValue":
        made = super().__new__(cls, value)
        made.name = name
        return made

    def __str__(self) -> str:  # repr stays float's: the engine adapter writes the plain number
        return f"{float(self)} ({self.name})"


def resolve_params(cond: Any, parameters: Any, problems: list[str]) -> Any:
    """Replace each `{param: name}` in a rule condition by that parameter's number (a dotted name reaches into a
    section: `temperature.febrile_at_or_above_c`). An unknown or non-numeric name is a problem, not a crash."""
    if isinstance(cond, dict):
        if set(cond) == {"param"}:
            name = cond["param"]
            value: Any = parameters
            for part in str(name).split("."):
                value = getattr(value, part, None) if not isinstance(value, dict) else value.get(part)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                known = sorted(k for k, v in type(parameters).model_fields.items()
                               if v.annotation in (float, int, "float", "int"))
                problems.append(f"'param: {name}' is not a number in parameters.yaml{closest(str(name), known)}")
                return cond
            return ParamValue(float(value), str(name))
        return {k: resolve_params(v, parameters, problems) for k, v in cond.items()}
    if isinstance(cond, list):
        return [resolve_params(v, parameters, problems) for v in cond]
    return cond


def compile_condition(cond: Any, fact: FactType, problems: list[str]) -> dict[str, Any]:
    """Rule-file condition → durable_rules expression on the current message, constants only.

    Grammar: a mapping whose entries must all hold; an entry is {field: {op: constant}} with op in
    eq ne lt lte gt gte in, {field: constant} meaning eq, or a group {all: [c...]} / {any: [c...]}. A constant
    may be `{param: name}`, resolved by `resolve_params` before compiling.
    """
    fields = fact.fields
    if not isinstance(cond, dict) or not cond:
        problems.append(f"a condition must be a non-empty mapping, got {cond!r}")
        return {}
    parts: list[dict[str, Any]] = []
    for name, test in cond.items():
        if name in ("all", "any"):
            if not isinstance(test, list) or not test:
                problems.append(f"'{name}' needs a non-empty list of conditions")
                continue
            parts.append({"$and" if name == "all" else "$or": [compile_condition(c, fact, problems) for c in test]})
            continue
        if name not in fields:
            problems.append(f"fact '{fact}' has no field '{name}'{closest(str(name), list(fields))}")
            continue
        tests = test if isinstance(test, dict) else {"eq": test}
        if not tests:
            problems.append(f"'{name}' has no comparison (write e.g. {name}: {{lt: 1.5}})")
            continue
        for op, value in tests.items():
            if op not in OPERATORS:
                problems.append(f"unknown operator '{op}' on '{name}'{closest(str(op), sorted(OPERATORS))}")
                continue
            values = value if op == "in" else [value]
            if op == "in" and (not isinstance(value, list) or not value):
                problems.append(f"'in' on '{name}' needs a non-empty list")
                continue
            kind = fields[name]
            for v in values:
                ok = (kind is bool and isinstance(v, bool)) or (
                    kind is float and isinstance(v, (int, float)) and not isinstance(v, bool)
                ) or (kind is str and isinstance(v, str))
                if not ok:
                    problems.append(f"'{name}' is a {kind.__name__} field; {v!r} can not be compared with it")
            if op == "eq":
                parts.append({name: value})
            elif op == "in":
                parts.append({"$or": [{name: v} for v in values]})
            else:
                limit = value
                if kind is float and op in _TOLERANT and isinstance(value, (int, float)) and not isinstance(value, bool):
                    limit = _tolerant_limit(op, float(value))
                parts.append({{"ne": "$neq", "lt": "$lt", "lte": "$lte", "gt": "$gt", "gte": "$gte"}[op]: {name: limit}})
    return parts[0] if len(parts) == 1 else {"$and": parts}


COMPARISON_TOLERANCE = 1e-9
"""RULES_SPEC §2.7 and A-23.1: derived values are compared with thresholds as computed, with a 1e-9 tolerance.
A value within the tolerance of a threshold counts as equal to it (exactly 38.0 is febrile, an eGFR of 30 that
floating point computes as 29.999999999999996 is not < 30). The derivations never round to get this effect."""

_TOLERANT = {"lt": -1.0, "gte": -1.0, "gt": 1.0, "lte": 1.0}


def _tolerant_limit(op: str, value: float) -> float:
    """The constant the engine compares with: `x < c` holds only below c - tol, `x > c` only above c + tol (and
    `<=`, `>=` accept up to tol beyond c), so a value within the tolerance of c is treated as equal to c.
    (A limit such as 0 - 1e-9 reaches the engine exactly: the adapter writes every number in a form it reads.)"""
    return value + _TOLERANT[op] * COMPARISON_TOLERANCE


_OPS = {"eq": "=", "ne": "≠", "lt": "<", "lte": "≤", "gt": ">", "gte": "≥", "in": "in"}


def render_condition(cond: Any) -> str:
    """A rule condition in one readable line: `analyte = ANC and value < 1.5`."""
    parts = []
    for name, test in cond.items():
        if name in ("all", "any"):
            joiner = " and " if name == "all" else " or "
            items = [render_condition(c) for c in test]
            items = [f"({i})" if (" and " in i or " or " in i) and not i.startswith("(") else i for i in items]
            parts.append("(" + joiner.join(items) + ")")
            continue
        tests = test if isinstance(test, dict) else {"eq": test}
        for op, value in tests.items():
            shown = "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else str(value).lower() \
                if isinstance(value, bool) else str(value)
            parts.append(f"{name} {_OPS.get(op, op)} {shown}")
    return " and ".join(parts)


def references_other_message(expr: Any) -> bool:
    """True if a compiled expression refers to anything but constants (the crash of upstream #381)."""
    if isinstance(expr, dict):
        for key, value in expr.items():
            if key in ("$m", "$s", "$add", "$sub", "$mul", "$div", "$l", "$r") or key.startswith("$i"):
                return True
            if isinstance(value, dict) and not key.startswith("$"):
                return True  # {field: {...}} is a reference form, never a constant comparison
            if references_other_message(value):
                return True
        return False
    if isinstance(expr, list):
        return any(references_other_message(v) for v in expr)
    return False


# --------------------------------------------------------------------------------------------------------------
# The loaded set


@dataclass(frozen=True)
class Rule:
    """One compiled rule: its spec, its file and line, and its durable_rules definition."""

    spec: RuleSpec
    category: str
    path: str
    line: int | None
    definitions: dict[str, dict[str, Any]]

    def _variant(self, fact_name: str) -> tuple[str, str]:
        for alt in self.spec.alternatives:
            if alt.fact == fact_name and fact_name != self.spec.fact:
                return alt.at, alt.message
        return self.spec.at, self.spec.message

    def at_field(self, fact_name: str) -> str:
        return self._variant(fact_name)[0]

    def message_for(self, fact_name: str) -> str:
        return self._variant(fact_name)[1]

    def condition_for(self, fact_name: str) -> str:
        """The rule's condition as configured, in words: what an alert cites as the thresholds in force."""
        for alt in self.spec.alternatives:
            if alt.fact == fact_name and fact_name != self.spec.fact:
                return render_condition(alt.when)
        return render_condition(self.spec.when)

    def severity_for(self, fact: dict[str, Any]) -> str:
        sev = self.spec.severity
        if isinstance(sev, str):
            return sev
        return sev.map.get(str(fact.get(sev.field)), sev.default)


@dataclass(frozen=True)
class RuleSet:
    """Everything under one rules directory, validated. `version` is a hash of every file's bytes."""

    directory: Path
    version: str
    parameters: Parameters
    tables: Tables
    rules: dict[str, Rule]
    files: tuple[str, ...] = field(default=())
    kri: Any = None  # monitor.kri_file.KriFile from kri.yaml, or None without one
    facts: FactCatalogue = field(default_factory=standard_catalogue)  # the fact types the rules were checked against

    def engine_definition(self) -> dict[str, Any]:
        """The durable_rules ruleset body: rule name → definition (identical for every shard)."""
        return {name: d for _, rule in sorted(self.rules.items()) for name, d in sorted(rule.definitions.items())}

    def facts_read(self) -> set[str]:
        return {r.spec.fact for r in self.rules.values()} | {
            a.fact for r in self.rules.values() for a in r.spec.alternatives}


def _validate(model: type[BaseModel], data: Any, path: Path, lines: dict[tuple[Any, ...], int], problems: list) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems.extend(pydantic_problems(path, exc, lines, model))
        return None


def load_rules(directory: str | Path | None = None, *, facts: FactCatalogue | None = None) -> RuleSet:
    """Load and validate a rules directory against a fact catalogue (default: the facts monitor/derive.py
    computes). Raises RuleFileError listing every problem with file and line."""
    facts = facts if facts is not None else standard_catalogue()
    root = Path(directory) if directory is not None else DEFAULT_RULES_DIR
    if not root.is_dir():
        raise RuleFileError([(str(root), None, "rules directory not found")])
    problems: list[tuple[str, int | None, str]] = []
    digest = hashlib.sha256()
    files = sorted(p for p in [*root.glob("*.yaml"), *root.glob("tables/*.yaml")] if p.is_file())
    texts: dict[Path, str] = {}
    for p in files:
        raw = p.read_bytes()
        digest.update(str(p.relative_to(root)).encode() + b"\0" + raw + b"\0")
        try:
            texts[p] = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append((str(p), None, f"not UTF-8 text: {exc}"))

    def load(rel: str, model: type[BaseModel]) -> Any:
        p = root / rel
        if p not in texts:
            problems.append((str(p), None, f"required file {rel} is missing"))
            return None
        try:
            data, lines = load_yaml(p, texts[p])
        except RuleFileError as exc:
            problems.extend(exc.problems)
            return None
        return _validate(model, data, p, lines, problems)

    parameters = load("parameters.yaml", Parameters)
    cyp = load("tables/cyp450.yaml", CypTable)
    immuno = load("tables/immunosuppressants.yaml", ImmunosuppressantTable)
    live = load("tables/live_vaccines.yaml", LiveVaccineTable)
    plausibility = load(PLAUSIBILITY_FILE, PlausibilityTable)
    if parameters is not None and plausibility is not None:
        problems.extend(_plausibility_problems(root / PLAUSIBILITY_FILE, texts, parameters, plausibility))

    rules: dict[str, Rule] = {}
    rule_files = [p for p in files if p.parent == root and p.name not in ("parameters.yaml", "kri.yaml")]
    try:  # the site-risk KRIs and QTLs (issue 20) are checked with the rules: a bad one is refused the same way
        from monitor.kri_file import load_kri

        kri = load_kri(root)
    except RuleFileError as exc:
        problems.extend(exc.problems)
        kri = None
    if not rule_files:
        problems.append((str(root), None, "no rule files (*.yaml) found"))
    for p in rule_files:
        if p not in texts:
            continue
        try:
            data, lines = load_yaml(p, texts[p])
        except RuleFileError as exc:
            problems.extend(exc.problems)
            continue
        rf = _validate(RuleFile, data, p, lines, problems)
        if rf is None:
            continue
        for i, spec in enumerate(rf.rules):
            line = lines.get(("rules", i))
            local: list[str] = []
            if spec.id in rules:
                other = rules[spec.id]
                local.append(f"duplicate rule id {spec.id} (first defined at {other.path}:{other.line})")
            definitions: dict[str, dict[str, Any]] = {}
            resolved: dict[int, Any] = {}  # conditions with their {param: ...} replaced by the numbers in force
            variants = [(spec.fact, spec.when, spec.at, spec.message)] + [
                (a.fact, a.when, a.at, a.message) for a in spec.alternatives]
            for n, (fact, when, at, message) in enumerate(variants):
                where = "" if n == 0 else f"alternatives[{n - 1}]: "
                if fact not in facts:
                    local.append(f"{where}unknown derived fact '{fact}'{closest(fact, sorted(facts))}")
                    continue
                fields = facts[fact].fields
                if at not in fields or fields[at] is not str:
                    local.append(f"{where}'at: {at}' is not a time field of fact '{fact}'{closest(at, list(fields))}")
                if isinstance(spec.severity, SeverityMap) and spec.severity.field not in fields:
                    local.append(f"{where}severity field '{spec.severity.field}' is not a field of '{fact}'")
                cond_problems: list[str] = []
                if parameters is not None:
                    when = resolve_params(when, parameters, cond_problems)
                    resolved[n] = when
                expr = {} if cond_problems else compile_condition(when, facts[fact], cond_problems)
                local.extend(f"{where}when: {m}" for m in cond_problems)
                try:
                    message.format_map(_FormatProbe(fields))
                except (KeyError, ValueError, IndexError, AttributeError) as exc:
                    local.append(f"{where}message: cannot be filled from fact '{fact}' ({exc})")
                definitions[spec.id if n == 0 else f"{spec.id}~{n}"] = {
                    "all": [{"m": {"$and": [{"fact": fact}, expr]}}],
                    "pri": spec.priority,
                    "run": spec.id,
                }
            if local:
                problems.extend((str(p), _problem_line(lines, i, m, line), m) for m in local)
                continue
            if resolved:
                spec = spec.model_copy(update={
                    "when": resolved.get(0, spec.when),
                    "alternatives": [a.model_copy(update={"when": resolved.get(k + 1, a.when)})
                                     for k, a in enumerate(spec.alternatives)]})
            rules[spec.id] = Rule(spec, spec.category or rf.category, str(p), line, definitions)
    if problems:
        raise RuleFileError(problems)
    return RuleSet(
        directory=root,
        version=digest.hexdigest()[:12],
        parameters=parameters,
        tables=Tables(cyp450=cyp, immunosuppressants=immuno, live_vaccines=live, plausibility=plausibility),
        rules=rules,
        files=tuple(str(p.relative_to(root)) for p in files),
        kri=kri,
        facts=facts,
    )


PLAUSIBILITY_FILE = "tables/plausibility.yaml"


def _plausibility_problems(path: Path, texts: dict[Path, str], params: Parameters,
                           table: PlausibilityTable) -> list[tuple[str, int | None, str]]:
    """Cross-file checks: every analyte the monitor identifies has a range, in the unit its conversions lead to
    (otherwise a new analyte would be checked against nothing, or against a range in another unit)."""
    _, lines = load_yaml(path, texts[path])
    targets = {"ANC": params.units.anc_to_10e9_per_l, "creatinine": params.units.creatinine_to_mg_dl,
               **params.units.lab_conversions}
    out: list[tuple[str, int | None, str]] = []
    for analyte in params.lab_analytes:
        if analyte not in table.labs:
            out.append((str(path), line_for(lines, ("labs",)),
                        f"labs: analyte '{analyte}' (parameters.yaml lab_analytes) has no plausible range"))
    for analyte, entry in table.labs.items():
        factors = targets.get(analyte)
        if factors is None:
            continue
        base = sorted(unit for unit, factor in factors.items() if factor == 1)
        if entry.unit not in base:
            out.append((str(path), line_for(lines, ("labs", analyte, "unit")),
                        f"labs.{analyte}.unit: '{entry.unit}' is not a unit parameters.yaml converts {analyte} to "
                        f"(factor 1: {', '.join(base) or 'none'})"))
    return out


def _problem_line(lines: dict[tuple[Any, ...], int], i: int, message: str, default: int | None) -> int | None:
    """The line a rule problem points at: the alternative's `when:`, the rule's `when:`, or the rule itself."""
    if message.startswith("alternatives["):
        n = int(message[len("alternatives["):message.index("]")])
        return lines.get(("rules", i, "alternatives", n, "when"), lines.get(("rules", i, "alternatives", n), default))
    if "when:" in message:
        return lines.get(("rules", i, "when"), default)
    return default


class _FormatProbe(dict):
    """Checks a message template against a fact's fields without real values."""

    def __init__(self, fields: dict[str, type]) -> None:
        super().__init__()
        self._fields = fields

    def __missing__(self, key: str) -> Any:
        if key not in self._fields:
            raise KeyError(f"unknown field {key!r}{closest(key, list(self._fields))}")
        return {float: 1.0, str: "x", bool: True}[self._fields[key]]


class SafeFormat(dict):
    """Fills a message template from a fact; a missing value prints as '?' instead of failing."""

    def __missing__(self, key: str) -> Any:
        return _Unknown()


class _Unknown:
    def __format__(self, spec: str) -> str:
        return "?"

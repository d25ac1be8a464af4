"""The catalogue of derived facts: the named quantities the monitor computes and rule files test.

A rule file names one fact type (`fact:`) and compares its fields with constants. The engine never computes
anything across events (ENGINE_NOTES, upstream #381): hours since T0, corrected temperatures, eGFR, dosing-day
totals and fever status at Hx are computed here, in Python, from the subject's validated events.

Every fact has `at` (ISO-8601 event time, the alert's `at` by default). Time fields are ISO-8601 strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FactType:
    name: str
    doc: str
    fields: dict[str, type]


def _fact(name: str, doc: str, **fields: type) -> FactType:
    return FactType(name, doc, {"at": str, **fields})


class FactCatalogue(Mapping[str, FactType]):
    """The fact types a rule file may name, by name. Passed in (to `load_rules`, the schema writer, the catalogue)
    rather than read from a module global, so a test or a future protocol can bring its own."""

    def __init__(self, types: Iterable[FactType]) -> None:
        self._types = {t.name: t for t in types}

    def __getitem__(self, name: str) -> FactType:
        return self._types[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._types)

    def __len__(self) -> int:
        return len(self._types)


def standard_catalogue() -> FactCatalogue:
    """The facts monitor/derive.py computes (one entry per derivation output)."""
    return FactCatalogue(_STANDARD)


_STANDARD: tuple[FactType, ...] = (
        _fact(
            "baseline_lab",
            "The most recent valid pre-T0 value of an eligibility analyte (A-10); at = enrollment.",
            analyte=str, value=float, unit=str, specimen_at=str, hours_before_reference=float,
            egfr_method_validated=bool,
        ),
        _fact(
            "medication_exposure",
            "One drug administration or concomitant medication, classified against the reference tables.",
            drug=str, atc=str, route=str, source=str, phase=str, systemic=bool,
            cyp_listed=bool, cyp_role=str, cyp_strength=str, cyp_recent=bool,
            systemic_steroid=bool, biologic=bool, in_kd_episode=bool,
            immunosuppressant=bool, washout_hours=float, washout_remaining_hours=float,
            in_restricted_period=bool, start_at=str, last_dose_at=str, enrollment_at=str, on_treatment_at=str,
            antipyretic=bool, aspirin=bool, regimen=str, mg_per_kg_per_day=float, active_in_restricted=bool,
            rescue=bool, before_verdict=bool, for_sae=bool, other_arm_study_drug=bool, arm=str,
        ),
        _fact(
            "vaccination",
            "An immunisation with its live status; phase before_t0 (within_lookback: dated after enrollment date "
            "- 1 calendar month and given before T0, even after the enrollment instant, A-23.9) or on_treatment "
            "(in_treatment_period: T0 to the end of dosing day 14, anakinra arm).",
            vaccine=str, atc=str, live=bool, phase=str, within_lookback=bool, in_treatment_period=bool,
            vaccine_date=str, enrollment_at=str, arm=str,
        ),
        _fact(
            "enrollment_profile",
            "Baseline facts at enrollment: age in completed calendar months on the site-local enrollment date, "
            "baseline weight, consent timing and the KD criteria (AHA 2017 complete / incomplete, parameters in "
            "kd_criteria); at = enrollment.",
            age_months=float, weight_known=bool, weight_kg=float, consent_ok=bool, consent_at=str,
            kd_complete=bool, kd_incomplete=bool, kd_signs=float, fever_days=float,
            gestational_age_weeks=float,
        ),
        _fact(
            "exclusion_answer",
            "One exclusion-checklist item of the enrollment record: answer = yes | no | unanswered.",
            item=str, answer=str,
        ),
        _fact(
            "ivig_failure",
            "The IVIG-failure inclusion criterion (A-5): first-course dose, a febrile reading in "
            "[E1 + 48h - tolerance, T0], and the time from E1 to T0; at = enrollment.",
            first_course_g_per_kg=float, febrile_after_e1=bool, hours_e1_to_t0=float, e1_at=str,
        ),
        _fact(
            "ivig_course",
            "An IVIG course (first = initial KD treatment, retreatment = IVIG-arm study drug) with its total g/kg.",
            course=str, g_per_kg=float, arm=str,
        ),
        _fact(
            "treatment_day",
            "Anakinra dosing day d (1..14) once its window has closed: doses attributed to it, and whether "
            "treatment was documented as discontinued before it (serious AE or rescue therapy).",
            day=float, doses=float, discontinued=bool,
        ),
        _fact(
            "treatment_duration",
            "Anakinra course length: kind extra_day (a dose on day >= 15, at that dose) or course_end (at the end "
            "of the day-14 window, with the last dosing day).",
            kind=str, last_dose_day=float, discontinued=bool,
        ),
        _fact(
            "echo",
            "An echocardiogram: worst coronary Z, its category (§7.5), the change from the worst prior category, "
            "its study day and whether it lies in the D45 window.",
            worst_z=float, category=float, category_increase=float, study_day=float, in_d45_window=bool,
            post_t0=bool, visit=str,
        ),
        _fact(
            "visit_window",
            "A protocol visit window (A-17) once it has closed: whether the visit happened in it.",
            visit=str, done=bool, missing_assessments=str, window_first_day=str, window_last_day=str,
        ),
        _fact(
            "assessment_window",
            "A CRP or D45 echo window once closed, for a visit that happened: how many assessments fell in it.",
            window=str, assessment=str, visit_done=bool, count=float,
        ),
        _fact(
            "adverse_event",
            "An adverse event (term and MedDRA PT lower-cased), seriousness, and for serious ones how long after "
            "investigator awareness it was recorded.",
            term=str, meddra_pt=str, serious=bool, seriousness=str, infection_type=str, report_delay_hours=float,
            report_due_at=str, on_treatment=bool,
        ),
        _fact(
            "lab_signal",
            "The first value of a post-T0 safety lab episode (A-20, thresholds in parameters.safety): signal = "
            "neutropenia | hepatitis | mas; grade = major | critical.",
            signal=str, analyte=str, value=float, grade=str, ratio_uln=float, ratio_baseline=float,
            criteria_met=float,
        ),
        _fact(
            "anakinra_dose",
            "One anakinra administration in the anakinra arm with its dosing day and the running day total "
            "before and after it (mg/kg); fever_status is what justifies an escalation on that day.",
            dosing_day=float, dose_mg_per_kg=float, day_total_before=float, day_total_after=float,
            base_level=float, ratio_before=float, ratio_after=float, first_dose=bool, fever_status=str,
            hours_since_t0=float, weight_kg=float,
        ),
        _fact(
            "ladder_step",
            "A ladder step's escalation decision (parameters.yaml ladder_steps: H12, H24), once its deadline "
            "(Hx + 3 h) has passed: fever at Hx, what was given (a supplement in the window, or the step's "
            "dosing-day total by Hx + 3 h), what the step requires (`required_mg_per_kg`, from the previous day's "
            "level for a day-total step) and `given_ratio` = given / required.",
            step=str, febrile=bool, assessed_c=float, assessed_at=str, given_mg_per_kg=float,
            doses_in_window=float, weight_known=bool, level_day1=float, previous_level=float,
            required_mg_per_kg=float, given_ratio=float, window_start=str, window_end=str,
        ),
        _fact(
            "fever_assessment",
            "A required temperature-assessment window once it has closed: H12/H24 ([Hx-2h, Hx+1h]) and "
            "ENDPOINT ([A+36h, A+48h]) with the number of valid readings in it.",
            window=str, readings=float, afebrile_readings_before=float, window_start=str, window_end=str,
        ),
        _fact(
            "primary_endpoint",
            "The 48-hour primary-endpoint verdict for an anchor (T0, or LASTESC = the last initial-ladder "
            "escalation), once A + 48 h has passed.",
            anchor=str, anchor_at=str, afebrile_readings=float, late_window_readings=float,
        ),
        _fact(
            "fever_recurrence",
            "A febrile reading after T0 that follows an afebrile stretch; afebrile_hours is the time since the "
            "previous febrile reading.",
            afebrile_hours=float, study_day=float, corrected_c=float,
        ),
        _fact(
            "temperature_quality",
            "A temperature reading excluded from decisions: problem = unit_suspect | nonprotocol_site | "
            "unit_unrecognized.",
            problem=str, value=float, unit=str, site=str,
        ),
        _fact(
            "unit_quality",
            "A lab or body-measure value whose unit is not in the normalisation tables (value not used).",
            analyte=str, unit=str, value=float,
        ),
        _fact(
            "weight_status",
            "Whether a weight exists at enrollment from any source (enrollment, observation, dose record).",
            weight_known=bool, weight_kg=float, weight_source=str,
        ),
)


@dataclass
class Fact:
    """One derived fact instance. `key` is its identity within the subject; `evidence` stays outside the engine."""

    name: str
    key: str
    values: dict[str, Any]
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def fact_id(self) -> str:
        cached = self.__dict__.get("_fact_id")
        if cached is None:
            cached = self.__dict__["_fact_id"] = f"{self.name}:{self.key}"
        return cached

    def message(self) -> dict[str, Any]:
        """The engine's view: scalar fields only, None dropped (a missing field simply matches nothing).
        Built once per fact (facts are reused while their inputs do not change)."""
        cached = self.__dict__.get("_message")
        if cached is None:
            cached = {"fact": self.name}
            for k, v in self.values.items():
                if v is not None:
                    cached[k] = v
            self.__dict__["_message"] = cached
        return cached

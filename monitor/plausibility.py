"""Plausibility: refuse a well-formed record whose number no child could have (issue 13).

Parsing (`monitor.events`) checks that a number is a finite number; it does not know the protocol. A weight of
1e308 kg or a dose of -1 mg/kg is well formed, and used to flow into the derived facts, where it produced nonsense
or an exception inside the rules engine. The ranges are data (`rules/tables/plausibility.yaml`), so a rule author
reads and changes them like any threshold; this module only applies them.

`Monitor.admit` calls `Plausibility.check` first, right after `parse_event`, in replay and in the service, so a
refused record goes to the dead letters with its original bytes (reason `implausible`) and never reaches a subject's
history. A reload of the rules builds a new Monitor, hence a new checker with the new ranges.

What is NOT refused, on purpose:
* a real but ineligible value (a 4 kg child): the eligibility rules must see it;
* a value a data-quality rule reports: a temperature outside 30-44 °C (DQ-TEMP-UNIT-SUSPECT) or a value in a unit
  the parameters do not list (DQ-UNIT-UNRECOGNIZED) is checked only against the wide `temperature_*` and
  `unrecognized_unit` ranges, which exist to keep absurd numbers out, not to judge the measurement.

The conversions mirror `monitor.derive` (the same parameters, the same unit folding), so a value is judged in the
unit the rules use: a weight in g or [lb_av] is checked in kg, an ANC in /uL in 10^9/L.
"""

from __future__ import annotations

import math
from typing import Any

from monitor import normalise as nm
from monitor.derive import analyte_lookup
from monitor.errors import EventRejected
from monitor.events import (
    ConcomitantMedication,
    DrugAdministration,
    Echocardiogram,
    Enrollment,
    LabResult,
    AdverseEvent,
    Visit,
    VitalSign,
)
from monitor.rules import PLAUSIBILITY_FILE, LabRange, Parameters, PlausibilityTable, PlausibleRange, RuleSet


def _num(value: float) -> str:
    """A number as a person reads it, exact enough to find in the record: 1e+308, 0.3, 250, 37.5."""
    return format(value, ".10g")


class Plausibility:
    """Applies the plausibility table to validated events. Built from the rules in force (`from_rules`); holds no
    state between events, so one instance serves every subject."""

    def __init__(self, *, table: PlausibilityTable, params: Parameters, source: str = PLAUSIBILITY_FILE) -> None:
        self.table = table
        self.params = params
        self.source = f"rules/{source}" if not source.startswith("rules/") else source
        self._analytes = analyte_lookup(params)
        units = params.units
        self._lab_factors: dict[str, dict[str, float]] = {
            **units.lab_conversions, "ANC": units.anc_to_10e9_per_l, "creatinine": units.creatinine_to_mg_dl}
        self._temperature_codes = set(params.temperature.codes)
        self._weight_codes = set(params.weight_codes)
        self._height_codes = set(params.height_codes)

    @classmethod
    def from_rules(cls, rules: RuleSet) -> "Plausibility":
        return cls(table=rules.tables.plausibility, params=rules.parameters)

    # ---- the check ----------------------------------------------------------------------------------------
    def check(self, event: Any) -> None:
        """Raise EventRejected('implausible', detail) if a number is outside its range. The detail names the event
        type and, for the first three such numbers, the field, the value (and its conversion) and the range with
        its file and entry; never the subject."""
        problems = self.problems(event)
        if problems:
            raise EventRejected("implausible", f"{event.type} event: " + "; ".join(problems[:3]),
                                event_id=event.event_id)

    def problems(self, event: Any) -> list[str]:
        """Every implausible value of an event, in words (empty if the event is plausible)."""
        return [found for found in self._problems(event) if found is not None]

    def _problems(self, e: Any) -> Any:
        t = self.table
        if isinstance(e, Enrollment):
            yield self._within("weight_kg", e.weight_kg, t.weight_kg)
            yield self._within("height_cm", e.height_cm, t.height_cm)
            yield self._within("gestational_age_at_birth_weeks", e.gestational_age_at_birth_weeks,
                               t.gestational_age_weeks)
            kd = e.kd_diagnosis
            if kd is not None:
                yield self._within("kd_diagnosis.crp_mg_dl", kd.crp_mg_dl, t.kd_crp_mg_dl)
                yield self._within("kd_diagnosis.esr_mm_h", kd.esr_mm_h, t.kd_esr_mm_h)
                yield self._within("kd_diagnosis.fever_days_at_first_ivig", kd.fever_days_at_first_ivig,
                                   t.kd_fever_days)
                yield self._within("kd_diagnosis.signs_present_by_fever_day", kd.signs_present_by_fever_day,
                                   t.kd_fever_days)
        elif isinstance(e, VitalSign):
            yield from self._vital(e)
        elif isinstance(e, LabResult):
            yield from self._lab(e)
        elif isinstance(e, (DrugAdministration, ConcomitantMedication)):
            if isinstance(e, DrugAdministration):  # the weight first: every mg/kg of the record depends on it
                yield self._within("weight_kg", e.weight_kg, t.weight_kg)
            yield self._within("dose_mg", e.dose_mg, t.dose_mg)
            yield self._within("dose_mg_per_kg", e.dose_mg_per_kg, t.dose_mg_per_kg)
            yield self._within("dose_g", e.dose_g, t.dose_g)
            yield self._within("dose_g_per_kg", e.dose_g_per_kg, t.dose_g_per_kg)
            if isinstance(e, ConcomitantMedication):
                yield self._within("dose_mg_per_kg_per_day", e.dose_mg_per_kg_per_day, t.dose_mg_per_kg_per_day)
                yield self._within("dose_iu", e.dose_iu, t.dose_iu)
        elif isinstance(e, AdverseEvent):
            yield self._within("grade", e.grade, t.ae_grade)
        elif isinstance(e, Visit):
            yield self._within("nominal_day", e.nominal_day, t.visit_nominal_day)
            yield self._within("physician_activity_score", e.physician_activity_score, t.activity_score)
            yield self._within("parent_activity_score", e.parent_activity_score, t.activity_score)
        elif isinstance(e, Echocardiogram):
            yield self._within("worst_z", e.worst_z, t.coronary_z)
            for artery, z in sorted(e.coronary_z_scores.items()):
                yield self._within(f"coronary_z_scores.{artery}", z, t.coronary_z)

    # ---- vital signs: temperature, weight, height, anything else -------------------------------------------
    def _vital(self, e: VitalSign) -> Any:
        t = self.table
        analyte = (e.analyte or "").lower()
        code = e.code or ""
        is_temperature = e.temperature_c is not None or code in self._temperature_codes or analyte in (
            "temperature", "body_temperature")
        if e.temperature_c is not None:
            yield self._within("temperature_c", e.temperature_c, t.temperature_cel)
        used_value = False
        if e.value is not None:
            if is_temperature and e.temperature_c is None:  # normalise.temperature reads value + unit
                used_value = True
                key = nm.unit_key(e.unit)
                if key in nm.CELSIUS_UNITS:
                    yield self._within("value", e.value, t.temperature_cel, unit=e.unit)
                elif key in nm.FAHRENHEIT_UNITS:
                    yield self._within("value", e.value, t.temperature_degf, unit=e.unit)
                else:
                    yield self._within("value", e.value, t.unrecognized_unit, unit=e.unit, unrecognized=True)
            for codes, name, factors, entry in (
                    (self._weight_codes, "body_weight", self.params.units.weight_to_kg, t.weight_kg),
                    (self._height_codes, "body_height", self.params.units.height_to_cm, t.height_cm)):
                if code in codes or analyte == name:
                    used_value = True
                    yield self._converted("value", e.value, e.unit, factors, entry)
            if not used_value:
                yield self._within("value", e.value, t.other_vital_value, unit=e.unit)

    # ---- labs -----------------------------------------------------------------------------------------------
    def _lab(self, e: LabResult) -> Any:
        t = self.table
        analyte = self._analytes.get(e.loinc or "") or self._analytes.get(e.analyte.strip().lower())
        entry = t.labs.get(analyte) if analyte is not None else None
        factors = self._lab_factors.get(analyte) if analyte is not None else None
        ref = e.reference_range
        if entry is None or factors is None:
            yield self._within("value", e.value, t.other_lab_value, unit=e.unit)
            if ref is not None:
                yield self._within("reference_range.low", ref.low, t.other_lab_value, unit=ref.unit or e.unit)
                yield self._within("reference_range.high", ref.high, t.other_lab_value, unit=ref.unit or e.unit)
            return
        yield self._converted("value", e.value, e.unit, factors, entry, analyte=analyte)
        if ref is None:
            return
        unit = ref.unit if ref.unit is not None else e.unit
        yield self._converted("reference_range.low", ref.low, unit, factors, entry, analyte=analyte)
        yield self._converted("reference_range.high", ref.high, unit, factors, entry, analyte=analyte)
        if isinstance(entry, LabRange) and entry.reference_high is not None and ref.high is not None:
            high = nm.convert(ref.high, unit, factors)
            if high is not None:
                bounds = PlausibleRange(range=entry.reference_high, unit=entry.unit, why=entry.why)
                yield self._within("reference_range.high", high, bounds, unit=entry.unit,
                                   sent=(ref.high, unit) if high != ref.high or unit != entry.unit else None,
                                   key=f"labs.{analyte}.reference_high")

    # ---- helpers --------------------------------------------------------------------------------------------
    def _converted(self, field: str, value: float | None, unit: str | None, factors: dict[str, float],
                   entry: PlausibleRange, *, analyte: str | None = None) -> str | None:
        """Judge a value in the unit the rules use; an unlisted unit (DQ-UNIT-UNRECOGNIZED) only against the wide
        `unrecognized_unit` range."""
        if value is None:
            return None
        converted = nm.convert(value, unit, factors)
        if converted is None:
            return self._within(field, value, self.table.unrecognized_unit, unit=unit, unrecognized=True)
        sent = (value, unit) if converted != value or nm.unit_key(unit) != nm.unit_key(entry.unit) else None
        key = f"labs.{analyte}" if analyte is not None else None
        return self._within(field, converted, entry, unit=entry.unit, sent=sent, key=key)

    def _within(self, field: str, value: float | int | None, entry: PlausibleRange, *, unit: str | None = None,
                sent: tuple[float, str | None] | None = None, unrecognized: bool = False,
                key: str | None = None) -> str | None:
        """None if `value` is absent or inside the range (bounds included), else the sentence for the detail.
        Python ints are unbounded: a 400-digit grade is compared without converting it to float."""
        if value is None:
            return None
        low, high = entry.range
        if isinstance(value, float) and not math.isfinite(value):
            inside = False  # events refuse these already; this keeps the checker safe on its own
        else:
            inside = low <= value <= high
        if inside:
            return None
        shown_unit = unit if unit is not None else entry.unit
        if sent is not None:
            what = f"{_num(sent[0])} {sent[1] or '(no unit)'} ({_num(value)} {shown_unit})"
        else:
            what = _num(value) if isinstance(value, float) else str(value) if abs(value) < 10**20 else (
                f"an integer of {len(str(abs(value)))} digits")
            if unit is not None and unit != entry.unit:
                what += f" {unit or '(no unit)'}"
        name = key or _entry_name(self.table, entry)
        where = f"{self.source}, {name}" if name else self.source
        note = " (a unit the parameters do not list: only absurd numbers are refused)" if unrecognized else ""
        in_unit = "in any unit" if entry.unit == "any" else entry.unit
        return (f"{field} = {what} is outside the plausible range [{_num(low)}, {_num(high)}] "
                f"{in_unit}{note} ({where})")


def _entry_name(table: PlausibilityTable, entry: PlausibleRange) -> str:
    """The key of an entry in the table, so the detail says which line to look at."""
    for name in type(table).model_fields:
        if getattr(table, name) is entry:
            return name
    for analyte, lab in table.labs.items():
        if lab is entry:
            return f"labs.{analyte}"
    return ""

"""Derived facts: from one subject's validated events to the named facts the rule files test.

This is where the protocol's time anchors (T0, Hx, dosing days, study days) and the normalised values are
computed (RULES_SPEC §2). It holds no thresholds of its own: windows and conversion factors come from
`Parameters`, drug classes from the reference tables, and the verdicts (ANC < 1.5, total > 8.8 ...) are the rule
files' business. Each derivation is a pure function of the subject's history and the deadline cut-off, so late
and amended data simply change the facts, and the alerts follow.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable
from zoneinfo import ZoneInfo

from monitor import normalise as nm
from monitor.events import ConcomitantMedication, DrugAdministration, Enrollment, LabResult, VitalSign
from monitor.facts import Fact
from monitor.rules import Parameters, Tables

H = dt.timedelta(hours=1)


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def _r(x: float | None, nd: int = 6) -> float | None:
    return round(x, nd) if x is not None else None


@dataclass(frozen=True)
class Reading:
    """A temperature reading usable in decisions."""

    event_id: str
    at: dt.datetime
    corrected_c: float
    raw_c: float
    site: str


@dataclass(frozen=True)
class Dose:
    event_id: str
    at: dt.datetime
    mg_per_kg: float | None
    weight_kg: float | None
    raw: dict[str, Any]


class SubjectView:
    """Read-only, lazily computed view of one subject's history for one evaluation."""

    def __init__(self, *, subject_id: str, site_id: str, arm: str | None, events: dict[str, list[Any]],
                 params: Parameters, tables: Tables) -> None:
        self.subject_id = subject_id
        self.site_id = site_id
        self.arm = arm
        self.ev = events
        self.p = params
        self.t = tables

    # ---- anchors ------------------------------------------------------------------------------------------
    @cached_property
    def zone(self) -> ZoneInfo:
        tz = self.p.site_timezones.get(self.site_id) or self.p.site_timezones.get("default", "UTC")
        return ZoneInfo(tz)

    @cached_property
    def enrollment(self) -> Enrollment | None:
        items = self.ev.get("enrollment", [])
        return items[-1] if items else None

    def is_anakinra(self, e: DrugAdministration | ConcomitantMedication) -> bool:
        return (e.atc or "") in self.p.anakinra_atc or "anakinra" in e.drug.lower() or "kineret" in e.drug.lower()

    def is_ivig(self, e: DrugAdministration | ConcomitantMedication) -> bool:
        name = e.drug.lower()
        return (e.atc or "") in self.p.ivig_atc or "ivig" in name or "immunoglobulin" in name

    @cached_property
    def t0_event(self) -> DrugAdministration | None:
        """First study-drug administration (§2.1): anakinra (study_drug) or the start of the IVIG retreatment."""
        for e in self.ev.get("drug_administration", []):
            if self.arm == "anakinra" and self.is_anakinra(e) and e.study_drug:
                return e
            if self.arm == "ivig" and self.is_ivig(e) and (e.purpose or "") == "study_treatment_retreatment":
                return e
        return None

    @cached_property
    def t0(self) -> dt.datetime | None:
        return self.t0_event.occurred_at if self.t0_event is not None else None

    @property
    def t0_id(self) -> str:
        return self.t0_event.event_id if self.t0_event is not None else ""

    @cached_property
    def reference_time(self) -> dt.datetime | None:
        """The cut-off for pre-treatment data (A-10): T0, else enrollment + the configured allowance."""
        if self.t0 is not None:
            return self.t0
        if self.enrollment is not None:
            return self.enrollment.occurred_at + self.p.eligibility_lab_after_enrollment_hours * H
        return None

    # ---- temperatures ---------------------------------------------------------------------------------------
    def is_temperature(self, e: VitalSign) -> bool:
        return e.temperature_c is not None or (e.code or "") in self.p.temperature.codes or (
            (e.analyte or "").lower() in ("temperature", "body_temperature")
        )

    @cached_property
    def temperatures(self) -> list[tuple[VitalSign, nm.Temperature]]:
        tp = self.p.temperature
        out = []
        for e in self.ev.get("vital_sign", []):
            if not self.is_temperature(e):
                continue
            out.append((e, nm.temperature(temperature_c=e.temperature_c, value=e.value, unit=e.unit, site=e.site,
                                          site_offsets_c=tp.site_offsets_c, plausible_c=tp.plausible_c)))
        return out

    @cached_property
    def readings(self) -> list[Reading]:
        return [Reading(e.event_id, e.occurred_at, t.corrected_c, t.celsius, t.site)  # type: ignore[arg-type]
                for e, t in self.temperatures if t.valid]

    def febrile(self, r: Reading) -> bool:
        return nm.is_febrile(r.corrected_c, self.p.temperature.febrile_at_or_above_c)

    def readings_in(self, start: dt.datetime, end: dt.datetime, *, open_start: bool = False) -> list[Reading]:
        return [r for r in self.readings if (start < r.at if open_start else start <= r.at) and r.at <= end]

    def assessment_at(self, hx: dt.datetime) -> Reading | None:
        """febrile_at(Hx) (A-18): the valid reading closest to Hx in [Hx-2h, Hx+1h]; a tie takes the higher value."""
        lo, hi = self.p.assessment_window_hours
        cands = self.readings_in(hx + lo * H, hx + hi * H)
        if not cands:
            return None
        return min(cands, key=lambda r: (abs((r.at - hx).total_seconds()), -r.corrected_c, r.event_id))

    # ---- weight and doses -----------------------------------------------------------------------------------
    @cached_property
    def weight_observations(self) -> list[tuple[dt.datetime, float, str]]:
        out = []
        for e in self.ev.get("vital_sign", []):
            if (e.code or "") in self.p.weight_codes or (e.analyte or "").lower() == "body_weight":
                kg = nm.convert(e.value, e.unit, self.p.units.weight_to_kg) if e.value is not None else None
                if kg is not None and kg > 0:
                    out.append((e.occurred_at, kg, e.event_id))
        return out

    def weight_at(self, at: dt.datetime, own: float | None = None) -> tuple[float | None, str]:
        """Weight for mg/kg (A-22): the record's own, else the latest observation at or before, else enrollment."""
        if own is not None and own > 0:
            return own, "dose record"
        best = None
        for t, kg, eid in self.weight_observations:
            if t <= at:
                best = (kg, f"observation {eid}")
        if best:
            return best
        if self.enrollment is not None and self.enrollment.weight_kg:
            return self.enrollment.weight_kg, "enrollment"
        return None, "none"

    def dose_mg_per_kg(self, e: DrugAdministration) -> Dose:
        weight, _ = self.weight_at(e.occurred_at, e.weight_kg)
        mgkg = e.dose_mg_per_kg
        if mgkg is None and e.dose_mg is not None and weight:
            mgkg = e.dose_mg / weight
        return Dose(e.event_id, e.occurred_at, _r(mgkg), weight, {"dose_mg": e.dose_mg, "dose_mg_per_kg": e.dose_mg_per_kg})

    @cached_property
    def anakinra_doses(self) -> list[Dose]:
        """Anakinra given in the anakinra arm from the start of dosing day 1."""
        if self.arm != "anakinra" or self.t0 is None:
            return []
        start = self.t0 - self.p.dosing_day_early_hours * H
        return [self.dose_mg_per_kg(e) for e in self.ev.get("drug_administration", [])
                if self.is_anakinra(e) and e.occurred_at >= start]

    def dosing_day(self, at: dt.datetime) -> int:
        assert self.t0 is not None
        return nm.dosing_day(self.t0, at, offset_hours=self.p.dosing_day_early_hours)

    @cached_property
    def day_levels(self) -> dict[int, float | None]:
        """Total mg/kg per dosing day; None when any dose of the day has no mg/kg (weight unknown)."""
        levels: dict[int, float | None] = {}
        for d in self.anakinra_doses:
            day = self.dosing_day(d.at)
            cur = levels.get(day, 0.0)
            levels[day] = None if (cur is None or d.mg_per_kg is None) else _r(cur + d.mg_per_kg)
        return levels

    def hx(self, hours: float) -> dt.datetime:
        assert self.t0 is not None
        return self.t0 + hours * H

    # ---- labs -----------------------------------------------------------------------------------------------
    def analyte_of(self, e: LabResult) -> str | None:
        name, code = e.analyte.strip().lower(), (e.loinc or "")
        for analyte, ids in self.p.lab_analytes.items():
            if code in ids or name in (i.lower() for i in ids) or name == analyte.lower():
                return analyte
        return None


@dataclass
class Derived:
    facts: list[Fact]
    next_deadline: dt.datetime | None


class Deriver:
    """Computes every derived fact of a subject. `cutoff`: deadlines at or before it are evaluated."""

    def __init__(self, *, params: Parameters, tables: Tables) -> None:
        self.p = params
        self.t = tables

    def derive(self, v: SubjectView, cutoff: dt.datetime | None) -> Derived:
        facts: list[Fact] = []
        pending: list[dt.datetime] = []

        def deadline(at: dt.datetime) -> bool:
            if cutoff is not None and at <= cutoff:
                return True
            pending.append(at)
            return False

        for fn in (self._weight, self._temperature_quality, self._unit_quality, self._baseline_labs,
                   self._medications, self._vaccines, self._anakinra_doses, self._ladder, self._assessments,
                   self._endpoints, self._fever_recurrence):
            facts.extend(fn(v, deadline))
        return Derived(facts, min(pending) if pending else None)

    # ---- data quality ---------------------------------------------------------------------------------------
    def _weight(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        if v.enrollment is None:
            return
        enr = v.enrollment
        weight, source = v.weight_at(enr.occurred_at + self.p.eligibility_lab_after_enrollment_hours * H)
        if weight is None:
            for e in v.ev.get("drug_administration", []):
                if e.weight_kg:
                    weight, source = e.weight_kg, f"dose record {e.event_id}"
                    break
        yield Fact("weight_status", "enrollment",
                   {"at": _iso(enr.occurred_at), "weight_known": weight is not None, "weight_kg": weight,
                    "weight_source": source},
                   {"events": [enr.event_id]})

    def _temperature_quality(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        for e, t in v.temperatures:
            if t.valid:
                continue
            value = e.temperature_c if e.temperature_c is not None else e.value
            yield Fact("temperature_quality", e.event_id,
                       {"at": _iso(e.occurred_at), "problem": t.problem, "value": value, "unit": e.unit or "Cel",
                        "site": t.site or "missing"},
                       {"events": [e.event_id], "celsius": _r(t.celsius, 2)})

    def _unit_quality(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        u = self.p.units
        tables = {"ANC": u.anc_to_10e9_per_l, "creatinine": u.creatinine_to_mg_dl}
        for e in v.ev.get("lab_result", []):
            analyte = v.analyte_of(e)
            if analyte is None:
                continue
            if analyte in tables:
                ok = nm.convert(e.value, e.unit, tables[analyte]) is not None
            elif analyte in u.other_lab_units:
                ok = nm.unit_key(e.unit) in {nm.unit_key(x) for x in u.other_lab_units[analyte]}
            else:
                continue
            if not ok:
                yield Fact("unit_quality", e.event_id,
                           {"at": _iso(e.occurred_at), "analyte": analyte, "unit": e.unit or "(none)", "value": e.value},
                           {"events": [e.event_id]})
        for e in v.ev.get("vital_sign", []):
            is_weight = (e.code or "") in self.p.weight_codes or (e.analyte or "").lower() == "body_weight"
            is_height = (e.code or "") in self.p.height_codes or (e.analyte or "").lower() == "body_height"
            if e.value is None or not (is_weight or is_height):
                continue
            factors = u.weight_to_kg if is_weight else u.height_to_cm
            if nm.convert(e.value, e.unit, factors) is None:
                yield Fact("unit_quality", e.event_id,
                           {"at": _iso(e.occurred_at), "analyte": "body_weight" if is_weight else "body_height",
                            "unit": e.unit or "(none)", "value": e.value},
                           {"events": [e.event_id]})

    # ---- eligibility ----------------------------------------------------------------------------------------
    def _baseline_labs(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        ref, enr = v.reference_time, v.enrollment
        if ref is None or enr is None:
            return
        u = self.p.units
        latest: dict[str, tuple[LabResult, float]] = {}
        for e in v.ev.get("lab_result", []):
            if e.occurred_at > ref:
                continue
            analyte = v.analyte_of(e)
            if analyte == "ANC":
                value = nm.convert(e.value, e.unit, u.anc_to_10e9_per_l)
            elif analyte == "creatinine":
                value = nm.convert(e.value, e.unit, u.creatinine_to_mg_dl)
            elif analyte == "INR":
                value = e.value
            else:
                continue
            if value is not None:
                latest[analyte] = (e, value)  # events are in occurred_at order: the last one wins
        for analyte, (e, value) in sorted(latest.items()):
            base = {"at": _iso(enr.occurred_at), "specimen_at": _iso(e.occurred_at),
                    "hours_before_reference": _r(nm.hours_between(e.occurred_at, ref), 3)}
            evidence: dict[str, Any] = {"events": [e.event_id], "raw_value": e.value, "raw_unit": e.unit}
            if analyte == "creatinine":
                height, hsource = self._height(v, ref)
                if height is None:
                    continue
                egfr = nm.schwartz_egfr(height_cm=height, creatinine_mg_dl=value, k=self.p.schwartz_k)
                if egfr is None:
                    continue
                age_months = nm.completed_months(enr.birth_date, nm.local_date(enr.occurred_at, v.zone))
                evidence.update(creatinine_mg_dl=_r(value, 4), height_cm=height, height_source=hsource)
                yield Fact("baseline_lab", "eGFR",
                           {**base, "analyte": "eGFR", "value": _r(egfr, 2), "unit": "mL/min/1.73m2",
                            "egfr_method_validated": age_months >= 12}, evidence)
            else:
                unit = "10^9/L" if analyte == "ANC" else "{INR}"
                yield Fact("baseline_lab", analyte, {**base, "analyte": analyte, "value": _r(value, 4), "unit": unit},
                           evidence)

    def _height(self, v: SubjectView, ref: dt.datetime) -> tuple[float | None, str]:
        if v.enrollment is not None and v.enrollment.height_cm:
            return v.enrollment.height_cm, "enrollment"
        best: tuple[float | None, str] = (None, "none")
        for e in v.ev.get("vital_sign", []):
            if ((e.code or "") in self.p.height_codes or (e.analyte or "").lower() == "body_height") and e.occurred_at <= ref:
                cm = nm.convert(e.value, e.unit, self.p.units.height_to_cm) if e.value is not None else None
                if cm:
                    best = (cm, f"observation {e.event_id}")
        return best

    def _classify_drug(self, drug: str, atc: str | None) -> dict[str, Any]:
        name, code = drug.strip().lower(), (atc or "").strip().upper()

        def hit(names: list[str], codes: list[str], main: str) -> bool:
            if code and any(code == c.upper() or (c.endswith("*") and code.startswith(c[:-1].upper())) for c in codes):
                return True
            return any(n.lower() == name or n.lower() in name.split() or name.startswith(n.lower())
                       for n in [main, *names])

        out: dict[str, Any] = {"cyp": None, "immuno": None}
        cyp = self.t.cyp450
        if not any(code.startswith(p.upper()) for p in cyp.excluded_atc_prefixes if code):
            for entry in cyp.interactors:
                if hit(entry.names, entry.atc, entry.drug):
                    out["cyp"] = entry
                    break
        for entry in self.t.immunosuppressants.drugs:
            if hit(entry.names, entry.atc, entry.drug):
                out["immuno"] = entry
                break
        out["steroid"] = any(code.startswith(p.upper()) for p in self.p.systemic_steroid_atc_prefixes) if code else False
        out["biologic"] = any(code.startswith(p.upper()) for p in self.p.biologic_atc_prefixes) if code else False
        return out

    def _medications(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        enr, t0 = v.enrollment, v.t0
        ref_enr = enr.occurred_at if enr is not None else None
        onset = enr.kd_diagnosis.fever_onset_date if enr is not None and enr.kd_diagnosis else None
        restricted_end = self._restricted_end(v)
        routes = {r.lower() for r in self.p.systemic_routes}
        items: list[tuple[Any, dt.datetime, dt.datetime | None, str]] = []
        for e in v.ev.get("drug_administration", []):
            if e.study_drug or self.is_study_drug(v, e):
                continue
            items.append((e, e.occurred_at, e.infusion_end_at or e.occurred_at, "drug_administration"))
        for e in v.ev.get("concomitant_medication", []):
            items.append((e, e.start_at or e.occurred_at, e.end_at, "concomitant_medication"))
        for e, start, last, source in items:
            cls = self._classify_drug(e.drug, e.atc)
            systemic = (e.route or "").strip().lower() in routes
            before_t0 = t0 is None or start < t0
            phase = "before_t0" if before_t0 else "on_treatment"
            values: dict[str, Any] = {
                "drug": e.drug, "atc": e.atc or "", "route": e.route or "", "source": source, "phase": phase,
                "systemic": systemic, "start_at": _iso(start), "last_dose_at": _iso(last),
                "systemic_steroid": bool(cls["steroid"]) and systemic, "biologic": bool(cls["biologic"]),
                "cyp_listed": cls["cyp"] is not None, "immunosuppressant": cls["immuno"] is not None,
            }
            evidence: dict[str, Any] = {"events": [e.event_id]}
            if cls["cyp"] is not None:
                entry = cls["cyp"]
                values.update(cyp_role=entry.role, cyp_strength=entry.strength)
                evidence["cyp_table"] = {"drug": entry.drug, "enzymes": entry.enzymes, "strength": entry.strength,
                                         "lookback_days": entry.lookback_days, "version": self.t.cyp450.version_date}
                if ref_enr is not None and before_t0:
                    ongoing = last is None or last >= ref_enr
                    values["cyp_recent"] = ongoing or (ref_enr - last) <= dt.timedelta(days=entry.lookback_days)
            if before_t0:
                values["at"] = _iso(ref_enr) if ref_enr is not None else None
                if onset is not None:
                    values["in_kd_episode"] = nm.local_date(start, v.zone) >= onset or (
                        last is not None and nm.local_date(last, v.zone) >= onset)
                if cls["immuno"] is not None and t0 is not None:
                    entry = cls["immuno"]
                    washout = max(self.t.immunosuppressants.washout_half_lives * entry.half_life_hours,
                                  (entry.minimum_washout_days or 0) * 24)
                    last_at = t0 if last is None or last > t0 else last
                    values["washout_hours"] = _r(washout, 2)
                    values["washout_remaining_hours"] = _r(washout - nm.hours_between(last_at, t0), 2)
                    evidence["half_life_hours"] = entry.half_life_hours
            else:
                values["at"] = _iso(start)
                values["in_restricted_period"] = restricted_end is not None and start <= restricted_end
            if values.get("at") is None:
                continue
            yield Fact("medication_exposure", e.event_id, values, evidence)

    def is_study_drug(self, v: SubjectView, e: DrugAdministration) -> bool:
        return (v.arm == "anakinra" and v.is_anakinra(e)) or (
            v.arm == "ivig" and v.is_ivig(e) and (e.purpose or "") == "study_treatment_retreatment")

    def _restricted_end(self, v: SubjectView) -> dt.datetime | None:
        """End of the on-treatment period (A-15): end of dosing day 14 (anakinra), T0 + 48 h (IVIG)."""
        if v.t0 is None:
            return None
        if v.arm == "anakinra":
            return v.hx(24 * (self.p.treatment_days - 1) + 24 - self.p.dosing_day_early_hours)
        return v.hx(self.p.ivig_arm_restricted_hours)

    def _vaccines(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        enr = v.enrollment
        if enr is None:
            return
        live_table = self.t.live_vaccines
        enr_date = nm.local_date(enr.occurred_at, v.zone)
        limit = nm.add_months(enr_date, -self.p.live_vaccine_lookback_months)
        for e in v.ev.get("immunization", []):
            if v.t0 is not None and e.occurred_at >= v.t0:
                continue
            code = (e.atc or "").upper()
            live = bool(e.live_attenuated) or code in {c.upper() for c in live_table.atc} or any(
                n.lower() in e.vaccine.lower() for n in live_table.names)
            vdate = nm.local_date(e.occurred_at, v.zone)
            yield Fact("baseline_vaccine", e.event_id,
                       {"at": _iso(enr.occurred_at), "vaccine": e.vaccine, "atc": e.atc or "", "live": live,
                        "within_lookback": limit < vdate <= enr_date, "vaccine_date": vdate.isoformat()},
                       {"events": [e.event_id, enr.event_id], "lookback_starts_after": limit.isoformat()})

    # ---- dosing ---------------------------------------------------------------------------------------------
    def _fever_status_for_day(self, v: SubjectView, day: int, at: dt.datetime) -> str:
        if day == 1 or day == 2:
            r = v.assessment_at(v.hx(12 if day == 1 else 24))
            if r is None:
                return "unknown"
            return "febrile" if v.febrile(r) else "afebrile"
        recent = v.readings_in(at - self.p.secondary_fever_lookback_hours * H, at)
        recent = [r for r in recent if r.at < at]
        if any(v.febrile(r) for r in recent):
            return "febrile"
        return "afebrile" if recent else "unknown"

    def _anakinra_doses(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        doses = v.anakinra_doses
        if not doses:
            return
        totals: dict[int, float | None] = {}
        levels = v.day_levels
        for i, d in enumerate(doses):
            day = v.dosing_day(d.at)
            before = totals.get(day, 0.0)
            after = None if (before is None or d.mg_per_kg is None) else _r(before + d.mg_per_kg)
            totals[day] = after
            if after is None or before is None:
                continue
            prev_day = max((dd for dd in levels if dd < day and levels[dd] is not None), default=None)
            base = 4.0 if day <= 1 else max(4.0, levels[prev_day] if prev_day is not None else 4.0)  # type: ignore[arg-type]
            yield Fact("anakinra_dose", d.event_id,
                       {"at": _iso(d.at), "dosing_day": float(day), "dose_mg_per_kg": d.mg_per_kg,
                        "day_total_before": before, "day_total_after": after, "base_level": base,
                        "ratio_before": _r(before / base), "ratio_after": _r(after / base), "first_dose": i == 0,
                        "fever_status": self._fever_status_for_day(v, day, d.at),
                        "hours_since_t0": _r(nm.hours_between(v.t0, d.at), 3), "weight_kg": d.weight_kg},  # type: ignore[arg-type]
                       {"events": [d.event_id], "raw_dose": d.raw})

    def _ladder(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        if v.arm != "anakinra" or v.t0 is None:
            return
        lo, hi = self.p.escalation_window_hours
        weight_known = v.weight_at(v.t0)[0] is not None or any(d.mg_per_kg is not None for d in v.anakinra_doses)
        for step, hours in (("H12", 12), ("H24", 24)):
            hx = v.hx(hours)
            if not deadline(hx + hi * H):
                continue
            r = v.assessment_at(hx)
            if r is None:
                continue
            if step == "H12":
                given = [d for d in v.anakinra_doses[1:] if hx + lo * H <= d.at <= hx + hi * H and v.dosing_day(d.at) == 1]
            else:
                given = [d for d in v.anakinra_doses if v.dosing_day(d.at) == 2 and d.at <= hx + hi * H]
            amount = None if any(d.mg_per_kg is None for d in given) else _r(sum(d.mg_per_kg for d in given))  # type: ignore[misc]
            yield Fact("ladder_step", step,
                       {"at": _iso(hx + hi * H), "step": step, "febrile": v.febrile(r), "assessed_c": r.corrected_c,
                        "assessed_at": _iso(r.at), "given_mg_per_kg": amount, "doses_in_window": float(len(given)),
                        "weight_known": weight_known, "level_day1": v.day_levels.get(1),
                        "window_start": _iso(hx + lo * H), "window_end": _iso(hx + hi * H)},
                       {"events": [v.t0_id, r.event_id, *[d.event_id for d in given]], "hx": _iso(hx),
                        "raw_c": r.raw_c, "site": r.site})

    # ---- fever and endpoints --------------------------------------------------------------------------------
    def _assessments(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        if v.t0 is None:
            return
        lo, hi = self.p.assessment_window_hours
        if v.arm == "anakinra":
            for step, hours in (("H12", 12), ("H24", 24)):
                hx = v.hx(hours)
                if not deadline(hx + hi * H):
                    continue
                n = len(v.readings_in(hx + lo * H, hx + hi * H))
                yield Fact("fever_assessment", step,
                           {"at": _iso(hx + hi * H), "window": step, "readings": float(n),
                            "window_start": _iso(hx + lo * H), "window_end": _iso(hx + hi * H)},
                           {"events": [v.t0_id, *[r.event_id for r in v.readings_in(hx - 6 * H, hx + 6 * H)]],
                            "hx": _iso(hx), "t0": _iso(v.t0)})
        end = v.hx(self.p.endpoint_window_hours)
        if deadline(end):
            start = v.hx(self.p.endpoint_window_hours - self.p.endpoint_late_window_hours)
            late = v.readings_in(start, end)
            afebrile = [r for r in v.readings_in(v.t0, end, open_start=True) if not v.febrile(r)]
            yield Fact("fever_assessment", "ENDPOINT",
                       {"at": _iso(end), "window": "ENDPOINT", "readings": float(len(late)),
                        "afebrile_readings_before": float(len(afebrile)), "window_start": _iso(start),
                        "window_end": _iso(end)},
                       {"events": [v.t0_id, *[r.event_id for r in late]], "t0": _iso(v.t0)})

    def _last_escalation(self, v: SubjectView) -> Dose | None:
        """A′ (A-6): the H12 supplement or the escalated H24 dose, the later of those given."""
        last = None
        l1 = v.day_levels.get(1)
        day2 = 0.0
        for i, d in enumerate(v.anakinra_doses):
            day = v.dosing_day(d.at)
            if day == 1 and i > 0:
                last = d
            elif day == 2 and d.mg_per_kg is not None:
                day2 += d.mg_per_kg
                if l1 is not None and day2 > l1 * 1.1 + nm.TOLERANCE:
                    last = d
        return last

    def _endpoints(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        if v.t0 is None:
            return
        anchors = [("T0", v.t0, [v.t0_id])]
        if v.arm == "anakinra":
            esc = self._last_escalation(v)
            if esc is not None:
                anchors.append(("LASTESC", esc.at, [esc.event_id]))
        window, late = self.p.endpoint_window_hours, self.p.endpoint_late_window_hours
        for name, a, ev in anchors:
            end = a + window * H
            if not deadline(end):
                continue
            afebrile = [r for r in v.readings_in(a, end, open_start=True) if not v.febrile(r)]
            late_readings = v.readings_in(end - late * H, end)
            yield Fact("primary_endpoint", name,
                       {"at": _iso(end), "anchor": name, "anchor_at": _iso(a), "afebrile_readings": float(len(afebrile)),
                        "late_window_readings": float(len(late_readings))},
                       {"events": ev + [r.event_id for r in late_readings][-3:],
                        "last_readings_c": [r.corrected_c for r in late_readings][-3:]})

    def _fever_recurrence(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        if v.t0 is None or v.arm != "anakinra":
            return
        last_febrile: Reading | None = None
        seen_afebrile = False
        for r in v.readings:
            if r.at < v.t0:
                if v.febrile(r):
                    last_febrile, seen_afebrile = r, False
                continue
            if not v.febrile(r):
                seen_afebrile = True
                continue
            if last_febrile is not None and seen_afebrile:
                yield Fact("fever_recurrence", r.event_id,
                           {"at": _iso(r.at), "afebrile_hours": _r(nm.hours_between(last_febrile.at, r.at), 3),
                            "study_day": float(nm.study_day(v.t0, r.at, v.zone)), "corrected_c": r.corrected_c},
                           {"events": [last_febrile.event_id, r.event_id], "previous_febrile_at": _iso(last_febrile.at)})
            last_febrile, seen_afebrile = r, False


def build_view(*, state: Any, params: Parameters, tables: Tables) -> SubjectView:
    return SubjectView(subject_id=state.subject_id, site_id=state.site_id, arm=state.arm, events=state.by_type(),
                       params=params, tables=tables)


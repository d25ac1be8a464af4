"""Derived facts: from one subject's validated events to the named facts the rule files test.

This is where the protocol's time anchors (T0, Hx, dosing days, study days) and the normalised values are
computed (RULES_SPEC §2). It holds no thresholds of its own: windows and conversion factors come from
`Parameters`, drug classes from the reference tables, and the verdicts (ANC < 1.5, total > 8.8 ...) are the rule
files' business. Each derivation is a pure function of the subject's history and the deadline cut-off, so late
and amended data simply change the facts, and the alerts follow.
"""

from __future__ import annotations

import bisect
import datetime as dt
from dataclasses import dataclass
from functools import cached_property
from collections.abc import Mapping
from typing import Any, Iterable
from zoneinfo import ZoneInfo

from monitor import normalise as nm
from monitor.errors import EvaluationError
from monitor.events import ConcomitantMedication, DrugAdministration, Enrollment, LabResult, VitalSign
from monitor.facts import Fact
from monitor.rules import LadderStep, Parameters, Tables

H = dt.timedelta(hours=1)
HOURS_PER_DAY = 24  # a dosing day and a washout day are calendar lengths, not protocol choices
MG_PER_G = 1000.0
EVIDENCE_HOURS = 6  # readings shown around an assessment hour in its evidence (display only)


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def analyte_lookup(params: Parameters) -> dict[str, str]:
    """Analyte name or LOINC code → analyte (built once per rules version by the Deriver)."""
    found: dict[str, str] = {}
    for analyte, ids in params.lab_analytes.items():
        found[analyte.lower()] = analyte
        for i in ids:
            found.setdefault(i, analyte)
            found.setdefault(i.lower(), analyte)
    return found


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
                 params: Parameters, tables: Tables, analytes: dict[str, str] | None = None,
                 first_reported: Mapping[str, dt.datetime] | None = None, memo: dict[str, Any] | None = None,
                 changes: list[tuple[Any, bool]] | None = None) -> None:
        self.subject_id = subject_id
        self.site_id = site_id
        self.arm = arm
        self.ev = events
        self.p = params
        self.t = tables
        self.analytes = analytes if analytes is not None else analyte_lookup(params)
        self.first_reported = first_reported or {}
        self.cache: dict[str, Any] = {}  # per-evaluation values the Deriver computes once
        self.memo = memo if memo is not None else {}  # per-subject values kept across evaluations
        # the vital signs and lab results changed since the last evaluation ((version, added) in order of
        # application); None: unknown, so values kept in the memo are rebuilt from the events
        self.changes = changes

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
        name = e.drug.lower()
        return (e.atc or "") in self.p.anakinra_atc or any(n in name for n in self.p.study_drug_names.anakinra)

    def is_ivig(self, e: DrugAdministration | ConcomitantMedication) -> bool:
        name = e.drug.lower()
        return (e.atc or "") in self.p.ivig_atc or any(n in name for n in self.p.study_drug_names.ivig)

    @property
    def on_anakinra(self) -> bool:
        """In the anakinra arm (parameters.yaml `arms`): T0 is its first study-drug anakinra; the ladder applies."""
        return self.arm is not None and self.arm == self.p.arms.anakinra

    @property
    def on_ivig(self) -> bool:
        return self.arm is not None and self.arm == self.p.arms.ivig

    @cached_property
    def t0_event(self) -> DrugAdministration | None:
        """First study-drug administration (§2.1): anakinra (study_drug) or the start of the IVIG retreatment."""
        for e in self.ev.get("drug_administration", []):
            if self.on_anakinra and self.is_anakinra(e) and e.study_drug:
                return e
            if self.on_ivig and self.is_ivig(e) and (e.purpose or "") in self.p.ivig_retreatment_purposes:
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

    def normalised(self, e: VitalSign) -> nm.Temperature:
        tp = self.p.temperature
        return nm.temperature(temperature_c=e.temperature_c, value=e.value, unit=e.unit, site=e.site,
                              site_offsets_c=tp.site_offsets_c, plausible_c=tp.plausible_c)

    @cached_property
    def _temperature_index(self) -> "TemperatureIndex":
        """The subject's temperatures, normalised once per event version and kept in event-time order in the memo;
        brought up to date from the changed vital signs (`changes`), or built from the events when the memo has
        none (first evaluation, memo emptied) or the changes are unknown."""
        index: TemperatureIndex | None = self.memo.get("temperature_index")
        if index is None or self.changes is None:
            index = TemperatureIndex()
            for e in self.ev.get("vital_sign", []):
                if self.is_temperature(e):
                    index.add(e, self.normalised(e))
            index.dirty = None
            self.memo["temperature_index"] = index
        else:
            for e, added in self.changes:
                if e.type != "vital_sign" or not self.is_temperature(e):
                    continue
                if added:
                    index.add(e, self.normalised(e))
                else:
                    index.remove(e)
        if self.changes:
            self.changes.clear()  # the subject's list: applied, so no later view applies them again
        return index

    @property
    def temperatures(self) -> list[tuple[VitalSign, nm.Temperature]]:
        """(event, normalised) of every temperature, in event-time order (ties: event_id). Do not modify."""
        return self._temperature_index.temperatures

    @property
    def readings(self) -> list[Reading]:
        """The valid temperatures, in event-time order. Do not modify."""
        return self._temperature_index.readings

    def febrile(self, r: Reading) -> bool:
        return nm.is_febrile(r.corrected_c, self.p.temperature.febrile_at_or_above_c)

    @property
    def _reading_times(self) -> list[dt.datetime]:
        return self._temperature_index.times

    def readings_in(self, start: dt.datetime, end: dt.datetime, *, open_start: bool = False) -> list[Reading]:
        """Valid readings in [start, end] ((start, end] with open_start), by binary search on the sorted list."""
        times = self._reading_times
        lo = (bisect.bisect_right if open_start else bisect.bisect_left)(times, start)
        hi = bisect.bisect_right(times, end)
        return self.readings[lo:hi]

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
        """mg/kg with the weight in force at the dose (§2.7, A-23.8). With no weight in force the dose has no
        mg/kg verdict, even when it is charted in mg/kg (§2.7: no weight, no dosing alerts)."""
        weight, _ = self.weight_at(e.occurred_at, e.weight_kg)
        mgkg = e.dose_mg_per_kg if weight else None
        if mgkg is None and e.dose_mg is not None and weight:
            mgkg = e.dose_mg / weight
        return Dose(e.event_id, e.occurred_at, mgkg, weight, {"dose_mg": e.dose_mg, "dose_mg_per_kg": e.dose_mg_per_kg})

    @cached_property
    def anakinra_doses(self) -> list[Dose]:
        """Anakinra given in the anakinra arm from the start of dosing day 1."""
        if not self.on_anakinra or self.t0 is None:
            return []
        start = self.t0 - self.p.dosing_day_early_hours * H
        return [self.dose_mg_per_kg(e) for e in self.ev.get("drug_administration", [])
                if self.is_anakinra(e) and e.occurred_at >= start]

    def _t0(self) -> dt.datetime:
        if self.t0 is None:
            raise RuntimeError("T0 is needed here but the subject has no study-drug administration")
        return self.t0

    def dosing_day(self, at: dt.datetime) -> int:
        return nm.dosing_day(self._t0(), at, offset_hours=self.p.dosing_day_early_hours)

    @cached_property
    def day_levels(self) -> dict[int, float | None]:
        """Total mg/kg per dosing day; None when any dose of the day has no mg/kg (weight unknown)."""
        levels: dict[int, float | None] = {}
        for d in self.anakinra_doses:
            day = self.dosing_day(d.at)
            cur = levels.get(day, 0.0)
            levels[day] = None if (cur is None or d.mg_per_kg is None) else cur + d.mg_per_kg
        return levels

    def hx(self, hours: float) -> dt.datetime:
        return self._t0() + hours * H

    # ---- labs -----------------------------------------------------------------------------------------------
    def analyte_of(self, e: LabResult) -> str | None:
        return self.analytes.get(e.loinc or "") or self.analytes.get(e.analyte.strip().lower())


class TemperatureIndex:
    """A subject's temperatures in event-time order (ties: event_id), with their valid readings and the readings'
    times for binary search, updated in place one event version at a time (test_incremental_oracle checks it
    against a from-scratch build after every batch)."""

    __slots__ = ("keys", "temperatures", "rkeys", "readings", "times", "dirty")

    def __init__(self) -> None:
        self.dirty: tuple[dt.datetime, str] | None = None  # the smallest key changed since `take_dirty`
        self.keys: list[tuple[dt.datetime, str]] = []
        self.temperatures: list[tuple[Any, nm.Temperature]] = []
        self.rkeys: list[tuple[dt.datetime, str]] = []
        self.readings: list[Reading] = []
        self.times: list[dt.datetime] = []

    def take_dirty(self) -> tuple[dt.datetime, str] | None:
        dirty, self.dirty = self.dirty, None
        return dirty

    def _touch(self, key: tuple[dt.datetime, str]) -> None:
        if self.dirty is None or key < self.dirty:
            self.dirty = key

    def add(self, e: Any, t: nm.Temperature) -> None:
        key = (e.occurred_at, e.event_id)
        self._touch(key)
        i = bisect.bisect_right(self.keys, key)
        self.keys.insert(i, key)
        self.temperatures.insert(i, (e, t))
        if t.valid:
            j = bisect.bisect_right(self.rkeys, key)
            self.rkeys.insert(j, key)
            self.readings.insert(j, Reading(e.event_id, e.occurred_at, t.corrected_c, t.celsius, t.site))  # type: ignore[arg-type]
            self.times.insert(j, e.occurred_at)

    def remove(self, e: Any) -> None:
        key = (e.occurred_at, e.event_id)
        self._touch(key)
        i = bisect.bisect_left(self.keys, key)
        while i < len(self.keys) and self.keys[i] == key:
            if self.temperatures[i][0] is e:
                valid = self.temperatures[i][1].valid
                del self.keys[i], self.temperatures[i]
                if valid:
                    j = bisect.bisect_left(self.rkeys, key)
                    del self.rkeys[j], self.readings[j], self.times[j]
                return
            i += 1


@dataclass
class Derived:
    parts: dict[str, list[Fact]]  # each derivation's facts, in INPUTS order (a reused derivation: the same list)
    next_deadline: dt.datetime | None

    @property
    def facts(self) -> list[Fact]:
        return [f for part in self.parts.values() for f in part]


class Deriver:
    """Computes every derived fact of a subject. `cutoff`: deadlines at or before it are evaluated."""

    def __init__(self, *, params: Parameters, tables: Tables) -> None:
        self.p = params
        self.t = tables
        self._drug_classes: dict[tuple[str, str | None], dict[str, Any]] = {}
        self._analytes = analyte_lookup(params)
        self._match_cache: dict[tuple[Any, ...], bool] = {}
        self._inputs = {name: kinds | (self.ALWAYS_T0 if name in self.T0_ONLY else self.ALWAYS)
                        for name, kinds in self.INPUTS.items()}
        self._temperature_filtered = frozenset({"_temperature_quality", *self.TEMPERATURE_WINDOWS})

    def view(self, state: Any, *, scratch: bool = False) -> SubjectView:
        """A fresh view of one subject's current events for one evaluation. `scratch`: one that uses nothing kept
        in the subject's memo (the oracle the memoised derivation is tested against)."""
        return SubjectView(subject_id=state.subject_id, site_id=state.site_id, arm=state.arm, events=state.by_type(),
                           params=self.p, tables=self.t, analytes=self._analytes,
                           first_reported=state.first_reported_view(), memo={} if scratch else state.memo,
                           changes=None if scratch else state.changed_events)

    # What each derivation reads ("temperature" and "measure" split vital signs). Every derivation also depends on
    # enrollment and drug administrations (arm, T0). A derivation is re-run only if one of its inputs changed or
    # one of its pending deadlines fell at or before the cut-off; otherwise its previous facts are reused.
    INPUTS: dict[str, frozenset[str]] = {
        "_weight": frozenset({"measure"}),
        "_temperature_quality": frozenset({"temperature"}),
        "_unit_quality": frozenset({"lab_result", "measure"}),  # it skips every vital sign that is no measure
        "_enrollment": frozenset({"measure"}),
        "_baseline_labs": frozenset({"lab_result", "measure"}),
        "_ivig": frozenset({"temperature", "measure"}),
        "_medications": frozenset({"concomitant_medication", "temperature", "measure"}),
        "_vaccines": frozenset({"immunization"}),
        "_anakinra_doses": frozenset({"temperature", "measure"}),
        "_ladder": frozenset({"temperature", "measure"}),
        "_treatment_days": frozenset({"adverse_event", "concomitant_medication", "measure"}),
        "_assessments": frozenset({"temperature"}),
        "_endpoints": frozenset({"temperature", "measure"}),
        "_fever_recurrence": frozenset({"temperature"}),
        "_visits": frozenset({"visit", "lab_result", "echocardiogram"}),
        "_echoes": frozenset({"echocardiogram"}),
        "_adverse_events": frozenset({"adverse_event"}),
        "_lab_signals": frozenset({"lab_result", "temperature"}),
    }
    ALWAYS = frozenset({"enrollment", "drug_administration"})

    # Derivations that read drug administrations only through T0 (`t0`, `t0_id`, `reference_time`): a changed drug
    # administration re-runs them only when T0 moved (another event, or another time), which `derive` reports as
    # the input kind "t0". The others read the doses themselves (doses, courses, rescue, last escalation).
    T0_ONLY = frozenset({"_weight", "_temperature_quality", "_unit_quality", "_baseline_labs", "_vaccines",
                         "_assessments", "_fever_recurrence", "_visits", "_echoes", "_adverse_events",
                         "_lab_signals"})
    ALWAYS_T0 = frozenset({"enrollment", "t0"})

    def kind_of(self, event: Any) -> str:
        """The input kind of an event, for deciding which derivations a change affects."""
        if event.type != "vital_sign":
            return str(event.type)
        is_measure = (event.code or "") in self.p.weight_codes or (event.code or "") in self.p.height_codes or (
            (event.analyte or "").lower() in ("body_weight", "body_height"))
        return "measure" if is_measure else "temperature"

    # Derivations that read temperatures only in some intervals of event time (given the other inputs, which
    # re-run them anyway when they change): a changed temperature outside every interval cannot change their
    # facts. Each returns closed intervals [lo, hi] (None: unbounded) that cover every reading it can read.
    TEMPERATURE_WINDOWS: dict[str, str] = {
        "_ivig": "_tw_ivig", "_medications": "_tw_medications", "_anakinra_doses": "_tw_anakinra_doses",
        "_ladder": "_tw_ladder", "_assessments": "_tw_assessments", "_endpoints": "_tw_endpoints",
        "_lab_signals": "_tw_lab_signals",
    }

    def _tw_ivig(self, v: SubjectView) -> list[tuple[dt.datetime | None, dt.datetime | None]]:
        return [] if v.t0 is None else [(None, v.t0)]  # the febrile readings in [E1 + 46 h, T0]

    def _tw_medications(self, v: SubjectView) -> list[tuple[dt.datetime | None, dt.datetime | None]]:
        return [] if v.t0 is None else [(v.t0, v.hx(self.p.endpoint_window_hours))]  # _verdict_time

    def _tw_anakinra_doses(self, v: SubjectView) -> list[tuple[dt.datetime | None, dt.datetime | None]]:
        if v.t0 is None:  # (whatever the arm: the windows need not be tight, only cover what is read)
            return []
        last = v.ev["drug_administration"][-1].occurred_at  # every dose is a drug administration
        hi = self.p.assessment_window_hours[1]
        steps = [v.hx(s.hours + hi) for s in self.p.ladder_steps]
        return [(None, max([last, *steps]))]  # fever status: the step assessments, else [dose - lookback, dose]

    def _tw_ladder(self, v: SubjectView) -> list[tuple[dt.datetime | None, dt.datetime | None]]:
        if v.t0 is None:
            return []
        lo, hi = self.p.assessment_window_hours
        return [(v.hx(s.hours + lo), v.hx(s.hours + hi)) for s in self.p.ladder_steps]

    def _tw_assessments(self, v: SubjectView) -> list[tuple[dt.datetime | None, dt.datetime | None]]:
        if v.t0 is None:
            return []
        hi = max(self.p.assessment_window_hours[1], EVIDENCE_HOURS)  # the evidence lists readings to Hx + 6 h
        return [(None, v.hx(max([self.p.endpoint_window_hours, *(s.hours + hi for s in self.p.ladder_steps)])))]

    def _tw_endpoints(self, v: SubjectView) -> list[tuple[dt.datetime | None, dt.datetime | None]]:
        if v.t0 is None:
            return []
        last = max(v.t0, v.ev["drug_administration"][-1].occurred_at)  # the anchors: T0 and a dose (LASTESC)
        return [(None, last + self.p.endpoint_window_hours * H)]

    def _tw_lab_signals(self, v: SubjectView) -> list[tuple[dt.datetime | None, dt.datetime | None]]:
        if v.t0 is None:
            return []
        fw = self.p.safety.mas_fever_window_hours * H  # the MAS pattern's fever around each post-T0 ferritin
        return [(e.occurred_at - fw, e.occurred_at + fw) for e in v.ev.get("lab_result", [])
                if e.occurred_at >= v.t0 and v.analyte_of(e) == "ferritin"]

    def _temperatures_matter(self, name: str, v: SubjectView, vitals: list[Any]) -> bool:
        if name == "_temperature_quality":  # its facts are those of the invalid temperatures only
            return any(v.is_temperature(e) and not v.normalised(e).valid for e in vitals)
        method = self.TEMPERATURE_WINDOWS.get(name)
        if method is None:
            return True
        # The windows depend only on inputs whose change re-runs the derivation (T0, the doses, its lab results,
        # enrollment; arm and site empty the memo), and a re-run forgets them: while its facts are reused they hold.
        kept: dict[str, Any] = v.memo.setdefault("_windows", {})
        windows = kept.get(name)
        if windows is None:
            windows = kept[name] = getattr(self, method)(v)
        return any((lo is None or lo <= e.occurred_at) and (hi is None or e.occurred_at <= hi)
                   for e in vitals for lo, hi in windows)

    # Derivations that read lab results of some analytes only (and _baseline_labs only up to the reference time):
    # a changed lab result of another analyte, in its old and new versions, cannot change their facts.
    # (_lab_signals, which reads ANC, ALT, AST, ferritin, platelets, triglycerides and fibrinogen, is left out:
    # test_fault_isolation plants its failing derivation there and relies on it re-running for every lab result.)
    LAB_ANALYTES: dict[str, frozenset[str]] = {
        "_visits": frozenset({"CRP"}),
        "_baseline_labs": frozenset({"ANC", "creatinine", "INR", "PT"}),
    }

    def _labs_matter(self, name: str, v: SubjectView, labs: list[Any]) -> bool:
        analytes = self.LAB_ANALYTES.get(name)
        if analytes is None:
            return True
        if name == "_baseline_labs":
            ref = v.reference_time
            if ref is None or v.enrollment is None:
                return False  # it derives nothing
            labs = [e for e in labs if e.occurred_at <= ref]
        return any(v.analyte_of(e) in analytes for e in labs)

    _FILTERED = frozenset({"temperature", "lab_result"})

    def _reusable(self, name: str, v: SubjectView, hit: frozenset[str] | set[str], vitals: list[Any], labs: list[Any]) -> bool:
        """Whether every changed input kind in `hit` is one the derivation provably does not read. `vitals` and
        `labs`: the changed versions (old and new) of vital signs and lab results."""
        if not hit <= self._FILTERED:
            return False
        if "temperature" in hit and (name not in self._temperature_filtered
                                     or self._temperatures_matter(name, v, vitals)):
            return False
        return not ("lab_result" in hit and (name not in self.LAB_ANALYTES or self._labs_matter(name, v, labs)))

    def derive(self, v: SubjectView, cutoff: dt.datetime | None, *, memo: dict[str, Any] | None = None,
               changed: set[str] | None = None) -> Derived:
        """All derived facts of a subject. With `memo` (the subject's cache) and `changed` (input kinds changed since
        the last call), derivations whose inputs did not change and whose deadlines did not fall are reused.
        With the view's `changes` (the vital signs changed, old and new versions) known, a derivation that reads
        temperatures only in some intervals is also reused when no changed one falls in those intervals."""
        parts: dict[str, list[Fact]] = {}
        pending_all: list[dt.datetime] = []
        changes = list(v.changes) if v.changes is not None else None
        vitals = [e for e, _ in changes if e.type == "vital_sign"] if changes else []
        labs = [e for e, _ in changes if e.type == "lab_result"] if changes else []
        if v.changes:
            v._temperature_index  # brought up to date now, whichever derivations run
        if memo is not None:
            t0_key = (v.t0_id, v.t0)
            if changed is not None and memo.get("_t0", memo) != t0_key:
                changed = {*changed, "t0"}  # T0 moved (or unknown): the T0-only derivations re-run too
            memo["_t0"] = t0_key
        for name in self.INPUTS:
            cached = memo.get(name) if memo is not None else None
            if cached is not None and changed is not None:
                inputs = self._inputs[name]
                due = cached[1] is not None and cutoff is not None and cached[1] <= cutoff
                hit = inputs & changed
                if not due and (not hit or (changes is not None and self._reusable(name, v, hit, vitals, labs))):
                    parts[name] = cached[0]
                    if cached[1] is not None:
                        pending_all.append(cached[1])
                    continue
            v.memo.get("_windows", {}).pop(name, None)  # forgotten whenever it re-runs (see _temperatures_matter)
            pending: list[dt.datetime] = []

            def deadline(at: dt.datetime, _pending: list[dt.datetime] = pending) -> bool:
                if cutoff is not None and at <= cutoff:
                    return True
                _pending.append(at)
                return False

            try:
                produced = list(getattr(self, name)(v, deadline))
            except Exception as exc:  # named, so the operator knows which derivation to look at
                raise EvaluationError(f"derivation {name}", exc) from exc
            first = min(pending) if pending else None
            if memo is not None:
                memo[name] = (produced, first)
            parts[name] = produced
            if first is not None:
                pending_all.append(first)
        return Derived(parts, min(pending_all) if pending_all else None)

    # ---- data quality ---------------------------------------------------------------------------------------
    def _baseline_weight(self, v: SubjectView) -> tuple[float | None, str]:
        """Baseline weight (§4.1 ELIG-WEIGHT, §4.7, A-23.8): the enrollment weight, else the latest weight
        observation (29463-7) before T0 (before the pre-treatment cut-off of A-10 while T0 is unknown). A dose
        record's `weight_kg` is that dose's dosing weight, never a baseline weight, and an observation taken at T0
        is not before it. DQ-WEIGHT-MISSING and ELIG-WEIGHT both read this one value, so they never fire together."""
        enr = v.enrollment
        if enr is None:
            return None, "none"
        if enr.weight_kg:
            return enr.weight_kg, "enrollment"
        best: tuple[float | None, str] = (None, "none")
        for t, kg, eid in v.weight_observations:
            if (t < v.t0) if v.t0 is not None else (v.reference_time is not None and t <= v.reference_time):
                best = (kg, f"observation {eid}")
        return best

    def _weight(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        if v.enrollment is None:
            return
        enr = v.enrollment
        weight, source = self._baseline_weight(v)
        yield Fact("weight_status", "enrollment",
                   {"at": _iso(enr.occurred_at), "weight_known": weight is not None, "weight_kg": weight,
                    "weight_source": source},
                   {"events": [enr.event_id]})

    def _temperature_quality(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        for e, t in v.temperatures:
            if t.valid:
                continue
            value = e.temperature_c if e.temperature_c is not None else e.value
            unit = "Cel" if e.temperature_c is not None else (e.unit or "(none)")
            if t.problem == "unit_unrecognized":
                yield Fact("unit_quality", e.event_id,
                           {"at": _iso(e.occurred_at), "analyte": "body_temperature", "unit": unit, "value": value},
                           {"events": [e.event_id]})
                continue
            yield Fact("temperature_quality", e.event_id,
                       {"at": _iso(e.occurred_at), "problem": t.problem, "value": value, "unit": unit,
                        "site": t.site or "missing"},
                       {"events": [e.event_id], "celsius": t.celsius})

    def _unit_quality(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        u = self.p.units
        tables = {"ANC": u.anc_to_10e9_per_l, "creatinine": u.creatinine_to_mg_dl}
        for e in v.ev.get("lab_result", []):
            analyte = v.analyte_of(e)
            if analyte is None:
                continue
            factors = tables.get(analyte) or u.lab_conversions.get(analyte)
            if factors is None:
                continue
            ok = nm.convert(e.value, e.unit, factors) is not None
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
            elif analyte in ("INR", "PT"):
                value = nm.convert(e.value, e.unit, u.lab_conversions.get(analyte, {}))
            else:
                continue
            if value is not None:
                latest[analyte] = (e, value)  # events are in occurred_at order: the last one wins
        for analyte, (e, value) in sorted(latest.items()):
            base = {"at": _iso(enr.occurred_at), "specimen_at": _iso(e.occurred_at),
                    "hours_before_reference": nm.hours_between(e.occurred_at, ref)}
            evidence: dict[str, Any] = {"events": [e.event_id], "raw_value": e.value, "raw_unit": e.unit}
            if analyte == "creatinine":
                height, hsource = self._height(v, ref)
                if height is None:
                    continue
                egfr = nm.schwartz_egfr(height_cm=height, creatinine_mg_dl=value, k=self.p.schwartz_k)
                if egfr is None:
                    continue
                age_months = nm.completed_months(enr.birth_date, nm.local_date(enr.occurred_at, v.zone))
                evidence.update(creatinine_mg_dl=value, height_cm=height, height_source=hsource)
                yield Fact("baseline_lab", "eGFR",
                           {**base, "analyte": "eGFR", "value": egfr, "unit": "mL/min/1.73m2",
                            "egfr_method_validated": age_months >= self.p.schwartz_validated_from_months}, evidence)
            else:
                unit = {"ANC": "10^9/L", "INR": "{INR}", "PT": "%"}[analyte]
                yield Fact("baseline_lab", analyte, {**base, "analyte": analyte, "value": value, "unit": unit},
                           evidence)

    def _height(self, v: SubjectView, ref: dt.datetime) -> tuple[float | None, str]:
        """Height for eGFR (§2.7): the enrollment height, else the latest 8302-2 observation before T0 (at or
        before the A-10 cut-off while T0 is unknown). "Before T0" excludes T0 itself, as for the baseline
        weight (A-23.8)."""
        if v.enrollment is not None and v.enrollment.height_cm:
            return v.enrollment.height_cm, "enrollment"
        best: tuple[float | None, str] = (None, "none")
        for e in v.ev.get("vital_sign", []):
            before = e.occurred_at < v.t0 if v.t0 is not None else e.occurred_at <= ref
            if ((e.code or "") in self.p.height_codes or (e.analyte or "").lower() == "body_height") and before:
                cm = nm.convert(e.value, e.unit, self.p.units.height_to_cm) if e.value is not None else None
                if cm:
                    best = (cm, f"observation {e.event_id}")
        return best

    def _classify_drug(self, drug: str, atc: str | None) -> dict[str, Any]:
        key = (drug, atc)
        found = self._drug_classes.get(key)
        if found is None:
            found = self._drug_classes[key] = self._classify_uncached(drug, atc)
        return found

    def _classify_uncached(self, drug: str, atc: str | None) -> dict[str, Any]:
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
        for washout in self.t.immunosuppressants.drugs:
            if hit(washout.names, washout.atc, washout.drug):
                out["immuno"] = washout
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
            if self.is_study_drug(v, e):
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
            values.update(self._conmed_fields(v, e, start, last, restricted_end, source))
            evidence: dict[str, Any] = {"events": [e.event_id]}
            if cls["cyp"] is not None:
                entry = cls["cyp"]
                values.update(cyp_role=entry.role, cyp_strength=entry.strength)
                evidence["cyp_table"] = {"drug": entry.drug, "enzymes": entry.enzymes, "strength": entry.strength,
                                         "lookback_days": entry.lookback_days, "version": self.t.cyp450.version_date}
                if ref_enr is not None and before_t0:
                    values["cyp_recent"] = last is None or last >= ref_enr or (
                        ref_enr - last) <= dt.timedelta(days=entry.lookback_days)
            values["enrollment_at"] = _iso(ref_enr)
            if before_t0:
                values["at"] = _iso(start)
                if onset is not None:
                    values["in_kd_episode"] = nm.local_date(start, v.zone) >= onset or (
                        last is not None and nm.local_date(last, v.zone) >= onset)
                if cls["immuno"] is not None and t0 is not None:
                    entry = cls["immuno"]
                    washout = max(self.t.immunosuppressants.washout_half_lives * entry.half_life_hours,
                                  (entry.minimum_washout_days or 0) * HOURS_PER_DAY)
                    last_at = t0 if last is None or last > t0 else last
                    values["washout_hours"] = washout
                    values["washout_remaining_hours"] = washout - nm.hours_between(last_at, t0)
                    evidence["half_life_hours"] = entry.half_life_hours
            else:
                values["at"] = _iso(start)
                values["in_restricted_period"] = restricted_end is not None and start <= restricted_end
            yield Fact("medication_exposure", e.event_id, values, evidence)

    def is_study_drug(self, v: SubjectView, e: DrugAdministration) -> bool:
        """Study treatment of the subject's own arm; a non-study anakinra dose before T0 is prior biotherapy."""
        on_study = e.study_drug or (v.t0 is not None and e.occurred_at >= v.t0)
        return (v.on_anakinra and v.is_anakinra(e) and on_study) or (
            v.on_ivig and v.is_ivig(e) and (e.purpose or "") in self.p.ivig_retreatment_purposes)

    def _restricted_end(self, v: SubjectView) -> dt.datetime | None:
        """End of the on-treatment period (A-15): end of dosing day 14 (anakinra), T0 + 48 h (IVIG)."""
        if v.t0 is None:
            return None
        if v.on_anakinra:
            return v.hx(HOURS_PER_DAY * self.p.treatment_days - self.p.dosing_day_early_hours)
        return v.hx(self.p.ivig_arm_restricted_hours)

    def _vaccines(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        enr = v.enrollment
        live_table = self.t.live_vaccines
        enr_date = nm.local_date(enr.occurred_at, v.zone) if enr is not None else None
        limit = nm.add_months(enr_date, -self.p.live_vaccine_lookback_months) if enr_date is not None else None
        treatment_end = self._restricted_end(v) if v.on_anakinra else None
        for e in v.ev.get("immunization", []):
            code = (e.atc or "").upper()
            live = bool(e.live_attenuated) or code in {c.upper() for c in live_table.atc} or any(
                n.lower() in e.vaccine.lower() for n in live_table.names)
            vdate = nm.local_date(e.occurred_at, v.zone)
            before = v.t0 is None or e.occurred_at < v.t0
            yield Fact("vaccination", e.event_id,
                       {"at": _iso(e.occurred_at), "vaccine": e.vaccine, "atc": e.atc or "", "live": live,
                        "phase": "before_t0" if before else "on_treatment", "arm": v.arm or "",
                        # dated after enrollment_date - 1 month and given before T0, including
                        # after the enrollment instant (anakinra must not start within a month of it); from T0
                        # on, CONMED-LIVE-VACCINE applies instead
                        "within_lookback": bool(before and limit is not None and limit < vdate),
                        "in_treatment_period": bool(not before and treatment_end is not None
                                                    and e.occurred_at <= treatment_end),
                        "vaccine_date": vdate.isoformat(), "enrollment_at": _iso(enr.occurred_at) if enr else None},
                       {"events": [e.event_id] + ([enr.event_id] if enr else []),
                        "lookback_starts_after": limit.isoformat() if limit else None})

    # ---- medication helpers -----------------------------------------------------------------------------------
    def _matches(self, drug: str, atc: str | None, prefixes: list[str], names: list[str]) -> bool:
        key = (drug, atc, id(prefixes), id(names))
        found = self._match_cache.get(key)
        if found is None:
            code, name = (atc or "").upper(), drug.lower()
            found = (bool(code) and any(code.startswith(p.upper()) for p in prefixes)) or any(
                n.lower() in name for n in names)
            self._match_cache[key] = found
        return found

    def _verdict_time(self, v: SubjectView) -> dt.datetime | None:
        """A-21: the primary verdict falls at the first afebrile reading after T0, else at T0 + 48 h."""
        if v.t0 is None:
            return None
        end = v.hx(self.p.endpoint_window_hours)
        for r in v.readings_in(v.t0, end, open_start=True):
            if not v.febrile(r):
                return r.at
        return end

    def _conmed_fields(self, v: SubjectView, e: Any, start: dt.datetime, last: dt.datetime | None,
                       restricted_end: dt.datetime | None, source: str) -> dict[str, Any]:
        p = self.p
        out: dict[str, Any] = {"arm": v.arm or "", "regimen": (getattr(e, "regimen", None) or "").lower()}
        out["antipyretic"] = self._matches(e.drug, e.atc, p.antipyretic_atc_prefixes, p.antipyretic_names) and not (
            self._matches(e.drug, e.atc, p.aspirin_atc, p.aspirin_names))
        out["aspirin"] = self._matches(e.drug, e.atc, p.aspirin_atc, p.aspirin_names)
        mgkgday = getattr(e, "dose_mg_per_kg_per_day", None)
        per_day = p.doses_per_day.get((getattr(e, "frequency", None) or "").lower())
        if mgkgday is None and per_day is not None:
            if e.dose_mg_per_kg is not None:
                mgkgday = e.dose_mg_per_kg * per_day
            elif e.dose_mg is not None:
                weight, _ = v.weight_at(start, getattr(e, "weight_kg", None))
                mgkgday = e.dose_mg * per_day / weight if weight else None
        out["mg_per_kg_per_day"] = mgkgday
        if v.t0 is not None:
            out["on_treatment_at"] = _iso(max(start, v.t0))
            ends = last if last is not None else None
            out["active_in_restricted"] = bool(restricted_end is not None and start <= restricted_end
                                               and (ends is None or ends >= v.t0))
        enr = v.enrollment
        randomised = enr is not None and start >= enr.occurred_at
        if source == "drug_administration":
            out["other_arm_study_drug"] = v.on_ivig and v.is_anakinra(e) and (
                randomised or (v.t0 is not None and start >= v.t0))
        if v.t0 is not None and start >= v.t0:
            routes = {r.lower() for r in p.systemic_routes}
            rescue = (self._matches(e.drug, e.atc, p.rescue_atc_prefixes, p.rescue_names)
                      and (e.route or "").strip().lower() in routes) or (
                v.on_anakinra and source == "drug_administration" and v.is_ivig(e))
            verdict = self._verdict_time(v)
            purpose = (getattr(e, "purpose", None) or getattr(e, "indication", None) or "").lower()
            out.update(rescue=rescue, before_verdict=verdict is not None and start < verdict,
                       for_sae=any(w in purpose for w in p.rescue_for_sae_words))
        return out

    # ---- enrollment -------------------------------------------------------------------------------------------
    def _enrollment(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        enr = v.enrollment
        if enr is None:
            return
        at = _iso(enr.occurred_at)
        enr_date = nm.local_date(enr.occurred_at, v.zone)
        weight, wsource = self._baseline_weight(v)
        kd = self._kd(v)
        consent_ok = enr.consent_signed_at is not None and enr.consent_signed_at <= enr.occurred_at
        yield Fact("enrollment_profile", "enrollment",
                   {"at": at, "age_months": float(nm.completed_months(enr.birth_date, enr_date)),
                    "weight_known": weight is not None, "weight_kg": weight, "consent_ok": consent_ok,
                    "consent_at": _iso(enr.consent_signed_at), **kd,
                    "gestational_age_weeks": enr.gestational_age_at_birth_weeks},
                   {"events": [enr.event_id], "birth_date": enr.birth_date.isoformat(),
                    "enrollment_date": enr_date.isoformat(), "weight_source": wsource})
        for item, answer in sorted(enr.exclusion_checklist.items()):
            yield Fact("exclusion_answer", item,
                       {"at": at, "item": item, "answer": "unanswered" if answer is None else ("yes" if answer else "no")},
                       {"events": [enr.event_id]})

    def _kd(self, v: SubjectView) -> dict[str, Any]:
        enr = v.enrollment
        kd, c = (enr.kd_diagnosis if enr else None), self.p.kd_criteria
        if kd is None:
            return {}
        signs = len(set(kd.principal_signs))
        fever_days = kd.fever_days_at_first_ivig
        if fever_days is None and kd.fever_onset_date is not None:
            first = self._first_course(v)
            if first:
                fever_days = (nm.local_date(first[0].occurred_at, v.zone) - kd.fever_onset_date).days + 1
        if fever_days is None:
            return {"kd_signs": float(signs)}
        by_day = kd.signs_present_by_fever_day
        complete = signs >= c.complete_min_signs and (
            fever_days >= c.complete_min_fever_days
            or (fever_days >= c.early_min_fever_days and by_day is not None and by_day <= c.early_signs_by_fever_day))
        labs = (kd.crp_mg_dl is not None and kd.crp_mg_dl >= c.crp_mg_dl_at_least) or (
            kd.esr_mm_h is not None and kd.esr_mm_h >= c.esr_mm_h_at_least)
        support = len(set(kd.supplemental_lab_criteria)) >= c.supplemental_at_least or bool(kd.echo_positive)
        age_months = nm.completed_months(enr.birth_date, nm.local_date(enr.occurred_at, v.zone))  # type: ignore[union-attr]
        incomplete = labs and support and (
            (signs in c.incomplete_signs and fever_days >= c.incomplete_min_fever_days)
            or (age_months < c.infant_max_months and fever_days >= c.infant_min_fever_days))
        return {"kd_complete": complete, "kd_incomplete": incomplete, "kd_signs": float(signs),
                "fever_days": float(fever_days)}

    def _first_course(self, v: SubjectView) -> list[DrugAdministration]:
        purposes = set(self.p.ivig_failure.first_course_purposes)
        return [e for e in v.ev.get("drug_administration", []) if v.is_ivig(e) and (e.purpose or "") in purposes]

    def _g_per_kg(self, v: SubjectView, items: list[DrugAdministration]) -> float | None:
        total = 0.0
        for e in items:
            if e.dose_g_per_kg is not None:
                total += e.dose_g_per_kg
            elif e.dose_g is not None or e.dose_mg is not None:
                weight, _ = v.weight_at(e.occurred_at, e.weight_kg)
                grams = e.dose_g if e.dose_g is not None else e.dose_mg / MG_PER_G  # type: ignore[operator]
                if not weight:
                    return None
                total += grams / weight
            else:
                return None
        return total

    def _ivig(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        first = self._first_course(v)
        enr = v.enrollment
        if first:
            gkg = self._g_per_kg(v, first)
            yield Fact("ivig_course", "first", {"at": _iso(first[0].occurred_at), "course": "first", "g_per_kg": gkg,
                                                "arm": v.arm or ""}, {"events": [e.event_id for e in first]})
            e1 = max((e.infusion_end_at or e.occurred_at) for e in first)
            if enr is not None and v.t0 is not None:
                f = self.p.ivig_failure
                start = e1 + (f.fever_from_hours_after_e1 - f.tolerance_hours) * H
                febrile = [r for r in v.readings_in(start, v.t0) if v.febrile(r)]
                yield Fact("ivig_failure", "first",
                           {"at": _iso(enr.occurred_at), "first_course_g_per_kg": gkg, "febrile_after_e1": bool(febrile),
                            "hours_e1_to_t0": nm.hours_between(e1, v.t0), "e1_at": _iso(e1)},
                           {"events": [*(e.event_id for e in first), *(r.event_id for r in febrile[:3]), v.t0_id],
                            "fever_window": [_iso(start), _iso(v.t0)]})
        if v.on_ivig and v.t0_event is not None:
            course = [e for e in v.ev.get("drug_administration", [])
                      if v.is_ivig(e) and (e.purpose or "") in self.p.ivig_retreatment_purposes]
            yield Fact("ivig_course", "retreatment",
                       {"at": _iso(v.t0), "course": "retreatment", "g_per_kg": self._g_per_kg(v, course),
                        "arm": v.arm}, {"events": [e.event_id for e in course]})

    # ---- treatment course -------------------------------------------------------------------------------------
    def _discontinuation(self, v: SubjectView) -> dt.datetime | None:
        """The first documented discontinuation (A-23.3): a serious AE or a switch to rescue therapy documented
        after T0. A non-serious AE does not stop treatment, and nothing before T0 (a serious AE the evening
        before the first dose) discontinues a treatment that has not started. The event model has no withdrawal
        event, so a withdrawal cannot be recognised yet."""
        if "discontinuation" in v.cache:
            return v.cache["discontinuation"]  # type: ignore[no-any-return]
        t0 = v.t0
        found = None
        if t0 is not None:
            times = [e.occurred_at for e in v.ev.get("adverse_event", []) if e.serious and e.occurred_at > t0]
            times += [e.occurred_at for e in v.ev.get("drug_administration", [])
                      if e.occurred_at > t0 and not self.is_study_drug(v, e)
                      and self._is_rescue(v, e, "drug_administration")]
            times += [(e.start_at or e.occurred_at) for e in v.ev.get("concomitant_medication", [])
                      if (e.start_at or e.occurred_at) > t0 and self._is_rescue(v, e, "concomitant_medication")]
            found = min(times) if times else None
        v.cache["discontinuation"] = found
        return found

    def _is_rescue(self, v: SubjectView, e: Any, source: str) -> bool:
        """Rescue KD therapy (A-21): a listed rescue drug by a systemic route, or IVIG given in the anakinra arm."""
        p = self.p
        routes = {r.lower() for r in p.systemic_routes}
        return (self._matches(e.drug, e.atc, p.rescue_atc_prefixes, p.rescue_names)
                and (e.route or "").strip().lower() in routes) or (
            v.on_anakinra and source == "drug_administration" and v.is_ivig(e))

    def _treatment_days(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        if not v.on_anakinra or v.t0 is None:
            return
        days: dict[int, list[Dose]] = {}
        for d in v.anakinra_doses:
            days.setdefault(v.dosing_day(d.at), []).append(d)
        stopped = self._discontinuation(v)
        for day in range(1, self.p.treatment_days + 1):
            end = v.hx(HOURS_PER_DAY * day - self.p.dosing_day_early_hours)
            if not deadline(end):
                continue
            given = days.get(day, [])
            start = v.hx(HOURS_PER_DAY * (day - 1) - self.p.dosing_day_early_hours)
            yield Fact("treatment_day", str(day),
                       {"at": _iso(end), "day": float(day), "doses": float(len(given)),
                        # a discontinuation excuses only the days whose window starts after it
                        "discontinued": stopped is not None and stopped < start},
                       {"events": [v.t0_id, *[d.event_id for d in given]], "window": [_iso(start), _iso(end)]})
        # each dosing day after the course is its own deviation, `at` its first administration
        for day in sorted(dd for dd in days if dd > self.p.treatment_days):
            first = days[day][0]
            yield Fact("treatment_duration", f"extra_day:{day}",
                       {"at": _iso(first.at), "kind": "extra_day", "last_dose_day": float(day), "discontinued": False},
                       {"events": [d.event_id for d in days[day]]})
        end14 = self._restricted_end(v)
        if end14 is not None and deadline(end14):
            yield Fact("treatment_duration", "course_end",
                       {"at": _iso(end14), "kind": "course_end",
                        "last_dose_day": float(max((dd for dd in days if dd <= self.p.treatment_days), default=0)),
                        "discontinued": stopped is not None and stopped <= end14},
                       {"events": [v.t0_id]})

    # ---- schedule ---------------------------------------------------------------------------------------------
    def _study_day_end(self, v: SubjectView, day: int) -> dt.datetime:
        """00:00 site-local on the day after study day `day` (A-17 window close)."""
        first = nm.local_date(v._t0(), v.zone)
        closing = first + dt.timedelta(days=day)
        return dt.datetime.combine(closing, dt.time(0, 0), tzinfo=v.zone)

    def _visits(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        if v.t0 is None:
            return
        zone = v.zone
        first = nm.local_date(v.t0, zone)  # study day 1; a window closes at 00:00 local after its last day

        def close_of(day: int) -> dt.datetime:
            return dt.datetime.combine(first + dt.timedelta(days=day), dt.time(0, 0), tzinfo=zone)

        def day_of(at: dt.datetime) -> int:
            return (nm.local_date(at, zone) - first).days + 1  # nm.study_day

        by_name: dict[str, list[tuple[int, Any]]] = {}
        for e in v.ev.get("visit", []):
            by_name.setdefault(e.visit.upper(), []).append((day_of(e.occurred_at), e))
        done: dict[str, list[Any]] = {}
        for name, w in self.p.visit_windows.items():
            lo, hi = w.days
            done[name] = [e for day, e in by_name.get(name.upper(), ()) if lo <= day <= hi]
            close = close_of(hi)
            if not deadline(close):
                continue
            first_day = first + dt.timedelta(days=lo - 1)
            last_day = first + dt.timedelta(days=hi - 1)
            yield Fact("visit_window", name,
                       {"at": close.isoformat(), "visit": name, "done": bool(done[name]),
                        "missing_assessments": ", ".join(w.assessments),
                        "window_first_day": first_day.isoformat(), "window_last_day": last_day.isoformat()},
                       {"events": [v.t0_id, *[e.event_id for e in done[name]]]})
        days: dict[str, list[int]] = {}  # the study days of the CRP results and of the echocardiograms, when needed
        for name, aw in self.p.assessment_windows.items():
            close = close_of(aw.days[1])
            if not deadline(close):
                continue
            kind = "CRP" if aw.assessment == "CRP" else "echo"
            if kind not in days:
                items = ([e for e in v.ev.get("lab_result", []) if v.analyte_of(e) == "CRP"] if kind == "CRP"
                         else v.ev.get("echocardiogram", []))
                days[kind] = [day_of(e.occurred_at) for e in items]
            count = sum(1 for d in days[kind] if aw.days[0] <= d <= aw.days[1])
            visit_done = any(done.get(n) for n in aw.visits)
            yield Fact("assessment_window", name,
                       {"at": close.isoformat(), "window": name, "assessment": aw.assessment, "visit_done": visit_done,
                        "count": float(count)},
                       {"events": [v.t0_id, *[e.event_id for n in aw.visits for e in done.get(n, [])]]})

    def _echoes(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        bounds = self.p.coronary_z_category_bounds
        worst_prior = None
        for e in v.ev.get("echocardiogram", []):
            zs = [z for z in e.coronary_z_scores.values() if z is not None]
            worst = max([*zs, *([e.worst_z] if e.worst_z is not None else [])], default=None)
            if worst is None:
                continue
            category = sum(1 for b in bounds if worst >= b - nm.TOLERANCE)
            post = v.t0 is not None and e.occurred_at >= v.t0
            day = nm.study_day(v.t0, e.occurred_at, v.zone) if v.t0 is not None else None
            lo, hi = self.p.d45_echo_days
            yield Fact("echo", e.event_id,
                       {"at": _iso(e.occurred_at), "worst_z": worst, "category": float(category),
                        "category_increase": float(category - worst_prior) if worst_prior is not None else None,
                        "study_day": float(day) if day is not None else None,
                        "in_d45_window": day is not None and lo <= day <= hi, "post_t0": post, "visit": e.visit or ""},
                       {"events": [e.event_id], "z_scores": dict(e.coronary_z_scores),
                        "worst_prior_category": worst_prior})
            worst_prior = category if worst_prior is None else max(worst_prior, category)

    # ---- safety -----------------------------------------------------------------------------------------------
    def _adverse_events(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        hours = self.p.safety.sae_report_hours
        for e in v.ev.get("adverse_event", []):
            aware = e.investigator_aware_at
            reported = v.first_reported.get(e.event_id, e.recorded_at)
            delay = nm.hours_between(aware, reported) if aware is not None else None
            yield Fact("adverse_event", e.event_id,
                       {"at": _iso(e.occurred_at), "term": e.term.lower(), "meddra_pt": (e.meddra_pt or "").lower(),
                        "serious": e.serious, "seriousness": "serious" if e.serious else "non-serious",
                        "infection_type": (e.infection_type or "").lower(), "report_delay_hours": delay,
                        "report_due_at": _iso(aware + hours * H) if aware is not None else None,
                        "on_treatment": v.t0 is not None and e.occurred_at >= v.t0},
                       {"events": [e.event_id], "first_reported_at": _iso(reported),
                        "investigator_aware_at": _iso(aware), "serious_criteria": list(e.serious_criteria)})

    def _lab_values(self, v: SubjectView, analyte: str) -> list[tuple[LabResult, float]]:
        u = self.p.units
        factors = u.anc_to_10e9_per_l if analyte == "ANC" else u.lab_conversions.get(analyte, {})
        out = []
        for e in v.ev.get("lab_result", []):
            if v.analyte_of(e) == analyte:
                value = nm.convert(e.value, e.unit, factors)
                if value is not None:
                    out.append((e, value))
        return out

    def _lab_signals(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        if v.t0 is None:
            return
        sp = self.p.safety
        # severe neutropenia on treatment: once per episode (ends on a later ANC >= threshold)
        in_episode = False
        for e, value in self._lab_values(v, "ANC"):
            if e.occurred_at < v.t0:
                continue
            low = value < sp.neutropenia_below - nm.TOLERANCE
            if low and not in_episode:
                grade = "critical" if value < sp.neutropenia_critical_below - nm.TOLERANCE else "major"
                yield Fact("lab_signal", f"neutropenia:{e.event_id}",
                           {"at": _iso(e.occurred_at), "signal": "neutropenia", "analyte": "ANC", "value": value,
                            "grade": grade}, {"events": [e.event_id], "raw_value": e.value, "raw_unit": e.unit})
            in_episode = low
        # hepatitis lab signal: ALT or AST >= 3 x ULN and >= 2 x its pre-T0 baseline; one episode for both
        # analytes, ending on a later specimen where neither meets the signal
        specimens: dict[dt.datetime, list[tuple[str, LabResult, float, float | None, float | None]]] = {}
        for analyte in ("ALT", "AST"):
            values = self._lab_values(v, analyte)
            baseline = [val for e, val in values if e.occurred_at <= v.t0]
            base = baseline[-1] if baseline else None
            for e, value in values:
                if e.occurred_at <= v.t0:
                    continue
                ref_high = e.reference_range.high if e.reference_range is not None else None  # validated, in range
                uln = ref_high or sp.default_uln_u_per_l.get(analyte)
                ratio_uln = value / uln if uln else None
                ratio_base = value / base if base else None
                specimens.setdefault(e.occurred_at, []).append((analyte, e, value, ratio_uln, ratio_base))
        in_episode = False
        for at in sorted(specimens):
            hits = [x for x in specimens[at]
                    if x[3] is not None and x[3] >= sp.hepatitis_uln_multiple - nm.TOLERANCE
                    and (x[4] is None or x[4] >= sp.hepatitis_baseline_multiple - nm.TOLERANCE)]
            if hits and not in_episode:
                analyte, e, value, ratio_uln, ratio_base = max(hits, key=lambda x: x[3])  # type: ignore[arg-type,return-value]
                yield Fact("lab_signal", f"hepatitis:{e.event_id}",
                           {"at": _iso(e.occurred_at), "signal": "hepatitis", "analyte": analyte, "value": value,
                            "grade": "major", "ratio_uln": ratio_uln, "ratio_baseline": ratio_base},
                           {"events": [x[1].event_id for x in hits]})
            in_episode = bool(hits)
        # MAS lab pattern (2016 criteria) around each post-T0 ferritin, once per episode
        window = sp.mas_lab_window_hours * H
        others = {a: self._lab_values(v, a) for a in ("platelets", "AST", "triglycerides", "fibrinogen")}
        tests = {"platelets": lambda x: x <= sp.mas_platelets_at_or_below + nm.TOLERANCE,
                 "AST": lambda x: x > sp.mas_ast_above + nm.TOLERANCE,
                 "triglycerides": lambda x: x > sp.mas_triglycerides_above_mg_dl + nm.TOLERANCE,
                 "fibrinogen": lambda x: x <= sp.mas_fibrinogen_at_or_below_mg_dl + nm.TOLERANCE}
        in_episode = False
        for e, ferritin in self._lab_values(v, "ferritin"):
            if e.occurred_at < v.t0:
                continue
            met: list[tuple[str, LabResult, float]] = []
            for a, vals in others.items():
                near = [(x, val) for x, val in vals if abs(x.occurred_at - e.occurred_at) <= window]
                matching = [(x, val) for x, val in near if tests[a](val)]
                if matching:  # the earliest: a later specimen of the same analyte adds nothing to the pattern
                    met.append((a, matching[0][0], matching[0][1]))
            fw = sp.mas_fever_window_hours * H
            febrile = [r for r in v.readings_in(e.occurred_at - fw, e.occurred_at + fw) if v.febrile(r)]
            hit = ferritin > sp.mas_ferritin_above + nm.TOLERANCE and len(met) >= sp.mas_min_criteria and bool(febrile)
            if hit and not in_episode:
                # the latest specimen the pattern needed: the instant it was first complete, which later
                # specimens cannot move (the alert stays where it was raised as the episode goes on)
                needed = sorted(x.occurred_at for _, x, _ in met)[:sp.mas_min_criteria]
                latest = max([e.occurred_at, *needed])
                yield Fact("lab_signal", f"mas:{e.event_id}",
                           {"at": _iso(latest), "signal": "mas", "analyte": "ferritin", "value": ferritin,
                            "grade": "critical", "criteria_met": float(len(met))},
                           {"events": [e.event_id, *(x.event_id for _, x, _ in met), febrile[0].event_id],
                            "criteria": {a: val for a, _, val in met}})
            if ferritin <= sp.mas_ferritin_above:
                in_episode = False
            elif hit:
                in_episode = True

    # ---- dosing ---------------------------------------------------------------------------------------------
    def _fever_status_for_day(self, v: SubjectView, day: int, at: dt.datetime) -> str:
        """The fever that justifies an escalation on `day` (§4.2): febrile_at(H12) on day 1, febrile_at(H24) on
        day 2 (`unknown` without a reading in the assessment window: no verdict), and from day 3 on a febrile
        reading in [dose - 24 h, dose], both ends included (A-23.7). From day 3 an empty window is `afebrile`:
        no reading is no febrile reading (A-23.2); `unknown` belongs to the H12/H24 assessments only."""
        step = next((s for s in self.p.ladder_steps if s.dosing_day == day), None)
        if step is not None:  # a ladder day: the step's assessment (H12 on day 1, H24 on day 2)
            r = v.assessment_at(v.hx(step.hours))
            if r is None:
                return "unknown"
            return "febrile" if v.febrile(r) else "afebrile"
        recent = v.readings_in(at - self.p.secondary_fever_lookback_hours * H, at)
        return "febrile" if any(v.febrile(r) for r in recent) else "afebrile"

    def _anakinra_doses(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        doses = v.anakinra_doses
        if not doses:
            return  # a dose with no weight in force has no mg/kg and no verdict (§2.7): see dose_mg_per_kg
        totals: dict[int, float | None] = {}
        levels = v.day_levels
        for i, d in enumerate(doses):
            day = v.dosing_day(d.at)
            before = totals.get(day, 0.0)
            after = None if (before is None or d.mg_per_kg is None) else before + d.mg_per_kg
            totals[day] = after
            if after is None or before is None:
                continue
            previous = [lv for dd, lv in sorted(levels.items()) if dd < day and lv is not None]
            start = self.p.dosing.start_mg_per_kg
            base = start if day <= 1 or not previous else max(start, previous[-1])
            yield Fact("anakinra_dose", d.event_id,
                       {"at": _iso(d.at), "dosing_day": float(day), "dose_mg_per_kg": d.mg_per_kg,
                        "day_total_before": before, "day_total_after": after, "base_level": base,
                        "ratio_before": before / base, "ratio_after": after / base, "first_dose": i == 0,
                        "fever_status": self._fever_status_for_day(v, day, d.at),
                        "hours_since_t0": nm.hours_between(v.t0, d.at), "weight_kg": d.weight_kg},  # type: ignore[arg-type]
                       {"events": [d.event_id], "raw_dose": d.raw})

    def _ladder(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        if not v.on_anakinra or v.t0 is None:
            return
        lo, hi = self.p.escalation_window_hours
        weight_known = v.weight_at(v.t0)[0] is not None or any(d.mg_per_kg is not None for d in v.anakinra_doses)
        for ladder in self.p.ladder_steps:  # H12, H24 (parameters.yaml ladder_steps)
            step, hx = ladder.name, v.hx(ladder.hours)
            if not deadline(hx + hi * H):
                continue
            r = v.assessment_at(hx)
            if r is None:
                continue
            if ladder.given == "supplement":
                given = self._supplement(v, ladder)
            else:
                given = [d for d in v.anakinra_doses if v.dosing_day(d.at) == ladder.dosing_day and d.at <= hx + hi * H]
            amount = None if any(d.mg_per_kg is None for d in given) else sum(d.mg_per_kg for d in given)  # type: ignore[misc]
            previous = v.day_levels.get(ladder.dosing_day - 1)
            required = ladder.required_mg_per_kg(previous)
            yield Fact("ladder_step", step,
                       {"at": _iso(hx + hi * H), "step": step, "febrile": v.febrile(r), "assessed_c": r.corrected_c,
                        "assessed_at": _iso(r.at), "given_mg_per_kg": amount, "doses_in_window": float(len(given)),
                        "weight_known": weight_known, "level_day1": v.day_levels.get(1), "previous_level": previous,
                        "required_mg_per_kg": required,
                        "given_ratio": amount / required if amount is not None and required else None,
                        "window_start": _iso(hx + lo * H), "window_end": _iso(hx + hi * H)},
                       {"events": [v.t0_id, r.event_id, *[d.event_id for d in given]], "hx": _iso(hx),
                        "raw_c": r.raw_c, "site": r.site})

    # ---- fever and endpoints --------------------------------------------------------------------------------
    def _assessments(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        if v.t0 is None:
            return
        lo, hi = self.p.assessment_window_hours
        if v.on_anakinra:
            for ladder in self.p.ladder_steps:
                step, hx = ladder.name, v.hx(ladder.hours)
                if not deadline(hx + hi * H):
                    continue
                n = len(v.readings_in(hx + lo * H, hx + hi * H))
                yield Fact("fever_assessment", step,
                           {"at": _iso(hx + hi * H), "window": step, "readings": float(n),
                            "window_start": _iso(hx + lo * H), "window_end": _iso(hx + hi * H)},
                           {"events": [v.t0_id, *[r.event_id for r in v.readings_in(hx - EVIDENCE_HOURS * H, hx + EVIDENCE_HOURS * H)]],
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

    def _supplement(self, v: SubjectView, step: LadderStep) -> list[Dose]:
        """A supplement step's doses (the H12 supplement, A-1, A-18): anakinra after the first dose, on the step's
        dosing day, inside the escalation window [Hx - 1 h, Hx + 3 h]; several injections when it is split."""
        lo, hi = self.p.escalation_window_hours
        hx = v.hx(step.hours)
        return [d for d in v.anakinra_doses[1:]
                if hx + lo * H <= d.at <= hx + hi * H and v.dosing_day(d.at) == step.dosing_day]

    def _last_escalation(self, v: SubjectView) -> Dose | None:
        """A′ (A-6, A-23.4): the last administration of the initial-ladder escalation, which is
        * the escalated day-2 dose, when day 2's total exceeds its base (max(4, day-1 level)) × the escalation
          ratio: its last injection (a split dose counts from its last part);
        * else the H12 supplement: the anakinra given on dosing day 1 after the first dose inside the H12
          escalation window [H12 - 1 h, H12 + 3 h], when it takes the day-1 total above 4 × the ratio: its last
          injection inside that window.
        The start dose is never an escalation, whatever its size (a start above 4.4 mg/kg is DOSE-START only), and
        topping an under-dose up to 4 is a correction. With no escalation there is no A′ and LASTESC is not
        evaluated (§2.5). The "first dose whose total crosses 4.4" is not A′: with a start above 4.4 it would put
        A′ at T0, and with a split supplement it would take its first injection instead of the last."""
        doses = v.anakinra_doses
        if not doses:
            return None
        ratio, start = self.p.escalation_ratio, self.p.dosing.start_mg_per_kg
        for step in reversed(self.p.ladder_steps):  # the latest step that escalated holds A'
            if step.given == "day_total":
                prev = v.day_levels.get(step.dosing_day - 1) if step.dosing_day > 1 else start
                level = v.day_levels.get(step.dosing_day)  # None when a dose of the day has no mg/kg
                if prev is not None and level is not None and level > max(start, prev) * ratio + nm.TOLERANCE:
                    return [d for d in doses if v.dosing_day(d.at) == step.dosing_day][-1]
            else:
                supplement = self._supplement(v, step)
                if supplement:
                    upto = [d.mg_per_kg for d in doses
                            if v.dosing_day(d.at) == step.dosing_day and d.at <= supplement[-1].at]
                    if None not in upto and sum(upto) > start * ratio + nm.TOLERANCE:  # type: ignore[arg-type]
                        return supplement[-1]
        return None

    def _endpoints(self, v: SubjectView, deadline: Any) -> Iterable[Fact]:
        if v.t0 is None:
            return
        anchors = [("T0", v.t0, [v.t0_id])]
        if v.on_anakinra:
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
        """A scan of the readings in time order. Its state after the last reading is kept in the memo, so readings
        added after it are scanned from there; a change at or before it (an amended, late or removed reading)
        scans again from the start."""
        if v.t0 is None or not v.on_anakinra:
            return
        index = v._temperature_index
        dirty = index.take_dirty()
        kept = v.memo.get("fever_recurrence_scan")
        readings = v.readings
        last_febrile: Reading | None = None
        seen_afebrile = False
        start, done = 0, []
        if kept is not None and kept[0] is index and kept[1] == v.t0 and (dirty is None or dirty > kept[2]):
            _, _, last_key, last_febrile, seen_afebrile, done = kept
            start = bisect.bisect_right(index.rkeys, last_key)
        yield from done
        new: list[Fact] = []
        for r in readings[start:]:
            if r.at < v.t0:
                if v.febrile(r):
                    last_febrile, seen_afebrile = r, False
                continue
            if not v.febrile(r):
                seen_afebrile = True
                continue
            if last_febrile is not None and seen_afebrile:
                fact = Fact("fever_recurrence", r.event_id,
                            {"at": _iso(r.at), "afebrile_hours": nm.hours_between(last_febrile.at, r.at),
                             "study_day": float(nm.study_day(v.t0, r.at, v.zone)), "corrected_c": r.corrected_c},
                            {"events": [last_febrile.event_id, r.event_id],
                             "previous_febrile_at": _iso(last_febrile.at)})
                new.append(fact)
                yield fact
            last_febrile, seen_afebrile = r, False
        if readings:
            v.memo["fever_recurrence_scan"] = (index, v.t0, index.rkeys[-1], last_febrile, seen_afebrile,
                                               [*done, *new])

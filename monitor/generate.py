"""Synthetic ANACOMP cohort: realistic event streams for demos and load tests.

`generate()` yields event dicts in the shape of the published scenarios (RULES_SPEC §5): the same field names,
UCUM units, LOINC/ATC codes, French site ids and Europe/Paris timestamps (+01:00 in winter, +02:00 in summer;
every time is computed in elapsed UTC seconds and only written in site-local time, so a daylight-saving change
never shifts an H12/H24 deadline, §2.1).

One subject, in event time:

* fever onset; a first IVIG course of 2 g/kg (10-12 h, `infusion_end_at` = E1) on fever day 5-8; scheduled aspirin
  30-50 mg/kg/day from then on; febrile readings after E1 (IVIG failure, A-5), some with a transient afebrile dip
  (recrudescence);
* screening at E1 + 24 h or later: consent, weight/height, one blood draw (ANC, creatinine in umol/L, CRP mg/L,
  ALT/AST, INR), an echocardiogram, a febrile screening temperature, then the enrollment (randomisation) record
  with a complete KD diagnosis (5 principal signs) and an all-false exclusion checklist;
* T0 = first study drug, at least 52 h after E1:
  - anakinra arm: 4 mg/kg, then the A-1 ladder applied exactly as the monitor reads it: febrile at H12 (the
    reading closest to H12 in [H12-2h, H12+1h]) -> +2 mg/kg about 0.2-2 h after H12; febrile at H24 -> 8 mg/kg on
    dosing day 2; otherwise the previous level; the same level once daily to day 14;
  - IVIG arm: one 2 g/kg retreatment infusion (`purpose = study_treatment_retreatment`);
* temperatures every 4-6 h while febrile and every 8-12 h once afebrile for the first 10 study days (a protocol
  reading just before H12 and H24 in the anakinra arm), then a home-diary reading on 30-65 % of days (varies by
  subject); defervescence 12-40 h after T0 for most subjects, a few early responders, a few late (40-47 h) and
  ~4 % non-responders (50-90 h). About 6 % have no afebrile reading by T0 + 48 h (late defervescers whose next
  reading falls after 48 h, and the non-responders): ENDPOINT-PRIMARY-FAILURE, an info notice, not a deviation.
  ~3 % have a short secondary fever after day 4 (FEVER-SECONDARY, info); ~3 % have a small coronary aneurysm at
  screening that persists at D45 (ENDPOINT-CORONARY-D45, info);
* visits D2, D3, D4, D6, D7, D14, D30, D45, D60 inside their A-17 windows; CRP at D3/D4, D7, D14, D30, D45; ANC at
  D3, D7, D14; ALT/AST at D7, D14; echocardiograms at screening, D14 and D45; weight again at D30 and D60.

Everything after the end of study day `days` is left out (pre-T0 history is always complete). With `days` < 14
the anakinra course is cut short and with `days` < 60 the later visits are missing: a monitor that evaluates those
deadlines (e.g. `replay --until` far in the future) will rightly flag them.

`recorded_at` is `occurred_at` plus a few minutes (bedside charting) to a few hours (lab results, echo reports,
infusions charted at their end); about 2 % of follow-up records that no deadline depends on (late temperatures,
weights, liver tests, the D14 echo report) arrive one to four days late.

A share `deviation_rate` of subjects gets exactly one planted deviation (`DEVIATIONS`); `EXPECTED_RULES` names
the alert each one should raise. Subjects without one are meant to be fully protocol-compliant: the only alerts
a correct monitor raises for them are the info notices named above.

Protocol logic comes from the rules directory's parameters (rules/parameters.yaml, the same `Parameters` the
monitor reads; `parameters=None` loads the bundled rules): the site temperature offsets, the febrile threshold and
the febrile_at(Hx) assessment window that decide the anakinra ladder. A parameter edit changes the generated
cohort as it changes the monitor's verdicts.

Deterministic: one `random.Random(seed)` draws the cohort plan and a seed per subject; no global random state and
no wall clock. Output is in delivery order (ascending `recorded_at`, ties in subject then chart order), streamed
with a bounded buffer (subjects are generated when the merge reaches their first possible record).
"""

from __future__ import annotations

import datetime as dt
import heapq
import json
import math
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator
from zoneinfo import ZoneInfo

from monitor.normalise import is_febrile
from monitor.rules import Parameters, load_rules

PARIS = ZoneInfo("Europe/Paris")
MINUTE = 60
HOUR = 3600
DAY = 86400

RECRUITMENT_START = dt.date(2025, 1, 6)
RECRUITMENT_DAYS = 365
"""T0 dates are spread over one year, so both UTC offsets and both daylight-saving changes occur."""

SITE_CODES = ("BIC", "NEC", "TLS", "LYO", "MRS", "BDX", "LIL", "NTE", "STR", "REN", "MTP", "GRE", "NCY", "RDB",
              "TRS", "ROU", "CAE", "DIJ", "AMI", "TOU")

DEVIATIONS: dict[str, tuple[str, ...]] = {
    "anakinra": ("missed_h12_supplement", "overdose", "low_anc", "clarithromycin", "fahrenheit_typo",
                 "nonprotocol_site", "duplicate", "late_dose_record"),
    "ivig": ("low_anc", "clarithromycin", "fahrenheit_typo", "nonprotocol_site", "duplicate"),
}
"""Planted deviations by arm (the anakinra-ladder ones only make sense in the anakinra arm)."""

EXPECTED_RULES: dict[str, tuple[str, ...]] = {
    "missed_h12_supplement": ("DOSE-H12-MISSED-ESCALATION",),   # febrile at H12, no +2 mg/kg
    "overdose": ("DOSE-MAX-EXCEEDED",),                          # H24 dose charted as 10 mg/kg (in mg only)
    "low_anc": ("ELIG-NEUTROPENIA",),                            # screening ANC 0.8-1.4 x10^9/L
    "clarithromycin": ("ELIG-CYP-INTERACTOR",),                  # course ended 1-5 days before enrollment
    "fahrenheit_typo": ("DQ-TEMP-UNIT-SUSPECT",),                # e.g. 100.4 in temperature_c, re-measured
    "nonprotocol_site": ("DQ-TEMP-SITE-NONPROTOCOL",),           # an extra temporal-artery reading
    "duplicate": (),                                             # retransmitted dose: dropped silently (§2.6)
    "late_dose_record": (),                                      # H12 supplement charted 2-4 days late: the
}                                                                # H12 alert is raised, then retracted (§2.3)

_ASPIRIN_INDICATION = "Kawasaki disease (anti-inflammatory)"
_IVIG_NAME = "immunoglobulin, normal human, intravascular (IVIG)"
_PRINCIPAL_SIGNS = ("extremity_changes", "polymorphous_exanthem", "bilateral_bulbar_conjunctival_injection",
                    "oral_mucosa_changes", "cervical_lymphadenopathy")
_CHECKLIST = ("preterm_or_neonate", "pregnant", "breastfeeding", "suspicion_other_diagnosis",
              "overt_bacterial_viral_fungal_infection", "tuberculosis_risk_or_active", "immunodeficiency_or_cancer",
              "other_interventional_trial", "hypersensitivity_anakinra_or_excipients_or_ecoli_proteins",
              "hypersensitivity_ivig_or_excipients_or_anti_iga", "hyperprolinemia_type_1_or_2", "smpc_contraindication")
_SITES = ("tympanic", "axillary", "oral")
"""Where the generator measures temperatures (choice weights by age in `build`); offsets from parameters.yaml."""
# visit, nominal day, actual study days to draw from (inside the A-17 windows), weights
_VISITS = (("D2", 2, (2,), (1,)), ("D3", 3, (3,), (1,)), ("D4", 4, (4,), (1,)), ("D6", 6, (5, 6), (1, 4)),
           ("D7", 7, (7, 8), (4, 1)), ("D14", 14, (13, 14, 15), (1, 4, 1)),
           ("D30", 30, (28, 29, 30, 31, 32), (1, 2, 4, 2, 1)), ("D45", 45, (43, 44, 45, 46, 47), (1, 2, 4, 2, 1)),
           ("D60", 60, (57, 58, 59, 60, 61, 62, 63), (1, 1, 2, 4, 2, 1, 1)))
_INTENSIVE_DAYS = 10


def site_ids(sites: int) -> list[str]:
    """FR-BIC-01, FR-NEC-02, FR-TLS-03, ... (codes repeat past 20 sites; the number keeps ids unique)."""
    return [f"FR-{SITE_CODES[j % len(SITE_CODES)]}-{j + 1:02d}" for j in range(sites)]


@dataclass(frozen=True)
class SubjectPlan:
    """What the cohort-level draw decides for one subject; everything else comes from `seed`."""

    number: int
    subject_id: str
    arm: str
    site_id: str
    t0_date: dt.date
    t0_minute: int  # site-local minute of the day of T0
    deviation: str | None
    seed: int

    @property
    def t0(self) -> int:
        return _local_ts(self.t0_date, self.t0_minute)

    @property
    def lower_bound(self) -> int:
        """No record of this subject has a `recorded_at` before this (first IVIG start >= T0 - 92 h)."""
        return self.t0 - 4 * DAY


def cohort_plan(*, subjects: int, seed: int, sites: int = 5, deviation_rate: float = 0.2) -> list[SubjectPlan]:
    """The cohort's subjects in randomisation (T0) order: arm by permuted blocks of 4, site, planted deviation."""
    rng = random.Random(seed)  # noqa: S311 - synthetic test data, not security
    site_list = site_ids(sites)
    site_weights = [1.0 / (1.0 + 0.25 * j) for j in range(sites)]  # a few large centres, a tail of small ones
    starts = sorted((rng.randrange(RECRUITMENT_DAYS), rng.randrange(8 * 12, 20 * 12) * 5) for _ in range(subjects))
    plans: list[SubjectPlan] = []
    block: list[str] = []
    for number, (day, minute) in enumerate(starts, start=1):
        if not block:
            block = ["anakinra", "anakinra", "ivig", "ivig"]
            rng.shuffle(block)
        arm = block.pop()
        site = rng.choices(site_list, weights=site_weights)[0]
        deviation = rng.choice(DEVIATIONS[arm]) if rng.random() < deviation_rate else None
        prefix = "ANA" if arm == "anakinra" else "IVG"
        plans.append(SubjectPlan(number=number, subject_id=f"{prefix}-{number:05d}", arm=arm, site_id=site,
                                 t0_date=RECRUITMENT_START + dt.timedelta(days=day), t0_minute=minute,
                                 deviation=deviation, seed=rng.getrandbits(64)))
    return plans


# ---- time helpers ---------------------------------------------------------------------------------------------
def _local_ts(day: dt.date, minute_of_day: int) -> int:
    """Elapsed seconds of a site-local wall-clock time (daytime only, so never in a DST gap or fold)."""
    h, m = divmod(minute_of_day, 60)
    return int(dt.datetime(day.year, day.month, day.day, h, m, tzinfo=PARIS).timestamp())


def _local_date(ts: int) -> dt.date:
    return dt.datetime.fromtimestamp(ts, PARIS).date()


def _iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, PARIS).isoformat()


def _r5(ts: float) -> int:
    """Round an instant to whole 5 minutes, as charted times usually are."""
    return int(round(ts / 300.0)) * 300


# ---- growth (rough paediatric medians; enough to keep doses, eGFR and weight plausible) --------------------------
def _median_height_cm(years: float) -> float:
    if years < 1:
        return 50 + 25 * years
    if years < 2:
        return 75 + 12 * (years - 1)
    if years < 12:
        return 87 + 6.2 * (years - 2)
    return min(175.0, 149 + 5 * (years - 12))


def _median_weight_kg(years: float) -> float:
    if years < 1:
        return 4.0 + 5.8 * years
    if years < 2:
        return 9.8 + 2.4 * (years - 1)
    if years < 10:
        return 12.2 + 2.3 * (years - 2)
    return min(70.0, 30.6 + 5 * (years - 10))


# ---- one subject ----------------------------------------------------------------------------------------------
@dataclass
class _Reading:
    ts: int
    raw_c: float
    site: str
    kind: str  # regular, protocol, screening, diary, typo, retake, nonprotocol
    offset_c: float  # the site's offset (parameters.yaml temperature.site_offsets_c; 0 for a non-protocol site)

    @property
    def valid(self) -> bool:
        return self.kind not in ("typo", "nonprotocol")

    @property
    def corrected(self) -> float:
        return round(self.raw_c + self.offset_c, 6)


class _SubjectBuilder:
    def __init__(self, plan: SubjectPlan, days: int, parameters: Parameters) -> None:
        self.plan = plan
        self.days = days
        self.p = parameters
        self.offsets = parameters.temperature.site_offsets_c
        self.rng = random.Random(plan.seed)  # noqa: S311 - synthetic test data, not security
        self.items: list[tuple[int, int, int, str, dict[str, Any]]] = []  # occurred, recorded, seq, type, fields
        self.duplicate_seq: int | None = None

    # -- recording helpers
    def add(self, kind: str, occurred: int, recorded: int, fields: dict[str, Any]) -> int:
        seq = len(self.items)
        self.items.append((occurred, max(recorded, occurred), seq, kind, fields))
        return seq

    def charted(self, occurred: int, lo_min: float, hi_min: float, *, late_ok: bool = False) -> int:
        """recorded_at: a few minutes to a few hours after the fact; rarely days late where nothing waits on it."""
        if late_ok and self.rng.random() < 0.02:
            return occurred + int(self.rng.uniform(1, 4) * DAY) // MINUTE * MINUTE
        return occurred + int(self.rng.uniform(lo_min, hi_min)) * MINUTE

    def u(self, a: float, b: float) -> float:
        return self.rng.uniform(a, b)

    def study_day_start(self, n: int) -> int:
        """Local midnight starting study day n (day 1 = the local date of T0)."""
        return _local_ts(self.t0_date + dt.timedelta(days=n - 1), 0)

    def day_time(self, n: int, minute_lo: int, minute_hi: int) -> int:
        return _local_ts(self.t0_date + dt.timedelta(days=n - 1), self.rng.randrange(minute_lo, minute_hi, 5))

    # -- the subject
    def build(self) -> list[tuple[int, int, dict[str, Any]]]:
        p, rng = self.plan, self.rng
        dev = p.deviation
        self.t0_date = p.t0_date
        t0 = self.t0 = p.t0
        self.end = self.study_day_start(self.days + 1)  # nothing after the end of study day `days`

        # demographics and anthropometry
        years = rng.uniform(0.27, 5.0) if rng.random() < 0.75 else rng.uniform(5.0, 17.9)
        age_days = min(max(int(years * 365.25), 95), 6560)  # 95 d > 3 calendar months; 6560 d < 18 years
        years = age_days / 365.25
        height = round(_median_height_cm(years) * rng.uniform(0.94, 1.06) * 2) / 2
        weight = round(max(5.3, _median_weight_kg(years) * rng.uniform(0.85, 1.18)), 1)
        self.weight = weight
        self.site = rng.choices(_SITES, weights=(6, 4, 0) if years < 6 else (4, 3, 3))[0]
        anc_unit = "G/L" if p.site_id.endswith(("2", "5", "8")) else "10*9/L"  # French labs often write G/L

        # timeline before T0
        e1 = _r5(t0 - rng.uniform(52, 80) * HOUR)              # end of the first IVIG course
        ivig1_start = _r5(e1 - rng.uniform(10, 12) * HOUR)
        enrollment = _r5(t0 - rng.uniform(45, 180) * MINUTE)
        consent = max(_r5(enrollment - rng.uniform(2, 20) * HOUR), e1 + 24 * HOUR)
        fever_day_at_ivig = rng.choices((5, 6, 7, 8), weights=(4, 3, 2, 1))[0]
        onset = _local_date(ivig1_start) - dt.timedelta(days=fever_day_at_ivig - 1)
        birth = _local_date(enrollment) - dt.timedelta(days=age_days)

        # the fever course
        if rng.random() < 0.82:
            defervescence = rng.uniform(12, 40)
        else:
            defervescence = rng.choices((rng.uniform(4, 12), rng.uniform(40, 47), rng.uniform(50, 90)),
                                        weights=(8, 6, 4))[0]
        if dev in ("missed_h12_supplement", "late_dose_record"):
            defervescence = max(defervescence, rng.uniform(14, 40))   # febrile at H12
        elif dev == "overdose":
            defervescence = max(defervescence, rng.uniform(26, 40))   # febrile at H12 and H24
        self.afebrile_from = t0 + int(defervescence * HOUR)
        self.dip = (e1 + 8 * HOUR, e1 + 30 * HOUR) if rng.random() < 0.2 else None  # recrudescence before T0
        self.secondary: tuple[int, int] | None = None
        if rng.random() < 0.03 and defervescence < 72:
            start = t0 + int(rng.uniform(max(defervescence + 30, 100), 300) * HOUR)
            self.secondary = (start, start + int(rng.uniform(6, 30) * HOUR))

        # first IVIG course and aspirin
        self.add("drug_administration", ivig1_start, self.charted(e1, 15, 50), {
            "drug": _IVIG_NAME, "atc": "J06BA02", "route": "intravenous", "dose_g_per_kg": 2.0,
            "dose_g": round(2.0 * weight, 1), "weight_kg": weight, "infusion_end_at": _iso(e1),
            "study_drug": False, "purpose": "initial_kd_treatment"})
        aspirin = _r5(ivig1_start + rng.uniform(30, 120) * MINUTE)
        self.add("concomitant_medication", aspirin, self.charted(aspirin, 10, 40), {
            "drug": "acetylsalicylic acid", "atc": "N02BA01", "route": "oral",
            "dose_mg_per_kg_per_day": rng.choice((30, 35, 40, 45, 50)), "frequency": "q6h", "regimen": "scheduled",
            "indication": _ASPIRIN_INDICATION, "start_at": _iso(aspirin), "end_at": None})
        if dev == "clarithromycin":
            last = _r5(enrollment - rng.uniform(26, 120) * HOUR)
            first = _r5(last - rng.uniform(3, 7) * DAY)
            self.add("concomitant_medication", first, self.charted(enrollment - 3 * HOUR, 0, 100), {
                "drug": "clarithromycin", "atc": "J01FA09", "route": "oral", "dose_mg_per_kg_per_day": 15,
                "frequency": "q12h", "regimen": "scheduled",
                "indication": rng.choice(("suspected atypical pneumonia (pre-diagnosis)", "acute otitis media")),
                "start_at": _iso(first), "end_at": _iso(last)})

        # screening
        obs = _r5(enrollment - rng.uniform(1.5, 4) * HOUR)
        self.add("vital_sign", obs, self.charted(obs, 5, 40), {
            "code": "29463-7", "analyte": "body_weight", "value": weight, "unit": "kg"})
        self.add("vital_sign", obs + 2 * MINUTE, self.charted(obs + 2 * MINUTE, 5, 40), {
            "code": "8302-2", "analyte": "body_height", "value": height, "unit": "cm"})
        echo = _r5(max(enrollment - rng.uniform(2, 18) * HOUR, e1 + 20 * HOUR))
        self.coronary = self._baseline_coronary()
        self.echo(echo, "screening", 1.0)
        draw = _r5(enrollment - rng.uniform(1, 5) * HOUR)
        anc = round(rng.uniform(0.8, 1.4), 1) if dev == "low_anc" else round(rng.uniform(3.0, 14.0), 1)
        self.crp0 = rng.randint(40, 250)
        self.alt0, self.ast0 = rng.randint(15, 180), rng.randint(20, 120)
        self.lab(draw, "ANC", "751-8", anc, anc_unit, (1.5, 8.5))
        self.lab(draw, "creatinine", "14682-9", max(10, round(36.5 * height / rng.uniform(85, 150))), "umol/L", None)
        self.lab(draw, "CRP", "1988-5", self.crp0, "mg/L", (0, 5))
        self.lab(draw, "ALT", "1742-6", self.alt0, "U/L", (0, 40))
        self.lab(draw, "AST", "1920-8", self.ast0, "U/L", (0, 50))
        self.lab(draw, "INR", "6301-6", round(rng.uniform(0.9, 1.3), 2), "{INR}", None)
        signs = list(_PRINCIPAL_SIGNS)
        rng.shuffle(signs)
        self.add("enrollment", enrollment, self.charted(enrollment, 5, 30), {
            "birth_date": birth.isoformat(), "sex": "M" if rng.random() < 0.6 else "F",
            "consent_signed_at": _iso(consent), "weight_kg": weight, "height_cm": height,
            "gestational_age_at_birth_weeks": rng.choice((37, 38, 39, 39, 40, 40, 41)),
            "kd_diagnosis": {"classification": "complete", "fever_onset_date": onset.isoformat(),
                             "principal_signs": signs,
                             "signs_present_by_fever_day": rng.randint(4, fever_day_at_ivig)},
            "exclusion_checklist": {k: False for k in _CHECKLIST}, "health_insurance": True})

        readings = self._readings(e1, enrollment)
        self._reading_deviation(readings)
        for r in readings:
            if r.ts < self.end or r.ts < t0:
                self._temperature_event(r)

        if p.arm == "anakinra":
            self._anakinra(readings)
        else:
            self._ivig_retreatment()
        self._visits()
        return self._finish()

    # -- temperatures
    def hot(self, ts: int) -> bool:
        if ts < self.t0:
            return not (self.dip and self.dip[0] <= ts <= self.dip[1])
        if self.secondary and self.secondary[0] <= ts < self.secondary[1]:
            return True
        return ts < self.afebrile_from

    def _raw(self, febrile: bool) -> float:
        corrected = self.u(38.3, 39.7) if febrile else self.u(36.4, 37.6)
        return round(corrected - self.offsets[self.site], 1)

    def _readings(self, e1: int, enrollment: int) -> list[_Reading]:
        rng, t0 = self.rng, self.t0
        out: list[_Reading] = []

        def reading(ts: int, kind: str) -> None:
            out.append(self.reading(ts, self._raw(self.hot(ts)), self.site, kind))

        t = _r5(e1 + rng.uniform(2, 6) * HOUR)                      # after the first course: every 6-10 h
        while t < enrollment - 2 * HOUR:
            reading(t, "regular")
            t = _r5(t + rng.uniform(6, 10) * HOUR)
        reading(_r5(enrollment - rng.uniform(15, 90) * MINUTE), "screening")  # febrile, >= E1 + 47 h
        intensive_end = min(self.study_day_start(_INTENSIVE_DAYS + 1), self.end)
        t = _r5(t0 + rng.uniform(3, 5) * HOUR)
        while t < intensive_end:
            reading(t, "regular")
            t = _r5(t + (rng.uniform(4, 6) if self.hot(t) else rng.uniform(8, 12)) * HOUR)
        if self.plan.arm == "anakinra":                             # the ladder decisions' readings
            reading(_r5(t0 + 12 * HOUR - rng.uniform(0, 40) * MINUTE), "protocol")
            reading(_r5(t0 + 24 * HOUR - rng.uniform(5, 60) * MINUTE), "protocol")
        diary = rng.uniform(0.3, 0.65)                             # home diary after day 10: about half the days
        for n in range(_INTENSIVE_DAYS + 1, self.days + 1):
            if rng.random() < diary:
                reading(self.day_time(n, 7 * 60, 20 * 60), "diary")
        out.sort(key=lambda r: r.ts)
        return out

    def _reading_deviation(self, readings: list[_Reading]) -> None:
        dev, rng, t0 = self.plan.deviation, self.rng, self.t0
        if dev == "fahrenheit_typo":
            # the nurse types the Fahrenheit value into the Celsius field, then re-measures and charts it right
            pool = [r for r in readings if r.kind == "regular" and t0 + 50 * HOUR <= r.ts < self.end]
            pool = pool or [r for r in readings if r.kind == "regular" and r.ts < t0]
            r = rng.choice(pool)
            readings.append(self.reading(r.ts, round(r.raw_c * 9 / 5 + 32, 1), r.site, "typo"))
            r.ts += rng.randrange(5, 25, 5) * MINUTE
            r.kind = "retake"
        elif dev == "nonprotocol_site":
            # an extra forehead (temporal artery) check next to a real reading, in the decision-critical days
            pool = [r for r in readings if t0 <= r.ts < min(t0 + 72 * HOUR, self.end)] or readings
            r = rng.choice(pool)
            readings.append(self.reading(r.ts + rng.randrange(5, 20, 5) * MINUTE,
                                         round(r.corrected - rng.uniform(0.2, 0.8), 1), "temporal_artery",
                                         "nonprotocol"))
        readings.sort(key=lambda r: r.ts)

    def _temperature_event(self, r: _Reading) -> None:
        late_ok = r.kind == "diary"
        self.add("vital_sign", r.ts, self.charted(r.ts, 3, 45, late_ok=late_ok),
                 {"code": "8310-5", "temperature_c": r.raw_c, "site": r.site})

    def reading(self, ts: int, raw_c: float, site: str, kind: str) -> _Reading:
        return _Reading(ts, raw_c, site, kind, self.offsets.get(site, 0.0))

    def febrile_at(self, readings: list[_Reading], hx: int) -> bool | None:
        """The monitor's febrile_at(Hx) (A-18): the valid reading closest to Hx in the assessment window
        ([Hx-2h, Hx+1h]), a tie takes the higher; febrile at the parameters' threshold (38.0 °C)."""
        lo, hi = self.p.assessment_window_hours
        cands = [r for r in readings if r.valid and hx + lo * HOUR <= r.ts <= hx + hi * HOUR]
        if not cands:
            return None
        best = min(cands, key=lambda r: (abs(r.ts - hx), -r.corrected))
        return is_febrile(best.corrected, self.p.temperature.febrile_at_or_above_c)

    # -- study drug
    def _anakinra(self, readings: list[_Reading]) -> None:
        rng, t0, w, dev = self.rng, self.t0, self.weight, self.plan.deviation
        f12 = self.febrile_at(readings, t0 + 12 * HOUR)
        f24 = self.febrile_at(readings, t0 + 24 * HOUR)
        doses: list[int] = []

        def dose(ts: int, mg_per_kg: float, *, recorded: int | None = None, mg_only: bool = False) -> None:
            if ts >= self.end:
                return
            fields: dict[str, Any] = {"drug": "anakinra", "atc": "L04AC03", "route": "subcutaneous",
                                      "study_drug": True}
            if not mg_only:
                fields["dose_mg_per_kg"] = mg_per_kg
            fields["dose_mg"] = round(mg_per_kg * w, 1)
            fields["weight_kg"] = w
            doses.append(self.add("drug_administration", ts, recorded or self.charted(ts, 5, 45), fields))

        dose(t0, 4)
        level1 = 4
        if f12 and dev != "missed_h12_supplement":
            ts = _r5(t0 + 12 * HOUR + rng.uniform(10, 120) * MINUTE)
            late = ts + int(rng.uniform(50, 96) * HOUR) // MINUTE * MINUTE if dev == "late_dose_record" else None
            dose(ts, 2, recorded=late)
            level1 = 6
        level = 8 if f24 else level1
        h24 = _r5(t0 + 24 * HOUR + rng.uniform(-45, 60) * MINUTE)
        if dev == "overdose":
            dose(h24, 10, mg_only=True)  # 8 mg/kg intended; 10 mg/kg worth of mg charted
        else:
            dose(h24, level)
        minute_of_day = self.plan.t0_minute
        for n in range(3, 15):  # once daily at about T0's local clock time
            dose(self.day_time(n, minute_of_day - 60, minute_of_day + 65), level)
        if dev == "duplicate" and doses:
            self.duplicate_seq = doses[min(len(doses) - 1, rng.randrange(1, 6))]

    def _ivig_retreatment(self) -> None:
        t0, w = self.t0, self.weight
        end = _r5(t0 + self.rng.uniform(10, 12) * HOUR)
        seq = self.add("drug_administration", t0, self.charted(end, 15, 50), {
            "drug": _IVIG_NAME, "atc": "J06BA02", "route": "intravenous", "dose_g_per_kg": 2.0,
            "dose_g": round(2.0 * w, 1), "weight_kg": w, "infusion_end_at": _iso(end), "study_drug": True,
            "purpose": "study_treatment_retreatment"})
        if self.plan.deviation == "duplicate":
            self.duplicate_seq = seq

    # -- follow-up
    def _baseline_coronary(self) -> dict[str, float]:
        rng = self.rng
        z = {"LMCA": rng.uniform(0.2, 1.6), "LAD": rng.uniform(0.3, 1.9), "RCA": rng.uniform(0.3, 1.8)}
        roll = rng.random()
        if roll < 0.03:
            z[rng.choice(("LAD", "RCA"))] = rng.uniform(2.6, 4.0)   # small aneurysm
        elif roll < 0.15:
            z[rng.choice(("LAD", "RCA"))] = rng.uniform(2.0, 2.45)  # dilation only
        return z

    def echo(self, ts: int, visit: str, factor: float, *, late_ok: bool = False) -> None:
        z = {k: round(v * factor, 1) for k, v in self.coronary.items()}
        self.add("echocardiogram", ts, self.charted(ts, 20, 240, late_ok=late_ok),
                 {"visit": visit, "coronary_z_scores": z, "worst_z": max(z.values())})

    def lab(self, ts: int, analyte: str, loinc: str, value: float, unit: str, ref: tuple[float, float] | None,
            *, late_ok: bool = False) -> None:
        fields: dict[str, Any] = {"analyte": analyte, "loinc": loinc, "value": value, "unit": unit}
        if ref is not None:
            fields["reference_range"] = {"low": ref[0], "high": ref[1], "unit": unit}
        self.add("lab_result", ts, self.charted(ts, 50, 200, late_ok=late_ok), fields)

    def _visits(self) -> None:
        rng = self.rng
        score0 = rng.randint(4, 8)
        crp_k = rng.uniform(0.15, 0.35)
        anc_unit = "G/L" if self.plan.site_id.endswith(("2", "5", "8")) else "10*9/L"
        crp_at_d4 = rng.random() < 0.2
        for name, nominal, choices, weights in _VISITS:
            if nominal > self.days:
                continue
            # a visit due inside the follow-up happens inside it (D60 with days=60 falls on days 57-60)
            allowed = [(c, w) for c, w in zip(choices, weights) if c <= self.days]
            day = rng.choices([c for c, _ in allowed], weights=[w for _, w in allowed])[0]
            ts = self.day_time(day, 9 * 60, 11 * 60 + 30)
            decay = math.exp(-0.22 * (day - 2))
            physician = max(0, round(score0 * decay + rng.uniform(-0.6, 0.6)))
            parent = max(0, min(10, physician + rng.choice((-1, 0, 0, 1))))
            self.add("visit", ts, self.charted(ts, 10, 90), {
                "visit": name, "nominal_day": nominal, "physician_activity_score": physician,
                "parent_activity_score": parent})
            draw = self.day_time(day, 7 * 60, 8 * 60 + 30)
            if name in ("D7", "D14", "D30", "D45") or name == ("D4" if crp_at_d4 else "D3"):
                crp = round(self.crp0 * math.exp(-crp_k * day) + rng.uniform(0.5, 3.0), 1)
                self.lab(draw, "CRP", "1988-5", crp, "mg/L", (0, 5))
            if name in ("D3", "D7", "D14"):
                self.lab(draw, "ANC", "751-8", round(rng.uniform(1.8, 6.5), 1), anc_unit, (1.5, 8.5))
            if name in ("D7", "D14"):
                f = rng.uniform(0.3, 0.9)
                self.lab(draw, "ALT", "1742-6", max(8, round(min(self.alt0, 100) * f)), "U/L", (0, 40), late_ok=True)
                self.lab(draw, "AST", "1920-8", max(10, round(min(self.ast0, 100) * f)), "U/L", (0, 50), late_ok=True)
            if name in ("D14", "D45"):
                self.echo(_r5(ts + rng.uniform(30, 120) * MINUTE), name,
                          rng.uniform(0.85, 1.0) if name == "D14" else rng.uniform(0.7, 0.95), late_ok=name == "D14")
            if name in ("D30", "D60"):
                obs = ts + 5 * MINUTE
                self.add("vital_sign", obs, self.charted(obs, 5, 60, late_ok=True), {
                    "code": "29463-7", "analyte": "body_weight",
                    "value": round(self.weight * rng.uniform(1.0, 1.04), 1), "unit": "kg"})

    # -- output
    def _finish(self) -> list[tuple[int, int, dict[str, Any]]]:
        p = self.plan
        items = [it for it in self.items if it[0] < self.end or it[0] < self.t0]
        items.sort(key=lambda it: (it[0], it[2]))
        out: list[tuple[int, int, dict[str, Any]]] = []
        for n, (occurred, recorded, seq, kind, fields) in enumerate(items, start=1):
            event = {"event_id": f"{p.subject_id}-E{n:04d}", "subject_id": p.subject_id, "site_id": p.site_id,
                     "arm": p.arm, "type": kind, "occurred_at": _iso(occurred), "recorded_at": _iso(recorded),
                     **fields}
            out.append((recorded, occurred, event))
            if seq == self.duplicate_seq:  # transport retry: same event_id, byte-identical payload
                out.append((recorded, occurred, dict(event)))
        out.sort(key=lambda e: (e[0], e[1]))  # stable: chart order breaks the remaining ties
        return out


def subject_events(plan: SubjectPlan, days: int, parameters: Parameters | None = None) -> list[dict[str, Any]]:
    """One subject's events, in its own delivery order."""
    return [e for _, _, e in _SubjectBuilder(plan, days, _parameters(parameters)).build()]


def generate(*, subjects: int, days: int, seed: int, sites: int = 5, deviation_rate: float = 0.2,
             parameters: Parameters | None = None) -> Iterator[dict[str, Any]]:
    """Yield a synthetic cohort's events in delivery order (ascending `recorded_at`, stable ties).

    `parameters`: the protocol parameters the cohort follows (default: the bundled rules' parameters.yaml).
    Raises ValueError at once (not at the first `next`) for impossible arguments."""
    _check(subjects=subjects, days=days, sites=sites, deviation_rate=deviation_rate)
    params = _parameters(parameters)
    return _merge(cohort_plan(subjects=subjects, seed=seed, sites=sites, deviation_rate=deviation_rate), days, params)


def _parameters(parameters: Parameters | None) -> Parameters:
    params = parameters if parameters is not None else load_rules().parameters
    missing = [s for s in _SITES if s not in params.temperature.site_offsets_c]
    if missing:
        raise ValueError(f"parameters.yaml temperature.site_offsets_c has no offset for {', '.join(missing)} "
                         f"(the generator measures at {', '.join(_SITES)})")
    return params


def _check(*, subjects: int, days: int, sites: int, deviation_rate: float) -> None:
    if subjects < 0 or days < 1 or sites < 1 or not 0.0 <= deviation_rate <= 1.0:
        raise ValueError("need subjects >= 0, days >= 1, sites >= 1 and 0 <= deviation_rate <= 1")


def _merge(plans: list[SubjectPlan], days: int, parameters: Parameters) -> Iterator[dict[str, Any]]:
    heap: list[tuple[int, int, int, dict[str, Any]]] = []
    nxt = 0
    while nxt < len(plans) or heap:
        # admit every subject whose first record could come at or before the current head of the merge
        while nxt < len(plans) and (not heap or plans[nxt].lower_bound <= heap[0][0]):
            plan = plans[nxt]
            for i, (recorded, _, event) in enumerate(_SubjectBuilder(plan, days, parameters).build()):
                if recorded < plan.lower_bound:  # pragma: no cover - a construction error, never data
                    raise AssertionError(f"{event['event_id']} recorded before its subject's lower bound")
                heapq.heappush(heap, (recorded, plan.number, i, event))
            nxt += 1
        yield heapq.heappop(heap)[3]


def write_cohort(*, subjects: int, days: int, seed: int, sites: int = 5, deviation_rate: float = 0.2,
                 output: str = "-", parameters: Parameters | None = None) -> int:
    """Write the cohort as JSON Lines to `output` ('-' = standard output); a one-line summary goes to stderr."""
    try:
        _check(subjects=subjects, days=days, sites=sites, deviation_rate=deviation_rate)
        plans = cohort_plan(subjects=subjects, seed=seed, sites=sites, deviation_rate=deviation_rate)
        events = generate(subjects=subjects, days=days, seed=seed, sites=sites, deviation_rate=deviation_rate,
                          parameters=parameters)
        count = 0
        handle = sys.stdout if output == "-" else open(output, "w", encoding="utf-8")
        try:
            dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
            buffer: list[str] = []
            for event in events:
                buffer.append(dumps(event))
                count += 1
                if len(buffer) >= 2000:
                    handle.write("\n".join(buffer) + "\n")
                    buffer.clear()
            if buffer:
                handle.write("\n".join(buffer) + "\n")
            handle.flush()
        finally:
            if handle is not sys.stdout:
                handle.close()
    except ValueError as exc:
        print(f"protocol-monitor generate: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if output != "-":
            raise
        # the reader went away (`... | head`): not an error; keep the interpreter's exit-time flush quiet
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 0
    except OSError as exc:
        print(f"protocol-monitor generate: cannot write {output}: {exc}", file=sys.stderr)
        return 1
    planted = Counter(p.deviation for p in plans if p.deviation)
    arms = Counter(p.arm for p in plans)
    detail = ", ".join(f"{k} {v}" for k, v in sorted(planted.items())) or "none"
    print(f"generated {count} events, {subjects} subjects (anakinra {arms['anakinra']}, ivig {arms['ivig']}), "
          f"{days} days, seed {seed}, {sites} sites; planted deviations {sum(planted.values())}: {detail}; "
          f"to {'standard output' if output == '-' else output}", file=sys.stderr)
    return 0

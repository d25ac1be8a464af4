"""Normalisation of raw clinical values (RULES_SPEC §2.7), as pure functions.

The numbers these functions use (unit factors, site offsets, plausibility range) come from `rules/parameters.yaml`
through `monitor.rules.Parameters`, so a rule author changes them without touching Python.
"""

from __future__ import annotations

import calendar
import datetime as dt
import math
from dataclasses import dataclass
from zoneinfo import ZoneInfo

TOLERANCE = 1e-9
"""Comparisons of measured values use this tolerance (spec §2.7: exactly 38.0 is febrile)."""


def unit_key(unit: str | None) -> str:
    """Units compare case-sensitively in UCUM, but senders vary the micro sign and spaces: fold those only."""
    if unit is None:
        return ""
    return unit.strip().replace("µ", "u").replace("μ", "u").replace(" ", "")


def convert(value: float, unit: str | None, factors: dict[str, float]) -> float | None:
    """value × factor for a known unit; None when the unit is not in the table (→ DQ-UNIT-UNRECOGNIZED)."""
    key = unit_key(unit)
    for known, factor in factors.items():
        if unit_key(known) == key:
            return value * factor
    return None


CELSIUS_UNITS = ("Cel", "C", "degC", "°C")
FAHRENHEIT_UNITS = ("[degF]", "degF", "F", "°F")
"""Temperature units as `unit_key` folds them; any other unit is DQ-UNIT-UNRECOGNIZED (spec §2.7)."""


@dataclass(frozen=True, slots=True)
class Temperature:
    """A temperature reading after unit conversion and site correction.

    `problem` is None for a reading usable in decisions, else `unit_suspect`, `nonprotocol_site` or
    `unit_unrecognized`; such readings are excluded from every decision.
    """

    celsius: float | None
    corrected_c: float | None
    site: str
    problem: str | None

    @property
    def valid(self) -> bool:
        return self.problem is None


def temperature(
    *,
    temperature_c: float | None,
    value: float | None,
    unit: str | None,
    site: str | None,
    site_offsets_c: dict[str, float],
    plausible_c: tuple[float, float],
) -> Temperature:
    """Convert to °C, check plausibility, correct for the measurement site. Never converts a suspect value."""
    site_name = (site or "").strip().lower().replace(" ", "_")
    celsius: float
    if temperature_c is not None:
        celsius = float(temperature_c)
    elif value is not None:
        key = unit_key(unit)
        if key in CELSIUS_UNITS:
            celsius = float(value)
        elif key in FAHRENHEIT_UNITS:
            celsius = (float(value) - 32.0) * 5.0 / 9.0
        else:
            return Temperature(None, None, site_name, "unit_unrecognized")
    else:
        return Temperature(None, None, site_name, "unit_unrecognized")
    low, high = plausible_c
    if not (low - TOLERANCE <= celsius <= high + TOLERANCE):
        return Temperature(celsius, None, site_name, "unit_suspect")
    if site_name not in site_offsets_c:
        return Temperature(celsius, None, site_name, "nonprotocol_site")
    # not rounded: 37.9999996 stays below 38.0; is_febrile's tolerance makes 37.5 + 0.5 febrile
    return Temperature(celsius, celsius + site_offsets_c[site_name], site_name, None)


def is_febrile(corrected_c: float, threshold_c: float) -> bool:
    """Febrile ⇔ corrected ≥ threshold, with a 1e-9 tolerance so 37.5 + 0.5 counts as 38.0."""
    return corrected_c >= threshold_c - TOLERANCE


def schwartz_egfr(*, height_cm: float, creatinine_mg_dl: float, k: float) -> float | None:
    """Bedside Schwartz (2009): eGFR = k × height / Scr, in mL/min/1.73 m² (never converted to absolute)."""
    if creatinine_mg_dl <= 0 or height_cm <= 0:
        return None
    return k * height_cm / creatinine_mg_dl


def add_months(day: dt.date, months: int) -> dt.date:
    """Calendar month arithmetic that clamps to the month end: 30 Nov + 3 months = 28/29 Feb (spec §2.7, A-2)."""
    index = day.month - 1 + months
    year, month = day.year + index // 12, index % 12 + 1
    return dt.date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def completed_months(birth: dt.date, on: dt.date) -> int:
    """Whole calendar months from birth to `on`: the largest m with add_months(birth, m) ≤ on.

    So "birth + 3 months ≤ date" is exactly "completed_months ≥ 3", and "< birth + 18 years" is "< 216".
    """
    if on < birth:
        return -1
    months = (on.year - birth.year) * 12 + (on.month - birth.month)
    while months > 0 and add_months(birth, months) > on:
        months -= 1
    while add_months(birth, months + 1) <= on:
        months += 1
    return months


def local_date(at: dt.datetime, zone: ZoneInfo) -> dt.date:
    """The site-local calendar date of an instant (all calendar-day logic uses it)."""
    return at.astimezone(zone).date()


def study_day(t0: dt.datetime, at: dt.datetime, zone: ZoneInfo) -> int:
    """Study day N: day 1 is the site-local date of T0 (A-17)."""
    return (local_date(at, zone) - local_date(t0, zone)).days + 1


def dosing_day(t0: dt.datetime, at: dt.datetime, *, offset_hours: float = 6.0) -> int:
    """Dosing day d: window [T0 + 24(d−1) h − 6 h, T0 + 24(d−1) h + 18 h) in elapsed time (spec §2.1)."""
    hours = hours_between(t0, at)
    return math.floor((hours + offset_hours) / 24.0) + 1


def hours_between(start: dt.datetime, end: dt.datetime) -> float:
    """Elapsed hours (absolute time, so a daylight-saving change never shifts a deadline)."""
    return (end.astimezone(dt.timezone.utc) - start.astimezone(dt.timezone.utc)).total_seconds() / 3600.0

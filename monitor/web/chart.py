"""The subject chart: one server-rendered SVG that explains a subject's alerts.

It is computed by the monitor's own derivation code (monitor.derive.SubjectView) over the subject's events, so
what the chart shows is what the rules saw: temperatures after unit conversion and site correction against the
febrile threshold, anakinra doses in mg/kg per dosing day against the 4/6/8 mg/kg ladder, IVIG infusions, T0 and
H12/H24/H48 with the escalation windows, ANC and bedside-Schwartz eGFR against the eligibility thresholds, and
every alert as a marker at its `at`, linked to its page. No script: presentation attributes and the app's
stylesheet only (the Content-Security-Policy allows no inline styles or scripts).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from monitor import normalise as nm
from monitor.derive import Deriver, SubjectView
from monitor.events import EventRejected, canonical, parse_event
from monitor.rules import RuleSet
from monitor.state import SubjectState

H = dt.timedelta(hours=1)
WIDTH, LEFT, RIGHT = 1000, 70, 20
LADDER = (4.0, 6.0, 8.0)


class EventLibrary:
    """Events read from JSON Lines files, by subject; re-read when a file changes (the demo appends to one)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = [Path(p) for p in paths]
        self._stamp: tuple[Any, ...] | None = None
        self._by_subject: dict[str, list[dict[str, Any]]] = {}

    def _current_stamp(self) -> tuple[Any, ...]:
        out: list[tuple[str, int | None, int | None]] = []
        for p in self.paths:
            try:
                st = p.stat()
                out.append((str(p), st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((str(p), None, None))
        return tuple(out)

    def subject(self, subject_id: str) -> list[dict[str, Any]]:
        stamp = self._current_stamp()
        if stamp != self._stamp:
            by_subject: dict[str, list[dict[str, Any]]] = {}
            for p in self.paths:
                try:
                    lines = p.read_text(encoding="utf-8").splitlines()
                except OSError:
                    continue
                for line in lines:
                    try:
                        data = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(data, dict) and isinstance(data.get("subject_id"), str) and "type" in data:
                        by_subject.setdefault(data["subject_id"], []).append(data)
            self._by_subject, self._stamp = by_subject, stamp
        return self._by_subject.get(subject_id, [])


def subject_view(raw_events: list[dict[str, Any]], rules: RuleSet) -> SubjectView | None:
    """The derivation's view of one subject after all its events (later versions of an event replace earlier)."""
    state: SubjectState | None = None
    for data in raw_events:
        try:
            event = parse_event(data)
        except EventRejected:
            continue
        if state is None:
            state = SubjectState(subject_id=event.subject_id, site_id=event.site_id)
        state.apply(event, canonical(data))
    if state is None:
        return None
    return Deriver(params=rules.parameters, tables=rules.tables).view(state)


@dataclass
class Panel:
    name: str
    top: float
    height: float
    lo: float
    hi: float

    def y(self, value: float) -> float:
        value = min(max(value, self.lo), self.hi)
        return self.top + self.height - (value - self.lo) / (self.hi - self.lo) * self.height


def _threshold(rules: RuleSet, rule_id: str, default: float) -> float:
    rule = rules.rules.get(rule_id)
    when = getattr(getattr(rule, "spec", None), "when", None)
    value = when.get("value") if isinstance(when, dict) else None
    if isinstance(value, dict) and isinstance(value.get("lt"), (int, float)):
        return float(value["lt"])
    return default


def _fmt(value: float | None, digits: int = 2) -> str:
    return "?" if value is None else f"{value:.{digits}f}".rstrip("0").rstrip(".")


def render_chart(view: SubjectView | None, *, alerts: list[dict[str, Any]], rules: RuleSet,
                 zone: ZoneInfo) -> str:
    """The SVG markup. `alerts`: dicts with alert_id, rule, severity, at, state (already fenced by the caller)."""
    if view is None:
        return ('<svg xmlns="http://www.w3.org/2000/svg" class="subject-chart" role="img" width="600" height="40" '
                'aria-label="no events"><text x="10" y="25">No events of this subject were given to the server '
                '(serve --events FILE).</text></svg>')
    p = rules.parameters
    febrile_c = p.temperature.febrile_at_or_above_c
    anc_min = _threshold(rules, "ELIG-NEUTROPENIA", 1.5)
    egfr_min = _threshold(rules, "ELIG-RENAL", 30.0)
    t0 = view.t0
    times: list[dt.datetime] = []
    for items in view.ev.values():
        times.extend(e.occurred_at for e in items)
    alert_times: list[dt.datetime | None] = []
    for a in alerts:
        try:
            alert_times.append(dt.datetime.fromisoformat(str(a["at"]).replace("Z", "+00:00")))
        except ValueError:
            alert_times.append(None)
    if t0 is not None:
        start, end = t0 - 60 * H, t0 + 84 * H  # the treatment phase: the ladder, the endpoint window
    else:
        known = times + [t for t in alert_times if t is not None]
        start, end = min(known) - 6 * H, max(known) + 6 * H
    span = (end - start).total_seconds()

    def x(t: dt.datetime) -> float:
        frac = (t - start).total_seconds() / span
        return LEFT + min(max(frac, 0.0), 1.0) * (WIDTH - LEFT - RIGHT)

    def inside(t: dt.datetime) -> bool:
        return start <= t <= end

    def local(t: dt.datetime) -> str:
        return t.astimezone(zone).strftime("%Y-%m-%d %H:%M %z")

    temp = Panel("temperature", 40, 170, 35.0, 41.0)
    dose = Panel("anakinra", 250, 120, 0.0, 10.0)
    ivig_top = 395
    labs_anc = Panel("ANC", 450, 80, 0.0, max(4.0, anc_min * 2))
    labs_egfr = Panel("eGFR", 560, 80, 0.0, 150.0)
    liver = Panel("liver", 670, 80, 0.0, 6.0)
    height = 780
    sp = p.safety
    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="subject-chart" role="img" viewBox="0 0 {WIDTH} {height}" '
        f'width="{WIDTH}" height="{height}" aria-label="Subject {escape(view.subject_id)}: temperatures, doses, '
        f'labs and alerts">',
        f'<title>Subject {escape(view.subject_id)} ({escape(view.site_id)}), times in {escape(str(zone))}</title>',
    ]
    # panel frames and labels
    for panel, label in ((temp, "Temperature °C (corrected)"), (dose, "Anakinra mg/kg"),
                         (labs_anc, "ANC ×10⁹/L (eligibility and on-treatment thresholds)"),
                         (labs_egfr, "eGFR mL/min/1.73m²"), (liver, "ALT / AST × upper limit of normal")):
        out.append(f'<rect class="panel" x="{LEFT}" y="{panel.top}" width="{WIDTH - LEFT - RIGHT}" '
                   f'height="{panel.height}" fill="none" stroke="#bbb"/>')
        out.append(f'<text class="panel-label" x="{LEFT + 4}" y="{panel.top - 4}" font-size="12">{label}</text>')
    out.append(f'<text class="panel-label" x="{LEFT + 4}" y="{ivig_top - 6}" font-size="12">IVIG infusions</text>')
    # time axis: one tick per local midnight
    day = start.astimezone(zone).replace(hour=0, minute=0, second=0, microsecond=0) + dt.timedelta(days=1)
    while day < end:
        out.append(f'<line class="tick" x1="{x(day):.1f}" x2="{x(day):.1f}" y1="{temp.top}" y2="{height - 20}" '
                   f'stroke="#eee"/>')
        out.append(f'<text class="tick-label" x="{x(day) + 2:.1f}" y="{height - 6}" font-size="10">'
                   f'{day.strftime("%d %b")}</text>')
        day += dt.timedelta(days=1)
    # escalation windows and T0/H12/H24/H48 markers
    if t0 is not None:
        lo_w, hi_w = p.escalation_window_hours
        for step in (12, 24):
            hx = t0 + step * H
            x1, x2 = x(hx + lo_w * H), x(hx + hi_w * H)
            out.append(f'<rect class="window" data-window="H{step}" x="{x1:.1f}" y="{temp.top}" width="{x2 - x1:.1f}" '
                       f'height="{dose.top + dose.height - temp.top}" fill="#fff3c4" opacity="0.7">'
                       f'<title>H{step} escalation window {local(hx + lo_w * H)} to {local(hx + hi_w * H)}</title>'
                       '</rect>')
        for name, hours in (("T0", 0), ("H12", 12), ("H24", 24), ("H48", 48)):
            at = t0 + hours * H
            out.append(f'<g class="marker" data-marker="{name}"><line x1="{x(at):.1f}" x2="{x(at):.1f}" '
                       f'y1="{temp.top - 14}" y2="{labs_egfr.top + labs_egfr.height}" stroke="#555" '
                       f'stroke-dasharray="3,3"/><text x="{x(at) + 2:.1f}" y="{temp.top - 16}" font-size="11">'
                       f'{name}</text><title>{name}: {local(at)}</title></g>')
    # temperatures
    for c in range(int(temp.lo) + 1, int(temp.hi)):
        out.append(f'<text class="y-label" x="{LEFT - 24}" y="{temp.y(c) + 4:.1f}" font-size="10">{c}</text>')
    for panel, limit in ((labs_anc, anc_min), (labs_anc, sp.neutropenia_below), (labs_egfr, egfr_min),
                         (liver, float(sp.hepatitis_uln_multiple))):
        out.append(f'<text class="y-label" x="{LEFT - 34}" y="{panel.y(limit) + 4:.1f}" font-size="10" '
                   f'fill="#c60">{_fmt(limit)}</text>')
    out.append(f'<line class="threshold" data-threshold="febrile" x1="{LEFT}" x2="{WIDTH - RIGHT}" '
               f'y1="{temp.y(febrile_c):.1f}" y2="{temp.y(febrile_c):.1f}" stroke="#c00" stroke-dasharray="6,3"/>')
    out.append(f'<text x="{WIDTH - RIGHT - 60}" y="{temp.y(febrile_c) - 3:.1f}" font-size="10" fill="#c00">'
               f'{_fmt(febrile_c, 1)} °C</text>')
    for e, t in view.temperatures:
        if not inside(e.occurred_at):
            continue
        cx = x(e.occurred_at)
        if t.valid and t.corrected_c is not None:
            febrile = nm.is_febrile(t.corrected_c, febrile_c)
            cls = "reading febrile" if febrile else "reading"
            out.append(f'<circle class="{cls}" data-event="{escape(e.event_id)}" cx="{cx:.1f}" '
                       f'cy="{temp.y(t.corrected_c):.1f}" r="4" fill="{"#c00" if febrile else "#06c"}">'
                       f'<title>{_fmt(t.corrected_c)} °C corrected ({_fmt(t.celsius)} °C {escape(str(t.site))}) at '
                       f'{local(e.occurred_at)} [{escape(e.event_id)}]</title></circle>')
        else:
            out.append(f'<circle class="reading excluded" data-event="{escape(e.event_id)}" cx="{cx:.1f}" '
                       f'cy="{temp.y(temp.lo + 0.2):.1f}" r="4" fill="none" stroke="#888">'
                       f'<title>excluded reading ({escape(str(t.problem))}) at {local(e.occurred_at)} '
                       f'[{escape(e.event_id)}]</title></circle>')
    # anakinra: the ladder, each dosing day's total, each dose
    for level in LADDER:
        out.append(f'<line class="ladder" data-ladder="{_fmt(level)}" x1="{LEFT}" x2="{WIDTH - RIGHT}" '
                   f'y1="{dose.y(level):.1f}" y2="{dose.y(level):.1f}" stroke="#7a7" stroke-dasharray="4,4"/>')
        out.append(f'<text x="{LEFT - 34}" y="{dose.y(level) + 4:.1f}" font-size="10">{_fmt(level)}</text>')
    if t0 is not None:
        early = p.dosing_day_early_hours
        for day_no, total in sorted(view.day_levels.items()):
            d_start = t0 + (24 * (day_no - 1) - early) * H
            d_end = d_start + 24 * H
            x1, x2 = x(d_start), x(d_end)
            if total is None or x2 - x1 < 1:
                continue
            out.append(f'<rect class="day-total" data-day="{day_no}" x="{x1 + 1:.1f}" y="{dose.y(total):.1f}" '
                       f'width="{x2 - x1 - 2:.1f}" height="{dose.top + dose.height - dose.y(total):.1f}" '
                       f'fill="#cde" opacity="0.6"><title>Dosing day {day_no}: {_fmt(total)} mg/kg in total'
                       f'</title></rect>')
    for d in view.anakinra_doses:
        if not inside(d.at):
            continue
        value = d.mg_per_kg if d.mg_per_kg is not None else 0.0
        out.append(f'<rect class="dose" data-event="{escape(d.event_id)}" x="{x(d.at) - 3:.1f}" '
                   f'y="{dose.y(value):.1f}" width="6" height="{dose.top + dose.height - dose.y(value):.1f}" '
                   f'fill="#036"><title>anakinra {_fmt(d.mg_per_kg)} mg/kg (weight {_fmt(d.weight_kg)} kg) at '
                   f'{local(d.at)} [{escape(d.event_id)}]</title></rect>')
    # IVIG infusions
    for e in view.ev.get("drug_administration", []):
        if not view.is_ivig(e):
            continue
        end_at = getattr(e, "infusion_end_at", None) or e.occurred_at + 12 * H
        if end_at < start or e.occurred_at > end:
            continue
        x1, x2 = x(e.occurred_at), x(end_at)
        out.append(f'<rect class="ivig" data-event="{escape(e.event_id)}" x="{x1:.1f}" y="{ivig_top}" '
                   f'width="{max(x2 - x1, 3):.1f}" height="14" fill="#a6c">'
                   f'<title>IVIG {escape(_fmt(getattr(e, "dose_g_per_kg", None)))} g/kg from {local(e.occurred_at)} '
                   f'to {local(end_at)} [{escape(e.event_id)}]</title></rect>')
    # labs: ANC and eGFR against the eligibility thresholds
    out.append(f'<line class="threshold" data-threshold="ANC" x1="{LEFT}" x2="{WIDTH - RIGHT}" '
               f'y1="{labs_anc.y(anc_min):.1f}" y2="{labs_anc.y(anc_min):.1f}" stroke="#c60" stroke-dasharray="6,3"/>')
    out.append(f'<line class="threshold" data-threshold="eGFR" x1="{LEFT}" x2="{WIDTH - RIGHT}" '
               f'y1="{labs_egfr.y(egfr_min):.1f}" y2="{labs_egfr.y(egfr_min):.1f}" stroke="#c60" '
               f'stroke-dasharray="6,3"/>')
    u = p.units
    height_cm: float | None = view.enrollment.height_cm if view.enrollment is not None else None
    for e in view.ev.get("vital_sign", []):
        if height_cm is None and ((e.code or "") in p.height_codes or (e.analyte or "").lower() == "body_height"):
            height_cm = nm.convert(e.value, e.unit, u.height_to_cm) if e.value is not None else None
    for e in view.ev.get("lab_result", []):
        analyte = view.analyte_of(e)
        if analyte not in ("ANC", "creatinine") or not inside(e.occurred_at):
            continue
        if analyte == "ANC":
            anc = nm.convert(e.value, e.unit, u.anc_to_10e9_per_l)
            if anc is None:
                continue
            value = anc
            below = value < anc_min
            out.append(f'<circle class="lab{" below" if below else ""}" data-analyte="ANC" '
                       f'data-event="{escape(e.event_id)}" cx="{x(e.occurred_at):.1f}" cy="{labs_anc.y(value):.1f}" '
                       f'r="4" fill="{"#c60" if below else "#393"}"><title>ANC {_fmt(value)} ×10⁹/L '
                       f'({escape(str(e.value))} {escape(str(e.unit))}) at {local(e.occurred_at)}</title></circle>')
        else:
            mg_dl = nm.convert(e.value, e.unit, u.creatinine_to_mg_dl)
            if mg_dl is None or not height_cm:
                continue
            egfr = nm.schwartz_egfr(height_cm=height_cm, creatinine_mg_dl=mg_dl, k=p.schwartz_k)
            if egfr is None:
                continue
            below = egfr < egfr_min
            out.append(f'<circle class="lab{" below" if below else ""}" data-analyte="eGFR" '
                       f'data-event="{escape(e.event_id)}" cx="{x(e.occurred_at):.1f}" '
                       f'cy="{labs_egfr.y(egfr):.1f}" r="4" fill="{"#c60" if below else "#393"}"><title>eGFR '
                       f'{_fmt(egfr, 1)} (creatinine {_fmt(mg_dl, 3)} mg/dL, height {_fmt(height_cm, 1)} cm) at '
                       f'{local(e.occurred_at)}</title></circle>')
    out.append(f'<line class="threshold" data-threshold="ANC-on-treatment" x1="{LEFT}" x2="{WIDTH - RIGHT}" '
               f'y1="{labs_anc.y(sp.neutropenia_below):.1f}" y2="{labs_anc.y(sp.neutropenia_below):.1f}" '
               f'stroke="#900" stroke-dasharray="2,3"/>')
    out.append(f'<line class="threshold" data-threshold="liver" x1="{LEFT}" x2="{WIDTH - RIGHT}" '
               f'y1="{liver.y(sp.hepatitis_uln_multiple):.1f}" y2="{liver.y(sp.hepatitis_uln_multiple):.1f}" '
               f'stroke="#c60" stroke-dasharray="6,3"/>')
    for e in view.ev.get("lab_result", []):
        analyte = view.analyte_of(e)
        if analyte not in ("ALT", "AST") or not inside(e.occurred_at):
            continue
        u_per_l = nm.convert(e.value, e.unit, u.lab_conversions.get(analyte, {}))
        high = (e.reference_range or {}).get("high") if isinstance(e.reference_range, dict) else None
        uln = float(high) if isinstance(high, (int, float)) and high > 0 else sp.default_uln_u_per_l.get(analyte)
        if u_per_l is None or not uln:
            continue
        ratio = u_per_l / uln
        above = ratio >= sp.hepatitis_uln_multiple
        out.append(f'<circle class="lab{" below" if above else ""}" data-analyte="{analyte}" '
                   f'data-event="{escape(e.event_id)}" cx="{x(e.occurred_at):.1f}" cy="{liver.y(ratio):.1f}" r="4" '
                   f'fill="{"#c60" if above else "#393"}"><title>{analyte} {_fmt(u_per_l, 0)} U/L = '
                   f'{_fmt(ratio, 2)} × ULN ({_fmt(uln, 0)}) at {local(e.occurred_at)}</title></circle>')
    # alerts, linked to their pages
    for a, when in zip(alerts, alert_times):
        if when is None:
            continue
        at = when
        cx = x(at)
        colour = {"critical": "#900", "major": "#d40"}.get(str(a.get("severity")), "#888")
        note = "" if inside(at) else " (outside the charted window)"
        out.append(f'<a class="alert-marker" data-alert="{escape(a["alert_id"])}" data-rule="{escape(a["rule"])}" '
                   f'href="/alerts/{escape(a["alert_id"])}"><path d="M{cx:.1f},{temp.top - 2} l-6,-10 h12 z" '
                   f'fill="{colour}"/><title>{escape(a["rule"])} ({escape(str(a.get("state")))}) at {local(at)}'
                   f'{note}</title></a>')
    out.append("</svg>")
    return "\n".join(out)

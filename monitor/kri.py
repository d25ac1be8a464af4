"""Site risk: key risk indicators (KRIs), funnel-plot flags and quality tolerance limits (QTLs) (issue 20).

ICH E6(R3) asks a sponsor two questions that alert counts do not answer: which site is out of line with the rest of
the trial, and is the trial as a whole within its quality tolerance limits? This module answers both from what the
monitor already holds (every subject's events, the open alerts, the dead letters, and the inbox store when there
is one), on a schedule rather than per event: scores compare sites with each other, so they only make sense over
the whole trial at one instant, and a per-event recomputation would cost the event path for nothing.

Everything a rule author may change is data, in `rules/kri.yaml`: each KRI names a numerator and a denominator
from the fixed list of measures (`MEASURES` in monitor/kri_file.py, the only Python a new KRI could need), a method, thresholds and
a minimum accrual; each QTL names a numerator, a denominator and a limit. A KRI naming an unknown measure is refused
with its file and line, like any other rule error.

Scores follow Gilead's open-source gsm (`Analyze_NormalApprox`, the funnel-plot method of Spiegelhalter, Stat Med
2005): with the trial rate mu = sum(numerators) / sum(denominators), each site's unadjusted score is
z0 = (x/n - mu) / sqrt(V/n), V = mu(1 - mu) (binomial) or mu (Poisson); the over-dispersion factor is
phi = mean(z0^2); the score is z = z0 / sqrt(phi). Two choices differ from gsm and are stated in docs/SITE_RISK.md:
mu and phi are taken over the sites that meet the minimum accrual (a 2-participant site neither gets a flag nor
moves everyone else's), and a site whose expected count under the trial rate is small (< `exact_below_expected`)
is scored by an exact test instead (Fisher's exact test of the site against the rest of the trial for binomial
KRIs, an exact Poisson test for rates), its two-sided p-value turned into the equivalent signed z so that one set
of thresholds (+-2 amber, +-3 red) applies to both. Distributions come from scipy.stats, never written by hand.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import stats

from monitor.alerts import Alert
from monitor.kri_file import (  # noqa: F401 - the file format, re-exported: monitor.kri is the module to use
    KRI_FILE, MEASURES, KriFile, KriSpec, Measure, Minimum, QtlSpec, Thresholds, load_kri)

log = logging.getLogger(__name__)

QTL_CATEGORY = "quality_tolerance"
"""The category of a QTL breach alert: its own, so routes can send it to the trial's quality manager."""
TRIAL_SUBJECT = "trial"
TRIAL_SITE = "all"
"""A QTL alert is about the whole trial: it names no subject and no site (the participants counted are in its
evidence, as pseudonymous ids, like any other alert)."""
UNATTRIBUTED = "unattributed"
"""Dead letters whose site cannot be read, or names no site the trial has: counted, never a label of their own."""

DOSING_MAJOR = {"major", "critical"}
ASSESSMENT_RULE = "FEVER-ASSESSMENT-MISSING"
SAE_LATE_RULE = "SAFE-SAE-LATE-REPORT"

# --------------------------------------------------------------------------------------------------------------
# Collecting the measures


class IntakeTally:
    """Dead letters per site, counted where they are sent (the monitor keeps no refused record). The site is read
    from the record if it is a JSON object with a short `site_id`; it only becomes a label if valid events name the
    same site (`collect`), so a hostile record can never add a label. Bounded: past `max_sites` distinct values,
    the rest count as unattributed."""

    def __init__(self, *, max_sites: int = 1000) -> None:
        self.dead: Counter[str] = Counter()
        self.max_sites = max_sites

    def dead_lettered(self, raw: bytes | str | None) -> None:
        site = UNATTRIBUTED
        try:
            import json

            value = json.loads(raw) if raw else None
            candidate = value.get("site_id") if isinstance(value, dict) else None
            if isinstance(candidate, str) and 0 < len(candidate) <= 64:
                site = candidate
        except (ValueError, TypeError, UnicodeDecodeError):
            pass
        if site not in self.dead and len(self.dead) >= self.max_sites:
            site = UNATTRIBUTED
        self.dead[site] += 1


@dataclass(frozen=True)
class AlertTiming:
    """One alert as the inbox store holds it: enough for the age of open alerts and the time to acknowledge."""

    site_id: str
    state: str
    raised_at: dt.datetime
    ack_at: dt.datetime | None


@dataclass
class Measures:
    """Every measure, per site, at one instant. `participants` keeps who is counted by a participant measure
    (a QTL's evidence lists them); `sites` is every site of the trial; `site_participants` and `exposure_days`
    decide the minimum accrual."""

    at: dt.datetime
    sites: list[str]
    counts: dict[str, dict[str, float]] = field(default_factory=dict)
    participants: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    site_participants: dict[str, int] = field(default_factory=dict)
    exposure_days: dict[str, float] = field(default_factory=dict)

    def add(self, measure: str, site: str, amount: float = 1.0) -> None:
        per = self.counts.setdefault(measure, {})
        per[site] = per.get(site, 0.0) + amount

    def person(self, measure: str, site: str, subject_id: str) -> None:
        self.participants.setdefault(measure, {}).setdefault(site, set()).add(subject_id)

    def sample(self, measure: str, site: str, value: float) -> None:
        self.samples.setdefault(measure, {}).setdefault(site, []).append(value)

    def value(self, measure: str, site: str) -> float:
        if MEASURES[measure].kind == "participants":
            return float(len(self.participants.get(measure, {}).get(site, ())))
        return self.counts.get(measure, {}).get(site, 0.0)

    def trial(self, measure: str) -> float:
        return sum(self.value(measure, s) for s in self.sites)

    def trial_participants(self, measure: str) -> list[str]:
        return sorted(set().union(*self.participants.get(measure, {}).values()))


def _hours(delta: dt.timedelta) -> float:
    return delta.total_seconds() / 3600.0


def collect(*, subjects: Iterable[Any], open_alerts: Iterable[Alert], now: dt.datetime, grace_hours: float,
            follow_up_days: float, intake: IntakeTally | None = None,
            store_alerts: Sequence[AlertTiming] | None = None, store_now: dt.datetime | None = None,
            extra_sites: Iterable[str] = ()) -> Measures:
    """Compute every measure from the monitor's subjects (`SubjectState`), its open alerts and the clock. Cheap
    enough to run every minute on the service thread: one pass over the events held. The inbox store's times are
    wall-clock times, so its ages are measured from `store_now` (the wall clock), not from the event clock."""
    grace = dt.timedelta(hours=grace_hours)
    subjects = list(subjects)
    sites = sorted({s.site_id for s in subjects} | set(extra_sites))
    m = Measures(at=now, sites=sites)
    for s in subjects:
        site = s.site_id
        by_type = s.by_type()
        enrollments = by_type.get("enrollment", [])
        if enrollments:
            m.person("participants_enrolled", site, s.subject_id)
            m.site_participants[site] = m.site_participants.get(site, 0) + 1
            start = enrollments[0].occurred_at
            end = min(now, start + dt.timedelta(days=follow_up_days))
            days = max(0.0, (end - start).total_seconds() / 86400.0)
            m.exposure_days[site] = m.exposure_days.get(site, 0.0) + days
            m.add("participant_weeks", site, days / 7.0)
        study = [e for e in by_type.get("drug_administration", []) if getattr(e, "study_drug", False)]
        if study:
            t0 = study[0].occurred_at
            if s.arm == "anakinra":
                for hx in (12, 24):
                    if now >= t0 + dt.timedelta(hours=hx + 1) + grace:
                        m.add("h12_h24_assessments_due", site)
            if now >= t0 + dt.timedelta(hours=48) + grace:
                m.person("endpoint_assessments_due", site, s.subject_id)
        for ae in by_type.get("adverse_event", []):
            if getattr(ae, "serious", None) is True:
                m.add("serious_adverse_events", site)
        for stored in s.events.values():
            m.add("records_received", site)
            first = stored.first_recorded_at or stored.event.recorded_at
            m.sample("data_entry_delay_hours", site, _hours(first - stored.event.occurred_at))
    for site in sites:  # every site has every count, zeros included (a site with none is in the funnel too)
        for name, measure in MEASURES.items():
            if measure.kind in ("count", "exposure"):
                m.counts.setdefault(name, {}).setdefault(site, 0.0)
    known = set(sites)
    if intake is not None:
        for site, n in intake.dead.items():
            target = site if site in known else UNATTRIBUTED
            if target in known:
                m.add("dead_lettered_records", target, n)
                m.add("records_received", target, n)
    for a in open_alerts:
        site = a.site_id
        if site not in known:
            continue
        values = a.evidence.get("values", {}) if isinstance(a.evidence, dict) else {}
        if a.category == "dosing" and a.severity in DOSING_MAJOR:
            m.add("major_dosing_deviations", site)
            m.person("participants_with_major_dosing_deviation", site, a.subject_id)
        if a.category == "eligibility":
            m.add("eligibility_alerts", site)
            if a.severity in DOSING_MAJOR:
                m.person("participants_ineligible", site, a.subject_id)
        if a.rule == ASSESSMENT_RULE:
            if values.get("window") in ("H12", "H24"):
                m.add("missed_h12_h24_assessments", site)
            elif values.get("window") == "ENDPOINT":
                m.person("endpoint_assessments_missing", site, a.subject_id)
        if a.rule == SAE_LATE_RULE:
            m.add("late_sae_reports", site)
        if store_alerts is None:
            try:
                detected = dt.datetime.fromisoformat(a.detected_at)
                m.sample("open_alert_age_days", site, max(0.0, (now - detected).total_seconds() / 86400.0))
            except (ValueError, TypeError):
                pass
    wall = store_now or now
    for t in store_alerts or ():
        if t.site_id not in known:
            continue
        if t.state in ("raised", "acknowledged"):
            m.sample("open_alert_age_days", t.site_id, max(0.0, (wall - t.raised_at).total_seconds() / 86400.0))
        if t.ack_at is not None:
            m.sample("time_to_acknowledge_hours", t.site_id, max(0.0, _hours(t.ack_at - t.raised_at)))
    return m


def timings_from_store(store: Any) -> list[AlertTiming]:
    """The inbox store's alerts as AlertTiming (AlertStore.alert_timings: site, state, raised and ack instants)."""
    out = []
    for site, state, raised, acked in store.alert_timings():
        try:
            raised_at = dt.datetime.fromisoformat(raised)
            ack_at = dt.datetime.fromisoformat(acked) if acked else None
        except (TypeError, ValueError):
            continue
        out.append(AlertTiming(site_id=site, state=state, raised_at=raised_at, ack_at=ack_at))
    return out


# --------------------------------------------------------------------------------------------------------------
# Scores


Flag = Literal["green", "amber", "red", "none"]


@dataclass(frozen=True)
class SiteScore:
    """One site on one KRI. `flag` is `none` (with `reason`) under the minimum accrual or for a descriptive KRI;
    `test` says how the score was obtained (`normal` approximation with over-dispersion, `fisher`, `poisson`)."""

    kri: str
    site: str
    numerator: float
    denominator: float
    value: float | None
    score: float | None
    flag: Flag
    test: str
    reason: str = ""
    limits: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class KriResult:
    kri: KriSpec
    trial_rate: float | None
    phi: float | None
    sites: list[SiteScore]


def _flag(score: float, thresholds: Thresholds) -> Flag:
    if abs(score) >= thresholds.red:
        return "red"
    if abs(score) >= thresholds.amber:
        return "amber"
    return "green"


TAIL = 80
"""Fisher's test sums the tables no more likely than the observed one. With an expected count under
`exact_below_expected` (5), tables more than TAIL events above the observed count have probabilities far below
1e-30 of the observed one's and are left out of the sum, which keeps the test a fixed-size vectorised call."""


def _exact_scores(method: str, x: np.ndarray, n: np.ndarray, total_x: float,
                  total_n: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact tests of each small site against the rest of the trial, vectorised over sites (scipy.stats):
    binomial KRIs by Fisher's exact test on [[x, n - x], [rest_x, rest_n - rest_x]] (two-sided: the hypergeometric
    probabilities no larger than the observed table's, as scipy.stats.fisher_exact computes it), rates by the exact
    Poisson test of x against the rest's rate times n (two-sided: twice the smaller tail). The p-value becomes the
    signed z with the same two-sided normal p."""
    rest_x, rest_n = total_x - x, total_n - n
    if method == "binomial":
        xs = np.rint(x).astype(np.int64)
        ns = np.rint(n).astype(np.int64)
        big_n, big_k = int(round(total_n)), int(round(total_x))
        hi = np.minimum(ns, big_k)
        lo = np.maximum(0, big_k - (big_n - ns))
        width = int(np.max(np.minimum(hi, xs + TAIL) - lo)) + 1 if len(xs) else 1
        grid = lo[:, None] + np.arange(width)[None, :]
        valid = grid <= np.minimum(hi, xs + TAIL)[:, None]
        logp = stats.hypergeom.logpmf(np.where(valid, grid, lo[:, None]), big_n, big_k, ns[:, None])
        observed = stats.hypergeom.logpmf(xs, big_n, big_k, ns)
        keep = valid & (logp <= observed[:, None] + 1e-7)
        p = np.minimum(1.0, np.where(keep, np.exp(logp), 0.0).sum(axis=1))
        expected = np.where(rest_n > 0, rest_x / np.where(rest_n > 0, rest_n, 1.0), 0.0) * n
        test = "fisher"
    else:
        rate = np.where(rest_n > 0, rest_x / np.where(rest_n > 0, rest_n, 1.0), total_x / max(total_n, 1e-300))
        expected = rate * n
        k = np.rint(x)
        with np.errstate(divide="ignore", invalid="ignore"):
            lower = stats.poisson.cdf(k, expected)
            upper = stats.poisson.sf(k - 1, expected)
        p = np.where(expected > 0, np.minimum(1.0, 2.0 * np.minimum(lower, upper)), np.where(k == 0, 1.0, 0.0))
        test = "poisson"
    direction = x - expected
    z = np.where((p >= 1.0) | (direction == 0), 0.0,
                 np.copysign(stats.norm.isf(np.clip(p, 1e-300, 1.0) / 2.0), direction))
    return z, np.array([test] * len(x), dtype=object)


def score_sites(*, kri: KriSpec, sites: Sequence[str], numerators: Sequence[float], denominators: Sequence[float],
                participants: Sequence[int], exposure_days: Sequence[float]) -> KriResult:
    """Score every site on one ratio KRI, vectorised over sites (BENCHMARKS.md: 1,000 sites x 10 KRIs in well
    under a second)."""
    x = np.asarray(numerators, dtype=float)
    n = np.asarray(denominators, dtype=float)
    if kri.method == "binomial":
        x = np.minimum(x, n)  # a count can not exceed its denominator (an open alert whose due count lags)
    people = np.asarray(participants, dtype=float)
    exposure = np.asarray(exposure_days, dtype=float)
    short_people = people < kri.minimum.participants
    short_time = exposure < kri.minimum.exposure_days
    no_den = n <= 0
    eligible = ~(short_people | short_time | no_den)
    out: list[SiteScore] = []
    mu: float | None = None
    phi: float | None = None
    z = np.zeros(len(x))
    tests = np.array(["normal"] * len(x), dtype=object)
    var = np.zeros(len(x))
    if eligible.any():
        mu = float(x[eligible].sum() / n[eligible].sum())
        if kri.method == "binomial":
            var_unit = mu * (1.0 - mu)
        else:
            var_unit = mu
        with np.errstate(divide="ignore", invalid="ignore"):
            metric = np.where(n > 0, x / np.where(n > 0, n, 1.0), 0.0)
            var = np.where(n > 0, var_unit / np.where(n > 0, n, 1.0), 0.0)
            if var_unit > 0:
                z0 = np.where(eligible, (metric - mu) / np.sqrt(var), 0.0)
                phi = float(np.mean(z0[eligible] ** 2))
                z = np.where(eligible, z0 / math.sqrt(phi), 0.0) if phi > 0 else np.zeros(len(x))
            else:
                phi = 0.0
        total_x, total_n = float(x[eligible].sum()), float(n[eligible].sum())
        small = np.nonzero(eligible & (mu * n < kri.exact_below_expected))[0]
        if len(small):
            z[small], tests[small] = _exact_scores(kri.method, x[small], n[small], total_x, total_n)
    for i, site in enumerate(sites):
        value = float(x[i] / n[i]) if n[i] > 0 else None
        if not eligible[i]:
            reasons = []
            if short_people[i]:
                reasons.append(f"{int(people[i])} participant{'s' if people[i] != 1 else ''}, under the minimum "
                               f"of {kri.minimum.participants}")
            if short_time[i]:
                reasons.append(f"{exposure[i]:.0f} days of exposure, under the minimum of "
                               f"{kri.minimum.exposure_days:g}")
            if no_den[i] and not reasons:
                reasons.append(f"no {kri.denominator} yet")
            out.append(SiteScore(kri=kri.name, site=site, numerator=float(x[i]), denominator=float(n[i]),
                                 value=value, score=None, flag="none", test="", reason="not flagged: "
                                 + "; ".join(reasons)))
            continue
        limits: dict[str, float] = {}
        if mu is not None and phi is not None and n[i] > 0:
            spread = math.sqrt(max(phi, 0.0) * var[i])
            for label, k in (("red", kri.thresholds.red), ("amber", kri.thresholds.amber)):
                limits[f"upper_{label}"] = mu + k * spread
                limits[f"lower_{label}"] = max(0.0, mu - k * spread)
        score = float(z[i])
        out.append(SiteScore(kri=kri.name, site=site, numerator=float(x[i]), denominator=float(n[i]), value=value,
                             score=score, flag=_flag(score, kri.thresholds), test=str(tests[i]), limits=limits))
    return KriResult(kri=kri, trial_rate=mu, phi=phi, sites=out)


def _statistic(values: list[float], statistic: str | None) -> float | None:
    if not values:
        return None
    if statistic == "median":
        return float(statistics.median(values))
    if statistic == "p90":
        return float(np.percentile(np.asarray(values), 90))
    return float(statistics.fmean(values))


def score_all(spec: KriFile, m: Measures) -> list[KriResult]:
    out = []
    for kri in spec.kris:
        if kri.method == "descriptive":
            per = m.samples.get(kri.numerator, {})
            rows = []
            for site in m.sites:
                values = per.get(site, [])
                stat = _statistic(values, kri.statistic)
                rows.append(SiteScore(kri=kri.name, site=site, numerator=float(len(values)), denominator=0.0,
                                      value=stat, score=None, flag="none", test="descriptive",
                                      reason="" if values else "no data"))
            out.append(KriResult(kri=kri, trial_rate=_statistic([v for vs in per.values() for v in vs],
                                                                kri.statistic), phi=None, sites=rows))
            continue
        den = kri.denominator or ""
        out.append(score_sites(
            kri=kri, sites=m.sites, numerators=[m.value(kri.numerator, s) for s in m.sites],
            denominators=[m.value(den, s) for s in m.sites],
            participants=[m.site_participants.get(s, 0) for s in m.sites],
            exposure_days=[m.exposure_days.get(s, 0.0) for s in m.sites]))
    return out


# --------------------------------------------------------------------------------------------------------------
# Quality tolerance limits


@dataclass(frozen=True)
class QtlResult:
    qtl: QtlSpec
    numerator: float
    denominator: float
    figure: float | None
    breached: bool
    participants: list[str]


def evaluate_qtls(spec: KriFile, m: Measures) -> list[QtlResult]:
    out = []
    for q in spec.qtls:
        num, den = m.trial(q.numerator), m.trial(q.denominator)
        figure = num / den if den > 0 else None
        people = m.trial_participants(q.numerator) if MEASURES[q.numerator].kind == "participants" else []
        out.append(QtlResult(qtl=q, numerator=num, denominator=den, figure=figure,
                             breached=figure is not None and figure > q.limit + 1e-12, participants=people))
    return out


def _qtl_alert_id(qtl_id: str, occurrence: int) -> str:
    text = f"{qtl_id}|{TRIAL_SUBJECT}|qtl" + (f"|{occurrence}" if occurrence else "")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


class QtlBook:
    """Open QTL breaches; `reconcile` turns the latest figures into raised and withdrawn alert records, like the
    alert book does for rule matches. A breach that ends and comes back is a new alert (a new occurrence number,
    so a new id); one that persists is not raised again, whatever its figure does meanwhile."""

    def __init__(self) -> None:
        self.open: dict[str, Alert] = {}
        self._occurrences: Counter[str] = Counter()

    def adopt(self, open_alerts: Iterable[Alert]) -> None:
        """After a restart, take over the QTL alerts the alerts topic still holds open (read back by the service),
        so a breach still in force is not raised twice and one that ended meanwhile is withdrawn."""
        for alert in open_alerts:
            if alert.category != QTL_CATEGORY or alert.status != "raised" or alert.rule in self.open:
                continue
            self.open[alert.rule] = alert
            for n in range(10_000):
                if _qtl_alert_id(alert.rule, n) == alert.alert_id:
                    self._occurrences[alert.rule] = max(self._occurrences[alert.rule], n + 1)
                    break

    def reconcile(self, results: Sequence[QtlResult], *, now: dt.datetime, version: str) -> list[Alert]:
        out: list[Alert] = []
        when = now.isoformat()
        for r in results:
            q = r.qtl
            held = self.open.get(q.id)
            if r.breached and held is None:
                n = self._occurrences[q.id]
                self._occurrences[q.id] += 1
                figure = r.figure or 0.0
                alert = Alert(
                    alert_id=_qtl_alert_id(q.id, n), status="raised", rule=q.id, title=q.title,
                    subject_id=TRIAL_SUBJECT, site_id=TRIAL_SITE, severity=q.severity, category=QTL_CATEGORY,
                    at=when, detected_at=when, rule_version=version,
                    message=(f"{q.title}: {figure:.1%} ({r.numerator:g} of {r.denominator:g}) is over the quality "
                             f"tolerance limit of {q.limit:.1%}."),
                    expects=q.expects or f"{q.numerator} / {q.denominator} at or under {q.limit:.1%} trial-wide.",
                    evidence={"fact": "quality_tolerance_limit",
                              "values": {"figure": round(figure, 6), "limit": q.limit, "numerator": r.numerator,
                                         "denominator": r.denominator, "numerator_measure": q.numerator,
                                         "denominator_measure": q.denominator},
                              "participants": r.participants})
                self.open[q.id] = alert
                out.append(alert)
            elif not r.breached and held is not None and r.figure is not None:
                del self.open[q.id]
                out.append(held.model_copy(update={
                    "status": "retracted", "retracts": held.alert_id, "detected_at": when, "rule_version": version,
                    "evidence": {**held.evidence, "back_within_limit": {
                        "figure": round(r.figure, 6), "numerator": r.numerator, "denominator": r.denominator}}}))
        return out


# --------------------------------------------------------------------------------------------------------------
# Prometheus metrics (bounded labels: site, kri, bound, qtl; never a subject)

FLAG_VALUE = {"green": 0.0, "amber": 1.0, "red": 2.0, "none": -1.0}
KRI_LABELS = {"site", "kri", "bound", "qtl"}


class KriMetrics:
    """The KRI and QTL gauges, served from the latest recomputation. A custom collector rather than labelled
    Gauges: 1,000 sites x 10 KRIs is ~90,000 label sets, which cost seconds to set one by one at each
    recomputation; here a recomputation only swaps one reference (atomic, so the HTTP thread that scrapes never
    sees half a table) and the families are built at scrape time. Label sets that disappear (a site gone, a KRI
    removed) disappear with the snapshot, so Grafana never shows a stale flag."""

    def __init__(self, *, registry: Any) -> None:
        self._latest: tuple[Sequence[KriResult], Sequence[QtlResult], float] | None = None
        registry.register(self)

    def publish(self, results: Sequence[KriResult], qtls: Sequence[QtlResult], seconds: float) -> None:
        self._latest = (list(results), list(qtls), seconds)

    def describe(self) -> list[Any]:
        return []  # families are known only once computed; registering must not call collect()

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        latest = self._latest
        if latest is None:
            return
        results, qtls, seconds = latest

        def family(name: str, doc: str, labels: list[str]) -> Any:
            return GaugeMetricFamily(name, doc, labels=labels)

        value = family("protocol_monitor_kri_value", "KRI value per site (a rate, or the descriptive statistic)",
                       ["site", "kri"])
        numerator = family("protocol_monitor_kri_numerator", "KRI numerator per site", ["site", "kri"])
        denominator = family("protocol_monitor_kri_denominator", "KRI denominator per site", ["site", "kri"])
        score = family("protocol_monitor_kri_score", "KRI score (z, over-dispersion adjusted, or the exact test's "
                       "equivalent) per site; absent when the site is not flagged", ["site", "kri"])
        flag = family("protocol_monitor_kri_flag", "KRI flag per site: 0 green, 1 amber, 2 red, -1 not flagged "
                      "(under the minimum accrual)", ["site", "kri"])
        limit = family("protocol_monitor_kri_funnel_limit", "Funnel limit at the site's denominator",
                       ["site", "kri", "bound"])
        trial_rate = family("protocol_monitor_kri_trial_rate", "Trial-wide KRI rate (sites over the minimum)",
                            ["kri"])
        phi = family("protocol_monitor_kri_overdispersion", "Spiegelhalter over-dispersion factor phi", ["kri"])
        for r in results:
            name = r.kri.name
            for s in r.sites:
                if s.value is not None:
                    value.add_metric([s.site, name], s.value)
                numerator.add_metric([s.site, name], s.numerator)
                denominator.add_metric([s.site, name], s.denominator)
                if s.score is not None:
                    score.add_metric([s.site, name], s.score)
                if r.kri.method != "descriptive":
                    flag.add_metric([s.site, name], FLAG_VALUE[s.flag])
                for bound, v in s.limits.items():
                    limit.add_metric([s.site, name, bound], v)
            if r.trial_rate is not None:
                trial_rate.add_metric([name], r.trial_rate)
            if r.phi is not None:
                phi.add_metric([name], r.phi)
        qtl_value = family("protocol_monitor_qtl_value", "QTL figure (a share, 0-1)", ["qtl"])
        qtl_limit = family("protocol_monitor_qtl_limit", "QTL limit (a share, 0-1)", ["qtl"])
        qtl_breached = family("protocol_monitor_qtl_breached", "1 while the QTL is breached", ["qtl"])
        for q in qtls:
            if q.figure is not None:
                qtl_value.add_metric([q.qtl.id], q.figure)
            qtl_limit.add_metric([q.qtl.id], q.qtl.limit)
            qtl_breached.add_metric([q.qtl.id], 1.0 if q.breached else 0.0)
        took = GaugeMetricFamily("protocol_monitor_kri_recompute_seconds", "Duration of the last KRI recomputation",
                                 value=seconds)
        yield from (value, numerator, denominator, score, flag, limit, trial_rate, phi, qtl_value, qtl_limit,
                    qtl_breached, took)


# --------------------------------------------------------------------------------------------------------------
# The scheduled recomputation


@dataclass(frozen=True)
class Snapshot:
    at: dt.datetime
    results: list[KriResult]
    qtls: list[QtlResult]
    seconds: float


class SiteRisk:
    """Recomputes the KRIs and QTLs of a monitor on a schedule (`interval_s`, default a minute), publishes the
    gauges and returns the QTL alert records to send through the alert path. Dependencies are passed in: the KRI
    spec, the intake tally, the metrics (optional), and a store reader for the inbox timings (optional).
    `raise_alerts` False computes the QTLs (gauges, table) without raising alerts: with several instances, each
    sees only its partitions' subjects, so exactly one instance must raise them (setting `qtl_alerts`)."""

    def __init__(self, *, spec: KriFile, intake: IntakeTally, metrics: KriMetrics | None = None,
                 interval_s: float = 60.0, store_alerts: Any = None, raise_alerts: bool = True) -> None:
        self.spec = spec
        self.raise_alerts = raise_alerts
        self.intake = intake
        self.metrics = metrics
        self.interval_s = interval_s
        self.store_alerts = store_alerts  # () -> list[AlertTiming], or None
        self.qtl_book = QtlBook()
        self.last: Snapshot | None = None
        self._at = -math.inf

    def due(self, monotonic_now: float | None = None) -> bool:
        return (time.monotonic() if monotonic_now is None else monotonic_now) - self._at >= self.interval_s

    def recompute(self, monitor: Any) -> list[Alert]:
        """Scores and QTLs from the monitor's state now; returns the QTL alert records that changed."""
        started = time.perf_counter()
        self._at = time.monotonic()
        now = monitor.clock.now()
        timings = self.store_alerts() if self.store_alerts is not None else None
        m = collect(subjects=monitor.subjects.values(), open_alerts=monitor.book.open_alerts(), now=now,
                    grace_hours=monitor.rules.parameters.deadline_grace_hours,
                    follow_up_days=self.spec.follow_up_days, intake=self.intake, store_alerts=timings,
                    store_now=dt.datetime.now(dt.timezone.utc) if timings is not None else None)
        results = score_all(self.spec, m)
        qtls = evaluate_qtls(self.spec, m)
        alerts = self.qtl_book.reconcile(qtls, now=now, version=monitor.rules.version) if self.raise_alerts else []
        seconds = time.perf_counter() - started
        self.last = Snapshot(at=now, results=results, qtls=qtls, seconds=seconds)
        if self.metrics is not None:
            self.metrics.publish(results, qtls, seconds)
        return alerts

    def maybe_recompute(self, monitor: Any) -> list[Alert]:
        return self.recompute(monitor) if self.due() else []


# --------------------------------------------------------------------------------------------------------------
# The table `protocol-monitor kri` prints


def _num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}".rstrip("0").rstrip(".") if abs(v) < 1e6 else f"{v:.3g}"


def format_table(snapshot: Snapshot) -> str:
    lines = [f"site risk at {snapshot.at.isoformat()} (computed in {snapshot.seconds * 1000:.1f} ms)", ""]
    header = f"{'kri':<32} {'site':<12} {'num':>7} {'den':>9} {'value':>9} {'score':>7} {'flag':<6} {'test':<8} note"
    lines.append(header)
    lines.append("-" * len(header))
    for r in snapshot.results:
        for s in r.sites:
            lines.append(f"{r.kri.name:<32} {s.site:<12} {_num(s.numerator, 2):>7} "
                         f"{_num(s.denominator, 2) if r.kri.method != 'descriptive' else '':>9} "
                         f"{_num(s.value, 4):>9} {_num(s.score, 2):>7} {s.flag if s.flag != 'none' else '':<6} "
                         f"{s.test:<8} {s.reason}".rstrip())
        if r.trial_rate is not None:
            lines.append(f"{r.kri.name:<32} {'(trial)':<12} {'':>7} {'':>9} {_num(r.trial_rate, 4):>9} "
                         f"{'':>7} {'':<6} {'':<8} phi {_num(r.phi, 3)}".rstrip())
    lines += ["", f"{'qtl':<32} {'figure':>8} {'limit':>7} {'num':>6} {'den':>6}  state"]
    for q in snapshot.qtls:
        fig = f"{q.figure:.1%}" if q.figure is not None else "-"
        lines.append(f"{q.qtl.id:<32} {fig:>8} {q.qtl.limit:>7.1%} {q.numerator:>6g} {q.denominator:>6g}  "
                     f"{'BREACHED' if q.breached else 'within'}")
    return "\n".join(lines)

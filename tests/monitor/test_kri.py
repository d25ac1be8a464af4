"""Site risk (issue 20): KRIs, funnel-plot flags and QTLs.

A generated cohort of 22 sites is replayed through the real monitor. One site (30 participants) is planted with
major dosing deviations at about three times the trial's rate, one site has only 2 participants. The planted site
must be red on the dosing KRI and on no other; the small site must not be flagged and say why; and every score must
equal a reference computed here independently: the counts from the alerts and events themselves, the score from
the published formulas (gsm / Spiegelhalter 2005 funnel plot; the exact Poisson and Fisher tests from their
definitions with `math`, not scipy).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import random
import shutil
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from connectors.base import RawRecord
from connectors.delivery import Route, Router
from connectors.memory import ListSink, MemorySource
from monitor.clock import ReplayClock
from monitor.config import Settings
from monitor.errors import RuleFileError
from monitor.evaluator import Monitor
from monitor.generate import cohort_plan, site_ids, subject_events
from monitor.kri import (QTL_CATEGORY, IntakeTally, KriMetrics, KriSpec, SiteRisk, format_table, load_kri,
                         score_sites)
from monitor.notify import Notifier
from monitor.replay import replay
from monitor.rules import DEFAULT_RULES_DIR, load_rules
from monitor.service import MonitorService
from monitor.store import AlertStore
from tests.support.kri_cohort import qtl_cohort

SITES = site_ids(22)
PLANTED, SMALL = SITES[0], SITES[21]
OTHER_DEVIATIONS = ("low_anc", "clarithromycin", "fahrenheit_typo", "nonprotocol_site")
DAYS = 15  # the anakinra course (14 days) is complete, so no site has a cut-short course


def planted_cohort() -> list[dict]:
    """22 sites: PLANTED has 30 participants, 12 of its 15 anakinra participants miss the H12 supplement (a
    major dosing deviation); the 20 ordinary sites have 10 participants with one such deviation each; SMALL has 2
    participants. Trial rate 32/232 per participant, PLANTED 12/30: about three times. Non-dosing deviations
    (eligibility, data quality) are spread over every site. Sites are interleaved in randomisation order, so
    exposure is comparable."""
    layout = [(PLANTED, 30, 12)] + [(s, 10, 1) for s in SITES[1:21]] + [(SMALL, 2, 0)]
    slots = [(site, j, deviations) for site, n, deviations in layout for j in range(n)]
    random.Random(5).shuffle(slots)  # noqa: S311 - test data
    plans = cohort_plan(subjects=len(slots), seed=11, sites=len(SITES), deviation_rate=0.0)
    events = []
    for k, (plan, (site, j, deviations)) in enumerate(zip(plans, slots), start=1):
        arm = "anakinra" if j % 2 == 0 else "ivig"
        deviation = "missed_h12_supplement" if arm == "anakinra" and j < 2 * deviations else None
        if deviation is None and k % 7 == 0:
            deviation = OTHER_DEVIATIONS[(k // 7) % len(OTHER_DEVIATIONS)]
        prefix = "ANA" if arm == "anakinra" else "IVG"
        plan = dataclasses.replace(plan, site_id=site, arm=arm, deviation=deviation,
                                   subject_id=f"{prefix}-{plan.number:05d}")
        events.extend(subject_events(plan, DAYS))
    events.sort(key=lambda e: (dt.datetime.fromisoformat(e["recorded_at"]), e["subject_id"], e["event_id"]))
    return events


@pytest.fixture(scope="module")
def cohort():
    events = planted_cohort()
    rules = load_rules()
    clock = ReplayClock()
    monitor = Monitor.create(rules=rules, clock=clock)
    replay(source=MemorySource(events=events), monitor=monitor, clock=clock, alerts=ListSink(), rejects=ListSink(),
           until=None)
    registry = CollectorRegistry()
    risk = SiteRisk(spec=rules.kri, intake=IntakeTally(), metrics=KriMetrics(registry=registry))
    qtl_alerts = risk.recompute(monitor)
    assert risk.last is not None
    results = {r.kri.name: r for r in risk.last.results}
    return {"events": events, "monitor": monitor, "risk": risk, "results": results, "registry": registry,
            "qtl_alerts": qtl_alerts}


def by_site(result) -> dict:
    return {s.site: s for s in result.sites}


def test_the_cohort_has_22_sites_a_planted_one_and_a_2_participant_one(cohort):
    enrolled: dict[str, set[str]] = {}
    for e in cohort["events"]:
        if e["type"] == "enrollment":
            enrolled.setdefault(e["site_id"], set()).add(e["subject_id"])
    assert len(enrolled) == 22 and len(enrolled[SMALL]) == 2 and len(enrolled[PLANTED]) == 30
    dosing = by_site(cohort["results"]["major_dosing_deviation_rate"])
    assert dosing[PLANTED].numerator == 12
    others = sum(s.numerator for site, s in dosing.items() if site not in (PLANTED, SMALL))
    trial_rate = (12 + others) / 232
    assert 12 / 30 >= 2.8 * trial_rate, "the planted site runs at about three times the trial's rate"


def test_the_planted_site_is_red_on_dosing_deviations_and_on_no_unrelated_kri(cohort):
    results = cohort["results"]
    assert by_site(results["major_dosing_deviation_rate"])[PLANTED].flag == "red"
    for name, result in results.items():
        if name == "major_dosing_deviation_rate":
            continue
        assert by_site(result)[PLANTED].flag != "red", f"{PLANTED} is red on the unrelated KRI {name}"
    reds = [s.site for s in results["major_dosing_deviation_rate"].sites if s.flag == "red"]
    assert reds == [PLANTED]


def test_the_2_participant_site_is_not_flagged_and_the_reason_says_so(cohort):
    for name, result in cohort["results"].items():
        row = by_site(result)[SMALL]
        assert row.flag == "none" and row.score is None, name
        if result.kri.method != "descriptive":
            assert "2 participants, under the minimum of 3" in row.reason, row.reason
    table = format_table(cohort["risk"].last)
    line = next(x for x in table.splitlines() if x.startswith("major_dosing_deviation_rate") and SMALL in x)
    assert "not flagged: 2 participants, under the minimum of 3" in line


# ---- the reference computation, written from the published formulas ------------------------------------------
def reference_scores(numerators: dict[str, float], denominators: dict[str, float], eligible: set[str], *,
                     method: str, exact_below: float = 5.0) -> dict[str, float]:
    """gsm Analyze_NormalApprox: mu = sum x / sum n; z0 = (x/n - mu) / sqrt(V/n), V = mu(1-mu) or mu;
    phi = mean(z0^2); z = z0 / sqrt(phi). A site whose expected count mu*n is under 5: an exact test against the
    rest of the trial (Fisher's hypergeometric, or the Poisson with the rest's rate), its two-sided p turned into
    the z with the same two-sided p, signed by observed - expected."""
    sites = sorted(eligible)
    mu = sum(numerators[s] for s in sites) / sum(denominators[s] for s in sites)
    var = mu * (1 - mu) if method == "binomial" else mu
    z0 = {s: (numerators[s] / denominators[s] - mu) / math.sqrt(var / denominators[s]) for s in sites}
    phi = sum(v * v for v in z0.values()) / len(sites)
    out = {s: z0[s] / math.sqrt(phi) for s in sites}
    total_x = sum(numerators[s] for s in sites)
    total_n = sum(denominators[s] for s in sites)
    for s in sites:
        if mu * denominators[s] >= exact_below:
            continue
        x, n = round(numerators[s]), denominators[s]
        rest_x, rest_n = total_x - numerators[s], total_n - n
        if method == "poisson":
            lam = rest_x / rest_n * n

            def pmf(k: int, lam: float = lam) -> float:
                return math.exp(-lam + k * math.log(lam) - math.lgamma(k + 1))

            lower = sum(pmf(k) for k in range(0, x + 1))
            upper = 1.0 - sum(pmf(k) for k in range(0, x))
            p = min(1.0, 2 * min(lower, upper))
            expected = lam
        else:  # Fisher's exact test, two-sided: tables no more likely than the observed one
            n_site, n_rest, k_all = round(n), round(rest_n), round(total_x)

            def hyper(k: int) -> float:
                return math.comb(n_site, k) * math.comb(n_rest, k_all - k) / math.comb(n_site + n_rest, k_all)

            observed = hyper(x)
            p = min(1.0, sum(hyper(k) for k in range(max(0, k_all - n_rest), min(n_site, k_all) + 1)
                             if hyper(k) <= observed * (1 + 1e-7)))
            expected = rest_x / rest_n * n
        # the z whose two-sided normal p is p: solve 2 * (1 - Phi(z)) = p by bisection on math.erfc
        lo, hi = 0.0, 40.0
        for _ in range(200):
            mid = (lo + hi) / 2
            if math.erfc(mid / math.sqrt(2)) > p:
                lo = mid
            else:
                hi = mid
        out[s] = 0.0 if p >= 1.0 or x == expected else math.copysign(lo, x - expected)
    return out


def test_dosing_scores_equal_the_reference_computed_from_alerts_and_events(cohort):
    monitor = cohort["monitor"]
    now = monitor.clock.now()
    numerators = {s: 0.0 for s in SITES}
    for a in monitor.book.open_alerts():
        if a.category == "dosing" and a.severity in ("major", "critical"):
            numerators[a.site_id] += 1
    weeks = {s: 0.0 for s in SITES}
    people = {s: 0 for s in SITES}
    for e in cohort["events"]:
        if e["type"] == "enrollment":
            start = dt.datetime.fromisoformat(e["occurred_at"])
            weeks[e["site_id"]] += (min(now, start + dt.timedelta(days=60)) - start).total_seconds() / (7 * 86400)
            people[e["site_id"]] += 1
    eligible = {s for s in SITES if people[s] >= 3 and weeks[s] * 7 >= 30}
    assert SMALL not in eligible and len(eligible) == 21
    expected = reference_scores(numerators, weeks, eligible, method="poisson")
    got = by_site(cohort["results"]["major_dosing_deviation_rate"])
    for site in SITES:
        assert got[site].numerator == numerators[site]
        assert got[site].denominator == pytest.approx(weeks[site], rel=1e-12)
        if site in eligible:
            assert got[site].score == pytest.approx(expected[site], abs=1e-6), site
    assert expected[PLANTED] >= 3


def test_eligibility_scores_equal_the_reference(cohort):
    monitor = cohort["monitor"]
    numerators = {s: 0.0 for s in SITES}
    for a in monitor.book.open_alerts():
        if a.category == "eligibility":
            numerators[a.site_id] += 1
    enrolled = {s: 0.0 for s in SITES}
    for e in cohort["events"]:
        if e["type"] == "enrollment":
            enrolled[e["site_id"]] += 1
    eligible = {s for s in SITES if enrolled[s] >= 3}
    expected = reference_scores(numerators, enrolled, eligible, method="poisson")
    got = by_site(cohort["results"]["eligibility_alert_rate"])
    for site in eligible:
        assert got[site].score == pytest.approx(expected[site], abs=1e-6), site


@pytest.mark.parametrize("counts", [
    # (site, numerator, denominator): large counts (normal approximation) and small ones (Fisher's exact test)
    [("A", 30, 100), ("B", 10, 100), ("C", 12, 90), ("D", 14, 110), ("E", 9, 80), ("F", 11, 95)],
    [("A", 3, 12), ("B", 0, 10), ("C", 1, 11), ("D", 0, 9), ("E", 1, 14), ("F", 2, 13)],
])
def test_binomial_scores_equal_the_reference(counts):
    kri = KriSpec(name="k", title="k", numerator="late_sae_reports", denominator="serious_adverse_events",
                  method="binomial")
    sites = [c[0] for c in counts]
    result = score_sites(kri=kri, sites=sites, numerators=[c[1] for c in counts],
                         denominators=[c[2] for c in counts], participants=[10] * len(sites),
                         exposure_days=[100.0] * len(sites))
    expected = reference_scores({c[0]: c[1] for c in counts}, {c[0]: c[2] for c in counts}, set(sites),
                                method="binomial")
    for s in result.sites:
        assert s.score == pytest.approx(expected[s.site], abs=1e-6), s


def test_metrics_carry_site_and_kri_labels_only_and_never_a_subject(cohort):
    text = generate_latest(cohort["registry"]).decode()
    subjects = set(cohort["monitor"].subjects)
    for family in cohort["registry"].collect():
        for sample in family.samples:
            assert set(sample.labels) <= {"site", "kri", "bound", "qtl"}, (family.name, sample.labels)
            assert not set(sample.labels.values()) & subjects
    assert f'protocol_monitor_kri_flag{{kri="major_dosing_deviation_rate",site="{PLANTED}"}} 2.0' in text
    assert f'protocol_monitor_kri_flag{{kri="major_dosing_deviation_rate",site="{SMALL}"}} -1.0' in text


def test_the_dosing_qtl_is_breached_in_the_planted_cohort_with_its_evidence(cohort):
    alert = next(a for a in cohort["qtl_alerts"] if a.rule == "QTL-MAJOR-DOSING-SHARE")
    assert alert.category == QTL_CATEGORY and alert.status == "raised"
    values = alert.evidence["values"]
    assert values["limit"] == 0.10 and values["figure"] == pytest.approx(32 / 232, abs=1e-6)
    assert len(alert.evidence["participants"]) == 32


# ---- a QTL breach through the alert path: raised, routed, stored, audited, then withdrawn ---------------------
class _Source:
    def __init__(self) -> None:
        self.batches: list[list[RawRecord]] = []

    def poll(self, timeout_ms: int) -> list[RawRecord]:
        return self.batches.pop(0) if self.batches else []

    def commit(self, offsets) -> None:
        return None

    def assignment(self):
        from kafka import TopicPartition

        return {TopicPartition("events", 0)}

    def lag(self):
        return {}


class _Topic:
    """The alerts topic's producer, acknowledging everything (faults are test_service.py's subject)."""

    def __init__(self) -> None:
        self.records: list = []

    def add(self, item, error=None) -> None:
        self.records.append(item)

    def flush(self) -> None:
        return None


def _records(events: list[dict], start: int) -> list[RawRecord]:
    return [RawRecord(value=json.dumps(e).encode(), origin=f"events/0@{start + i}", topic="events", partition=0,
                      offset=start + i, timestamp_ms=None) for i, e in enumerate(events)]


def test_a_qtl_breach_is_raised_stored_audited_and_withdrawn_when_late_data_bring_the_trial_back(tmp_path):
    events, ineligible, correction = qtl_cohort()  # the lab corrects a transcription after the last event

    store = AlertStore(url=f"sqlite:///{tmp_path / 'alerts.db'}")
    router = Router(routes=[Route(name="quality-manager", sink="webhook", match={"category": [QTL_CATEGORY]},
                                  webhook={"url": "https://ctms.example.org/hooks/qtl"})], sinks={})
    notifier = Notifier(store=store, router=router)
    rules = load_rules()
    clock = ReplayClock()
    alerts = _Topic()
    svc = MonitorService(settings=Settings(clock="stream", rules_watch_seconds=0), clock=clock, alerts=alerts,
                         dead_letters=_Topic(), monitor=Monitor.create(rules=rules, clock=clock), published=set(),
                         on_alert=notifier.accept)
    svc.site_risk = SiteRisk(spec=rules.kri, intake=IntakeTally(), interval_s=0.0)
    source = _Source()
    source.batches = [_records(events, 0), [], _records([correction], len(events)), []]
    svc.attach(source)
    stop = threading.Event()
    for _ in range(4):
        svc.run_once(stop)

    qtl = [a for a in alerts.records if a.rule == "QTL-INELIGIBLE-RANDOMISED"]
    assert [a.status for a in qtl] == ["raised", "retracted"], [(a.rule, a.status) for a in alerts.records]
    raised, withdrawn = qtl
    assert raised.category == QTL_CATEGORY and raised.subject_id == "trial" and raised.site_id == "all"
    assert raised.evidence["values"]["figure"] == pytest.approx(1 / 8) and raised.evidence["values"]["limit"] == 0.02
    assert raised.evidence["participants"] == [ineligible]
    assert "12.5%" in raised.message and "2.0%" in raised.message
    assert withdrawn.retracts == raised.alert_id
    assert withdrawn.evidence["back_within_limit"]["figure"] == 0.0

    row = store.get(raised.alert_id)
    assert row["state"] == "withdrawn" and row["category"] == QTL_CATEGORY
    actions = [(e.action, e.data.get("rule")) for e in store.audit_entries()]
    assert ("alert_raised", "QTL-INELIGIBLE-RANDOMISED") in actions
    assert ("alert_retracted", "QTL-INELIGIBLE-RANDOMISED") in actions
    assert store.verify_audit() == []
    due = store.due_deliveries()
    assert (raised.alert_id, "raised", "quality-manager") in [(a, s, k) for a, s, k, _ in due]
    store.close()


# ---- rule authors' data edits ---------------------------------------------------------------------------------
@pytest.fixture()
def rules_copy(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, target)
    return target


def test_a_threshold_edit_and_a_new_kri_are_data_edits(rules_copy: Path):
    from monitor.kri import Measures, score_all

    counts = (("S1", 15), ("S2", 8), ("S3", 5), ("S4", 10), ("S5", 3), ("S6", 8))
    m = Measures(at=dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc), sites=[c[0] for c in counts])
    for site, dev in counts:
        weeks = 100.0
        m.add("major_dosing_deviations", site, dev)
        m.add("participant_weeks", site, weeks)
        m.site_participants[site] = 10
        m.exposure_days[site] = weeks * 7
        m.add("serious_adverse_events", site, 4)
    before = {s.site: s for s in score_all(load_kri(rules_copy), m)[0].sites}
    assert before["S1"].flag == "green" and before["S1"].test == "normal"

    path = rules_copy / "kri.yaml"
    text = path.read_text()
    path.write_text(text.replace("    method: poisson\n    thresholds: {amber: 2, red: 3}",
                                 "    method: poisson\n    thresholds: {amber: 1, red: 1.5}", 1))
    after = {s.site: s for s in score_all(load_kri(rules_copy), m)[0].sites}
    assert after["S1"].score == before["S1"].score and after["S1"].flag == "red"

    path.write_text(path.read_text().replace("kris:\n", "kris:\n  - name: serious_ae_rate\n"
                                             "    title: Serious adverse events per participant-week\n"
                                             "    numerator: serious_adverse_events\n"
                                             "    denominator: participant_weeks\n"
                                             "    method: poisson\n", 1))
    spec = load_rules(rules_copy).kri
    assert spec.kris[0].name == "serious_ae_rate"
    assert {s.site: s.value for s in score_all(spec, m)[0].sites}["S1"] == pytest.approx(4 / 100)


def test_rules_validate_refuses_a_kri_naming_an_unknown_numerator_with_file_and_line(rules_copy: Path, capsys):
    from monitor.cli import main

    path = rules_copy / "kri.yaml"
    lines = path.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if "numerator: missed_h12_h24_assessments" in line)
    lines[at] = lines[at].replace("missed_h12_h24_assessments", "missed_h12_assessments")
    path.write_text("".join(lines))
    with pytest.raises(RuleFileError) as caught:
        load_rules(rules_copy)
    [(where, line, message)] = caught.value.problems
    assert where == str(path) and line == at + 1
    assert "unknown measure 'missed_h12_assessments'" in message and "missed_h12_h24_assessments" in message
    assert main(["rules", "validate", str(rules_copy)]) == 3
    assert f"{path}:{at + 1}:" in capsys.readouterr().err


def test_rules_validate_accepts_the_bundled_kri_file():
    spec = load_rules().kri
    assert spec is not None and len(spec.kris) >= 9 and {q.id for q in spec.qtls} == {
        "QTL-MAJOR-DOSING-SHARE", "QTL-PRIMARY-ENDPOINT-MISSING", "QTL-INELIGIBLE-RANDOMISED"}


def test_after_a_restart_an_open_qtl_alert_is_adopted_not_raised_twice_and_withdrawn_when_over():
    from monitor.kri import QtlBook, QtlResult, QtlSpec

    q = QtlSpec(id="QTL-INELIGIBLE-RANDOMISED", title="t", numerator="participants_ineligible",
                denominator="participants_enrolled", limit=0.02)
    now = dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc)
    breached = [QtlResult(qtl=q, numerator=1, denominator=10, figure=0.1, breached=True, participants=["A"])]
    within = [QtlResult(qtl=q, numerator=0, denominator=10, figure=0.0, breached=False, participants=[])]
    [raised] = QtlBook().reconcile(breached, now=now, version="v1")
    restarted = QtlBook()
    restarted.adopt([raised])
    assert restarted.reconcile(breached, now=now, version="v1") == []
    [withdrawn] = restarted.reconcile(within, now=now, version="v1")
    assert withdrawn.status == "retracted" and withdrawn.retracts == raised.alert_id
    [again] = restarted.reconcile(breached, now=now, version="v1")
    assert again.alert_id not in (raised.alert_id,)


def test_the_kri_command_prints_the_table_for_a_replayed_file_and_for_a_store(tmp_path, capsys):
    from monitor.cli import main
    from monitor.generate import write_cohort

    events = tmp_path / "cohort.jsonl"
    assert write_cohort(subjects=12, days=2, seed=3, sites=3, deviation_rate=0.3, output=str(events)) == 0
    with events.open("a") as f:
        f.write('{"site_id": "FR-BIC-01", "broken": true}\n')  # a dead letter, counted for its site
    assert main(["kri", str(events)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("site risk at ") and "major_dosing_deviation_rate" in out and "QTL-INELIGIBLE-RANDOMISED" in out
    dead = next(line for line in out.splitlines() if line.startswith("dead_letter_rate") and "FR-BIC-01" in line)
    assert dead.split()[2] == "1"

    store = AlertStore(url=f"sqlite:///{tmp_path / 'alerts.db'}")
    rules = load_rules()
    clock = ReplayClock()
    monitor = Monitor.create(rules=rules, clock=clock)
    sink = ListSink()
    replay(source=MemorySource(events=[json.loads(x) for x in events.read_text().splitlines()[:-1]]),
           monitor=monitor, clock=clock, alerts=sink, rejects=ListSink(), until=None)
    for alert in sink.items:
        store.add_record(alert)
    first = store.list(state="raised")[0]["alert_id"]
    store.acknowledge(first, by="j.martin", reason="seen")
    store.close()
    assert main(["kri", "--store", f"sqlite:///{tmp_path / 'alerts.db'}"]) == 0
    out = capsys.readouterr().out
    assert "time_to_acknowledge_median_hours" in out and "not flagged: 0 participants, under the minimum of 3" in out


@settings(max_examples=60, deadline=None)
@given(
    path=st.sampled_from([("kris", 0, "numerator"), ("kris", 1, "method"), ("kris", 0, "thresholds"),
                            ("kris", 5, "statistic"), ("qtls", 0, "limit"), ("qtls", 1, "denominator"),
                            ("kris", 2, "minimum"), ("follow_up_days",), ("kris",), ("qtls", 2)]),
    value=st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                      st.text(max_size=12), st.lists(st.integers(), max_size=2),
                      st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)))
def test_any_mutation_of_kri_yaml_is_accepted_or_refused_with_file_and_line(tmp_path_factory, path, value):
    import yaml

    target = tmp_path_factory.mktemp("kri")
    doc = yaml.safe_load((DEFAULT_RULES_DIR / "kri.yaml").read_text())
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (target / "kri.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True))
    try:
        load_kri(target)
    except RuleFileError as exc:
        assert exc.problems and all(p[0].endswith("kri.yaml") for p in exc.problems)

"""Site-risk recomputation cost (issue 20): 1,000 sites x 10 KRIs, scored and published, against the recompute
interval (60 s by default, `kri_interval_seconds`).

    .venv/bin/python benchmarks/bench_kri.py [--sites 1000] [--kris 10] [--repeat 20] [--json PATH] [--smoke]

What is timed is what the service does every interval once the measures are collected: the scores of every KRI
(normal approximation with over-dispersion, and the exact tests for the sites whose expected count is small),
the QTLs, and publishing every gauge into a Prometheus registry. The synthetic counts are drawn so that about a
quarter of the sites are small (exact tests) and a few are under the minimum accrual, which is the expensive
mix. Collecting the measures from the monitor's state is one pass over the events held and is reported
separately by the `protocol-monitor kri` table (`computed in ... ms`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry  # noqa: E402

from monitor.kri import KriFile, KriMetrics, KriSpec, Measures, QtlSpec, evaluate_qtls, score_all  # noqa: E402

COUNT_MEASURES = ("major_dosing_deviations", "missed_h12_h24_assessments", "eligibility_alerts", "late_sae_reports",
                  "dead_lettered_records")
DENOMINATORS = {"major_dosing_deviations": ("participant_weeks", "poisson"),
                "missed_h12_h24_assessments": ("h12_h24_assessments_due", "binomial"),
                "eligibility_alerts": ("participants_enrolled", "poisson"),
                "late_sae_reports": ("serious_adverse_events", "binomial"),
                "dead_lettered_records": ("records_received", "binomial")}


def synthetic(sites: int, kris: int, seed: int) -> tuple[KriFile, Measures]:
    rng = random.Random(seed)  # noqa: S311 - benchmark data
    specs = []
    for k in range(kris):
        numerator = COUNT_MEASURES[k % len(COUNT_MEASURES)]
        denominator, method = DENOMINATORS[numerator]
        specs.append(KriSpec(name=f"kri_{k}", title=f"KRI {k}", numerator=numerator, denominator=denominator,
                             method=method))
    spec = KriFile(kris=specs, qtls=[QtlSpec(id="QTL-BENCH", title="bench", numerator="late_sae_reports",
                                             denominator="serious_adverse_events", limit=0.1)])
    names = [f"S-{i:04d}" for i in range(sites)]
    m = Measures(at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), sites=names)
    for site in names:
        people = rng.choice([2, 4, 8, 15, 30, 60])  # a quarter small, some under the minimum of 3
        m.site_participants[site] = people
        m.exposure_days[site] = people * rng.uniform(20, 60)
        weeks = m.exposure_days[site] / 7
        due = people * 2
        m.add("participant_weeks", site, weeks)
        m.add("h12_h24_assessments_due", site, due)
        m.add("serious_adverse_events", site, max(1, people // 3))
        m.add("records_received", site, people * 120)
        for _ in range(people):
            m.person("participants_enrolled", site, f"{site}-{_}")
        rate = rng.uniform(0.5, 1.5)
        m.add("major_dosing_deviations", site, rng.randint(0, max(1, int(weeks * 0.02 * rate))))
        m.add("missed_h12_h24_assessments", site, rng.randint(0, max(1, int(due * 0.05 * rate))))
        m.add("eligibility_alerts", site, rng.randint(0, max(1, int(people * 0.1 * rate))))
        m.add("late_sae_reports", site, rng.randint(0, max(1, people // 6)))
        m.add("dead_lettered_records", site, rng.randint(0, max(1, int(people * 120 * 0.01 * rate))))
    return spec, m


def run(sites: int, kris: int, repeat: int, seed: int = 1) -> dict:
    spec, m = synthetic(sites, kris, seed)
    metrics = KriMetrics(registry=CollectorRegistry())
    times, exact = [], 0
    results: list = []
    qtls: list = []
    for _ in range(repeat):
        started = time.perf_counter()
        results = score_all(spec, m)
        qtls = evaluate_qtls(spec, m)
        metrics.publish(results, qtls, 0.0)
        times.append(time.perf_counter() - started)
        exact = sum(1 for r in results for s in r.sites if s.test in ("fisher", "poisson"))
    unflagged = sum(1 for r in results for s in r.sites if s.flag == "none")
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    KriMetrics(registry=registry).publish(results, qtls, 0.0)
    started = time.perf_counter()
    body = generate_latest(registry)
    scrape_s = time.perf_counter() - started
    return {"sites": sites, "kris": kris, "repeat": repeat, "median_s": statistics.median(times),
            "max_s": max(times), "exact_tests_per_recompute": exact, "unflagged_site_kris": unflagged,
            "scrape_s": scrape_s, "scrape_bytes": len(body), "series": body.count(b"\n") - body.count(b"# "),
            "interval_s": 60.0, "python": platform.python_version(), "cpus": __import__("os").cpu_count()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--kris", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--smoke", action="store_true", help="50 sites x 3 KRIs, 2 repeats")
    args = parser.parse_args()
    if args.smoke:
        args.sites, args.kris, args.repeat = 50, 3, 2
    r = run(args.sites, args.kris, args.repeat)
    print(" sites | KRIs | median s | max s | exact tests | share of the 60 s interval")
    print("-------+------+----------+-------+-------------+---------------------------")
    print(f"{r['sites']:>6,} | {r['kris']:>4} | {r['median_s']:>8.3f} | {r['max_s']:>5.3f} | "
          f"{r['exact_tests_per_recompute']:>11,} | {r['median_s'] / r['interval_s']:.2%}")
    print(f"(one /metrics scrape of the {r['series']:,} KRI series: {r['scrape_s']:.2f} s, {r['scrape_bytes'] / 1e6:.1f} MB, "
          "on the HTTP thread)")
    print(f"({r['repeat']} recomputations; {r['unflagged_site_kris']} site-KRIs under the minimum accrual; "
          f"Python {r['python']}, {r['cpus']} CPUs)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Cost per event by position in its subject's history: is the work per event flat in history length?

    .venv/bin/python benchmarks/bench_tenths.py --subjects 100 --days 60 --seed 1

A generated cohort is replayed in this process, batch by batch as `monitor.replay` does (tick, then ingest).
The CPU time of each batch (time.process_time_ns around tick + ingest) is shared equally by its events, and each
event falls in the tenth of its subject's history given by its rank among that subject's records in delivery
order. Printed: the mean cost per event in each tenth and the ratio of the last tenth to the first (issue 15's
target: within 1.5x). CPU time, so other load on the machine matters less than for wall time; rules loading and
the generation of the cohort are not counted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from monitor.clock import ReplayClock  # noqa: E402
from monitor.evaluator import Monitor  # noqa: E402
from monitor.events import parse_event  # noqa: E402
from monitor.generate import generate  # noqa: E402
from monitor.rules import load_rules  # noqa: E402


def measure(events: list[dict], tenths: int = 10) -> list[float]:
    totals = Counter(e["subject_id"] for e in events)
    seen: Counter[str] = Counter()
    ranks = []
    for e in events:
        ranks.append(min(tenths - 1, seen[e["subject_id"]] * tenths // totals[e["subject_id"]]))
        seen[e["subject_id"]] += 1
    rules = load_rules(None)
    clock = ReplayClock()
    monitor = Monitor.create(rules=rules, clock=clock)
    cost = [0.0] * tenths
    count = [0] * tenths
    i = 0
    while i < len(events):
        j = i
        while j < len(events) and events[j]["recorded_at"] == events[i]["recorded_at"]:
            j += 1
        batch = [(parse_event(e), e) for e in events[i:j]]
        started = time.process_time_ns()
        clock.advance_to(dt.datetime.fromisoformat(events[i]["recorded_at"]))
        monitor.tick()
        monitor.ingest(batch)
        share = (time.process_time_ns() - started) / (j - i)
        for k in range(i, j):
            cost[ranks[k]] += share
            count[ranks[k]] += 1
        i = j
    return [c / n / 1000 if n else 0.0 for c, n in zip(cost, count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--deviation-rate", type=float, default=0.2)
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    events = list(generate(subjects=args.subjects, days=args.days, seed=args.seed, sites=args.sites,
                           deviation_rate=args.deviation_rate))
    us = measure(events)
    ratio = us[-1] / us[0] if us[0] else float("inf")
    print(f"{len(events):,} events, {args.subjects} subjects x {args.days} days, seed {args.seed}: "
          f"CPU us per event by tenth of the subject's history")
    print(" | ".join(f"{k + 1}: {v:,.0f}" for k, v in enumerate(us)))
    print(f"last / first tenth: {ratio:.2f}; mean {sum(us) / len(us):,.0f} us")
    if args.json:
        Path(args.json).write_text(json.dumps({"us_per_event_by_tenth": us, "ratio_last_first": ratio,
                                               "events": len(events)}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

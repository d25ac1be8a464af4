"""Hot-reload benchmark (issue 15): how long a running service takes to switch rules versions with N subjects'
history held, measured around `MonitorService.reload_rules` (validate, rebuild every subject under the new rules,
take the alert book over, publish the changes). The rules change is one threshold (the daily maximum).

    .venv/bin/python benchmarks/bench_reload.py --subjects 1000 --days 60 --seed 1
    .venv/bin/python benchmarks/bench_reload.py --smoke          # 50 subjects x 20 days

The history is loaded into the service's monitor the way a recovery loads it (no batch-by-batch evaluation: that is
not what is timed), in this process; sinks are in memory, so the figure is the monitor's own work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kafka import TopicPartition  # noqa: E402

from connectors.memory import ListSink  # noqa: E402
from monitor.clock import ReplayClock  # noqa: E402
from monitor.config import Settings  # noqa: E402
from monitor.evaluator import Monitor  # noqa: E402
from monitor.events import parse_event  # noqa: E402
from monitor.generate import generate  # noqa: E402
from monitor.rules import DEFAULT_RULES_DIR, load_rules  # noqa: E402
from monitor.service import MonitorService  # noqa: E402


def measure(*, subjects: int, days: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        rules_dir = Path(tmp) / "rules"
        shutil.copytree(DEFAULT_RULES_DIR, rules_dir)
        clock = ReplayClock()
        monitor = Monitor.create(rules=load_rules(rules_dir), clock=clock)
        events = sorted(generate(subjects=subjects, days=days, seed=seed, sites=10, deviation_rate=0.1),
                        key=lambda e: e["recorded_at"])
        alerts = ListSink()
        svc = MonitorService(settings=Settings(clock="stream", rules_watch_seconds=0), clock=clock, alerts=alerts,
                             dead_letters=ListSink(), monitor=monitor, published=set())
        lane = TopicPartition("events", 0)  # one partition holds every subject; its clock is the stream's end
        for e in events:
            event = parse_event(e)
            monitor.lanes[event.subject_id] = lane
            svc.clocks.advance(lane, event.recorded_at)
            monitor.load((event, e))
        monitor.evaluate_rebuilt(list(monitor.subjects), published=frozenset(), open_alerts={})
        held = len(monitor.book.open_alerts())
        path = rules_dir / "parameters.yaml"
        path.write_text(path.read_text().replace("max_mg_per_kg_day: 8.0", "max_mg_per_kg_day: 7.0"))
        started, cpu = time.perf_counter(), time.process_time()
        assert svc.reload_rules(), "the reload was refused"
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        return {"subjects": subjects, "events": len(events), "reload_s": round(seconds, 2), "reload_cpu_s": round(cpu, 2),
                "open_alerts_before": held, "open_alerts_after": len(monitor_after(svc)),
                "alert_records_published": len(alerts.items)}


def monitor_after(svc: MonitorService) -> list:
    return svc.monitor.book.open_alerts()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="50 subjects x 20 days")
    args = parser.parse_args()
    if args.smoke:
        args.subjects, args.days = 50, 20
    print(f"loading {args.subjects} subjects x {args.days} days ...", file=sys.stderr)
    print(json.dumps(measure(subjects=args.subjects, days=args.days, seed=args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

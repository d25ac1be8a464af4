"""The built-in demo: a small synthetic cohort with planted deviations, replayed through the real monitor."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from connectors.file import JsonLinesSource
from connectors.stdout import TextRejectSink
from monitor.alerts import Alert
from monitor.clock import ReplayClock
from monitor.evaluator import Monitor
from monitor.generate import generate
from monitor.replay import replay
from monitor.rules import load_rules


class _ReadableSink:
    """Prints each alert as one readable line (the JSON records are what `replay` writes)."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, alert: Alert) -> None:
        self.count += 1
        verb = "RAISED   " if alert.status == "raised" else "WITHDRAWN"
        print(f"{verb} {alert.severity:<8} {alert.rule:<32} {alert.subject_id:<10} at {alert.at[:16]}  "
              f"{alert.message}", flush=True)

    def flush(self) -> None:
        sys.stdout.flush()


def run_demo(*, rules_dir: str | None = None, subjects: int = 24, seed: int = 7) -> int:
    rules = load_rules(rules_dir)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo.jsonl"
        with path.open("w") as handle:
            for event in generate(subjects=subjects, days=60, seed=seed, sites=3, deviation_rate=0.5):
                handle.write(json.dumps(event, separators=(",", ":")) + "\n")
        print(f"Demo cohort: {subjects} synthetic subjects, both arms, about half with a planted protocol deviation.")
        print(f"Rules version {rules.version}: {len(rules.rules)} rules from {rules.directory}\n")
        clock = ReplayClock()
        monitor = Monitor.create(rules=rules, clock=clock)
        sink = _ReadableSink()
        summary = replay(source=JsonLinesSource(paths=[path]), monitor=monitor, clock=clock, alerts=sink,
                         rejects=TextRejectSink(), until=None)
    print()
    for line in summary.lines(monitor):
        print(line)
    print("\nNext: `protocol-monitor replay FILE --until ISO-8601` writes these alerts as JSON Lines.")
    return 0

"""Where a replay's CPU goes, and how many derivation runs it makes (counted, so not noisy).

    .venv/bin/python benchmarks/bench_derivations.py --subjects 50 --days 60 --seed 1
    .venv/bin/python benchmarks/bench_derivations.py --file cohort.jsonl

A generated cohort (or a file of flat events) is replayed in this process through `monitor.replay.replay`, as
`protocol-monitor replay` does. Printed: the CPU seconds of the replay (time.process_time; rules loading and the
generation of the cohort are not counted), events per CPU second, evaluations, derivation runs in all and per
derivation, and the CPU seconds inside parsing, derivation, the engine's sync and each derivation (time.process_time
around each call; the wrappers add a little). CPU time, so other load on the machine matters less than for wall
time; compare two versions in the same conditions.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import monitor.replay as replay_module  # noqa: E402
from connectors.file import JsonLinesSource  # noqa: E402
from connectors.memory import ListSink  # noqa: E402
from connectors.stdout import TextRejectSink  # noqa: E402
from monitor.clock import ReplayClock  # noqa: E402
from monitor.derive import Deriver  # noqa: E402
from monitor.engine import RulesEngine  # noqa: E402
from monitor.evaluator import Monitor  # noqa: E402
from monitor.generate import generate  # noqa: E402
from monitor.rules import load_rules  # noqa: E402


def _instrument(cpu: Counter[str], runs: Counter[str]) -> None:
    clock = time.process_time

    def timed(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return original(*args, **kwargs)
            finally:
                cpu[label] += clock() - started

        setattr(owner, name, wrapper)

    timed(Deriver, "derive", "derive (all derivations and reuse checks)")
    timed(RulesEngine, "sync", "engine sync")
    for name in ("parse_record", "decode", "parse_event"):  # the replay's parsing, whichever functions it calls
        if hasattr(replay_module, name):
            timed(replay_module, name, f"parse ({name})")
    for name in Deriver.INPUTS:
        original = getattr(Deriver, name)

        def run(self: Any, view: Any, deadline: Any, _original: Any = original, _name: str = name) -> list[Any]:
            runs[_name] += 1
            started = clock()
            produced = list(_original(self, view, deadline))
            cpu["  " + _name] += clock() - started
            return produced

        setattr(Deriver, name, run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=50)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--deviation-rate", type=float, default=0.2)
    parser.add_argument("--file", help="replay this file of flat events instead of a generated cohort")
    parser.add_argument("--no-split", action="store_true", help="count runs only: no CPU timers around calls")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.file) if args.file else Path(tmp) / "cohort.jsonl"
        if not args.file:
            with path.open("w", encoding="utf-8") as handle:
                for event in generate(subjects=args.subjects, days=args.days, seed=args.seed, sites=args.sites,
                                      deviation_rate=args.deviation_rate):
                    handle.write(json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n")
        cpu: Counter[str] = Counter()
        runs: Counter[str] = Counter()
        if args.no_split:
            for name in Deriver.INPUTS:
                original = getattr(Deriver, name)

                def count(self: Any, view: Any, deadline: Any, _original: Any = original, _name: str = name) -> Any:
                    runs[_name] += 1
                    return _original(self, view, deadline)

                setattr(Deriver, name, count)
        else:
            _instrument(cpu, runs)
        rules = load_rules(None)
        clock = ReplayClock()
        monitor = Monitor.create(rules=rules, clock=clock)
        started = time.process_time()
        summary = replay_module.replay(source=JsonLinesSource(paths=[path]), monitor=monitor, clock=clock,
                                       alerts=ListSink(), rejects=TextRejectSink(stream=io.StringIO()), until=None)
        seconds = time.process_time() - started
    figures = {"records": summary.records, "cpu_s": round(seconds, 3),
               "events_per_cpu_s": round(summary.records / seconds) if seconds else None,
               "evaluations": monitor.stats.evaluations, "derivation_runs": sum(runs.values()),
               "runs": dict(runs.most_common()), "cpu_split_s": {k: round(v, 3) for k, v in cpu.most_common()}}
    print(f"{summary.records} records, {seconds:.2f} CPU s ({figures['events_per_cpu_s']} events per CPU second); "
          f"{monitor.stats.evaluations} evaluations, {figures['derivation_runs']} derivation runs "
          f"({figures['derivation_runs'] / max(1, monitor.stats.evaluations):.2f} per evaluation)")
    for name, n in runs.most_common():
        print(f"  runs {name:24s} {n:7d}")
    for label, s in cpu.most_common():
        print(f"  CPU s {label:40s} {s:7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

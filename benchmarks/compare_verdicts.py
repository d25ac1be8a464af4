"""Final open alerts per rule, before → after, from two `protocol-monitor replay` outputs of the same cohort.

    .venv/bin/python -m monitor generate --subjects 1000 --days 60 --seed 1 -o cohort.jsonl   # bench_replay's cohort
    PYTHONPATH=<old checkout> .venv/bin/python -m monitor replay cohort.jsonl > before.jsonl
    .venv/bin/python -m monitor replay cohort.jsonl > after.jsonl
    .venv/bin/python benchmarks/compare_verdicts.py before.jsonl after.jsonl [--subjects RULE]

An alert is open at the end when it was raised and no later record retracts its alert_id. Alerts are compared
by (rule, subject, at), since a changed fact id would change the alert_id of an otherwise identical verdict.
`--subjects RULE` lists the subjects whose open alerts of RULE differ, to explain the change.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def open_alerts(path: Path) -> set[tuple[str, str, str]]:
    raised: dict[str, tuple[str, str, str]] = {}
    retracted: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("status") == "raised":
            raised[record["alert_id"]] = (record["rule"], record["subject_id"], record["at"])
        elif record.get("status") == "retracted":
            retracted.add(record.get("retracts") or record["alert_id"])
    return {key for alert_id, key in raised.items() if alert_id not in retracted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--subjects", metavar="RULE", default=None, help="list the subjects whose RULE alerts differ")
    args = parser.parse_args(argv)
    before, after = open_alerts(args.before), open_alerts(args.after)
    if args.subjects:
        gone = sorted(a for a in before - after if a[0] == args.subjects)
        new = sorted(a for a in after - before if a[0] == args.subjects)
        for label, items in (("only before", gone), ("only after", new)):
            for rule, subject, at in items:
                print(f"{label}\t{subject}\t{at}")
        return 0
    count_before = Counter(rule for rule, _, _ in before)
    count_after = Counter(rule for rule, _, _ in after)
    print("| rule | before | after | change | only before | only after |")
    print("|---|---:|---:|---:|---:|---:|")
    for rule in sorted(set(count_before) | set(count_after)):
        b, a = count_before[rule], count_after[rule]
        gone = sum(1 for x in before - after if x[0] == rule)
        new = sum(1 for x in after - before if x[0] == rule)
        if b != a or gone or new:
            print(f"| {rule} | {b} | {a} | {a - b:+d} | {gone} | {new} |")
    print(f"| total | {len(before)} | {len(after)} | {len(after) - len(before):+d} | {len(before - after)} | "
          f"{len(after - before)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

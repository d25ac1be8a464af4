"""Share of raised alerts later withdrawn when a whole cohort is caught up through the broker (issue 16), next to
a file replay of the same events.

    .venv/bin/python benchmarks/bench_flapping.py [--cohort scenarios|generated] [--json PATH]

`scenarios`: the published scenarios copied 3 times under new ids (153 subjects, 5,409 events). `generated`: the
Kafka benchmark's cohort (`generate(subjects=100, days=60, seed=21, deviation_rate=0.3)`). Both are produced in
one burst by a batching producer to an events topic of 3 partitions and consumed by `protocol-monitor run --clock
stream` (a new group), then the alerts topic is read: raised records, withdrawn records, and the final open set
compared with the replay's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monitor.broker import LocalBroker  # noqa: E402
from tests.support.kafkatools import (  # noqa: E402
    ServiceProcess, alert_records, create_topics, events_as_records, final_pairs, produce_batched, read_topic,
    replay_alerts, scenario_cohort, wait_until_consumed)


def cohort(name: str) -> list[dict]:
    if name == "scenarios":
        return scenario_cohort(sorted((ROOT.parent / "shared" / "scenarios").glob("*.jsonl")), copies=3)
    from monitor.generate import generate

    return list(generate(subjects=100, days=60, seed=21, deviation_rate=0.3))


def share(records: list[dict]) -> dict:
    raised = sum(1 for r in records if r["status"] == "raised")
    withdrawn = sum(1 for r in records if r["status"] == "retracted")
    return {"raised": raised, "withdrawn": withdrawn, "withdrawn_share": round(withdrawn / raised, 4) if raised else 0,
            "final_open": len(final_pairs(records))}


def run(name: str, tmp: Path) -> dict:
    events = cohort(name)
    replayed = replay_alerts(events)
    out = {"cohort": name, "events": len(events), "subjects": len({e["subject_id"] for e in events}),
           "replay": share(replayed)}
    with LocalBroker(log_path=tmp / "broker.log") as broker:
        tag = uuid.uuid4().hex[:6]
        topics = {"events": f"ev-{tag}", "alerts": f"al-{tag}", "dead": f"dl-{tag}"}
        create_topics(broker.bootstrap, {topics["events"]: 3, topics["alerts"]: 3, topics["dead"]: 1})
        produce_batched(broker.bootstrap, topics["events"], events_as_records(events))
        group = f"b-{tag}"
        service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=tmp / "service.log",
                                 extra=["--clock", "stream"], env={"PROTOCOL_MONITOR_IDLE_PARTITION_SECONDS": "2"})
        started = time.perf_counter()
        service.start()
        try:
            wait_until_consumed(broker.bootstrap, group, topics["events"], 1800)
            seconds = time.perf_counter() - started
            want = {r["alert_id"] for r in final_pairs(replayed)}
            messages = read_topic(broker.bootstrap, topics["alerts"], timeout_s=60, until=lambda m: {
                r["alert_id"] for r in final_pairs(alert_records(m))} == want)
        finally:
            service.stop()
        records = alert_records(messages)
        out["kafka"] = share(records)
        out["kafka"]["seconds_to_consume"] = round(seconds, 1)
        out["kafka"]["final_equals_replay"] = {r["alert_id"] for r in final_pairs(records)} == want
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", choices=["scenarios", "generated"], default="scenarios")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = run(args.cohort, Path(tempfile.mkdtemp(prefix="bench-flap-")))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

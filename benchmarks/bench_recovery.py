"""Recovery benchmark (issue 15): time from the start of a `protocol-monitor run` instance to /readyz when its group
has already committed N subjects' history (a restart, or partitions moving to a new instance).

    .venv/bin/python benchmarks/bench_recovery.py --subjects 10000 --days 20
    .venv/bin/python benchmarks/bench_recovery.py --smoke                       # 200 subjects x 10 days

The history is produced to a 3-partition events topic and the group's offsets are committed at its end directly
(the offsets the producer's acknowledgements gave, not `end_offsets()`, see ENGINE_NOTES), so no first instance has
to process it batch by batch before the measurement. The timed instance loads its partitions' committed history,
evaluates each subject once, publishes the alerts the (empty) alerts topic does not hold, and becomes ready.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monitor.broker import LocalBroker, free_port  # noqa: E402
from monitor.generate import generate  # noqa: E402
from tests.support.kafkatools import ServiceProcess, create_topics, wait_ready  # noqa: E402


def produce(bootstrap: str, topic: str, events: list[dict]) -> dict[int, int]:
    """Produce keyed by subject; returns partition -> next offset, from the acknowledgements."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=256 * 1024)
    futures = [producer.send(topic, key=e["subject_id"].encode(), value=json.dumps(e).encode()) for e in events]
    producer.flush()
    ends: dict[int, int] = {}
    for f in futures:
        meta = f.get(timeout=60)
        ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    producer.close()
    return ends


def commit(bootstrap: str, group: str, topic: str, ends: dict[int, int]) -> None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        consumer.commit({TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in ends.items()})
    finally:
        consumer.close()


def measure(*, subjects: int, days: int, seed: int, workdir: Path) -> dict:
    events = list(generate(subjects=subjects, days=days, seed=seed, sites=20, deviation_rate=0.2))
    tag = uuid.uuid4().hex[:6]
    topics = {"events": f"rec-{tag}", "alerts": f"ral-{tag}", "dead": f"rdl-{tag}"}
    with LocalBroker(log_path=workdir / "broker.log") as broker:
        create_topics(broker.bootstrap, {topics["events"]: 3, topics["alerts"]: 3, topics["dead"]: 1})
        print(f"producing {len(events)} events of {subjects} subjects ...", file=sys.stderr)
        ends = produce(broker.bootstrap, topics["events"], events)
        group = f"rg-{tag}"
        commit(broker.bootstrap, group, topics["events"], ends)
        port = free_port()
        started = time.perf_counter()
        svc = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=workdir / "service.log",
                             extra=["--metrics-port", str(port)]).start()
        try:
            ready = wait_ready(port, started=started, timeout_s=1800)
            cpu = child_cpu_seconds(svc.proc.pid) if ready is not None and svc.proc else None
        finally:
            svc.stop()
    return {"recovery_subjects": subjects, "recovery_events": len(events), "recovery_ready_s":
            round(ready, 2) if ready is not None else None,
            "recovery_cpu_s": round(cpu, 2) if cpu is not None else None}


def child_cpu_seconds(pid: int) -> float | None:
    """user + system CPU of a running process (Linux /proc; None elsewhere): the machine is shared, so before/after
    comparisons use this rather than the wall time."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=10_000)
    ap.add_argument("--days", type=int, default=20)
    ap.add_argument("--seed", type=int, default=41)
    ap.add_argument("--smoke", action="store_true", help="200 subjects x 10 days")
    args = ap.parse_args()
    if args.smoke:
        args.subjects, args.days = 200, 10
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(measure(subjects=args.subjects, days=args.days, seed=args.seed, workdir=Path(tmp))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""End-to-end benchmark through the test broker: the service's throughput next to kafka-python's raw consume rate
measured in the same run, and event-to-alert latency at a steady rate.

    .venv/bin/python benchmarks/bench_kafka.py [--subjects 200] [--rate 300] [--json PATH]

1. A cohort is produced to an events topic (3 partitions). kafka-python consumes it once with json.loads only:
   the raw ceiling. The service (`protocol-monitor run`, a child process) then consumes it from scratch: the time
   until its group has committed every offset gives its throughput.
2. Latency: a second cohort is streamed at a steady rate while a fresh service runs. For every alert record, the
   latency is its broker timestamp on the alerts topic minus the broker timestamp of the newest event it cites.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monitor.broker import LocalBroker  # noqa: E402
from monitor.generate import generate  # noqa: E402
from tests.connectors.kafkatools import (  # noqa: E402
    ServiceProcess, create_topics, read_topic, wait_until_consumed)


def produce_all(bootstrap: str, topic: str, events: list[dict], rate: float | None = None) -> dict[str, int]:
    """Produce events (optionally at a steady rate); returns event_id → broker timestamp (ms)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    futures = []
    start = time.monotonic()
    for i, e in enumerate(events):
        futures.append((e["event_id"], producer.send(topic, key=e["subject_id"].encode(), value=json.dumps(e).encode())))
        if rate:
            ahead = (i + 1) / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
    producer.flush()
    stamps = {eid: f.get(timeout=30).timestamp for eid, f in futures}
    producer.close()
    return stamps


def raw_consume_rate(bootstrap: str, topic: str, n: int) -> float:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"raw-{uuid.uuid4().hex[:6]}",
                             enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=500)
    got, started = 0, None
    while got < n:
        for msgs in consumer.poll(timeout_ms=500).values():
            if started is None:
                started = time.perf_counter()
            for m in msgs:
                json.loads(m.value)
            got += len(msgs)
    elapsed = time.perf_counter() - started  # type: ignore[operator]
    consumer.close()
    return n / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=100)
    ap.add_argument("--rate", type=float, default=300.0, help="events/s for the latency run")
    ap.add_argument("--latency-subjects", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    with LocalBroker(log_path=tmp / "broker.log") as broker:
        events = list(generate(subjects=args.subjects, days=60, seed=21, deviation_rate=0.3))
        tag = uuid.uuid4().hex[:6]
        topics = {"events": f"ev-{tag}", "alerts": f"al-{tag}", "dead": f"dl-{tag}"}
        create_topics(broker.bootstrap, {topics["events"]: 3, topics["alerts"]: 3, topics["dead"]: 1})
        produce_all(broker.bootstrap, topics["events"], events)
        raw = raw_consume_rate(broker.bootstrap, topics["events"], len(events))
        group = f"bench-{tag}"
        service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=tmp / "service.log")
        started = time.perf_counter()
        service.start()
        ok = wait_until_consumed(broker.bootstrap, group, topics["events"], 1800)
        e2e_seconds = time.perf_counter() - started
        service.stop()
        e2e = len(events) / e2e_seconds

        # latency at a steady rate
        lat_events = list(generate(subjects=args.latency_subjects, days=60, seed=22, deviation_rate=1.0))
        for e in lat_events:
            e["subject_id"] = "L" + e["subject_id"]
            e["event_id"] = "L" + e["event_id"]
        ltopics = {"events": f"lev-{tag}", "alerts": f"lal-{tag}", "dead": f"ldl-{tag}"}
        create_topics(broker.bootstrap, {ltopics["events"]: 3, ltopics["alerts"]: 3, ltopics["dead"]: 1})
        lservice = ServiceProcess(bootstrap=broker.bootstrap, topics=ltopics, group=f"lat-{tag}",
                                  log=tmp / "latency.log").start()
        time.sleep(8)  # joined the group before the stream starts
        stamps = produce_all(broker.bootstrap, ltopics["events"], lat_events, rate=args.rate)
        wait_until_consumed(broker.bootstrap, f"lat-{tag}", ltopics["events"], 600)
        lservice.stop()
        latencies = []
        for m in read_topic(broker.bootstrap, ltopics["alerts"]):
            record = json.loads(m.value)
            cited = [stamps[e] for e in record["evidence"].get("events", []) if e in stamps]
            if cited:
                latencies.append((m.timestamp - max(cited)) / 1000.0)
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")

    result = {"events": len(events), "raw_consume_events_per_s": round(raw), "service_events_per_s": round(e2e),
              "ratio": round(e2e / raw, 3), "all_committed": ok, "latency_rate_events_per_s": args.rate,
              "alerts_measured": len(latencies), "latency_p50_s": round(pct(0.5), 4),
              "latency_p99_s": round(pct(0.99), 4), "latency_max_s": round(latencies[-1], 4) if latencies else None,
              "latency_mean_s": round(statistics.mean(latencies), 4) if latencies else None}
    print(" events | raw consume ev/s | service ev/s | ratio | latency p50 s | p99 s | alerts")
    print(f"{result['events']:>7,} | {result['raw_consume_events_per_s']:>16,} | {result['service_events_per_s']:>12,}"
          f" | {result['ratio']:>5} | {result['latency_p50_s']:>13} | {result['latency_p99_s']:>5} |"
          f" {result['alerts_measured']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

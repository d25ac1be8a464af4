"""End-to-end benchmark through the test broker: the service's throughput next to kafka-python's raw consume rate
measured in the same run, and event-to-alert latency at a steady rate.

    .venv/bin/python benchmarks/bench_kafka.py [--subjects 100] [--rate 1000] [--json PATH]   (also part of run_all.py)

1. A cohort is produced to an events topic (3 partitions). kafka-python consumes it once with json.loads only:
   the raw ceiling. The service (`protocol-monitor run`, a child process) then consumes it from scratch: the time
   until its group has committed every offset gives its throughput.
2. Latency: a second cohort is streamed at a steady rate while a fresh service runs. For every alert record, the
   latency is its broker timestamp on the alerts topic minus the broker timestamp of the newest event it cites.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monitor.broker import LocalBroker  # noqa: E402
from monitor.generate import generate  # noqa: E402
from tests.support.kafkatools import (  # noqa: E402
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


def bench_stream(broker: LocalBroker, subjects: int, rate: float, tmp: Path) -> dict:
    tag = uuid.uuid4().hex[:6]
    events = list(generate(subjects=subjects, days=60, seed=21, deviation_rate=0.3))
    topics = {"events": f"ev-{tag}", "alerts": f"al-{tag}", "dead": f"dl-{tag}"}
    create_topics(broker.bootstrap, {topics["events"]: 3, topics["alerts"]: 3, topics["dead"]: 1})
    produce_all(broker.bootstrap, topics["events"], events)
    raw = raw_consume_rate(broker.bootstrap, topics["events"], len(events))
    group = f"b-{tag}"
    service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=tmp / "e2e.log")
    started = time.perf_counter()
    service.start()
    wait_until_consumed(broker.bootstrap, group, topics["events"], 1800)
    e2e = len(events) / (time.perf_counter() - started)
    service.stop()
    # latency at a steady rate, a fresh service already in its group
    lat = list(generate(subjects=max(10, subjects // 3), days=60, seed=22, deviation_rate=1.0))
    for e in lat:
        e["subject_id"], e["event_id"] = "L" + e["subject_id"], "L" + e["event_id"]
    lt = {"events": f"lev-{tag}", "alerts": f"lal-{tag}", "dead": f"ldl-{tag}"}
    create_topics(broker.bootstrap, {lt["events"]: 3, lt["alerts"]: 3, lt["dead"]: 1})
    lsvc = ServiceProcess(bootstrap=broker.bootstrap, topics=lt, group=f"l-{tag}", log=tmp / "lat.log").start()
    time.sleep(8)
    stamps = produce_all(broker.bootstrap, lt["events"], lat, rate=rate)
    wait_until_consumed(broker.bootstrap, f"l-{tag}", lt["events"], 600)
    lsvc.stop()
    latencies = sorted((m.timestamp - max(stamps[e] for e in json.loads(m.value)["evidence"]["events"] if e in stamps))
                       / 1000 for m in read_topic(broker.bootstrap, lt["alerts"])
                       if any(e in stamps for e in json.loads(m.value)["evidence"].get("events", [])))
    pct = lambda p: round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 4) if latencies else None  # noqa: E731
    return {"stream_events": len(events), "raw_consume_events_per_s": round(raw), "e2e_events_per_s": round(e2e),
            "e2e_over_raw": round(e2e / raw, 3), "latency_rate_events_per_s": rate, "latency_alerts": len(latencies),
            "latency_p50_s": pct(0.5), "latency_p99_s": pct(0.99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=100)
    ap.add_argument("--rate", type=float, default=1000.0, help="events/s for the latency run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    with LocalBroker(log_path=tmp / "broker.log") as broker:
        result = bench_stream(broker, args.subjects, args.rate, tmp)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

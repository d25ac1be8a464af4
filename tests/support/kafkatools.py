"""Helpers for the integration tests against a real Kafka-protocol broker on loopback."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

DATETIME_FIELDS = ("occurred_at", "recorded_at", "start_at", "end_at", "infusion_end_at", "consent_signed_at",
                   "investigator_aware_at")
DATE_FIELDS = ("birth_date",)


def create_topics(bootstrap: str, names: dict[str, int], **security: Any) -> None:
    """`security`: kafka-python client options (security_protocol, ssl_cafile, sasl_...) for a secured broker."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **security)
    try:
        admin.create_topics([NewTopic(n, p, 1) for n, p in names.items()])
    finally:
        admin.close()


def produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes]], **security: Any) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=8_000_000, **security)
    for key, value in records:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def events_as_records(events: list[dict[str, Any]]) -> list[tuple[bytes | None, bytes]]:
    return [(e.get("subject_id", "").encode(), json.dumps(e).encode()) for e in events]


def read_topic(bootstrap: str, topic: str, *, until: Any = None, timeout_s: float = 60.0,
               **security: Any) -> list[Any]:
    """All messages of a topic; with `until(messages) -> bool`, keeps reading until it holds or time runs out."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, **security)
    consumer.topics()
    parts = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for msgs in consumer.poll(timeout_ms=300).values():
                out.extend(msgs)
            ends = consumer.end_offsets(tps)  # may be short on Tansu (ENGINE_NOTES): the high watermark is right
            caught_up = all(consumer.highwater(tp) is not None
                            and consumer.position(tp) >= max(ends[tp], consumer.highwater(tp) or 0) for tp in tps)
            if caught_up and (until is None or until(out)):
                break
    finally:
        consumer.close()
    return out


def alert_records(messages: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(m.value) for m in messages]


def final_pairs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    withdrawn = {r["alert_id"] for r in records if r["status"] == "retracted"}
    seen, out = set(), []
    for r in records:
        if r["status"] == "raised" and r["alert_id"] not in withdrawn and r["alert_id"] not in seen:
            seen.add(r["alert_id"])
            out.append(r)
    return out


def scenario_subjects(header: dict[str, Any]) -> set[str]:
    """The subjects a published scenario speaks of: those it expects alerts for and those it expects none for."""
    return {a["subject"] for a in header["expected_alerts"]} | {
        a["subject"] for a in header.get("expected_no_alerts", [])}


def assert_scenarios_alerted(final: list[dict[str, Any]], plans: list[tuple[str, dict[str, Any], dt.datetime,
                                                                            dt.timedelta]],
                             records: list[dict[str, Any]] | None = None) -> None:
    """Each plan (name, header, horizon, shift) of a published scenario moved in time: its final alerts up to the
    horizon are exactly the expected ones, each within 60 s of its expected (shifted) time; with `records` (every
    alert record read), each expected retraction is among them. One check for every test that runs the scenarios
    through the service."""
    for name, header, horizon, shift in plans:
        subjects = scenario_subjects(header)
        within = [r for r in final if r["subject_id"] in subjects and dt.datetime.fromisoformat(r["at"]) <= horizon]
        got = Counter((r["rule"], r["subject_id"]) for r in within)
        want = Counter((a["rule"], a["subject"]) for a in header["expected_alerts"])
        assert got == want, f"{name}: got {sorted(got.elements())}, want {sorted(want.elements())}"
        for exp in header["expected_alerts"]:
            target = dt.datetime.fromisoformat(exp["at"]) + shift
            assert any(abs((dt.datetime.fromisoformat(r["at"]) - target).total_seconds()) <= 60
                       for r in within if (r["rule"], r["subject_id"]) == (exp["rule"], exp["subject"])), exp
        if records is not None:
            withdrawn = {(r["rule"], r["subject_id"]) for r in records if r["status"] == "retracted"}
            for exp in header.get("expected_retractions", []):
                assert (exp["rule"], exp["subject"]) in withdrawn, f"{name}: {exp} not raised then withdrawn"


def wait_ready(port: int, *, started: float, timeout_s: float) -> float | None:
    """Poll the service's /readyz on loopback until it answers 200: the seconds since `started` (a
    `time.perf_counter()`), or None if it was not ready within `timeout_s` of `started`."""
    while time.perf_counter() - started < timeout_s:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
                return time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.2)
    return None


class ServiceProcess:
    """`protocol-monitor run` as a child process, stopped (or killed) by its PID."""

    def __init__(self, *, bootstrap: str, topics: dict[str, str], group: str, log: Path,
                 extra: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.env = env or {}  # e.g. PROTOCOL_MONITOR_KAFKA__SASL_PLAIN_PASSWORD
        self.argv = [sys.executable, "-m", "monitor", "run", "--bootstrap-servers", bootstrap,
                     "--events-topic", topics["events"], "--alerts-topic", topics["alerts"],
                     "--dead-letter-topic", topics["dead"], "--group-id", group, *(extra or [])]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "ServiceProcess":
        env = dict(os.environ, PYTHONUNBUFFERED="1", PROTOCOL_MONITOR_SESSION_TIMEOUT_MS="6000",
                   PROTOCOL_MONITOR_HEARTBEAT_INTERVAL_MS="1000", **self.env)
        self.proc = subprocess.Popen(self.argv, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        if proc.poll() is None:
            os.kill(proc.pid, sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            return proc.wait(timeout=10)


def shift_events(events: list[dict[str, Any]], days: int) -> list[dict[str, Any]]:
    """Move a timeline by whole days (so local clock times and calendar logic are unchanged in one season)."""
    delta = dt.timedelta(days=days)
    out = []
    for e in events:
        e = json.loads(json.dumps(e))
        for name in DATETIME_FIELDS:
            if e.get(name):
                e[name] = (dt.datetime.fromisoformat(e[name]) + delta).isoformat()
        for name in DATE_FIELDS:
            if e.get(name):
                e[name] = (dt.date.fromisoformat(e[name]) + delta).isoformat()
        kd = e.get("kd_diagnosis")
        if kd and kd.get("fever_onset_date"):
            kd["fever_onset_date"] = (dt.date.fromisoformat(kd["fever_onset_date"]) + delta).isoformat()
        out.append(e)
    return out


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets per partition (an OffsetFetch; the probe never joins the group)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        consumer.topics()
        parts = sorted(consumer.partitions_for_topic(topic) or set())
        out = {}
        for p in parts:
            off = consumer.committed(TopicPartition(topic, p))
            if off is not None:
                out[p] = off
        return out
    finally:
        consumer.close(autocommit=False)


def end_offsets(bootstrap: str, topic: str, timeout_s: float = 30.0) -> dict[int, int]:
    """The true end of each partition: the fetch responses' high watermark (Tansu's ListOffsets answers the last
    batch's first offset + 1, ENGINE_NOTES), never below ListOffsets."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        parts: set[int] = set()
        deadline = time.monotonic() + 10
        while not parts and time.monotonic() < deadline:
            consumer.topics()  # forces a metadata refresh
            parts = consumer.partitions_for_topic(topic) or set()
        assert parts, f"topic {topic} has no partitions"
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        listed = consumer.end_offsets(tps)
        consumer.assign(tps)
        for tp in tps:  # fetch from just below the listed end: the response carries the high watermark
            consumer.seek(tp, max(0, listed[tp] - 1))
        deadline = time.monotonic() + timeout_s
        while any(consumer.highwater(tp) is None for tp in tps) and time.monotonic() < deadline:
            consumer.poll(timeout_ms=200, max_records=1)
        assert all(consumer.highwater(tp) is not None for tp in tps), "no fetch answered"
        return {tp.partition: max(listed[tp], consumer.highwater(tp) or 0) for tp in tps}
    finally:
        consumer.close()


def wait_until_consumed(bootstrap: str, group: str, topic: str, timeout_s: float) -> bool:
    ends = end_offsets(bootstrap, topic)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = committed_offsets(bootstrap, group, topic)
        if all(end == 0 or done.get(p, -1) >= end for p, end in ends.items()):  # an empty partition has nothing to do
            return True
        time.sleep(0.5)
    return False


def same_local_clock(events: list[dict[str, Any]], days: int, zone: str = "Europe/Paris") -> bool:
    """True if moving every instant by `days` keeps its local UTC offset (no daylight-saving change between)."""
    from zoneinfo import ZoneInfo

    tz, delta = ZoneInfo(zone), dt.timedelta(days=days)
    for e in events:
        for name in DATETIME_FIELDS:
            if e.get(name):
                t = dt.datetime.fromisoformat(e[name])
                if t.astimezone(tz).utcoffset() != (t + delta).astimezone(tz).utcoffset():
                    return False
    return True


def produce_batched(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes]],
                    timestamps_ms: list[int] | None = None, **security: Any) -> None:
    """A batching producer (linger, large batches): several records per record batch, the case where Tansu's
    ListOffsets answers short (ENGINE_NOTES). `timestamps_ms`: CreateTime of each record (as if produced then)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=256_000,
                             max_request_size=8_000_000, **security)
    for i, (key, value) in enumerate(records):
        producer.send(topic, key=key, value=value,
                      timestamp_ms=timestamps_ms[i] if timestamps_ms is not None else None)
    producer.flush()
    producer.close()


def scenario_cohort(scenarios: list[Path], copies: int) -> list[dict[str, Any]]:
    """The published scenarios copied `copies` times under new subject and event ids (issue 16's cohort: 3 copies
    of the 35 scenarios = 153 subjects), as one feed in `recorded_at` order (a stable sort: a batch keeps its
    order)."""
    events: list[dict[str, Any]] = []
    for path in scenarios:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        for k in range(copies):
            for line in lines[1:]:
                e = json.loads(line)
                e["subject_id"] = f"{e['subject_id']}-C{k}"
                e["event_id"] = f"{e['event_id']}-C{k}"
                events.append(e)
    events.sort(key=lambda e: dt.datetime.fromisoformat(e["recorded_at"]))
    return events


def replay_alerts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What `protocol-monitor replay` of these events as one file publishes (alert records, in order)."""
    from connectors.memory import ListSink, MemorySource
    from monitor.clock import ReplayClock
    from monitor.evaluator import Monitor
    from monitor.replay import replay
    from monitor.rules import load_rules

    clock = ReplayClock()
    monitor = Monitor.create(rules=load_rules(), clock=clock)
    sink = ListSink()
    replay(source=MemorySource(events=events), monitor=monitor, clock=clock, alerts=sink, rejects=ListSink(),
           until=None)
    return [json.loads(a.to_json()) for a in sink.items]

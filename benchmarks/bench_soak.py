"""Soak benchmark: `protocol-monitor run` under a steady stream for many minutes; memory, open file descriptors,
threads, event-to-alert latency, throughput and consumer lag sampled every minute. Memory must stay flat after the
warm-up and fds and threads must not grow: a leak shows as a rising RSS column and a failed verdict.

    .venv/bin/python benchmarks/bench_soak.py [--minutes 10] [--rate 150] [--subjects 200] [--json .bench/soak.json]
    .venv/bin/python benchmarks/bench_soak.py --smoke      # 1 minute, a sample every 15 s, 30 subjects (CI)

What runs (everything on 127.0.0.1, every process stopped by its PID, also on Ctrl-C):
1. the test broker (`monitor.broker.LocalBroker`) and the service as a child process, wall clock, metrics port on;
2. warm-up: a generated cohort (`monitor.generate`, `--subjects` x 60 days) plus a few "deadline subjects", all
   consumed before the first sample (sample 0);
3. the steady stream at `--rate` events/s for `--minutes`. It adds no subject and no event_id, so what the monitor
   holds is bounded and a flat RSS is a meaningful leak check. The mix (drawn with a fixed seed):
   - 70 % amendments (RULES_SPEC §2.6: same event_id, later `recorded_at`, different payload) of a fixed pool of
     events, each one toggling between its original values and a flipped version: a late temperature reading
     as a Fahrenheit value typed as Celsius (DQ-TEMP-UNIT-SUSPECT) or taken at a temporal-artery site
     (DQ-TEMP-SITE-NONPROTOCOL), the screening ANC at 1.1 x10^9/L (ELIG-NEUTROPENIA). Every amendment is
     evaluated; most raise or withdraw an alert, so the whole evaluate/reconcile/publish path runs;
   - 25 % exact redeliveries of the version the monitor holds (dropped as duplicates);
   - 5 % invalid messages (not JSON, a JSON array, an event without `type`): the dead-letter path;
   - deadline subjects (published scenario 04, febrile at H12 with no supplementary dose): once per sample
     period their whole timeline is amended, moved so that the H12 escalation deadline (+ grace) falls half a
     period later. The alert is withdrawn (its deadline is in the future again) and raised again by the live
     deadline scheduler: their lateness is reported.
4. each sample: from /proc/<service pid>, VmRSS, entries of fd/ and task/ (threads); from the alerts topic
   (read continuously), the alert records of the period and the latency of those caused by a stream amendment
   (alert broker timestamp minus the produce timestamp of the newest amendment among its evidence events, as in
   bench_kafka.py); events/s sent and processed (the service's /metrics) and consumer lag (/metrics).
Verdict: RSS of the first sample after the warm-up period (end of stream minute 1) against the last, in MB and
%, with a least-squares slope; flat if it grew by at most `--max-growth-mb` (3 MB); fds and threads must not be
higher at the end than at minute 1. `--fail-on-growth` turns a failed verdict into exit status 1.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import os
import platform
import random
import signal
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monitor.broker import LocalBroker, free_port  # noqa: E402
from monitor.generate import generate  # noqa: E402
from tests.support.kafkatools import ServiceProcess, create_topics, wait_until_consumed  # noqa: E402

SCENARIO_04 = ROOT.parent / "shared" / "scenarios" / "04_missed_escalation_h12.jsonl"
DATETIME_FIELDS = ("occurred_at", "recorded_at", "start_at", "end_at", "infusion_end_at", "consent_signed_at",
                   "investigator_aware_at")
MIX = {"amendment": 0.70, "duplicate": 0.25, "invalid": 0.05}
INVALID = (b"{not json", b"[1, 2, 3]", json.dumps({"event_id": "SOAK-NOTYPE", "subject_id": "SOAK-X",
                                                   "site_id": "FR-BIC-01"}).encode())


# ---- the stream ---------------------------------------------------------------------------------------------------
class Flipper:
    """A fixed pool of events; each amendment toggles one between its original values and a flipped version, with
    a `recorded_at` one second later than the version before (so it always replaces it)."""

    def __init__(self, events: list[dict[str, Any]], per_subject: int) -> None:
        by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for e in events:
            by_subject[e["subject_id"]].append(e)
        self.pool: list[tuple[dict[str, Any], str]] = []
        for items in by_subject.values():
            temps = sorted((e for e in items if e["type"] == "vital_sign" and e.get("temperature_c") is not None),
                           key=lambda e: e["occurred_at"])
            for i, e in enumerate(temps[-per_subject:]):  # home-diary readings, after the decision-critical days
                self.pool.append((e, "unit" if i % 2 == 0 else "site"))
            anc = [e for e in items if e["type"] == "lab_result" and e.get("analyte") == "ANC"]
            if anc:
                self.pool.append((min(anc, key=lambda e: e["occurred_at"]), "anc"))
        self.versions: dict[str, int] = defaultdict(int)
        self.current: dict[str, bytes] = {}  # event_id -> the bytes of the version last sent (for redeliveries)
        self._next = 0

    def amendment(self) -> dict[str, Any]:
        original, kind = self.pool[self._next % len(self.pool)]
        self._next += 1
        v = self.versions[original["event_id"]] = self.versions[original["event_id"]] + 1
        e = dict(original)
        e["recorded_at"] = (dt.datetime.fromisoformat(original["recorded_at"]) + dt.timedelta(seconds=v)).isoformat()
        if v % 2 == 1:  # odd versions are flipped, even versions restore the original values
            if kind == "unit":
                e["temperature_c"] = round(original["temperature_c"] * 9 / 5 + 32, 1)
            elif kind == "site":
                e["site"] = "temporal_artery"
            else:
                e["value"] = 1.1
        return e


class DeadlineSubjects:
    """Scenario 04's subject, copied `count` times; `round(due)` moves the copies so their H12 escalation deadline
    (+ grace) falls at `due` and returns the events already recorded by then (the same set every round)."""

    H12_DUE_AFTER_T0 = dt.timedelta(hours=17)  # H12 + 3 h window + 2 h grace

    def __init__(self, count: int) -> None:
        self.template: list[dict[str, Any]] = []
        if count and SCENARIO_04.is_file():
            lines = [ln for ln in SCENARIO_04.read_text().splitlines() if ln.strip()]
            self.template = [json.loads(ln) for ln in lines[1:]]
        self.count = count if self.template else 0
        self.t0 = next((dt.datetime.fromisoformat(e["occurred_at"]) for e in self.template
                        if e["type"] == "drug_administration" and e.get("study_drug")), None)
        self.days: int | None = None  # whole days added to date fields, fixed at the first round

    def round(self, due: dt.datetime) -> list[dict[str, Any]]:
        if not self.count or self.t0 is None:
            return []
        shift = due - (self.t0 + self.H12_DUE_AFTER_T0)
        if self.days is None:
            self.days = shift.days
        cut = self.t0 + self.H12_DUE_AFTER_T0 - dt.timedelta(seconds=1)  # recorded before the deadline falls
        out = []
        for i in range(self.count):
            sid = f"SOAK-DL-{i:02d}"
            for t in self.template:
                if dt.datetime.fromisoformat(t["recorded_at"]) > cut:
                    continue
                e = json.loads(json.dumps(t))
                e["subject_id"], e["event_id"] = sid, f"{sid}-{t['event_id']}"
                for k in DATETIME_FIELDS:
                    if e.get(k):
                        e[k] = (dt.datetime.fromisoformat(e[k]) + shift).isoformat()
                if e.get("birth_date"):
                    e["birth_date"] = (dt.date.fromisoformat(e["birth_date"])
                                       + dt.timedelta(days=self.days)).isoformat()
                kd = e.get("kd_diagnosis")
                if kd and kd.get("fever_onset_date"):
                    kd["fever_onset_date"] = (dt.date.fromisoformat(kd["fever_onset_date"])
                                              + dt.timedelta(days=self.days)).isoformat()
                out.append(e)
        return out


# ---- observation --------------------------------------------------------------------------------------------------
class TopicReader(threading.Thread):
    """Reads a topic from the beginning, continuously, keeping (broker timestamp ms, value) of every record."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True, name=f"read-{topic}")
        self.bootstrap, self.topic = bootstrap, topic
        self.records: list[tuple[int, bytes]] = []
        self.stop_event = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None)
        try:
            parts: set[int] = set()
            while not parts and not self.stop_event.is_set():
                consumer.topics()
                parts = consumer.partitions_for_topic(self.topic) or set()
                if not parts:
                    time.sleep(0.2)
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            while not self.stop_event.is_set():
                for msgs in consumer.poll(timeout_ms=300).values():
                    with self.lock:
                        self.records.extend((m.timestamp, m.value) for m in msgs)
        finally:
            consumer.close()

    def since(self, start: int) -> list[tuple[int, bytes]]:
        with self.lock:
            return self.records[start:]

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)


def proc_sample(pid: int) -> dict[str, Any]:
    """RSS (MB), open file descriptors and threads of a live process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(status.split("VmRSS:")[1].split()[0])
    return {"rss_mb": round(rss_kb / 1024, 1), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": len(os.listdir(f"/proc/{pid}/task"))}


def scrape(port: int) -> dict[str, float]:
    """Totals from the service's /metrics: events consumed and rejected, alerts, consumer lag."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()  # noqa: S310
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        base = name.split("{", 1)[0]
        for key in ("protocol_monitor_events_consumed_total", "protocol_monitor_events_rejected_total",
                    "protocol_monitor_alerts_raised_total", "protocol_monitor_alerts_retracted_total",
                    "protocol_monitor_consumer_lag_messages", "protocol_monitor_subjects",
                    "protocol_monitor_open_alerts"):
            if base == key:
                out[key] += float(value)
    return dict(out)


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(p * len(values)))], 3)


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over xs."""
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den, 3) if den else None


# ---- the run ------------------------------------------------------------------------------------------------------
def run_soak(*, minutes: float, sample_s: float, rate: float, subjects: int, deadline_subjects: int,
             temps_per_subject: int, seed: int, tmp: Path, log: Any = print) -> dict[str, Any]:
    rng = random.Random(seed)  # noqa: S311 - benchmark data, not security
    tag = uuid.uuid4().hex[:6]
    topics = {"events": f"sev-{tag}", "alerts": f"sal-{tag}", "dead": f"sdl-{tag}"}
    cohort = list(generate(subjects=subjects, days=60, seed=seed, deviation_rate=0.2))
    flipper = Flipper(cohort, temps_per_subject)
    deadlines = DeadlineSubjects(deadline_subjects)
    port = free_port()
    result: dict[str, Any] = {
        "machine": f"{platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs",
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "minutes": minutes, "sample_seconds": sample_s, "rate_events_per_s": rate, "subjects": subjects,
        "deadline_subjects": deadlines.count, "warmup_events": len(cohort), "amendment_pool": len(flipper.pool),
        "mix": MIX, "seed": seed}
    with LocalBroker(log_path=tmp / "broker.log") as broker:
        create_topics(broker.bootstrap, {topics["events"]: 3, topics["alerts"]: 3, topics["dead"]: 1})
        svc = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=f"soak-{tag}", log=tmp / "service.log",
                             extra=["--metrics-port", str(port), "--clock", "wall"]).start()
        alerts = TopicReader(broker.bootstrap, topics["alerts"])
        dead = TopicReader(broker.bootstrap, topics["dead"])
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=2)
        try:
            if svc.proc is None:
                raise RuntimeError("the service did not start")
            pid = svc.proc.pid
            alerts.start()
            dead.start()

            def send(e: dict[str, Any] | None, raw: bytes | None = None, key: bytes | None = None) -> int:
                ts = int(time.time() * 1000)
                value = raw if raw is not None else json.dumps(e).encode()
                if e is not None:
                    key = e["subject_id"].encode()
                producer.send(topics["events"], key=key, value=value, timestamp_ms=ts)
                if e is not None:
                    flipper.current[e["event_id"]] = value
                return ts

            # warm-up
            started = time.monotonic()
            for e in cohort:
                send(e)
            period = sample_s
            due_at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=period / 2)
            dl_due: list[float] = []
            for e in deadlines.round(due_at):
                send(e)
            dl_due.append(due_at.timestamp())
            producer.flush()
            if not wait_until_consumed(broker.bootstrap, f"soak-{tag}", topics["events"], 900):
                raise RuntimeError("the service did not consume the warm-up cohort within 15 minutes; see "
                                   f"{tmp / 'service.log'}")
            result["warmup_seconds"] = round(time.monotonic() - started, 1)
            time.sleep(2)  # the service refreshes its lag gauge at most once a second
            log(f"warm-up: {len(cohort)} events, {subjects} subjects, consumed in {result['warmup_seconds']} s")

            stamps: dict[str, list[int]] = defaultdict(list)  # event_id -> produce timestamps of stream amendments
            samples: list[dict[str, Any]] = []
            prev = {"t": time.time(), "sent": 0, "alerts": 0, "dead": 0, "metrics": scrape(port)}
            counts = {"amendment": 0, "duplicate": 0, "invalid": 0, "deadline": 0}

            def take(minute: float) -> dict[str, Any]:
                now = time.time()
                m = scrape(port)
                processed = (m.get("protocol_monitor_events_consumed_total", 0)
                             + m.get("protocol_monitor_events_rejected_total", 0))
                processed_before = (prev["metrics"].get("protocol_monitor_events_consumed_total", 0)
                                    + prev["metrics"].get("protocol_monitor_events_rejected_total", 0))
                new_alerts = alerts.since(prev["alerts"])
                lat, lateness, kinds = [], [], {"raised": 0, "retracted": 0}
                for ts, value in new_alerts:
                    a = json.loads(value)
                    kinds[a["status"]] += 1
                    if a["subject_id"].startswith("SOAK-DL-"):
                        if a["status"] == "raised" and a["rule"] == "DOSE-H12-MISSED-ESCALATION":
                            due = max((d for d in dl_due if d <= ts / 1000 + 1), default=None)
                            if due is not None:
                                lateness.append(ts / 1000 - due)
                        continue
                    causes = [s for eid in a.get("evidence", {}).get("events", []) for s in stamps.get(eid, ())
                              if s <= ts]
                    if causes:
                        lat.append((ts - max(causes)) / 1000)
                sent = sum(counts.values())
                row = {"minute": round(minute, 2), **proc_sample(pid),
                       "sent_per_s": round((sent - prev["sent"]) / (now - prev["t"]), 1),
                       "processed_per_s": round((processed - processed_before) / (now - prev["t"]), 1),
                       "lag": int(m.get("protocol_monitor_consumer_lag_messages", 0)),
                       "alerts_raised": kinds["raised"], "alerts_retracted": kinds["retracted"],
                       "latency_n": len(lat), "latency_p50_s": pct(lat, 0.5), "latency_p99_s": pct(lat, 0.99),
                       "dead_letters": len(dead.since(prev["dead"])),
                       "deadline_alerts": len(lateness),
                       "deadline_late_max_s": round(max(lateness), 3) if lateness else None,
                       "open_alerts": int(m.get("protocol_monitor_open_alerts", 0)),
                       "subjects": int(m.get("protocol_monitor_subjects", 0))}
                prev.update(t=now, sent=sent, alerts=prev["alerts"] + len(new_alerts),
                            dead=prev["dead"] + row["dead_letters"], metrics=m)
                return row

            row0 = take(0)
            row0.update(sent_per_s=None, processed_per_s=None)
            samples.append(row0)
            log(header())
            log(fmt(row0, "warm-up"))

            # the steady stream
            start = time.monotonic()
            total = int(rate * minutes * 60)
            next_sample, next_round = sample_s, sample_s
            choices, weights = list(MIX), list(MIX.values())
            known_ids = list(flipper.current)  # every event_id the monitor holds: redeliveries of their last version
            i = 0
            while True:
                elapsed = time.monotonic() - start
                if elapsed >= next_sample:
                    producer.flush()
                    row = take(next_sample / 60)
                    samples.append(row)
                    log(fmt(row))
                    if next_sample >= minutes * 60 - 1e-6:
                        break
                    next_sample += sample_s
                    continue
                if elapsed >= next_round and deadlines.count:
                    due_at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=period / 2)
                    for e in deadlines.round(due_at):
                        send(e)
                        counts["deadline"] += 1
                    dl_due.append(due_at.timestamp())
                    next_round += period
                if i >= total:
                    time.sleep(min(0.05, max(0.0, next_sample - elapsed)))
                    continue
                ahead = i / rate - elapsed
                if ahead > 0:
                    time.sleep(min(ahead, max(0.0, next_sample - elapsed)))
                    continue
                kind = rng.choices(choices, weights)[0]
                if kind == "amendment":
                    e = flipper.amendment()
                    stamps[e["event_id"]].append(send(e))
                elif kind == "duplicate":
                    raw = flipper.current[rng.choice(known_ids)]
                    send(None, raw=raw, key=json.loads(raw)["subject_id"].encode())
                else:
                    send(None, raw=INVALID[counts["invalid"] % len(INVALID)], key=b"SOAK-X")
                counts[kind] += 1
                i += 1
            producer.flush()
            drained = wait_until_consumed(broker.bootstrap, f"soak-{tag}", topics["events"], 300)
            result["drained_after_stream"] = drained
            time.sleep(2)  # the readers catch up with what the last events caused
            result["dead_letters_total"] = len(dead.since(0))
            result["alert_records_total"] = len(alerts.since(0))
            result["sent"] = counts
            result["samples"] = samples
            result["service_alive"] = svc.proc is not None and svc.proc.poll() is None
        finally:
            producer.close(timeout=5)
            code = svc.stop()
            alerts.stop()
            dead.stop()
        result["service_exit_code"] = code
        stats = [ln for ln in (tmp / "service.log").read_text(errors="replace").splitlines()
                 if ln.startswith("stopped:")]
        result["service_stats"] = ast.literal_eval(stats[-1][len("stopped: "):]) if stats else None
    result["verdict"] = verdict(samples)
    result["logs"] = str(tmp)
    return result


def verdict(samples: list[dict[str, Any]], max_growth_mb: float = 3.0) -> dict[str, Any]:
    """First sample after the warm-up period (end of stream minute 1, or the first stream sample if the run is
    shorter) against the last. Memory is flat if it grew by at most `max_growth_mb` (an absolute bound: a leak
    of 0.3 MB/min is 1 % of a 300 MB service over ten minutes, and 0.4 GB a day)."""
    stream = [s for s in samples if s["minute"] > 0]
    if not stream:
        return {}
    first = next((s for s in stream if s["minute"] >= 1 - 1e-6), stream[0])
    if first is stream[-1] and len(stream) > 1:
        first = stream[0]
    last = stream[-1]
    after = [s for s in stream if s["minute"] >= first["minute"]]
    growth = round(last["rss_mb"] - first["rss_mb"], 1)
    out = {"from_minute": first["minute"], "to_minute": last["minute"],
           "rss_first_mb": first["rss_mb"], "rss_last_mb": last["rss_mb"], "rss_growth_mb": growth,
           "rss_growth_pct": round(100 * growth / first["rss_mb"], 1),
           "rss_slope_mb_per_min": slope([s["minute"] for s in after], [s["rss_mb"] for s in after]),
           "rss_max_mb": max(s["rss_mb"] for s in after),
           "fds_first": first["fds"], "fds_last": last["fds"],
           "threads_first": first["threads"], "threads_last": last["threads"]}
    out["memory_flat"] = growth <= max_growth_mb
    out["fds_flat"] = last["fds"] <= first["fds"]
    out["threads_flat"] = last["threads"] <= first["threads"]
    out["ok"] = out["memory_flat"] and out["fds_flat"] and out["threads_flat"]
    return out


COLUMNS = (("minute", 6), ("rss_mb", 7), ("fds", 4), ("threads", 7), ("sent_per_s", 10), ("processed_per_s", 15),
           ("lag", 5), ("alerts_raised", 13), ("alerts_retracted", 16), ("latency_p50_s", 13),
           ("latency_p99_s", 13), ("dead_letters", 12), ("deadline_late_max_s", 19), ("open_alerts", 11),
           ("subjects", 8))


def header() -> str:
    return " | ".join(f"{name:>{w}}" for name, w in COLUMNS)


def fmt(row: dict[str, Any], label: str | None = None) -> str:
    cells = []
    for name, w in COLUMNS:
        value = label if (name == "minute" and label) else row.get(name)
        cells.append(f"{'-' if value is None else value!s:>{w}}")
    return " | ".join(cells)


def markdown(result: dict[str, Any]) -> str:
    """The per-sample table as Markdown (for BENCHMARKS.md)."""
    names = [n for n, _ in COLUMNS]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in result["samples"]:
        lines.append("| " + " | ".join("warm-up" if (n == "minute" and row["minute"] == 0) else
                                        ("-" if row.get(n) is None else str(row.get(n))) for n in names) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the steady stream (default 10)")
    ap.add_argument("--sample-seconds", type=float, default=60.0, help="sampling period (default 60)")
    ap.add_argument("--rate", type=float, default=150.0, help="steady stream, events/s (default 150)")
    ap.add_argument("--subjects", type=int, default=200, help="warm-up cohort size (default 200)")
    ap.add_argument("--deadline-subjects", type=int, default=4, help="subjects with a live H12 deadline each period")
    ap.add_argument("--temps-per-subject", type=int, default=4, help="temperature readings per subject in the pool")
    ap.add_argument("--seed", type=int, default=41)
    ap.add_argument("--smoke", action="store_true", help="1 minute, a sample every 15 s, 30 subjects, 100 events/s")
    ap.add_argument("--max-growth-mb", type=float, default=3.0,
                    help="RSS growth after the warm-up minute allowed by the verdict (default 3 MB)")
    ap.add_argument("--fail-on-growth", action="store_true", help="exit 1 if the verdict finds growth")
    ap.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    ap.add_argument("--json", default=str(ROOT / ".bench" / "soak.json"))
    args = ap.parse_args()
    if args.smoke:
        args.minutes, args.sample_seconds, args.subjects, args.rate = 1.0, 15.0, 30, 100.0

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the finally blocks that stop the service and the broker

    signal.signal(signal.SIGTERM, interrupted)
    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    try:
        result = run_soak(minutes=args.minutes, sample_s=args.sample_seconds, rate=args.rate, subjects=args.subjects,
                          deadline_subjects=args.deadline_subjects, temps_per_subject=args.temps_per_subject,
                          seed=args.seed, tmp=tmp)
    except KeyboardInterrupt:
        print("interrupted: the service and the broker were stopped", file=sys.stderr)
        return 130
    result["smoke"] = args.smoke
    result["verdict"] = verdict(result["samples"], args.max_growth_mb)
    v = result["verdict"]
    print(f"verdict: RSS {v['rss_first_mb']} MB at minute {v['from_minute']} -> {v['rss_last_mb']} MB at minute "
          f"{v['to_minute']} ({v['rss_growth_mb']:+} MB, {v['rss_growth_pct']:+} %, slope "
          f"{v['rss_slope_mb_per_min']} MB/min); fds {v['fds_first']} -> {v['fds_last']}; threads "
          f"{v['threads_first']} -> {v['threads_last']}: {'flat' if v['ok'] else 'GROWTH'}")
    print(f"sent {result['sent']}; service {result['service_stats']}; drained {result['drained_after_stream']}")
    if args.markdown:
        print(markdown(result))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json} (logs in {tmp})", file=sys.stderr)
    return 1 if args.fail_on_growth and not v["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())

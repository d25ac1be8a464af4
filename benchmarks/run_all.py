"""Every benchmark in one command: a table on standard output and a JSON file.

    .venv/bin/python benchmarks/run_all.py [--smoke] [--json .bench/results.json]

1. replay throughput and peak memory, 1,000 subjects x 60 days (`bench_replay.py`);
2. end-to-end throughput through the test broker next to kafka-python's raw consume rate, same run;
3. event-to-alert latency p50/p99 at a steady 1,000 events/s;
4. punctuality of live deadline alerts: H12 escalations missed on purpose, due a few seconds after the start;
5. recovery: time to /readyz of a restarted instance whose group committed 1,000 subjects' history;
6. memory per subject: replay peak RSS / subjects, and the engine's own cost per session.
`--smoke` runs small sizes (CI uses it; it is not a timed test).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_kafka import bench_stream, produce_all  # noqa: E402
from monitor.broker import LocalBroker, free_port  # noqa: E402
from monitor.generate import generate  # noqa: E402
from tests.support.kafkatools import (  # noqa: E402
    ServiceProcess, create_topics, read_topic, wait_ready, wait_until_consumed)


def bench_replay(subjects: int, days: int) -> dict:
    out = Path(tempfile.mkdtemp()) / "replay.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_replay.py"), "--subjects", str(subjects),
                    "--days", str(days), "--seed", "1", "--json", str(out)], check=True, capture_output=True)
    r = json.loads(out.read_text())
    return {"replay_events": r["events"], "replay_subjects": subjects, "replay_events_per_s": r["events_per_second"],
            "replay_peak_rss_mb": r["peak_rss_mb"],
            "memory_per_subject_kb": round(r["peak_rss_mb"] * 1024 / subjects, 1)}


def engine_session_kb() -> float:
    code = ("from monitor.rules import load_rules; from monitor.engine import RulesEngine\n"
            "rss=lambda: int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])\n"
            "r=load_rules(); e=RulesEngine(definition=r.engine_definition(), version=r.version, max_sessions=None)\n"
            "a=rss()\n"
            "[e.sync(f'S{i}', {'f:1': {'fact': 'weight_status', 'at': 'x', 'weight_known': True}}) for i in range(500)]\n"
            "print((rss()-a)/500)")
    return round(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                      cwd=ROOT).stdout), 1)


def bench_deadlines(broker: LocalBroker, count: int, tmp: Path) -> dict:
    """Scenario 04's subject (febrile at H12, no supplement), moved so that H12 + 3 h + 2 h grace falls 20-40 s
    after the start; the alert's broker timestamp minus that instant is its lateness."""
    from tests.conftest import SHARED, load_scenario

    _, template = load_scenario(SHARED / "scenarios" / "04_missed_escalation_h12.jsonl")
    t0 = next(dt.datetime.fromisoformat(e["occurred_at"]) for e in template
              if e["type"] == "drug_administration" and e.get("study_drug"))
    now = dt.datetime.now(dt.timezone.utc)
    events, due = [], {}
    for i in range(count):
        target = now + dt.timedelta(seconds=20 + 20 * i / max(1, count - 1))
        shift = target - (t0 + dt.timedelta(hours=17))
        sid = f"DL-{i:03d}"
        due[sid] = target
        for e in template:
            e = json.loads(json.dumps(e))
            e["subject_id"], e["event_id"] = sid, f"{sid}-{e['event_id']}"
            for k in ("occurred_at", "recorded_at", "start_at", "end_at", "infusion_end_at", "consent_signed_at"):
                if e.get(k):
                    e[k] = (dt.datetime.fromisoformat(e[k]) + shift).isoformat()
            if dt.datetime.fromisoformat(e["recorded_at"]) <= now:  # only what has "happened" so far
                events.append(e)
    tag = uuid.uuid4().hex[:6]
    topics = {"events": f"dev-{tag}", "alerts": f"dal-{tag}", "dead": f"ddl-{tag}"}
    create_topics(broker.bootstrap, {topics["events"]: 3, topics["alerts"]: 3, topics["dead"]: 1})
    svc = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=f"d-{tag}", log=tmp / "deadline.log").start()
    produce_all(broker.bootstrap, topics["events"], events)
    msgs = read_topic(broker.bootstrap, topics["alerts"], timeout_s=90, until=lambda m: sum(
        json.loads(x.value)["rule"] == "DOSE-H12-MISSED-ESCALATION" for x in m) >= count)
    svc.stop()
    late = sorted(m.timestamp / 1000 - due[json.loads(m.value)["subject_id"]].timestamp() for m in msgs
                  if json.loads(m.value)["rule"] == "DOSE-H12-MISSED-ESCALATION")
    return {"deadline_alerts": len(late), "deadline_late_max_s": round(max(late), 3) if late else None,
            "deadline_late_p50_s": round(late[len(late) // 2], 3) if late else None}


def bench_recovery(broker: LocalBroker, subjects: int, tmp: Path) -> dict:
    """A monitor processes 1,000 subjects' history and commits; a new instance in the same group (a restart, or
    the partitions moving) is timed from its start to /readyz: it loads the committed history of its partitions
    and evaluates each subject once."""
    tag = uuid.uuid4().hex[:6]
    events = list(generate(subjects=subjects, days=60, seed=31, deviation_rate=0.2))
    topics = {"events": f"rev-{tag}", "alerts": f"ral-{tag}", "dead": f"rdl-{tag}"}
    create_topics(broker.bootstrap, {topics["events"]: 3, topics["alerts"]: 3, topics["dead"]: 1})
    produce_all(broker.bootstrap, topics["events"], events)
    group = f"r-{tag}"
    first = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=tmp / "recovery-first.log")
    first.start()
    wait_until_consumed(broker.bootstrap, group, topics["events"], 1800)
    first.stop()
    port = free_port()
    started = time.perf_counter()
    svc = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=tmp / "recovery.log",
                         extra=["--metrics-port", str(port)]).start()
    ready = wait_ready(port, started=started, timeout_s=900)
    svc.stop()
    return {"recovery_subjects": subjects, "recovery_events": len(events),
            "recovery_ready_s": round(ready, 2) if ready else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=str(ROOT / ".bench" / "results.json"))
    args = ap.parse_args()
    size = dict(subjects=50, days=20, stream=20, rate=200.0, deadlines=3, recovery=30) if args.smoke else dict(
        subjects=1000, days=60, stream=100, rate=1000.0, deadlines=10, recovery=1000)
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    results: dict = {"machine": f"{platform.platform()}, {platform.python_version()}, "
                                f"{__import__('os').cpu_count()} CPUs", "smoke": args.smoke}
    results.update(bench_replay(size["subjects"], size["days"]))
    results["engine_session_kb"] = engine_session_kb()
    with LocalBroker(log_path=tmp / "broker.log") as broker:
        results.update(bench_stream(broker, size["stream"], size["rate"], tmp))
        results.update(bench_deadlines(broker, size["deadlines"], tmp))
        results.update(bench_recovery(broker, size["recovery"], tmp))
    targets = [("replay events/s", results["replay_events_per_s"], ">= 50,000"),
               ("end-to-end / raw consume", results["e2e_over_raw"], ">= 0.70"),
               ("latency p99 s @ %d ev/s" % size["rate"], results["latency_p99_s"], "<= 0.050"),
               ("deadline lateness max s", results["deadline_late_max_s"], "<= 1.0"),
               ("recovery to ready s (%d subjects)" % size["recovery"], results["recovery_ready_s"], "<= 10"),
               ("memory per subject KB", results["memory_per_subject_kb"], "<= 300")]
    print(f"{'measure':<38} {'measured':>12}  target")
    for name, value, target in targets:
        print(f"{name:<38} {value!s:>12}  {target}")
    print(f"(raw consume {results['raw_consume_events_per_s']} ev/s, e2e {results['e2e_events_per_s']} ev/s, "
          f"latency p50 {results['latency_p50_s']} s, engine session {results['engine_session_kb']} KB, "
          f"replay peak RSS {results['replay_peak_rss_mb']} MB)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

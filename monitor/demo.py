"""The built-in demo: a local broker, a synthetic cohort streamed into it, the real service, alerts as they fire.

Everything runs on this machine (loopback only) and stops on exit or Ctrl-C. The cohort is historical, so the
service runs with the stream clock (deadlines follow the events' recorded_at).
"""

from __future__ import annotations

import json
import threading
import time
import uuid

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from monitor.alerts import Alert
from monitor.broker import LocalBroker, free_port
from monitor.config import load_settings
from monitor.generate import generate
from monitor.service import build_service


def _print_alert(alert: Alert) -> None:
    verb = "RAISED   " if alert.status == "raised" else "WITHDRAWN"
    print(f"{verb} {alert.severity:<8} {alert.rule:<32} {alert.subject_id:<10} at {alert.at[:16]}  {alert.message}",
          flush=True)


def run_demo(*, rules_dir: str | None = None, subjects: int = 24, seed: int = 7, rate: float = 400.0) -> int:
    events = list(generate(subjects=subjects, days=60, seed=seed, sites=3, deviation_rate=0.5))
    tag = uuid.uuid4().hex[:6]
    with LocalBroker() as broker:
        settings = load_settings(overrides={
            "bootstrap_servers": broker.bootstrap, "events_topic": f"demo-events-{tag}",
            "alerts_topic": f"demo-alerts-{tag}", "dead_letter_topic": f"demo-dead-letter-{tag}",
            "group_id": f"demo-{tag}", "rules": rules_dir, "clock": "stream", "tick_seconds": 0.2,
            "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "metrics_port": free_port()})
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        # one partition: the stream clock follows delivery order exactly, as a replay does
        admin.create_topics([NewTopic(settings.events_topic, 1, 1), NewTopic(settings.alerts_topic, 1, 1),
                             NewTopic(settings.dead_letter_topic, 1, 1)])
        admin.close()
        print(f"Local broker on {broker.bootstrap}; topics {settings.events_topic}, {settings.alerts_topic}; "
              f"metrics on http://127.0.0.1:{settings.metrics_port}/metrics")
        print(f"Streaming {len(events)} events of {subjects} synthetic subjects (about half with a planted "
              f"deviation) at {rate:.0f} events/s. Ctrl-C stops.\n", flush=True)
        service = build_service(settings, on_alert=_print_alert)
        stop = threading.Event()
        sent = threading.Event()

        def stream() -> None:
            producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=5)
            for i, event in enumerate(events):
                if stop.is_set():
                    break
                producer.send(settings.events_topic, key=event["subject_id"].encode(),
                              value=json.dumps(event).encode())
                if i % 20 == 19:
                    time.sleep(20 / rate)
            producer.flush()
            producer.close()
            sent.set()

        def watch() -> None:
            sent.wait()
            while not stop.is_set():
                if service.stats["events"] + service.stats["rejected"] >= len(events):
                    time.sleep(1.0)
                    stop.set()
                time.sleep(0.2)

        threading.Thread(target=stream, daemon=True).start()
        threading.Thread(target=watch, daemon=True).start()
        started = time.monotonic()
        try:
            service.run(stop)
        except KeyboardInterrupt:
            stop.set()
        finally:
            service.close()
        elapsed = time.monotonic() - started
    st = service.stats
    print(f"\n{st['events']} events consumed, {st['rejected']} dead-lettered, {st['alerts_published']} alert records "
          f"published in {elapsed:.1f} s; broker stopped.")
    print("Next: run the service against your own Kafka with `protocol-monitor run --bootstrap-servers HOST:PORT`.")
    return 0

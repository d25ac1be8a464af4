"""The built-in demo: a local broker, a synthetic cohort streamed into it, the real service, alerts as they fire,
and the safety officers' inbox on them.

Everything runs on this machine (loopback only) and stops on exit or Ctrl-C. The cohort is historical, so the
service runs with the stream clock (deadlines follow the events' recorded_at). Alerts go to an alert store in a
temporary directory (removed on exit) that the inbox serves, with a demo safety-officer account whose password is
made up at start and printed.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from monitor.alerts import Alert
from monitor.broker import LocalBroker, free_port
from monitor.config import load_settings
from monitor.generate import generate
from monitor.rules import load_rules
from monitor.service import build_service
from monitor.store import AlertStore

DEMO_USER = "demo.officer"


def _print_alert(alert: Alert) -> None:
    verb = "RAISED   " if alert.status == "raised" else "WITHDRAWN"
    print(f"{verb} {alert.severity:<8} {alert.rule:<32} {alert.subject_id:<10} at {alert.at[:16]}  {alert.message}",
          flush=True)


class _Inbox:
    """`protocol-monitor serve` in a thread of the demo, on loopback, stopped by `stop()`."""

    def __init__(self, settings: Any, store_url: str, events: Path, port: int) -> None:
        import uvicorn
        from pydantic import SecretStr

        from monitor.web.app import build_app

        settings = settings.model_copy(update={"store": store_url})
        settings.web = settings.web.model_copy(update={
            "host": "127.0.0.1", "port": port, "events": [str(events)], "poll_seconds": 2.0,
            "session_secret": SecretStr(secrets.token_urlsafe(32))})
        self.address = f"http://127.0.0.1:{port}/"
        config = uvicorn.Config(build_app(settings), host="127.0.0.1", port=port, log_level="warning",
                                access_log=False, server_header=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="demo-inbox", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def run_demo(*, rules_dir: str | None = None, subjects: int = 24, seed: int = 7, rate: float = 400.0,
             inbox: bool = True, exit_when_done: bool = False, inbox_port: int = 0) -> int:
    from monitor.web.passwords import hash_password

    workdir = Path(tempfile.mkdtemp(prefix="protocol-monitor-demo-"))
    started: list[_Inbox] = []
    try:
        return _run(rules_dir=rules_dir, subjects=subjects, seed=seed, rate=rate, inbox=inbox,
                    exit_when_done=exit_when_done, inbox_port=inbox_port, workdir=workdir,
                    hash_password=hash_password, started=started)
    finally:
        for web in started:  # also after an error or Ctrl-C before the end
            web.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _run(*, rules_dir: str | None, subjects: int, seed: int, rate: float, inbox: bool, exit_when_done: bool,
         inbox_port: int, workdir: Path, hash_password: Any, started: list[_Inbox]) -> int:
    parameters = load_rules(rules_dir).parameters  # the cohort follows the rules the service runs
    events = list(generate(subjects=subjects, days=60, seed=seed, sites=3, deviation_rate=0.5, parameters=parameters))
    tag = uuid.uuid4().hex[:6]
    store_url = f"sqlite:///{workdir / 'alerts.db'}"
    events_path = workdir / "events.jsonl"
    events_path.touch()
    store = AlertStore(url=store_url)
    password = secrets.token_urlsafe(12)
    store.add_user(username=DEMO_USER, printed_name="Demo Safety Officer", role="safety_officer", sites=[],
                   password_hash=hash_password(password), actor="demo")
    web: _Inbox | None = None
    interrupted = False
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
        if inbox:
            web = _Inbox(settings, store_url, events_path, inbox_port or free_port())
            started.append(web)
            print(f"Safety officers' inbox on {web.address}  sign in as {DEMO_USER}, password {password}  "
                  "(a demo account made up for this run)")
        print(f"Streaming {len(events)} events of {subjects} synthetic subjects (about half with a planted "
              f"deviation) at {rate:.0f} events/s. Ctrl-C stops.\n", flush=True)

        def on_alert(alert: Alert) -> None:
            _print_alert(alert)
            store.add_record(alert)

        service = build_service(settings, on_alert=on_alert)
        stop = threading.Event()
        sent = threading.Event()

        def stream() -> None:
            producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=5)
            with events_path.open("a", encoding="utf-8") as log:
                for i, event in enumerate(events):
                    if stop.is_set():
                        break
                    producer.send(settings.events_topic, key=event["subject_id"].encode(),
                                  value=json.dumps(event).encode())
                    log.write(json.dumps(event) + "\n")
                    if i % 20 == 19:
                        log.flush()
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
        began = time.monotonic()
        try:
            service.run(stop)
        except KeyboardInterrupt:
            stop.set()
            interrupted = True
        finally:
            service.close()
        elapsed = time.monotonic() - began
    st = service.stats
    print(f"\n{st['events']} events consumed, {st['rejected']} dead-lettered, {st['alerts_published']} alert records "
          f"published in {elapsed:.1f} s; broker stopped.")
    try:
        if web is not None and not interrupted and not exit_when_done:
            print(f"The inbox stays on {web.address} (user {DEMO_USER}, password {password}). Ctrl-C stops it.",
                  flush=True)
            try:
                while web.thread.is_alive():
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
    finally:
        if web is not None:
            web.stop()
            print("inbox stopped.")
        store.close()
    print("Next: run the service against your own Kafka with `protocol-monitor run --bootstrap-servers HOST:PORT`;"
          " serve the inbox on its store with `protocol-monitor serve` (README, For safety officers).")
    return 0

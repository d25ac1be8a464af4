"""The notifier and the broker: unreachable at start it waits (back-off, a clear line, SIGTERM works) and then
stores and delivers; deliveries never depend on the broker being there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from monitor.broker import LocalBroker, free_port
from tests.connectors.kafkatools import create_topics, produce
from tests.connectors.sample_alert import make_alert


def _wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _receiver() -> tuple[ThreadingHTTPServer, list[dict]]:
    bodies: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, bodies


def test_notifier_waits_for_an_unreachable_broker_then_stores_and_delivers(tmp_path):
    port = free_port()
    server, bodies = _receiver()
    config = tmp_path / "monitor.yaml"
    config.write_text(json.dumps({"routes": [{"name": "hook", "sink": "webhook", "match": {},
                                              "webhook": {"url": f"http://127.0.0.1:{server.server_port}/a",
                                                          "timeout_s": 2, "retries": 0}}]}))
    log = tmp_path / "notify.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PROTOCOL_MONITOR_SESSION_TIMEOUT_MS="6000",
               PROTOCOL_MONITOR_HEARTBEAT_INTERVAL_MS="1000", PROTOCOL_MONITOR_NOTIFY_GROUP_ID="n-faults")
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "notify", "--config", str(config),  # noqa: S603
                             "--bootstrap-servers", f"127.0.0.1:{port}", "--alerts-topic", "alerts-n",
                             "--store", f"sqlite:///{tmp_path / 'alerts.db'}"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for(lambda: "Kafka broker unreachable" in log.read_text(), "the unreachable line")
        assert proc.poll() is None, log.read_text()
        with LocalBroker(port=port, log_path=tmp_path / "broker.log") as broker:
            create_topics(broker.bootstrap, {"alerts-n": 1})
            alert = make_alert()
            produce(broker.bootstrap, "alerts-n", [(alert.subject_id.encode(), alert.model_dump_json().encode())])
            _wait_for(lambda: len(bodies) >= 1, "the webhook delivery")
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        server.shutdown()
        server.server_close()
    assert [b["alert_id"] for b in bodies] == [make_alert().alert_id]
    assert "Traceback" not in log.read_text()


def test_sigterm_while_the_notifier_waits_for_the_broker_stops_cleanly(tmp_path):
    log = tmp_path / "notify.log"
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "notify", "--bootstrap-servers",  # noqa: S603
                             f"127.0.0.1:{free_port()}", "--store", f"sqlite:///{tmp_path / 'alerts.db'}"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        _wait_for(lambda: "Kafka broker unreachable" in log.read_text(), "the unreachable line")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert "Traceback" not in log.read_text()

"""The notifier and the broker: unreachable at start it waits (back-off, a clear line, SIGTERM works) and then
stores and delivers; deliveries never depend on the broker being there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from monitor.broker import LocalBroker, free_port
from tests.support.kafkatools import create_topics, produce
from tests.support.sample_alert import make_alert
from tests.connectors.test_faults import wait_for
from tests.monitor.test_notify import Receiver


def _notifier(log, *args: str, **env: str) -> subprocess.Popen[bytes]:
    """`protocol-monitor notify` as a child process, its output in `log`."""
    return subprocess.Popen([sys.executable, "-m", "monitor", "notify", *args],  # noqa: S603
                            stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **env))


def _stop(proc: subprocess.Popen[bytes], log) -> None:
    """SIGTERM, which must end it with 0; killed by its PID if it does not stop."""
    if proc.returncode is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_notifier_waits_for_an_unreachable_broker_then_stores_and_delivers(tmp_path):
    port = free_port()
    receiver = Receiver(free_port())
    receiver.up()
    config = tmp_path / "monitor.yaml"
    config.write_text(json.dumps({"routes": [{"name": "hook", "sink": "webhook", "match": {},
                                              "webhook": {"url": f"http://127.0.0.1:{receiver.port}/a",
                                                          "timeout_s": 2, "retries": 0}}]}))
    log = tmp_path / "notify.log"
    proc = _notifier(log, "--config", str(config), "--bootstrap-servers", f"127.0.0.1:{port}", "--alerts-topic",
                     "alerts-n", "--store", f"sqlite:///{tmp_path / 'alerts.db'}",
                     PROTOCOL_MONITOR_SESSION_TIMEOUT_MS="6000", PROTOCOL_MONITOR_HEARTBEAT_INTERVAL_MS="1000",
                     PROTOCOL_MONITOR_NOTIFY_GROUP_ID="n-faults")
    try:
        wait_for(log, "Kafka broker unreachable")
        assert proc.poll() is None, log.read_text()
        with LocalBroker(port=port, log_path=tmp_path / "broker.log") as broker:
            create_topics(broker.bootstrap, {"alerts-n": 1})
            alert = make_alert()
            produce(broker.bootstrap, "alerts-n", [(alert.subject_id.encode(), alert.model_dump_json().encode())])
            deadline = time.monotonic() + 60
            while not receiver.bodies and time.monotonic() < deadline:
                time.sleep(0.2)
            _stop(proc, log)  # while the broker is still there
    finally:
        _stop(proc, log)
        receiver.down()
    assert [b["alert_id"] for b in receiver.bodies] == [make_alert().alert_id]
    assert "Traceback" not in log.read_text()


def test_sigterm_while_the_notifier_waits_for_the_broker_stops_cleanly(tmp_path):
    log = tmp_path / "notify.log"
    proc = _notifier(log, "--bootstrap-servers", f"127.0.0.1:{free_port()}", "--store",
                     f"sqlite:///{tmp_path / 'alerts.db'}")
    try:
        wait_for(log, "Kafka broker unreachable")
    finally:
        _stop(proc, log)
    assert "Traceback" not in log.read_text()

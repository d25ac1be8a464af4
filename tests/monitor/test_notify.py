"""Delivery end to end: alert records into the store, routed by severity and site to a real SMTP server and a
real HTTP receiver on loopback; a receiver that is down keeps its alerts in the outbox until it comes back."""

from __future__ import annotations

import email
import email.policy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd import controller as aiosmtpd_controller

from connectors.delivery import Router
from monitor.broker import free_port
from monitor.notify import Notifier
from monitor.store import AlertStore
from tests.conftest import SHARED, load_scenario, run_events


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd hook
        self.messages.append(email.message_from_bytes(envelope.original_content or envelope.content,
                                                      policy=email.policy.default))
        return "250 OK"


class Receiver:
    """An HTTP receiver that can be down (port closed) and come back on the same port."""

    def __init__(self, port: int) -> None:
        self.port, self.bodies, self.server = port, [], None

    def up(self) -> None:
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def mailbox():
    box = Mailbox()
    ctl = aiosmtpd_controller.Controller(box, hostname="127.0.0.1", port=free_port())
    ctl.start()
    yield ctl, box
    ctl.stop()


def test_routing_email_and_webhook_with_a_receiver_down_for_a_while(mailbox, tmp_path):
    ctl, box = mailbox
    receiver = Receiver(free_port())
    header, events = load_scenario(SHARED / "scenarios" / "21_late_dose_record_retracts_alert.jsonl")
    _, more = load_scenario(SHARED / "scenarios" / "06_overdose_above_8mgkg.jsonl")
    alerts, _, _ = run_events(events + more, tmp_path=tmp_path)
    router = Router.from_config([
        {"name": "safety-email", "sink": "email", "match": {"severity": ["critical", "major"]},
         "smtp": {"host": "127.0.0.1", "port": ctl.port, "sender": "monitor@trial.example",
                  "recipients": ["safety@trial.example"], "timeout_s": 5}},
        {"name": "site-webhook", "sink": "webhook", "match": {"site": ["FR-BIC-01"]},
         "webhook": {"url": f"http://127.0.0.1:{receiver.port}/alerts", "timeout_s": 2, "retries": 0}},
    ])
    store = AlertStore(url=f"sqlite:///{tmp_path / 'alerts.db'}")
    notifier = Notifier(store=store, router=router, base_retry_s=0.0)
    for alert in alerts:
        notifier.accept(alert)
        notifier.accept(alert)  # redelivered from the topic: stored and delivered once
    expected_mail = [a for a in alerts if a.severity in ("critical", "major")]
    expected_hook = [a for a in alerts if a.site_id == "FR-BIC-01"]
    assert expected_mail and expected_hook and any(a.status == "retracted" for a in expected_mail)

    notifier.deliver_due()  # the webhook receiver is down: its alerts wait
    assert len(box.messages) == len(expected_mail)
    assert receiver.bodies == [] and store.pending_count() == len(expected_hook)

    receiver.up()
    try:
        notifier.deliver_due()
    finally:
        receiver.down()
    assert store.pending_count() == 0
    assert sorted((b["alert_id"], b["status"]) for b in receiver.bodies) == sorted(
        (a.alert_id, a.status) for a in expected_hook)
    subjects = [m["Subject"] for m in box.messages]
    assert any(s.startswith("[WITHDRAWN]") for s in subjects)  # the follow-up of a withdrawn alert
    overdose = next(m for m in box.messages if "DOSE-MAX-EXCEEDED" in m["Subject"])
    body = overdose.get_content()
    assert "8 mg/kg" in body and "ANA-006" in body and "Alert id" in body
    actions = [e.action for e in store.audit_entries()]
    assert actions.count("alert_delivered") == len(expected_mail) + len(expected_hook)
    assert store.verify_audit() == []


# ---- the alert store cannot be written ----------------------------------------------------------------------------
def test_a_full_store_raises_store_unavailable_and_stores_nothing(tmp_path):
    """SQLite's own limit (`max_page_count`) makes the database full without a mount: the write fails as a whole,
    with a message that says what to do, and the store is usable again once there is room."""
    from monitor.store import StoreUnavailable
    from tests.support.sample_alert import make_alert

    store = AlertStore(url=f"sqlite:///{tmp_path / 'alerts.db'}")
    store.add_record(make_alert(), sinks=["x"])
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")
    retracted = make_alert("retracted")
    with pytest.raises(StoreUnavailable, match="database or disk is full.*free space"):
        for i in range(50):  # the first pages may still have room
            store.add_record(retracted.model_copy(update={"alert_id": f"{i:024x}"}), sinks=["x"])
    stored = store._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    audited = len(store.audit_entries())
    store._conn.execute(f"PRAGMA max_page_count = {pages * 100}")
    assert store.add_record(retracted.model_copy(update={"alert_id": f"{i:024x}"}), sinks=["x"])
    assert store._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0] == stored + 1
    assert len(store.audit_entries()) == audited + 1 and store.verify_audit() == []


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs: a genuinely full (and then read-only) file system for the alert store."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN); the max_page_count test covers the store")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],  # noqa: S603, S607
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)  # noqa: S603, S607


class NotifierProcess:
    """`protocol-monitor notify` as a child process, stopped by its PID."""

    def __init__(self, *, bootstrap: str, topic: str, group: str, store: str, log) -> None:
        import sys

        self.argv = [sys.executable, "-m", "monitor", "notify", "--bootstrap-servers", bootstrap,
                     "--alerts-topic", topic, "--store", store]
        self.group, self.log, self.proc = group, log, None

    def start(self) -> "NotifierProcess":
        import os
        import subprocess

        env = dict(os.environ, PYTHONUNBUFFERED="1", PROTOCOL_MONITOR_SESSION_TIMEOUT_MS="6000",
                   PROTOCOL_MONITOR_HEARTBEAT_INTERVAL_MS="1000", PROTOCOL_MONITOR_NOTIFY_GROUP_ID=self.group)
        self.proc = subprocess.Popen(self.argv, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env)  # noqa: S603
        return self

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> int:
        import os
        import signal

        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout=30)
        except Exception:
            os.kill(proc.pid, signal.SIGKILL)
            return proc.wait(timeout=10)


def test_store_full_then_read_only_the_notifier_stops_says_why_and_loses_nothing(small_disk, tmp_path):
    import sqlite3
    import subprocess
    import time
    import uuid
    from collections import Counter

    from monitor.broker import LocalBroker
    from tests.support.kafkatools import committed_offsets, create_topics, produce
    from tests.support.sample_alert import make_alert

    def alerts(first: int, n: int) -> list[tuple[bytes, bytes]]:
        template = make_alert()
        return [(b"ANA-004", template.model_copy(update={"alert_id": f"{i:024x}"}).to_json().encode())
                for i in range(first, first + n)]

    def committed() -> int:
        return committed_offsets(broker.bootstrap, group, topic).get(0, 0)

    def wait_committed(n: int, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while committed() < n and time.monotonic() < deadline:
            time.sleep(0.3)
        return committed()

    def stored() -> Counter:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return Counter(conn.execute("SELECT alert_id, status FROM records").fetchall())

    tag = uuid.uuid4().hex[:8]
    topic, group, db = f"n-alerts-{tag}", f"n-{tag}", small_disk / "alerts.db"
    log = tmp_path / "notify.log"
    with LocalBroker(log_path=tmp_path / "broker.log") as broker:
        create_topics(broker.bootstrap, {topic: 1})
        notifier = NotifierProcess(bootstrap=broker.bootstrap, topic=topic, group=group, store=f"sqlite:///{db}",
                                   log=log)
        try:
            produce(broker.bootstrap, topic, alerts(0, 10))
            notifier.start()
            assert wait_committed(10) == 10

            # the disk fills up: the notifier stops at the first record it cannot store, says why, commits nothing
            # past the last stored record
            with (small_disk / "filler").open("wb") as filler:
                try:
                    while True:
                        filler.write(b"\0" * 65536)
                        filler.flush()
                except OSError:
                    pass
            produce(broker.bootstrap, topic, alerts(10, 20))
            assert notifier.wait() == 1
            text = log.read_text()
            assert "database or disk is full" in text and "free space" in text and "stopped consuming" in text
            assert "Traceback" not in text
            assert 10 <= committed() < 30
            assert committed() == sum(stored().values()), "an offset was committed past a record not stored"

            # room again: a restarted notifier stores what waited, each record once
            (small_disk / "filler").unlink()
            notifier.log = tmp_path / "notify-again.log"
            notifier.start()
            assert wait_committed(30) == 30
            assert notifier.stop() == 0

            # the volume turns read-only: the notifier refuses to start and says why; nothing is consumed
            subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)  # noqa: S603, S607
            produce(broker.bootstrap, topic, alerts(30, 5))
            notifier.log = tmp_path / "notify-read-only.log"
            notifier.start()
            assert notifier.wait() == 1
            text = notifier.log.read_text()
            assert "alert store" in text and "read-only" in text, text[-2000:]
            assert "Traceback" not in text
            assert committed() == 30
            subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)  # noqa: S603, S607
            notifier.start()
            assert wait_committed(35) == 35
            assert notifier.stop() == 0
        finally:
            notifier.stop()
    counts = stored()
    assert sum(counts.values()) == 35 and set(counts.values()) == {1}, "a record was lost or stored twice"
    store = AlertStore(url=f"sqlite:///{db}")
    try:
        assert store.verify_audit() == []
        assert [e.action for e in store.audit_entries()].count("alert_raised") == 35
    finally:
        store.close()


def test_run_with_an_unwritable_audit_store_refuses_to_start_and_says_why(small_disk, tmp_path):
    """`protocol-monitor run --store` records the rules version it loads; on a read-only volume it does not start
    (exit 1, one clear line, no traceback) rather than run rules the audit trail does not show."""
    import subprocess
    import sys

    from monitor.broker import free_port

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)  # noqa: S603, S607
    done = subprocess.run([sys.executable, "-m", "monitor", "run", "--bootstrap-servers",  # noqa: S603
                           f"127.0.0.1:{free_port()}", "--store", f"sqlite:///{small_disk / 'alerts.db'}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "not starting: the audit trail cannot record rules version" in done.stderr
    assert "mounted read-only" in done.stderr and "Traceback" not in done.stderr


def test_a_withdrawal_stored_before_its_alert_leaves_the_alert_withdrawn(tmp_path):
    """After an outage the alerts topic may hold a withdrawal before the alert it withdraws; the store's state does
    not depend on that order."""
    from tests.support.sample_alert import make_alert

    store = AlertStore(url=f"sqlite:///{tmp_path / 'alerts.db'}")
    assert store.add_record(make_alert("retracted"))
    assert store.add_record(make_alert())
    assert store.get(make_alert().alert_id)["state"] == "withdrawn"
    assert not store.add_record(make_alert()) and store.verify_audit() == []

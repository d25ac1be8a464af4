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

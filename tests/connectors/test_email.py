"""SmtpSink against a real SMTP server (aiosmtpd) on 127.0.0.1, and the plain-text alert format."""

from __future__ import annotations

import email
import email.policy
import socket
import time

import pytest

from connectors.base import DeliveryError
from connectors.email import SmtpSink, format_email
from monitor.broker import free_port
from monitor.errors import MonitorError
from tests.support.sample_alert import EVENTS, EXPECTS, MESSAGE, make_alert

aiosmtpd_controller = pytest.importorskip("aiosmtpd.controller")

class Collector:
    def __init__(self) -> None:
        self.envelopes: list = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd hook name
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"

    def messages(self) -> list[email.message.EmailMessage]:
        return [email.message_from_bytes(e.original_content or e.content, policy=email.policy.default)
                for e in self.envelopes]


@pytest.fixture
def smtp_server():
    handler = Collector()
    controller = aiosmtpd_controller.Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield controller, handler
    finally:
        controller.stop()


def sink_for(controller, **kw) -> SmtpSink:
    return SmtpSink(host="127.0.0.1", port=controller.port, sender="monitor@trial.example",
                    recipients=["oncall@trial.example", "cra@trial.example"], timeout_s=5.0, **kw)


def assert_plain_text(msg, body: str) -> None:
    assert not msg.is_multipart()
    assert msg.get_content_type() == "text/plain"
    assert "<html" not in body.lower() and "<br" not in body.lower()
    for line in body.splitlines():
        assert len(line) <= 80, line
        assert line.isprintable(), repr(line)


def test_raised_alert_arrives_as_a_readable_plain_text_email(smtp_server):
    controller, handler = smtp_server
    alert = make_alert()
    sink_for(controller).deliver(alert)

    assert len(handler.envelopes) == 1
    env = handler.envelopes[0]
    assert env.mail_from == "monitor@trial.example"
    assert env.rcpt_tos == ["oncall@trial.example", "cra@trial.example"]
    msg = handler.messages()[0]
    assert msg["Subject"] == "[MAJOR] DOSE-H12-MISSED-ESCALATION · ANA-004 · FR-BIC-01"
    assert msg["X-Alert-Id"] == alert.alert_id
    assert msg["X-Alert-Status"] == "raised"
    assert alert.alert_id in msg["Message-ID"] and "raised" in msg["Message-ID"]
    body = msg.get_content()
    assert_plain_text(msg, body)

    flat = " ".join(body.split())  # wrapped lines joined back
    assert f"What happened: {MESSAGE}" in flat
    assert "Subject: ANA-004" in body
    assert "Site: FR-BIC-01" in body
    assert "Rule: DOSE-H12-MISSED-ESCALATION" in body
    assert "Title: Febrile at H12 but no supplementary dose" in body
    assert "Severity: major / dosing" in body
    assert "Condition: step = H12 and febrile = true and ((weight_known = true and given_mg_per_kg < 1.8)" in flat
    assert "rule_condition" not in body
    assert "When: 2025-02-10T23:30:00+01:00 (event time)" in body
    assert "Detected: 2025-02-11T01:30:00+01:00" in body
    assert f"Protocol expects: {EXPECTS}" in flat
    assert "Window: 2025-02-10T19:30:00+01:00 → 2025-02-10T23:30:00+01:00" in body
    for event_id in EVENTS:
        assert event_id in body
    assert "  assessed_c: 38.5" in body.splitlines()
    assert "  given_mg_per_kg: 0.0" in body.splitlines()
    assert "  febrile: true" in body.splitlines()
    assert "  ANA-004-E020: clinical-events/3@1187" in body.splitlines()
    assert "  raw_c: 38.1" in body.splitlines()
    assert "Rule version: a31d264df3db" in body
    assert f"Alert id: {alert.alert_id}" in body
    assert "withdrawn" not in body.lower()


def test_withdrawal_says_so_first_and_threads_under_the_alert(smtp_server):
    controller, handler = smtp_server
    sink = sink_for(controller)
    raised, retracted = make_alert("raised"), make_alert("retracted")
    sink.deliver(raised)
    sink.deliver(retracted)
    sink.deliver(raised)  # a re-send

    first, second, resend = handler.messages()
    assert second["Subject"] == "[WITHDRAWN] DOSE-H12-MISSED-ESCALATION · ANA-004 · FR-BIC-01"
    assert second["X-Alert-Status"] == "retracted"
    assert second["X-Alert-Id"] == raised.alert_id
    body = second.get_content()
    assert_plain_text(second, body)
    lines = body.splitlines()
    assert f"alert {raised.alert_id} is withdrawn" in lines[0]
    assert "because later data removed its cause" in " ".join(body.split()[:20])
    assert "Rule: DOSE-H12-MISSED-ESCALATION" in body and "Subject: ANA-004" in body
    assert "Detected: 2025-02-11T09:05:00+01:00" in body
    assert f"Alert id: {raised.alert_id}" in body

    assert second["Message-ID"] != first["Message-ID"]
    assert second["In-Reply-To"] == first["Message-ID"]
    assert resend["Message-ID"] == first["Message-ID"]  # a re-send is recognisable


def test_server_not_listening_is_a_quick_delivery_error():
    sink = SmtpSink(host="127.0.0.1", port=free_port(), sender="m@trial.example", recipients=["a@trial.example"],
                    timeout_s=2.0)
    start = time.monotonic()
    with pytest.raises(DeliveryError, match=r"alert [0-9a-f]+ \(raised\) by SMTP to 127\.0\.0\.1") as info:
        sink.deliver(make_alert())
    assert time.monotonic() - start < 2.0
    assert isinstance(info.value, MonitorError)
    assert MESSAGE not in str(info.value)


def test_silent_server_times_out_within_timeout():
    with socket.socket() as listener:  # accepts connections (backlog) but never greets
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        sink = SmtpSink(host="127.0.0.1", port=listener.getsockname()[1], sender="m@trial.example",
                        recipients=["a@trial.example"], timeout_s=0.5)
        start = time.monotonic()
        with pytest.raises(DeliveryError):
            sink.deliver(make_alert())
        elapsed = time.monotonic() - start
    assert 0.4 <= elapsed < 3.0


def test_server_refusing_the_message_is_a_delivery_error(smtp_server):
    controller, handler = smtp_server

    async def refuse(server, session, envelope):
        return "554 Transaction failed: policy"

    handler.handle_DATA = refuse
    with pytest.raises(DeliveryError, match="554"):
        sink_for(controller).deliver(make_alert())


def test_long_values_wrap_under_80_columns_and_control_characters_are_dropped():
    alert = make_alert().model_copy(update={"message": "x " * 120 + "\r\nBcc: evil@example.com",
                                            "subject_id": "ANA-004\r\nBcc: evil@example.com"})
    subject, body = format_email(alert)
    assert "\n" not in subject and "\r" not in subject
    assert all(len(line) <= 80 and line.isprintable() for line in body.splitlines())
    assert not any(line.startswith("Bcc:") for line in body.splitlines())


def test_constructor_checks_its_settings():
    with pytest.raises(ValueError):
        SmtpSink(host="127.0.0.1", port=25, sender="m@trial.example", recipients=[])
    with pytest.raises(ValueError):
        SmtpSink(host="127.0.0.1", port=25, sender="m@trial.example", recipients=["a@x"], username="u")
    sink = SmtpSink(host="h", port=25, sender="m@trial.example", recipients=["a@x"], username="u", password="pw")
    assert "pw" not in repr(sink)

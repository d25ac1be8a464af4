"""Alerts by e-mail: a plain-text message readable on a phone, sent over SMTP.

`format_email` turns an alert into (subject line, body); `SmtpSink.deliver` sends one message and raises
`DeliveryError` when the server does not take it, so the caller keeps the alert in its outbox and retries later.
The Message-ID is derived from (alert_id, status): a re-sent message carries the same id, and a mail client or
the recipient can tell a resend from a new alert. The body is never logged.
"""

from __future__ import annotations

import json
import logging
import smtplib
import ssl
import textwrap
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

from connectors.base import DeliveryError
from monitor.alerts import Alert

log = logging.getLogger(__name__)

WIDTH = 76
WITHDRAWN_LINE = "WITHDRAWN: alert {alert_id} is withdrawn because later data removed its cause."


def _clean(value: Any) -> str:
    """One line of text: no control characters (a value can never start a new header or a fake line)."""
    text = value if isinstance(value, str) else _value(value)
    return "".join(ch if ch.isprintable() else " " for ch in text).strip()


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _line(label: str, value: Any, *, indent: str = "  ") -> list[str]:
    """`Label: value`, wrapped at WIDTH; long words (ids, timestamps) are never broken."""
    text = f"{label}: {_clean(value)}" if label else _clean(value)
    return textwrap.wrap(text, width=WIDTH, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False) or [text]


def email_subject(alert: Alert) -> str:
    tag = "WITHDRAWN" if alert.status == "retracted" else _clean(alert.severity).upper() or "ALERT"
    return f"[{tag}] {_clean(alert.rule)} · {_clean(alert.subject_id)} · {_clean(alert.site_id)}"


def format_email(alert: Alert) -> tuple[str, str]:
    """(subject line, plain-text body) for one alert record; a withdrawal says so on its first line."""
    ev = alert.evidence or {}
    raw_values = ev.get("values")
    values: dict[str, Any] = raw_values if isinstance(raw_values, dict) else {}
    out: list[str] = []
    if alert.status == "retracted":
        out += _line("", WITHDRAWN_LINE.format(alert_id=alert.retracts or alert.alert_id))
        out.append("")
    out += _line("What happened", alert.message)
    out.append("")
    out += _line("Subject", alert.subject_id)
    out += _line("Site", alert.site_id)
    out += _line("Rule", alert.rule)
    out += _line("Title", alert.title)
    if ev.get("rule_condition"):
        out += _line("Condition", ev["rule_condition"])
    out += _line("Severity", f"{alert.severity} / {alert.category}")
    out += _line("When", f"{alert.at} (event time)")
    out += _line("Detected", alert.detected_at)
    if alert.expects:
        out.append("")
        out += _line("Protocol expects", alert.expects)

    out.append("")
    out += _line("Evidence", f"derived fact {ev['fact']}" if ev.get("fact") else "")
    events = ev.get("events")
    if isinstance(events, list) and events:
        out.append("Events:")
        out += [f"  {_clean(e)}" for e in events]
    if "window_start" in values or "window_end" in values:
        out += _line("Window", f"{values.get('window_start', '?')} → {values.get('window_end', '?')}")
    shown = {k: v for k, v in values.items() if k not in ("window_start", "window_end")}
    if shown:
        out.append("Values:")
        for name in sorted(shown):
            out += _line(f"  {_clean(name)}", shown[name], indent="      ")
    sources = ev.get("sources")
    if isinstance(sources, dict) and sources:
        out.append("Sources (topic/partition@offset):")
        for event_id in sorted(sources, key=str):
            where = sources[event_id]
            if isinstance(where, dict):
                fhir = where.get("fhir")  # the FHIR resource/version the event was mapped from (issue 18)
                place = (f"{where.get('topic', '?')}/{where.get('partition', '?')}@{where.get('offset', '?')}"
                         if "topic" in where or not fhir else "")
                where = " ".join(x for x in (place, f"FHIR {fhir}" if fhir else "") if x)
            out += _line(f"  {_clean(event_id)}", where, indent="      ")
    others = {k: v for k, v in ev.items() if k not in ("fact", "events", "values", "sources", "rule_condition") and v is not None}
    if others:
        out.append("Other evidence:")
        for name in sorted(others):
            out += _line(f"  {_clean(name)}", others[name], indent="      ")

    out.append("")
    out += _line("Rule version", alert.rule_version)
    out += _line("Alert id", alert.alert_id)
    if alert.status == "retracted":
        out += _line("Status", "retracted (withdrawn)")
    return email_subject(alert), "\n".join(out) + "\n"


def message_id(alert: Alert, domain: str = "protocol-monitor.invalid") -> str:
    """The same (alert_id, status) always gives the same Message-ID, so a re-send is recognisable."""
    return f"<alert-{_clean(alert.alert_id)}-{alert.status}@{domain}>"


class SmtpSink:
    """Sends each alert as one plain-text e-mail to a fixed list of recipients."""

    def __init__(self, *, host: str, port: int, sender: str, recipients: list[str], timeout_s: float = 10.0,
                 starttls: bool = False, username: str | None = None, password: str | None = None) -> None:
        if not host:
            raise ValueError("SmtpSink: host is required")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"SmtpSink: port must be 1..65535, not {port!r}")
        if not sender or not recipients or any(not r for r in recipients):
            raise ValueError("SmtpSink: a sender and at least one recipient are required")
        if timeout_s <= 0:
            raise ValueError("SmtpSink: timeout_s must be > 0")
        if (username is None) != (password is None):
            raise ValueError("SmtpSink: give both username and password, or neither")
        self.host, self.port, self.sender = host, port, sender
        self.recipients = list(recipients)
        self.timeout_s = float(timeout_s)
        self.starttls = starttls
        self.username, self._password = username, password
        domain = sender.rpartition("@")[2].strip(" <>")
        self._domain = domain if domain and domain != sender else "protocol-monitor.invalid"

    def __repr__(self) -> str:  # never shows the password
        return (f"SmtpSink(host={self.host!r}, port={self.port}, sender={self.sender!r}, "
                f"recipients={self.recipients!r}, starttls={self.starttls})")

    def build_message(self, alert: Alert) -> EmailMessage:
        subject, body = format_email(alert)
        msg = EmailMessage()
        msg["Subject"] = subject
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.recipients)
        msg["Date"] = formatdate(localtime=False, usegmt=True)
        msg["Message-ID"] = message_id(alert, self._domain)
        if alert.status == "retracted":  # threads the withdrawal under the alert it withdraws
            raised = message_id(alert.model_copy(update={"status": "raised"}), self._domain)
            msg["In-Reply-To"] = raised
            msg["References"] = raised
        msg["X-Alert-Id"] = _clean(alert.alert_id)
        msg["X-Alert-Status"] = alert.status
        msg["Auto-Submitted"] = "auto-generated"
        # quoted-printable keeps the message 7-bit (any relay takes it) while clients show the text as written
        msg.set_content(body, subtype="plain", charset="utf-8", cte="quoted-printable")
        return msg

    def deliver(self, alert: Alert) -> None:
        """Send one message; `DeliveryError` if the server can not be reached, times out or refuses it."""
        msg = self.build_message(alert)
        what = f"alert {alert.alert_id} ({alert.status}) by SMTP to {self.host}:{self.port}"
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout_s) as smtp:
                if self.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if self.username is not None:
                    smtp.login(self.username, self._password or "")
                refused = smtp.send_message(msg, from_addr=self.sender, to_addrs=self.recipients)
        except smtplib.SMTPRecipientsRefused as exc:
            raise DeliveryError(f"{what} failed: every recipient was refused "
                                f"({', '.join(sorted(exc.recipients))})") from exc
        except smtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(f"{what} failed: authentication refused (code {exc.smtp_code})") from exc
        except smtplib.SMTPResponseException as exc:
            text = exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) else exc.smtp_error
            raise DeliveryError(f"{what} failed: server answered {exc.smtp_code} {_clean(text)}") from exc
        except TimeoutError as exc:
            raise DeliveryError(f"{what} failed: no answer within {self.timeout_s:g} s") from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
        if refused:
            # the message went to the other recipients; resending would duplicate it for them
            log.warning("%s: some recipients refused it: %s", what, ", ".join(sorted(refused)))
        log.info("sent %s to %d recipient(s)", what, len(self.recipients) - len(refused))

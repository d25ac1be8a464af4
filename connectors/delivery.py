"""Alert delivery: routing alert records to sinks (e-mail, webhook) by severity, category and site, through a
persistent outbox so that nothing is lost while a receiver is down."""

from __future__ import annotations

from monitor.errors import MonitorError


class DeliveryError(MonitorError):
    """A receiver did not take an alert; it stays in the outbox and is retried."""

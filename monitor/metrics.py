"""Prometheus metrics of the service. Labels are bounded (site, rule, severity, category, type, reason, version):
never a subject id. The registry is passed in, so tests stay independent of each other."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Info, start_http_server

from monitor.alerts import Alert


class Metrics:
    def __init__(self, *, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events_consumed = Counter("protocol_monitor_events_consumed", "Valid events consumed",
                                       ["site", "type"], registry=registry)
        self.events_rejected = Counter("protocol_monitor_events_rejected", "Events sent to the dead-letter topic",
                                       ["reason"], registry=registry)
        self.alerts_raised = Counter("protocol_monitor_alerts_raised", "Alert records raised",
                                     ["site", "rule", "severity", "category"], registry=registry)
        self.alerts_retracted = Counter("protocol_monitor_alerts_retracted", "Alert records withdrawn",
                                        ["site", "rule"], registry=registry)
        self.rules = Info("protocol_monitor_rules", "Rules version in force", registry=registry)

    def alert_published(self, alert: Alert) -> None:
        if alert.status == "raised":
            self.alerts_raised.labels(alert.site_id, alert.rule, alert.severity, alert.category).inc()
        else:
            self.alerts_retracted.labels(alert.site_id, alert.rule).inc()


def serve(*, registry: CollectorRegistry, host: str, port: int) -> Any:
    """Start the HTTP endpoint (/metrics); returns the server so callers can shut it down."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server

"""Prometheus metrics and health endpoints of the service.

Labels are bounded (site, rule, severity, category, type, reason, topic, partition, arm, version): never a subject
id. The registry is passed in, so tests stay independent. Gauges that describe state (open alerts, subjects,
pending deadlines, lag) are refreshed by the service thread, never computed on the HTTP thread, because the
monitor's state is owned by one thread.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from monitor.alerts import Alert

LABELS = {"site", "rule", "severity", "category", "type", "reason", "topic", "partition", "arm", "version", "cause",
          "kri", "bound", "qtl"}  # the last three: site-risk gauges (monitor/kri.py)
WITHDRAWAL_CAUSES = ("late_data", "amendment", "new_data", "deadline", "recovery", "rules_change", "other")
"""Why an alert was withdrawn: `late_data` a record that happened before the alert's deadline (+ grace) arrived
after the alert; `amendment` a corrected version of a held record; `new_data` a later record changed the verdict;
`deadline` re-evaluated when a deadline fell due; `recovery` a restarted or new owner found the condition gone;
`rules_change` a new rules version."""
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


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
        self.alerts_withdrawn = Counter("protocol_monitor_alerts_withdrawn",
                                        "Alert records withdrawn, by why (flapping: compare with alerts raised)",
                                        ["rule", "cause"], registry=registry)
        self.open_alerts = Gauge("protocol_monitor_open_alerts", "Alerts raised and not withdrawn",
                                 ["site", "severity"], registry=registry)
        self.event_to_alert = Histogram("protocol_monitor_event_to_alert_seconds",
                                        "From the event's broker timestamp to the alert's publication",
                                        buckets=LATENCY_BUCKETS, registry=registry)
        self.consumer_lag = Gauge("protocol_monitor_consumer_lag_messages", "Messages not yet consumed",
                                  ["topic", "partition"], registry=registry)
        self.deadlines_pending = Gauge("protocol_monitor_deadlines_pending", "Subjects with a deadline pending",
                                       ["site"], registry=registry)
        self.subjects = Gauge("protocol_monitor_subjects", "Subjects held by this instance", ["site", "arm"],
                              registry=registry)
        self.rules = Info("protocol_monitor_rules", "Rules version in force", registry=registry)
        self.rules_reload_failures = Counter("protocol_monitor_rules_reload_failures",
                                             "Rules versions refused at reload (the previous one stayed)",
                                             registry=registry)
        self._known: dict[str, set[tuple[str, ...]]] = {}

    def alert_published(self, alert: Alert, latency_s: float | None = None, cause: str = "other") -> None:
        if alert.status == "raised":
            self.alerts_raised.labels(alert.site_id, alert.rule, alert.severity, alert.category).inc()
        else:
            self.alerts_retracted.labels(alert.site_id, alert.rule).inc()
            self.alerts_withdrawn.labels(alert.rule, cause if cause in WITHDRAWAL_CAUSES else "other").inc()
        if latency_s is not None and latency_s >= 0:
            self.event_to_alert.observe(latency_s)

    def set_gauge(self, gauge: Gauge, name: str, values: Tally[tuple[str, ...]]) -> None:
        """Set a labelled gauge to exactly these values; label sets seen before and now absent go to 0."""
        for key in self._known.get(name, set()) - set(values):
            gauge.labels(*key).set(0)
        for key, value in values.items():
            gauge.labels(*key).set(value)
        self._known[name] = self._known.get(name, set()) | set(values)


class HealthServer:
    """/metrics, /healthz (the process is alive) and /readyz (partitions assigned and state rebuilt)."""

    def __init__(self, *, registry: CollectorRegistry, host: str, port: int, ready: Callable[[], bool]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, status, kind = generate_latest(outer.registry), 200, CONTENT_TYPE_LATEST
                elif path == "/healthz":
                    body, status, kind = b"ok\n", 200, "text/plain"
                elif path == "/readyz":
                    ok = outer.ready()
                    body, status, kind = (b"ready\n" if ok else b"not ready\n"), (200 if ok else 503), "text/plain"
                else:
                    body, status, kind = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - no access log (no PHI anyway)
                return

        self.registry = registry
        self.ready = ready
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "HealthServer":
        self.thread.start()
        return self

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()

"""Alert delivery: routes pick the sinks (e-mail, webhook) for each alert record by severity, category and site;
the store's outbox holds every delivery until the receiver took it, so nothing is lost while a receiver is down.

Routes come from the configuration (`routes:` in the YAML file):

    routes:
      - name: safety-officers
        sink: email
        match: {severity: [critical, major]}          # any of severity / category / site; empty = everything
        smtp: {host: smtp.example.org, port: 587, starttls: true, sender: monitor@example.org,
               recipients: [safety@example.org], username: monitor}   # password: PROTOCOL_MONITOR_SMTP_PASSWORD
      - name: operations
        sink: webhook
        match: {category: [data_quality]}
        webhook: {url: https://ops.example.org/hooks/protocol-monitor}

A withdrawal is routed like the alert it withdraws, so every receiver gets the follow-up.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from connectors.base import Deliverer
from monitor.alerts import Alert
from monitor.errors import ConfigError


class Match(BaseModel):
    model_config = ConfigDict(extra="forbid")

    severity: list[str] = Field(default_factory=list)
    category: list[str] = Field(default_factory=list)
    site: list[str] = Field(default_factory=list)

    def matches(self, alert: Alert) -> bool:
        return all(not allowed or value in allowed for allowed, value in (
            (self.severity, alert.severity), (self.category, alert.category), (self.site, alert.site_id)))


class SmtpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str
    port: int = 25
    sender: str
    recipients: list[str]
    starttls: bool = False
    username: str | None = None
    timeout_s: float = 10.0


class WebhookConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str
    timeout_s: float = 5.0
    retries: int = 2
    headers: dict[str, str] = Field(default_factory=dict)


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    sink: Literal["email", "webhook"]
    match: Match = Field(default_factory=Match)
    smtp: SmtpConfig | None = None
    webhook: WebhookConfig | None = None

    @model_validator(mode="after")
    def _target(self) -> "Route":
        if self.sink == "email" and self.smtp is None:
            raise ValueError(f"route {self.name}: an email route needs `smtp`")
        if self.sink == "webhook" and self.webhook is None:
            raise ValueError(f"route {self.name}: a webhook route needs `webhook`")
        return self


class Router:
    """Which routes an alert record goes to, and the sink behind each route name."""

    def __init__(self, *, routes: list[Route], sinks: dict[str, Deliverer]) -> None:
        self.routes = routes
        self.sinks = sinks

    @classmethod
    def from_config(cls, raw: list[dict[str, Any]]) -> "Router":
        from connectors.email import SmtpSink
        from connectors.webhook import WebhookSink

        try:
            routes = [Route.model_validate(r) for r in raw]
        except ValueError as exc:
            raise ConfigError(f"invalid alert route: {exc}") from None
        sinks: dict[str, Deliverer] = {}
        for r in routes:
            if r.sink == "email":
                c = r.smtp
                if c is None:  # the Route validator already refuses this; kept for `python -O`
                    raise ConfigError(f"route {r.name}: an email route needs `smtp`")
                sinks[r.name] = SmtpSink(host=c.host, port=c.port, sender=c.sender, recipients=c.recipients,
                                         timeout_s=c.timeout_s, starttls=c.starttls, username=c.username,
                                         password=os.environ.get("PROTOCOL_MONITOR_SMTP_PASSWORD"))
            else:
                w = r.webhook
                if w is None:
                    raise ConfigError(f"route {r.name}: a webhook route needs `webhook`")
                sinks[r.name] = WebhookSink(w.url, timeout_s=w.timeout_s, retries=w.retries, headers=w.headers)
        return cls(routes=routes, sinks=sinks)

    def route_names(self, alert: Alert) -> list[str]:
        return [r.name for r in self.routes if r.match.matches(alert)]

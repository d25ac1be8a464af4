"""The small protocols every source and sink implements (like quix-streams' `BaseSink.add/flush`), and the one
every alert receiver implements (`Deliverer`, with its `DeliveryError`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from monitor.alerts import Alert
from monitor.errors import EventRejected, MonitorError


@dataclass(frozen=True)
class RawRecord:
    """One input record as received: its bytes and where it came from (file:line, or topic/partition/offset)."""

    value: bytes
    origin: str
    headers: dict[str, bytes] = field(default_factory=dict)
    key: bytes | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    timestamp_ms: int | None = None


class Source(Protocol):
    def __iter__(self) -> Iterator[RawRecord]: ...


class AlertSink(Protocol):
    def add(self, alert: Alert) -> None: ...

    def flush(self) -> None: ...


class RejectSink(Protocol):
    def add(self, record: RawRecord, error: EventRejected) -> None: ...

    def flush(self) -> None: ...


class DeliveryError(MonitorError):
    """A receiver did not take an alert; it stays in the outbox and is retried."""


class Deliverer(Protocol):
    """An alert receiver (e-mail, webhook): takes one alert record or raises DeliveryError."""

    def deliver(self, alert: Alert) -> None: ...

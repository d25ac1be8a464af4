"""Alert records as JSON Lines on a text stream (standard output in `replay`), and rejects as readable lines."""

from __future__ import annotations

import sys
from typing import TextIO

from connectors.base import RawRecord
from monitor.alerts import Alert
from monitor.errors import EventRejected


class JsonLinesAlertSink:
    def __init__(self, *, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def add(self, alert: Alert) -> None:
        self.stream.write(alert.to_json() + "\n")

    def flush(self) -> None:
        self.stream.flush()


class TextRejectSink:
    """Writes one line per rejected record: where it was, its event id if known, and the reason."""

    def __init__(self, *, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.count = 0

    def add(self, record: RawRecord, error: EventRejected) -> None:
        self.count += 1
        who = f" event {error.event_id}" if error.event_id else ""
        self.stream.write(f"rejected {record.origin}{who}: {error.reason}: {error.detail}\n")

    def flush(self) -> None:
        self.stream.flush()

"""In-memory source and sink: rule tests and the test suite feed events and collect records without files."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

from connectors.base import RawRecord


def _iso(value: Any) -> str:
    """Dates read from YAML are sent as ISO text, as a real feed would."""
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    raise TypeError(f"cannot send {type(value).__name__} in an event")


class MemorySource:
    """Yields each event dict as the JSON bytes a feed would deliver."""

    def __init__(self, *, events: list[dict[str, Any]]) -> None:
        self.events = events

    def __iter__(self) -> Iterator[RawRecord]:
        for i, event in enumerate(self.events):
            yield RawRecord(value=json.dumps(event, default=_iso).encode(), origin=f"event {i + 1}")


class ListSink:
    """Collects what it is given: alerts (`add(alert)`) or rejects (`add(record, error)`)."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def add(self, *item: Any) -> None:
        self.items.append(item[0] if len(item) == 1 else item)

    def flush(self) -> None:
        pass

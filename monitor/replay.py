"""Replay: feed a recorded stream through the monitor with the stream's own clock (RULES_SPEC §2.3)."""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from connectors.base import AlertSink, RawRecord, RejectSink, Source
from monitor.batches import BatchLoop
from monitor.clock import ReplayClock
from monitor.errors import EventRejected
from monitor.evaluator import Monitor
from monitor.events import parse_record
from monitor.fhir import FhirMapper, flat_records


@dataclass
class ReplaySummary:
    records: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    raised: int = 0
    retracted: int = 0
    ignored: Counter[str] = field(default_factory=Counter)  # FHIR resources the rules do not need, by kind
    seconds: float = 0.0

    def lines(self, monitor: Monitor) -> list[str]:
        s = monitor.stats
        open_alerts = monitor.book.open_alerts()
        rate = self.records / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"records read: {self.records}; accepted: {s.events['new'] + s.events['amended']} "
            f"(new {s.events['new']}, amendments {s.events['amended']}); duplicates dropped: "
            f"{s.events['duplicate']}; superseded versions ignored: {s.events['superseded']}; "
            f"rejected: {sum(self.rejected.values())}"
            + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) + ")" if self.rejected else ""),
            f"subjects: {len(monitor.subjects)}; alerts raised: {self.raised}; retracted: {self.retracted}; "
            f"open at end: {len(open_alerts)}",
            f"rules version {monitor.rules.version} ({len(monitor.rules.rules)} rules from {monitor.rules.directory}); "
            f"{self.seconds:.2f} s, {rate:,.0f} records/s",
        ]
        if self.ignored:
            out.append(f"FHIR resources ignored (not needed by the rules): {sum(self.ignored.values())} ("
                       + ", ".join(f"{k} {v}" for k, v in sorted(self.ignored.items())) + ")")
        return out


def replay(*, source: Source, monitor: Monitor, clock: ReplayClock, alerts: AlertSink, rejects: RejectSink,
           until: dt.datetime | None, mapper: FhirMapper | None = None) -> ReplaySummary:
    """With `mapper`, records are FHIR R4 resources or Bundles (monitor/fhir.py) mapped to events first.
    Events sharing a `recorded_at` form one batch, applied atomically. Before each batch the clock moves to
    its `recorded_at` and due deadlines fire on the state as it was, as a live monitor would have seen it."""
    summary = ReplaySummary()
    started = time.perf_counter()

    def emit(items: list) -> None:
        for a in items:
            alerts.add(a)
            if a.status == "raised":
                summary.raised += 1
            else:
                summary.retracted += 1
        for failure in monitor.take_failures():  # undone by the monitor: their records are rejected like bad input
            for item, error in zip(failure.items, failure.errors):
                summary.rejected[error.reason] += 1
                rejects.add(item[3], error)

    def records() -> Iterator[RawRecord]:
        for outer in source:
            summary.records += 1
            if mapper is None:
                yield outer
                continue
            mapped = mapper.map_record(outer.value)  # FHIR: a record may hold several events, or refusals
            summary.ignored.update(mapped.ignored)
            for exc in mapped.rejected:
                summary.rejected[exc.reason] += 1
                rejects.add(outer, exc)
            yield from flat_records(outer, mapped)

    batches = BatchLoop(monitor=monitor, key=lambda item: item[0].recorded_at,
                        advance=lambda item: clock.advance_to(item[0].recorded_at),
                        on_deadlines=emit, on_batch=lambda _batch, out, _held: emit(out))
    for record in records():
        try:
            event, payload = parse_record(record.value)
            batches.admit(event)
        except EventRejected as exc:
            summary.rejected[exc.reason] += 1
            rejects.add(record, exc)
            continue
        batches.add((event, payload, None, record))  # (event, payload, origin, the record it came from)
    batches.flush()
    emit(monitor.finish(until))
    alerts.flush()
    rejects.flush()
    summary.seconds = time.perf_counter() - started
    return summary

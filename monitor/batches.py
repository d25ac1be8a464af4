"""The batching loop, written once: replay (`monitor/replay.py`) and the Kafka service (`monitor/service.py`) both
cut their stream of events into batches and tick the clock before each one, and must do it the same way.

A batch is the run of consecutive accepted events sharing a key (the `recorded_at`; the service adds the partition,
since a batch follows one partition's clock). When a batch opens, the clock moves to its first event and the
deadlines due by then are evaluated on the state as it was, as a live monitor would have seen it; when it is cut
(a new key, or the caller's explicit `flush`), it is ingested atomically (`Monitor.ingest`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monitor.alerts import Alert
    from monitor.evaluator import Monitor
    from monitor.events import Event

Item = tuple[Any, ...]  # (event, payload, origin, record, ...), as `Monitor.ingest` takes them


class BatchLoop:
    """Cut items into batches, tick the clock when one opens, ingest it when it is cut.

    The caller keeps what is particular to it in the callbacks: how its clock moves (`advance`), and what becomes
    of the alerts (`on_deadlines` for those the tick raised, `on_batch` for those the batch caused). With
    `track_held`, `on_batch` also receives the ids of the batch's events the monitor held before the batch (an
    amendment of a held event withdraws for another reason than new data)."""

    def __init__(self, *, monitor: Monitor, key: Callable[[Item], Hashable], advance: Callable[[Item], None],
                 on_deadlines: Callable[[list[Alert]], None],
                 on_batch: Callable[[list[Item], list[Alert], set[str]], None], track_held: bool = False) -> None:
        self.monitor = monitor
        self.key = key
        self.advance = advance
        self.on_deadlines = on_deadlines
        self.on_batch = on_batch
        self.track_held = track_held
        self.items: list[Item] = []

    def admit(self, event: Event) -> None:
        """`Monitor.admit` the event against the open batch's items if it joins that batch (raises EventRejected)."""
        self.monitor.admit(event, self.items if self.items and self.items[0][0].recorded_at == event.recorded_at
                           else [])

    def add(self, item: Item) -> None:
        """Add an admitted item: a new key cuts the open batch first; a new batch moves the clock and ticks."""
        if self.items and self.key(self.items[0]) != self.key(item):
            self.flush()
        if not self.items:
            self.advance(item)
            self.on_deadlines(self.monitor.tick())
        self.items.append(item)

    def flush(self) -> None:
        """Ingest the open batch, if any (at the end of the input, or before the caller evaluates otherwise)."""
        if not self.items:
            return
        batch = list(self.items)
        self.items.clear()
        held: set[str] = set()
        if self.track_held:
            subjects = self.monitor.subjects
            held = {item[0].event_id for item in batch if item[0].subject_id in subjects
                    and item[0].event_id in subjects[item[0].subject_id].events}
        self.on_batch(batch, self.monitor.ingest(batch), held)

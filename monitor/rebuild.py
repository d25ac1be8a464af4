"""Rebuild on assignment: the subjects of newly assigned partitions are rebuilt by reading those partitions from the
beginning, so that a service taking over from another (a rebalance, a crash, a new group) holds each subject's whole
history before it evaluates anything new for it.

Up to the group's committed offset the history is loaded without evaluating each batch and each subject is then
evaluated once, taking over what the alerts topic held at that offset (each alert record carries the commit position
of the batch that produced it); the rest is processed batch by batch, as live: the alerts the previous owner
published past its commit are derived again under the same ids and not published again, and once those records are
read, whatever this pass did otherwise is made to agree with the topic (`Monitor.settle`). The rebuild's end is never
below the committed offset nor the fetch's high watermark (a ListOffsets answer may be short: ENGINE_NOTES, Tansu).

The service (`monitor/service.py`) owns the loop and the monitor; this module owns the per-partition bookkeeping of
where each rebuild stands, and is told the source, the monitor and the topic's known pairs at each call (the monitor
is replaced by a rules reload, the source is attached after construction).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Container
from dataclasses import dataclass, field
from typing import Any

from kafka import TopicPartition

from monitor.alerts import Alert
from monitor.evaluator import Monitor

log = logging.getLogger(__name__)


@dataclass
class ServiceState:
    """What the service knows about its partitions: for readiness and for dropping subjects on revocation."""

    rebuild_until: dict[TopicPartition, int] = field(default_factory=dict)
    # records below this offset are loaded without evaluation; the partition's subjects are then evaluated once
    bulk_until: dict[TopicPartition, int] = field(default_factory=dict)
    subjects_by_partition: dict[TopicPartition, set[str]] = field(default_factory=dict)
    ready: bool = False


class _Either:
    """Membership in either of two collections, without copying the large one."""

    def __init__(self, a: Container[tuple[str, str]], b: Container[tuple[str, str]]) -> None:
        self.a, self.b = a, b

    def __contains__(self, item: object) -> bool:
        return item in self.a or item in self.b


class Rebuild:
    """Where each assigned partition's rebuild stands, and the steps that move it: `start` (newly assigned
    partitions are sought to their beginning), `raise_ends` (after the first fetch), `finish` (the quiet load reached
    the committed offset), `settle_due` (the previous owner's tail was read again), `revoke`."""

    def __init__(self, *, state: ServiceState,
                 refresh_published: Callable[[], set[tuple[str, str]]] | None) -> None:
        self.state = state
        self.refresh_published = refresh_published  # reads the alerts topic back; None: nothing to read back
        self.committed: dict[TopicPartition, int] = {}  # per partition: offsets are never committed below this
        # rebuilding partitions whose records up to this offset the previous owner published alerts for (the
        # highest commit position on the alerts topic): once they are read again, the topic and the alert book are
        # made to agree where this pass went otherwise (`Monitor.settle`); ready only after
        self.settle_at: dict[TopicPartition, int] = {}
        self.end_checked: set[TopicPartition] = set()  # rebuild boundary raised to the first fetch's high watermark
        self.newly_assigned: list[TopicPartition] = []
        self.open_published: dict[str, list[Alert]] = {}  # by subject, open on the topic when read back
        self.read_back: Collection[tuple[str, str]] | None = None  # the last read-back of the alerts topic

    def pending(self) -> bool:
        """Some assigned partition is not rebuilt yet (the service is not ready)."""
        return bool(self.state.rebuild_until or self.state.bulk_until or self.newly_assigned or self.settle_at)

    def revoke(self, tp: TopicPartition) -> set[str]:
        """Forget a revoked partition; returns its subjects, for the service to drop."""
        self.state.rebuild_until.pop(tp, None)
        self.state.bulk_until.pop(tp, None)
        self.committed.pop(tp, None)
        self.settle_at.pop(tp, None)
        self.end_checked.discard(tp)
        if tp in self.newly_assigned:
            self.newly_assigned.remove(tp)
        return self.state.subjects_by_partition.pop(tp, set())

    def forget_read_back(self) -> None:
        """Rebuilt: the read-back is read again at the next assignment or reload."""
        self.read_back = None
        self.open_published = {}

    def start(self, source: Any, *, published: set[tuple[str, str]], site_risk: Any) -> set[TopicPartition]:
        """Newly assigned partitions are read again from their beginning to rebuild their subjects' state. What the
        topic holds is added to `published` (in place). If the broker does not answer, they stay newly assigned
        (and their records unused) until it does. Returns the partitions now rebuilding."""
        tps = list(self.newly_assigned)
        if not tps or source is None:
            return set()
        if self.refresh_published is not None:  # another instance may have published for these subjects
            fresh = self.refresh_published()
            published |= fresh
            self.read_back = fresh  # by subject: a rebuilt subject's occurrence numbers continue after them
            self.open_published = {}
            for record in getattr(fresh, "open", {}).values():
                alert = Alert.model_validate(record)
                self.open_published.setdefault(alert.subject_id, []).append(alert)
            if site_risk is not None and site_risk.raise_alerts:  # open QTL breaches: taken over
                site_risk.qtl_book.adopt(self.open_published.get("trial", []))
        ends = source.end_offsets(tps)
        highwater = getattr(source, "highwater", None)
        self.newly_assigned = [tp for tp in self.newly_assigned if tp not in tps]
        total = 0
        for tp in tps:
            self.state.subjects_by_partition.setdefault(tp, set())
            committed = self.bulk_boundary(source, tp)
            self.committed[tp] = committed
            after = getattr(self.read_back, "after", None)
            tail = after(tp.partition, committed) if after is not None else None
            if tail is not None or committed > 0:  # see `finish` and `Monitor.settle`
                self.settle_at[tp] = tail if tail is not None else committed
            # ListOffsets may answer below the true end (ENGINE_NOTES: Tansu) and so below the committed offset:
            # the rebuild never stops before the committed offset, nor before the last fetch's high watermark
            end = max(ends.get(tp) or 0, committed, (highwater(tp) if highwater is not None else None) or 0)
            total += end
            if end > 0:
                self.state.rebuild_until[tp] = end
            else:  # an empty partition has nothing to rebuild: it is rebuilt now (it must not block readiness)
                self.state.rebuild_until.pop(tp, None)
            if committed > 0:
                self.state.bulk_until[tp] = committed
            self.end_checked.discard(tp)
        source.seek_to_beginning(tps)
        log.info("assigned partitions %s; rebuilding their subjects from the beginning (%d records)",
                 sorted(t.partition for t in tps), total)
        return set(tps)

    @staticmethod
    def bulk_boundary(source: Any, tp: TopicPartition) -> int:
        """Where a rebuild stops loading quietly and goes on batch by batch, as live: the group's committed offset.
        Every alert the history before it caused was published before the commit, so only its end state matters
        (with what was published adopted); the rest (a crashed owner's unacknowledged tail, or all of a new
        group's history) is evaluated batch by batch so no alert that came and went there is lost."""
        committed = getattr(source, "committed", None)
        done = committed(tp) if committed is not None else None
        return int(done or 0)

    def finish(self, tp: TopicPartition, *, monitor: Monitor,
               published: Collection[tuple[str, str]]) -> list[tuple[Alert, int | None]]:
        """A partition's history is loaded: evaluate its subjects once, adopting what was already published."""
        boundary = self.state.bulk_until.pop(tp)
        started = time.monotonic()
        subjects = self.state.subjects_by_partition.get(tp, set())
        # Adopt the topic as it stood at the committed offset: the alerts published with a higher commit position
        # come from records read again next, which derive them again under the same ids (occurrence numbers
        # continue those published up to the commit), so they are neither withdrawn nor published twice. Open
        # alerts the state at the commit does not hold are withdrawn now. (Deferring that withdrawal until a later
        # match claimed the alert joined two occurrences when the state at the commit differed from the previous
        # owner's: test_faults' restart ended with ids a clean run does not have.)
        as_of = getattr(self.read_back, "as_of", None)
        if as_of is not None:
            view = as_of(tp.partition, boundary)
            adopted: Any = view
            open_alerts = {s: [Alert.model_validate(r) for r in view.open_for(s)] for s in subjects}
        else:
            adopted = self.read_back if self.read_back is not None else published
            open_alerts = self.open_published
        alerts = monitor.evaluate_rebuilt(subjects, published=adopted, open_alerts=open_alerts)
        log.info("partition %d rebuilt: %d subjects evaluated in %.2f s", tp.partition, len(subjects),
                 time.monotonic() - started)
        return [(a, None) for a in alerts]

    def finished(self, offsets: dict[TopicPartition, int]) -> list[TopicPartition]:
        """Partitions whose quiet load reached its boundary in this poll (to `finish`)."""
        return [tp for tp in self.state.bulk_until if offsets.get(tp, 0) >= self.state.bulk_until[tp]]

    def settle_due(self, offsets: dict[TopicPartition, int], *, monitor: Monitor,
                   published: Container[tuple[str, str]], produced: list[tuple[Alert, int | None]],
                   note: Callable[[list[Alert]], list[Alert]]) -> None:
        """Partitions whose previous owner's tail was read again (or that are read to their end): make the alert
        book agree with the topic (`Monitor.settle`). What `produced` holds counts as on the topic (a withdrawal
        made at the rebuild's end in this very batch must not be made again); what settling changes is noted
        (`note`) and added to it."""
        for tp in [t for t, end in self.settle_at.items() if t not in self.state.bulk_until
                   and (offsets.get(t, 0) >= end or t not in self.state.rebuild_until)]:
            del self.settle_at[tp]
            if getattr(self.read_back, "for_subject", None) is None:  # no read-back with subjects: nothing known
                continue
            pending = {(a.alert_id, a.status) for a, _ in produced}
            settled = monitor.settle(self.state.subjects_by_partition.get(tp, ()), seen=self.read_back,
                                     on_topic=_Either(published, pending), topic_open=self.open_published)
            produced.extend((a, None) for a in note(settled))

    def raise_ends(self, source: Any) -> None:
        """Once a rebuilding partition's first fetch answered, its boundary is at least that high watermark (a
        ListOffsets answer may be short: ENGINE_NOTES)."""
        highwater = getattr(source, "highwater", None)
        if highwater is None:
            return
        for tp in [t for t in self.state.rebuild_until if t not in self.end_checked]:
            hw = highwater(tp)
            if hw is None:
                continue
            self.end_checked.add(tp)
            if hw > self.state.rebuild_until[tp]:
                self.state.rebuild_until[tp] = hw

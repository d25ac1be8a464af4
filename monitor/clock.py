"""Processing time and deadlines.

The monitor never uses engine timers. A `Clock` says what time it is for processing: the wall clock when live,
the stream's own progress (the latest `recorded_at` seen) in replay. The `DeadlineScheduler` remembers, per
subject, the processing time at which its next deadline falls due (deadline + grace, RULES_SPEC §2.3).
"""

from __future__ import annotations

import datetime as dt
import heapq
from collections.abc import Callable, Hashable
from typing import Protocol

_NEVER = dt.datetime.min.replace(tzinfo=dt.timezone.utc)


class Clock(Protocol):
    def now(self) -> dt.datetime: ...


class ReplayClock:
    """Processing time = the latest `recorded_at` seen; it never goes backwards."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start

    def advance_to(self, t: dt.datetime) -> None:
        if self._now is None or t > self._now:
            self._now = t

    def now(self) -> dt.datetime:
        if self._now is None:
            return dt.datetime.min.replace(tzinfo=dt.timezone.utc)
        return self._now


class PartitionClocks:
    """One processing clock per partition ("lane"), each never going backwards (issue 16).

    A subject lives in exactly one partition, so its deadlines are judged against that partition's clock only: a
    partition that is ahead can no longer fire the deadlines of subjects whose records still wait in a partition
    that is behind. `now()` without a lane (an alert's `detected_at` outside any partition, a rules switch) is the
    latest of them. The service decides how each lane advances (stream: `recorded_at`; wall: broker timestamps
    while the partition has a backlog, the wall clock once it is caught up, never a time ahead of the wall clock).
    """

    def __init__(self) -> None:
        self._now: dict[Hashable, dt.datetime] = {}

    def advance(self, lane: Hashable, t: dt.datetime) -> None:
        current = self._now.get(lane)
        if current is None or t > current:
            self._now[lane] = t

    def now_of(self, lane: Hashable) -> dt.datetime:
        return self._now.get(lane, _NEVER)

    def now(self) -> dt.datetime:
        return max(self._now.values(), default=_NEVER)

    def drop(self, lane: Hashable) -> None:
        self._now.pop(lane, None)

    def lanes(self) -> dict[Hashable, dt.datetime]:
        return dict(self._now)


class WallClock:
    """Live processing time."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)


class DeadlineScheduler:
    """Per lane (a partition; one lane when there are none), a heap of (due processing time, subject); a later
    `set` for a subject replaces the earlier one. `lane_of(subject)` says which lane a subject's deadline waits in,
    so each lane can be popped against its own clock."""

    def __init__(self, lane_of: Callable[[str], Hashable] | None = None) -> None:
        self._heaps: dict[Hashable, list[tuple[dt.datetime, str]]] = {}
        self._due: dict[str, dt.datetime] = {}
        self._lane: dict[str, Hashable] = {}
        self.lane_of = lane_of

    def set(self, subject_id: str, due: dt.datetime | None) -> None:
        if due is None:
            self._due.pop(subject_id, None)
            self._lane.pop(subject_id, None)
            return
        lane = self.lane_of(subject_id) if self.lane_of is not None else None
        if self._due.get(subject_id) == due and self._lane.get(subject_id) == lane:
            return
        self._due[subject_id] = due
        self._lane[subject_id] = lane
        heapq.heappush(self._heaps.setdefault(lane, []), (due, subject_id))

    def _live(self, lane: Hashable, entry: tuple[dt.datetime, str]) -> bool:
        due, subject = entry
        return self._due.get(subject) == due and self._lane.get(subject) == lane

    def pop_due(self, now: dt.datetime | Callable[[Hashable], dt.datetime]) -> list[str]:
        """Subjects whose deadline is due, in due order (ties by subject id: deterministic). `now` is one time for
        every lane, or a function giving each lane's own time."""
        due_now: list[tuple[dt.datetime, str]] = []
        for lane, heap in list(self._heaps.items()):
            t = now(lane) if callable(now) else now
            while heap and heap[0][0] <= t:
                entry = heapq.heappop(heap)
                if self._live(lane, entry):
                    del self._due[entry[1]]
                    del self._lane[entry[1]]
                    due_now.append(entry)
            if not heap:
                del self._heaps[lane]
        return [subject for _, subject in sorted(due_now)]

    def pending(self) -> dict[str, dt.datetime]:
        return dict(self._due)

    def due_of(self, subject_id: str) -> dt.datetime | None:
        """The subject's pending deadline (None if it has none), e.g. to put it back when a batch is undone."""
        return self._due.get(subject_id)

    def next_due(self) -> dt.datetime | None:
        best: dt.datetime | None = None
        for lane, heap in self._heaps.items():
            while heap and not self._live(lane, heap[0]):
                heapq.heappop(heap)
            if heap and (best is None or heap[0][0] < best):
                best = heap[0][0]
        return best

"""Processing time and deadlines.

The monitor never uses engine timers. A `Clock` says what time it is for processing: the wall clock when live,
the stream's own progress (the latest `recorded_at` seen) in replay. The `DeadlineScheduler` remembers, per
subject, the processing time at which its next deadline falls due (deadline + grace, RULES_SPEC §2.3).
"""

from __future__ import annotations

import datetime as dt
import heapq
from typing import Protocol


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


class WallClock:
    """Live processing time."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)


class DeadlineScheduler:
    """A heap of (due processing time, subject); a later `set` for a subject replaces the earlier one."""

    def __init__(self) -> None:
        self._heap: list[tuple[dt.datetime, str]] = []
        self._due: dict[str, dt.datetime] = {}

    def set(self, subject_id: str, due: dt.datetime | None) -> None:
        if due is None:
            self._due.pop(subject_id, None)
            return
        if self._due.get(subject_id) == due:
            return
        self._due[subject_id] = due
        heapq.heappush(self._heap, (due, subject_id))

    def pop_due(self, now: dt.datetime) -> list[str]:
        """Subjects whose deadline is due at `now`, in due order (ties by subject id: deterministic)."""
        out: list[str] = []
        while self._heap and self._heap[0][0] <= now:
            due, subject = heapq.heappop(self._heap)
            if self._due.get(subject) == due:
                del self._due[subject]
                out.append(subject)
        return out

    def pending(self) -> dict[str, dt.datetime]:
        return dict(self._due)

    def due_of(self, subject_id: str) -> dt.datetime | None:
        """The subject's pending deadline (None if it has none), e.g. to put it back when a batch is undone."""
        return self._due.get(subject_id)

    def next_due(self) -> dt.datetime | None:
        while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

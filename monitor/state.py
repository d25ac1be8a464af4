"""Per-subject event history with the duplicate and amendment policy of RULES_SPEC §2.6."""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from monitor.events import Event, canonical_of


def _event_order(e: Any) -> tuple[Any, str]:
    return e.occurred_at, e.event_id


def _withdrawn(e: Any) -> bool:
    """`status: entered-in-error` (FHIR) withdraws the event: its version is held, so an older copy arriving late
    is still superseded (§2.6), but no derivation sees it."""
    return getattr(e, "status", None) == "entered-in-error"


def _fhir_source(ref: str) -> dict[str, Any]:
    parts = ref.split("/")
    out: dict[str, Any] = {"fhir": ref, "resource_type": parts[0]}
    if len(parts) > 1:
        out["resource_id"] = parts[1]
    if len(parts) > 3 and parts[2] == "_history":
        out["version"] = parts[3]
    return out


class _FirstReported(Mapping[str, Any]):
    """event_id -> when it was first reported, read from the stored versions on demand."""

    def __init__(self, events: dict[str, "Stored"]) -> None:
        self._events = events

    def __getitem__(self, event_id: str) -> Any:
        return self._events[event_id].first_recorded_at

    def __iter__(self) -> Iterator[str]:
        return iter(self._events)

    def __len__(self) -> int:
        return len(self._events)


class Applied(enum.Enum):
    NEW = "new"
    DUPLICATE = "duplicate"  # same event_id, identical payload: a transport retry, dropped silently
    AMENDED = "amended"  # same event_id, different payload, later recorded_at: replaces the old version
    SUPERSEDED = "superseded"  # same event_id, different payload, but older than the version held: ignored


@dataclass(slots=True)
class Stored:
    event: Event
    text: str | bytes  # its canonical text, or the record's JSON text it is computed from when needed
    seq: int
    first_recorded_at: Any = None  # when this event_id was first reported (amendments keep it)
    origin: dict[str, Any] | None = None  # where it came from when streamed: topic, partition, offset

    @property
    def canonical(self) -> str:
        """Canonical text of the payload, used to tell a transport retry (same bytes) from an amendment (§2.6)."""
        return canonical_of(self.text)


def _same_payload(held: str | bytes, new: str | bytes) -> bool:
    if type(held) is type(new) and held == new:
        return True  # the same canonical text, or the same bytes (whose canonical texts are then equal too)
    return canonical_of(held) == canonical_of(new)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What `SubjectState.restore` needs to undo a batch: the scalars as they were, and an undo log of the event
    versions the batch replaced (event_id, previous version or None), filled by `apply` while the checkpoint is
    open. Stored versions are never changed in place and `_by_type` is copy-on-write, so references suffice."""

    undo: list[tuple[str, "Stored | None"]]
    site_id: str
    arm: str | None
    seq: int
    by_type: dict[str, list[Any]] | None
    changed: frozenset[str]
    changed_events: tuple[tuple[Any, bool], ...]


@dataclass
class SubjectState:
    """Everything the monitor holds about one subject: its current event versions, keyed by event_id."""

    subject_id: str
    site_id: str
    events: dict[str, Stored] = field(default_factory=dict)
    arm: str | None = None
    _seq: int = 0
    memo: dict[str, Any] = field(default_factory=dict)  # the deriver's cache for this subject
    changed: set[str] = field(default_factory=set)  # input kinds changed since the last evaluation
    # vital signs and lab results changed since then, in order: (version, True) added, (version, False) replaced
    changed_events: list[tuple[Any, bool]] = field(default_factory=list)
    _by_type: dict[str, list[Any]] | None = None
    _undo: list[tuple[str, Stored | None]] | None = None  # open checkpoint's undo log

    def apply(self, event: Event, canonical: str | bytes, origin: dict[str, Any] | None = None) -> Applied:
        """`canonical`: the payload's canonical text (`events.canonical`), or the record's JSON text (bytes) the
        event was validated from (`events.parse_record`), from which the canonical text is computed when needed."""
        held = self.events.get(event.event_id)
        self._seq += 1
        if held is not None:
            if _same_payload(held.text, canonical):
                return Applied.DUPLICATE
            if event.recorded_at < held.event.recorded_at:
                return Applied.SUPERSEDED
        if self._undo is not None:
            self._undo.append((event.event_id, held))
        first = held.first_recorded_at if held is not None else event.recorded_at
        if held is not None and event.recorded_at < first:
            first = event.recorded_at
        self.events[event.event_id] = Stored(event, canonical, self._seq, first, origin)
        if self._by_type is not None:  # copy-on-write of the one list that changed: views handed out stay intact
            groups = dict(self._by_type)
            if held is not None:
                groups[held.event.type] = [e for e in groups.get(held.event.type, []) if e is not held.event]
            items = list(groups.get(event.type, []))
            if not _withdrawn(event):
                bisect.insort(items, event, key=_event_order)
            groups[event.type] = items
            self._by_type = groups
        self.site_id = event.site_id
        if event.type == "enrollment" and event.arm:
            self.arm = event.arm
        elif self.arm is None and event.arm:
            self.arm = event.arm
        return Applied.AMENDED if held is not None else Applied.NEW

    def checkpoint(self) -> Checkpoint:
        """Open an undo log before a batch, so a batch whose evaluation fails can be undone exactly. Close it with
        `commit` (kept) or `restore` (undone)."""
        self._undo = []
        return Checkpoint(self._undo, self.site_id, self.arm, self._seq, self._by_type, frozenset(self.changed),
                          tuple(self.changed_events))

    def commit(self) -> None:
        """The batch is kept: close the undo log."""
        self._undo = None

    def restore(self, checkpoint: Checkpoint) -> None:
        """Undo everything applied since `checkpoint`. The derivation memo is a cache that may hold results of the
        undone batch, so it is emptied: the next evaluation recomputes from the events."""
        for event_id, previous in reversed(checkpoint.undo):
            if previous is None:
                self.events.pop(event_id, None)
            else:
                self.events[event_id] = previous
        self._undo = None
        self.site_id = checkpoint.site_id
        self.arm = checkpoint.arm
        self._seq = checkpoint.seq
        self._by_type = checkpoint.by_type
        self.changed = set(checkpoint.changed)
        self.changed_events = list(checkpoint.changed_events)
        self.memo = {}

    def origins(self, event_ids: list[str]) -> dict[str, Any]:
        """Where each evidence event came from: topic/partition/offset when streamed, and the FHIR resource
        (type, id, version) it was mapped from."""
        out: dict[str, Any] = {}
        for eid in event_ids:
            stored = self.events.get(eid)
            if stored is None:
                continue
            ref = getattr(stored.event, "source_ref", None)
            if ref:
                out[eid] = {**(stored.origin or {}), **_fhir_source(ref)}
            elif stored.origin:
                out[eid] = stored.origin
        return out

    def first_reported_view(self) -> Mapping[str, Any]:
        """Like `first_reported`, without building a dict per evaluation."""
        return _FirstReported(self.events)

    def first_reported(self) -> dict[str, Any]:
        """event_id → when it was first reported (an SAE corrected later was still reported on time)."""
        return {eid: stored.first_recorded_at for eid, stored in self.events.items()}

    def by_type(self) -> dict[str, list[Event]]:
        """Current versions grouped by type, each list in event-time order (ties: event_id, for determinism).
        Kept until the next change; callers must not modify the lists."""
        if self._by_type is not None:
            return self._by_type
        groups: dict[str, list[Any]] = {}
        for stored in self.events.values():
            if not _withdrawn(stored.event):
                groups.setdefault(stored.event.type, []).append(stored.event)
        for items in groups.values():
            items.sort(key=_event_order)
        self._by_type = groups
        return groups

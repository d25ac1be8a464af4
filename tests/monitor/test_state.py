"""SubjectState keeps its events grouped by type incrementally; the groups must equal a regrouping from scratch
after any mix of new events, amendments (which can move an event in time or to another type), duplicates and
superseded versions."""

from __future__ import annotations

import datetime as dt
import random

from monitor.events import canonical, parse_event
from monitor.generate import generate
from monitor.state import SubjectState


def _from_scratch(state: SubjectState) -> dict[str, list[str]]:
    groups: dict[str, list] = {}
    for stored in state.events.values():
        groups.setdefault(stored.event.type, []).append(stored.event)
    return {t: [e.event_id for e in sorted(items, key=lambda e: (e.occurred_at, e.event_id))]
            for t, items in groups.items()}


def test_incremental_groups_equal_a_fresh_grouping_through_amendments():
    rng = random.Random(5)
    subject = next(iter({e["subject_id"] for e in generate(subjects=1, days=30, seed=3)}))
    payloads = [e for e in generate(subjects=1, days=30, seed=3) if e["subject_id"] == subject]
    state = SubjectState(subject, payloads[0]["site_id"])
    seen: list[dict] = []
    for i, p in enumerate(payloads):
        state.apply(parse_event(p), canonical(p))
        seen.append(p)
        if i % 7 == 3:  # an amendment of an earlier event, recorded later, moved in event time
            old = dict(rng.choice(seen))
            old["recorded_at"] = p["recorded_at"]
            old["amendment_reason"] = f"correction {i}"
            moved = dt.datetime.fromisoformat(old["occurred_at"]) + dt.timedelta(hours=rng.choice([-30, -2, 3, 50]))
            old["occurred_at"] = min(moved, dt.datetime.fromisoformat(old["recorded_at"])).isoformat()
            state.apply(parse_event(old), canonical(old))
        if i % 11 == 5:  # a transport retry
            state.apply(parse_event(p), canonical(p))
        groups = state.by_type()  # used between changes, as the monitor does
        assert {t: [e.event_id for e in items] for t, items in groups.items()} == _from_scratch(state)
    assert sum(len(v) for v in state.by_type().values()) == len(state.events)

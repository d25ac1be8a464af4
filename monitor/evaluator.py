"""The monitor's core loop: apply event batches, derive facts, run the rules, reconcile alerts.

`Monitor` is the same in replay and live service. Its dependencies (rules, engine, clock) are passed in. It is
driven from one thread (ENGINE_NOTES: the engine never releases the GIL and is not thread-safe).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from typing import Any
from dataclasses import dataclass, field

from monitor.alerts import Alert, AlertBook
from monitor.clock import Clock, DeadlineScheduler
from monitor.derive import Deriver
from monitor.engine import RulesEngine
from monitor.errors import EventRejected
from monitor.events import Event, canonical
from monitor.plausibility import Plausibility
from monitor.rules import RuleSet
from monitor.state import Applied, SubjectState

log = logging.getLogger(__name__)


@dataclass
class Stats:
    events: Counter[str] = field(default_factory=Counter)  # by outcome: new, duplicate, amended, superseded
    alerts: Counter[str] = field(default_factory=Counter)  # raised, retracted
    evaluations: int = 0


MAX_EVENTS_PER_SUBJECT = 10_000
"""Default bound on the event versions held for one subject (a real subject has a few hundred over the trial)."""


class Monitor:
    """Holds every subject's state and turns events and the passage of time into alert records."""

    def __init__(self, *, rules: RuleSet, engine: RulesEngine, clock: Clock,
                 max_events_per_subject: int = MAX_EVENTS_PER_SUBJECT) -> None:
        self.rules = rules
        self.max_events_per_subject = max_events_per_subject
        self.engine = engine
        self.clock = clock
        self.deriver = Deriver(params=rules.parameters, tables=rules.tables)
        self.plausibility = Plausibility.from_rules(rules)  # the ranges of the rules in force (tables/plausibility.yaml)
        self.grace = dt.timedelta(hours=rules.parameters.deadline_grace_hours)
        self.subjects: dict[str, SubjectState] = {}
        self.book = AlertBook()
        self.deadlines = DeadlineScheduler()
        self.stats = Stats()
        self._horizon: dt.datetime | None = None
        self._facts_read = rules.facts_read()

    @classmethod
    def create(cls, *, rules: RuleSet, clock: Clock, max_events_per_subject: int = MAX_EVENTS_PER_SUBJECT,
               ) -> "Monitor":
        engine = RulesEngine(definition=rules.engine_definition(), version=rules.version)
        return cls(rules=rules, engine=engine, clock=clock, max_events_per_subject=max_events_per_subject)

    def admit(self, event: Event, pending: Sequence[tuple[Any, ...]] = ()) -> None:
        """Refuse (EventRejected `subject_limit`) a new event that would take its subject past the bound on held
        events; `pending` are the batch items not yet ingested. Amendments and retries of held events always pass:
        they do not grow the state. A refused event goes to the dead letters like any other rejected one."""
        self.plausibility.check(event)  # `implausible`: a number no child could have (monitor/plausibility.py)
        state = self.subjects.get(event.subject_id)
        held = state.events if state is not None else {}
        if event.event_id in held:
            return
        queued = {item[0].event_id for item in pending
                  if item[0].subject_id == event.subject_id and item[0].event_id not in held}
        if event.event_id in queued or len(held) + len(queued) < self.max_events_per_subject:
            return
        raise EventRejected("subject_limit", f"its subject already holds the maximum of "
                            f"{self.max_events_per_subject} events (max_events_per_subject); the event was not "
                            "applied: check the source for a feed loop, or raise the limit and replay the "
                            "dead letters", event_id=event.event_id)

    # ---- input ------------------------------------------------------------------------------------------------
    def ingest(self, batch: list[tuple[Any, ...]]) -> list[Alert]:
        """Apply one batch (events sharing a `recorded_at`) atomically, then evaluate what it touched and any
        subject whose deadline is due. Each item is (validated event, decoded payload[, origin])."""
        touched: set[str] = set()
        for item in batch:
            if self.load(item):
                touched.add(item[0].subject_id)
        return self._evaluate(touched | set(self.deadlines.pop_due(self.clock.now())))

    def load(self, item: tuple[Any, ...]) -> bool:
        """Apply one (event, payload[, origin]) to its subject's history without evaluating anything; True if it
        changed the history. A rebuild loads a partition's history this way, then calls `evaluate_rebuilt`."""
        event, payload = item[0], item[1]
        origin = item[2] if len(item) > 2 else None
        state = self.subjects.get(event.subject_id)
        if state is None:
            state = self.subjects[event.subject_id] = SubjectState(event.subject_id, event.site_id)
        previous = state.events.get(event.event_id)
        outcome = state.apply(event, canonical(payload), origin)
        self.stats.events[outcome.value] += 1
        if outcome in (Applied.NEW, Applied.AMENDED):
            state.changed.add(self.deriver.kind_of(event))
            if previous is not None:
                state.changed.add(self.deriver.kind_of(previous.event))
            return True
        return False

    def evaluate_rebuilt(self, subjects: Iterable[str], *, published: Collection[tuple[str, str]],
                         open_alerts: dict[str, list[Alert]]) -> list[Alert]:
        """Evaluate subjects loaded by a rebuild once, on their end state. What was already published for them
        (`published`, and the alerts still open on the topic, by subject) is adopted first, so an alert whose
        condition went is withdrawn and occurrence numbers continue where they were."""
        out: list[Alert] = []
        for subject_id in sorted(s for s in subjects if s in self.subjects):
            out.extend(self.evaluate_subject(subject_id, adopt=(published, open_alerts.get(subject_id, []))))
        return out

    def tick(self) -> list[Alert]:
        """Evaluate the subjects whose deadlines are due at the clock's current time."""
        return self._evaluate(set(self.deadlines.pop_due(self.clock.now())))

    def finish(self, horizon: dt.datetime | None) -> list[Alert]:
        """End of a replay: evaluate every deadline up to the evaluation horizon (RULES_SPEC §2.3)."""
        self._horizon = horizon
        if horizon is None:
            return self.tick()
        due = [s for s, at in self.deadlines.pending().items() if at - self.grace <= horizon]
        due += self.deadlines.pop_due(self.clock.now())
        return self._evaluate(set(due))

    @staticmethod
    def _with_sources(alert: Alert, state: SubjectState) -> Alert:
        """Streamed evidence events cite their topic, partition and offset."""
        if alert.status != "raised":
            return alert
        sources = state.origins(list(alert.evidence.get("events", [])))
        if not sources:
            return alert
        return alert.model_copy(update={"evidence": {**alert.evidence, "sources": sources}})

    def drop_subject(self, subject_id: str) -> None:
        """Forget a subject whose partition moved to another instance (its engine session serves another)."""
        self.subjects.pop(subject_id, None)
        self.engine.release(subject_id)
        self.book.forget(subject_id)
        self.deadlines.set(subject_id, None)

    # ---- evaluation -------------------------------------------------------------------------------------------
    def cutoff(self) -> dt.datetime:
        cut = self.clock.now() - self.grace
        if self._horizon is not None and self._horizon > cut:
            return self._horizon
        return cut

    def _evaluate(self, subjects: set[str]) -> list[Alert]:
        out: list[Alert] = []
        for subject_id in sorted(subjects):
            out.extend(self.evaluate_subject(subject_id))
        return out

    def evaluate_subject(self, subject_id: str,
                         adopt: tuple[Collection[tuple[str, str]], list[Alert]] | None = None) -> list[Alert]:
        state = self.subjects[subject_id]
        view = self.deriver.view(state)
        derived = self.deriver.derive(view, self.cutoff(), memo=state.memo, changed=state.changed)
        state.changed = set()
        facts = {f.fact_id: f for f in derived.facts}
        self.engine.sync(subject_id, {fid: f.message() for fid, f in facts.items() if f.name in self._facts_read})
        matches = self.engine.matches(subject_id)
        if adopt is not None:
            self.book.adopt(subject_id=subject_id, site_id=state.site_id, matches=matches, facts=facts,
                            rules=self.rules.rules, published=adopt[0], open_alerts=adopt[1],
                            detected_at=self.clock.now().isoformat(), version=self.rules.version)
        alerts = self.book.reconcile(
            subject_id=subject_id, site_id=state.site_id, matches=matches, facts=facts,
            rules=self.rules.rules, detected_at=self.clock.now().isoformat(), version=self.rules.version)
        self.deadlines.set(subject_id, derived.next_deadline + self.grace if derived.next_deadline else None)
        alerts = [self._with_sources(a, state) for a in alerts]
        self.stats.evaluations += 1
        for a in alerts:
            self.stats.alerts[a.status] += 1
        return alerts

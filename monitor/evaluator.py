"""The monitor's core loop: apply event batches, derive facts, run the rules, reconcile alerts.

`Monitor` is the same in replay and live service. Its dependencies (rules, engine, clock) are passed in. It is
driven from one thread (ENGINE_NOTES: the engine never releases the GIL and is not thread-safe).

No record can stop it. A batch is applied to each subject after a checkpoint and kept only if the subject's
evaluation succeeds; if anything raises while evaluating one subject (a derivation, the engine, building an alert),
that subject's part of the batch is undone, its state is exactly as before, and the failure is handed to the caller
(`take_failures`) so its records go to the dead letters as `evaluation_error`. Every other subject goes on.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import Counter
from collections.abc import Collection, Container, Hashable, Iterable, Sequence
from typing import Any
from dataclasses import dataclass, field

from monitor.alerts import Alert, AlertBook
from monitor.clock import Clock, DeadlineScheduler
from monitor.derive import Deriver
from monitor.engine import Messages, RulesEngine
from monitor.errors import EngineError, EvaluationError, EventRejected
from monitor.events import Event, canonical
from monitor.facts import Fact
from monitor.plausibility import Plausibility
from monitor.rules import RuleSet
from monitor.state import Applied, Checkpoint, SubjectState

log = logging.getLogger(__name__)


@dataclass
class Stats:
    events: Counter[str] = field(default_factory=Counter)  # by outcome: new, duplicate, amended, superseded
    alerts: Counter[str] = field(default_factory=Counter)  # raised, retracted
    evaluations: int = 0


@dataclass(frozen=True)
class EvaluationFailure:
    """One subject whose evaluation raised. `items` are the batch items that were undone (empty when the failure
    came from a deadline alone); `errors` has, for each item, the EventRejected (`evaluation_error`) to dead-letter
    it with. Items are the tuples given to `ingest`; callers put the raw record last to find its original bytes."""

    subject_id: str
    stage: str
    items: list[tuple[Any, ...]]
    errors: list[EventRejected]


_TRACKED = frozenset({"vital_sign", "lab_result"})  # the types whose changed versions the deriver is told of
_NEW_SUBJECT = None  # checkpoint of a subject that did not exist before the batch: undoing it removes the subject
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
        self.lanes: dict[str, Hashable] = {}  # subject -> its partition, when the clock has one per partition
        self.deadlines = DeadlineScheduler(lane_of=self.lanes.get)
        self.stats = Stats()
        self._horizon: dt.datetime | None = None
        self._facts_read = rules.facts_read()
        self._arms = frozenset(rules.parameters.arms.model_dump().values())
        self._failures: list[EvaluationFailure] = []

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
        if event.arm is not None and event.arm not in self._arms:
            raise EventRejected("invalid_field", f"{event.type} event: arm: {event.arm[:64]!r} is not an arm of "
                                f"the protocol (parameters.yaml arms: {', '.join(sorted(self._arms))})",
                                event_id=event.event_id)
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
        """Apply one batch (events sharing a `recorded_at`) atomically per subject, then evaluate what it touched
        and any subject whose deadline is due. Each item is (validated event, decoded payload[, origin[, ...]]).
        A subject whose evaluation fails gets its part of the batch undone; see `take_failures`."""
        touched: set[str] = set()
        undo: dict[str, tuple[Checkpoint | None, dt.datetime | None, list[tuple[Any, ...]], list[Applied]]] = {}
        for item in batch:
            subject_id = item[0].subject_id
            if subject_id not in undo:
                state = self.subjects.get(subject_id)
                undo[subject_id] = (state.checkpoint() if state is not None else _NEW_SUBJECT,
                                    self.deadlines.due_of(subject_id), [], [])
            undo[subject_id][2].append(item)
            try:
                outcome = self._apply(item)
            except Exception as exc:  # defensive: applying a validated event should never raise
                self._fail(subject_id, EvaluationError("applying the event", exc), undo.pop(subject_id))
                touched.discard(subject_id)
                continue
            undo[subject_id][3].append(outcome)
            if outcome in (Applied.NEW, Applied.AMENDED):
                touched.add(subject_id)
        alerts = self._evaluate(touched | set(self.deadlines.pop_due(self._lane_now)), undo)
        for subject_id in undo:  # kept (a failed subject was restored, which closed its log already)
            state = self.subjects.get(subject_id)
            if state is not None:
                state.commit()
        return alerts

    def load(self, item: tuple[Any, ...]) -> bool:
        """Apply one (event, payload[, origin]) to its subject's history without evaluating anything; True if it
        changed the history. A rebuild loads a partition's history this way, then calls `evaluate_rebuilt`."""
        return self._apply(item) in (Applied.NEW, Applied.AMENDED)

    def _apply(self, item: tuple[Any, ...]) -> Applied:
        event, payload = item[0], item[1]
        origin = item[2] if len(item) > 2 else None
        state = self.subjects.get(event.subject_id)
        if state is None:
            state = self.subjects[event.subject_id] = SubjectState(event.subject_id, event.site_id)
        previous = state.events.get(event.event_id)
        anchors = (state.arm, state.site_id)
        outcome = state.apply(event, payload if isinstance(payload, bytes) else canonical(payload), origin)
        self.stats.events[outcome.value] += 1
        if outcome in (Applied.NEW, Applied.AMENDED):
            state.changed.add(self.deriver.kind_of(event))
            if previous is not None:
                state.changed.add(self.deriver.kind_of(previous.event))
                if previous.event.type in _TRACKED:
                    state.changed_events.append((previous.event, False))
            if event.type in _TRACKED:
                state.changed_events.append((event, True))
            if (state.arm, state.site_id) != anchors:
                # every derivation reads the arm, and the site selects the time zone: any event can carry them,
                # so a change invalidates the whole memo, whatever the event's kind
                state.memo = {}
        return outcome

    def take_failures(self) -> list[EvaluationFailure]:
        """The evaluation failures since the last call (each already undone and logged), for the dead letters."""
        out, self._failures = self._failures, []
        return out

    def _fail(self, subject_id: str, error: EvaluationError,
              undo: tuple[Checkpoint | None, dt.datetime | None, list[tuple[Any, ...]], list[Applied]] | None,
              ) -> None:
        """Undo the subject's part of the batch, free its engine session, record and log the failure once.
        The log line names the stage and exception class, never the subject (no PHI in logs)."""
        items: list[tuple[Any, ...]] = []
        state = self.subjects.get(subject_id)
        if undo is not None:
            checkpoint, due, items, outcomes = undo
            if checkpoint is None:
                self.subjects.pop(subject_id, None)
            elif state is not None:
                state.restore(checkpoint)
            for outcome in outcomes:
                self.stats.events[outcome.value] -= 1
            self.deadlines.set(subject_id, due)
        else:  # a deadline alone: evaluate it again only when the subject's next event comes
            if state is not None:
                state.memo = {}
            self.deadlines.set(subject_id, None)
        self._release(subject_id)  # its facts are asserted again at its next evaluation
        self.stats.events["evaluation_error"] += len(items)
        cause = error.cause
        detail = (f"{error.stage} raised {type(cause).__name__}: {str(cause)[:200]}".replace(subject_id, "<subject>")
                  + "; the subject's batch was undone. Fix the rule, parameter or derivation named, then replay "
                  "this record")
        log.error("evaluation failed in %s (%s); %d record(s) undone and sent to the dead letters as "
                  "evaluation_error; other subjects go on", error.stage, type(cause).__name__, len(items))
        self._failures.append(EvaluationFailure(
            subject_id=subject_id, stage=error.stage, items=items,
            errors=[EventRejected("evaluation_error", detail, event_id=item[0].event_id) for item in items]))

    def evaluate_rebuilt(self, subjects: Iterable[str], *, published: Collection[tuple[str, str]],
                         open_alerts: dict[str, list[Alert]]) -> list[Alert]:
        """Evaluate subjects loaded by a rebuild once, on their end state. What was already published for them up
        to the committed offset (`published`, and the alerts it leaves open, by subject) is adopted first, so an
        alert whose condition went is withdrawn and occurrence numbers continue where they were."""
        out: list[Alert] = []
        for subject_id in sorted(s for s in subjects if s in self.subjects):
            adopt = (published, open_alerts.get(subject_id, []))
            try:
                out.extend(self.evaluate_subject(subject_id, adopt=adopt))
            except Exception as exc:
                out.extend(self._rebuild_stepwise(subject_id, exc, adopt))
        return out

    def settle(self, subjects: Iterable[str], *, seen: Any, on_topic: Container[tuple[str, str]],
               topic_open: dict[str, list[Alert]]) -> list[Alert]:
        """The subjects' partition is read again past every record the previous owner published alerts for: make
        the topic and the book agree where this pass went otherwise (`AlertBook.settle`). `seen.for_subject(s)`:
        every pair the topic held for a subject when read back."""
        changed = {s for s in subjects if s in self.subjects and self.book.settle(
            s, seen=seen.for_subject(s), on_topic=on_topic, topic_open=topic_open.get(s, []))}
        return self._evaluate(changed)

    def _rebuild_stepwise(self, subject_id: str, exc: Exception,
                          adopt: tuple[Collection[tuple[str, str]], list[Alert]]) -> list[Alert]:
        """A rebuilt subject whose end state cannot be evaluated: its history held a batch that failed before
        (undone and dead-lettered then, but loaded again from the topic). Apply its history again batch by batch,
        leaving out each batch whose evaluation fails, then evaluate the end state once. No crash loop."""
        error = exc if isinstance(exc, EvaluationError) else EvaluationError("evaluation", exc)
        log.warning("a rebuilt subject could not be evaluated (%s, %s): applying its history batch by batch",
                    error.stage, type(error.cause).__name__)
        old = self.subjects.pop(subject_id)
        self._release(subject_id)
        stored = sorted(old.events.values(), key=lambda st: (st.event.recorded_at, st.seq))
        groups: list[list[Any]] = []
        for st in stored:
            if groups and groups[-1][0].event.recorded_at == st.event.recorded_at:
                groups[-1].append(st)
            else:
                groups.append([st])
        left_out = 0
        for group in groups:
            state = self.subjects.get(subject_id)
            checkpoint = state.checkpoint() if state is not None else _NEW_SUBJECT
            for st in group:
                self._apply((st.event, json.loads(st.canonical), st.origin))
                self.subjects[subject_id].events[st.event.event_id].first_recorded_at = st.first_recorded_at
            try:
                self._derive_and_sync(subject_id)
                self.subjects[subject_id].commit()
            except Exception:
                left_out += len(group)
                if checkpoint is None:
                    self.subjects.pop(subject_id, None)
                else:
                    self.subjects[subject_id].restore(checkpoint)
                self._release(subject_id)
        if left_out:
            log.error("a rebuilt subject: %d record(s) left out of its history (they failed evaluation before)",
                      left_out)
        if subject_id not in self.subjects:
            return []
        try:
            return self.evaluate_subject(subject_id, adopt=adopt)
        except Exception as final:
            self._fail(subject_id, final if isinstance(final, EvaluationError)
                       else EvaluationError("evaluation", final), None)
            return []

    def _release(self, subject_id: str) -> None:
        """Empty the subject's engine session; if the engine fails at that, never hand the session on."""
        try:
            self.engine.release(subject_id)
        except Exception:
            self.engine.discard(subject_id)

    def tick(self) -> list[Alert]:
        """Evaluate the subjects whose deadlines are due at the clock's current time."""
        return self._evaluate(set(self.deadlines.pop_due(self._lane_now)))

    def finish(self, horizon: dt.datetime | None) -> list[Alert]:
        """End of a replay: evaluate every deadline up to the evaluation horizon (RULES_SPEC §2.3)."""
        self._horizon = horizon
        if horizon is None:
            return self.tick()
        due = [s for s, at in self.deadlines.pending().items() if at - self.grace <= horizon]
        due += self.deadlines.pop_due(self._lane_now)
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
        self.lanes.pop(subject_id, None)

    # ---- evaluation -------------------------------------------------------------------------------------------
    def _lane_now(self, lane: Hashable) -> dt.datetime:
        """The processing time of a lane (a partition): its own clock when the clock keeps one per partition."""
        now_of = getattr(self.clock, "now_of", None)
        if lane is None or now_of is None:
            return self.clock.now()
        return now_of(lane)  # type: ignore[no-any-return]

    def now_for(self, subject_id: str | None) -> dt.datetime:
        """The processing time a subject's deadlines are judged against: its partition's clock (issue 16)."""
        return self._lane_now(self.lanes.get(subject_id) if subject_id is not None else None)

    def cutoff(self, subject_id: str | None = None) -> dt.datetime:
        cut = self.now_for(subject_id) - self.grace
        if self._horizon is not None and self._horizon > cut:
            return self._horizon
        return cut

    def _evaluate(self, subjects: set[str],
                  undo: dict[str, tuple[Checkpoint | None, dt.datetime | None, list[tuple[Any, ...]],
                                        list[Applied]]] | None = None) -> list[Alert]:
        out: list[Alert] = []
        for subject_id in sorted(subjects):
            if subject_id not in self.subjects:
                continue
            try:
                out.extend(self.evaluate_subject(subject_id))
            except Exception as exc:  # defence in depth: one subject never stops the others
                error = exc if isinstance(exc, EvaluationError) else EvaluationError("evaluation", exc)
                self._fail(subject_id, error, (undo or {}).get(subject_id))
        return out

    def _derive_and_sync(self, subject_id: str) -> tuple[Any, dict[str, Any]]:
        """Derive the subject's facts and make the engine hold them; (derived, facts by id)."""
        state = self.subjects[subject_id]
        view = self.deriver.view(state)
        derived = self.deriver.derive(view, self.cutoff(subject_id), memo=state.memo, changed=state.changed)
        state.changed = set()
        state.changed_events = []
        facts, messages, delta = self._facts_of(state, derived)
        messages.changed = delta
        try:
            self.engine.sync(subject_id, messages)
        except EngineError as exc:
            raise EvaluationError("rules engine", exc) from exc
        return derived, facts

    def _facts_of(self, state: SubjectState, derived: Any) -> tuple[dict[str, Fact], Messages, set[str] | None]:
        """The subject's facts by id, the engine messages of those the rules read, and the ids that changed since
        the last evaluation (None: all of them may have). Kept in the memo and updated from the derivations that
        re-ran (a reused derivation hands back the same list), so the work is that of the facts that changed.
        Equal to `{f.fact_id: f for f in derived.facts}` (test_incremental_oracle): when two facts share an id
        (the count differs) it is built that way."""
        kept = state.memo.get("_synced")
        parts: dict[str, list[Fact]] = derived.parts
        if kept is not None:
            old_parts, facts, messages, count = kept
            delta: set[str] | None = set()
            changed = [(old_parts.get(name), new) for name, new in parts.items() if old_parts.get(name) is not new]
            for old, _ in changed:
                for f in old or ():
                    fid = f.fact_id
                    delta.add(fid)  # type: ignore[union-attr]
                    facts.pop(fid, None)
                    messages.pop(fid, None)
                    count -= 1
            for _, new in changed:
                for f in new:
                    fid = f.fact_id
                    delta.add(fid)  # type: ignore[union-attr]
                    facts[fid] = f
                    if f.name in self._facts_read:
                        messages[fid] = f.message()
                    count += 1
            if count == len(facts):
                state.memo["_synced"] = (parts, facts, messages, count)
                return facts, messages, delta
        everything = derived.facts
        facts = {f.fact_id: f for f in everything}
        messages = Messages((fid, f.message()) for fid, f in facts.items() if f.name in self._facts_read)
        state.memo["_synced"] = (parts, facts, messages, len(everything))
        return facts, messages, None

    def evaluate_subject(self, subject_id: str,
                         adopt: tuple[Collection[tuple[str, str]], list[Alert]] | None = None) -> list[Alert]:
        """Evaluate one subject: derive, run the rules, reconcile its alerts. Raises (EvaluationError naming the
        stage) before the alert book changes; callers undo the subject's batch."""
        state = self.subjects[subject_id]
        derived, facts = self._derive_and_sync(subject_id)
        matches = self.engine.matches(subject_id)
        if adopt is not None:
            self.book.adopt(subject_id=subject_id, site_id=state.site_id, matches=matches, facts=facts,
                            rules=self.rules.rules, published=adopt[0], open_alerts=adopt[1],
                            detected_at=self.now_for(subject_id).isoformat(), version=self.rules.version)
        alerts = self.book.reconcile(
            subject_id=subject_id, site_id=state.site_id, matches=matches, facts=facts,
            rules=self.rules.rules, detected_at=self.now_for(subject_id).isoformat(), version=self.rules.version)
        self.deadlines.set(subject_id, derived.next_deadline + self.grace if derived.next_deadline else None)
        alerts = [self._with_sources(a, state) for a in alerts]
        self.stats.evaluations += 1
        for a in alerts:
            self.stats.alerts[a.status] += 1
        return alerts

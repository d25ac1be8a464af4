"""Alert records and the book that turns rule matches into raised and retracted alerts.

An alert's identity is (rule, subject, the fact that fired it). Its `alert_id` is a hash of that identity, so the
same alert always gets the same id, in a replay, after a restart or under another rules version. If an alert is
withdrawn and the condition later returns, the new alert carries an occurrence number in its identity, so a
consumer that keys on `alert_id` never confuses the two.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Container
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from monitor.errors import EvaluationError
from monitor.facts import Fact
from monitor.rules import Rule, SafeFormat

DEDUP_NOTE = "consumers deduplicate on (alert_id, status): a redelivered record is identical"


class Alert(BaseModel):
    """One alert record, as written to standard output or the alerts topic."""

    model_config = ConfigDict(frozen=True)

    alert_id: str
    status: Literal["raised", "retracted"]
    retracts: str | None = None
    rule: str
    title: str
    subject_id: str
    site_id: str
    severity: str
    category: str
    at: str
    detected_at: str
    rule_version: str
    message: str
    expects: str = ""
    evidence: dict[str, Any]
    # Where the service published it: the events partition of its subject and the offset committed with the batch
    # that produced it (a Kafka header, not part of the record). A restarted owner whose committed offset is
    # below it will read that batch again and derive this very alert itself (see `AlertBook.settle`).
    commit_position: tuple[int, int] | None = Field(default=None, exclude=True, repr=False)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)


def alert_id(rule: str, subject_id: str, fact_id: str, occurrence: int) -> str:
    text = f"{rule}|{subject_id}|{fact_id}" + (f"|{occurrence}" if occurrence else "")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


class AlertBook:
    """Open alerts per subject; `reconcile` compares them with the engine's matches and says what changed."""

    def __init__(self) -> None:
        self._open: dict[str, dict[tuple[str, str], Alert]] = {}
        self._occurrences: dict[tuple[str, str, str], int] = {}
        # per adopted subject, the (alert_id, status) pairs the alerts topic held for it: its occurrence numbers
        # continue after them, whatever the service later does with its own published set. While a restarted
        # owner reads the records past its committed offset again, only the pairs published for records up to
        # that offset: the alerts the previous owner derived from the later ones are derived again under the same
        # ids (and not published twice); `settle` then takes in every pair.
        self._seen: dict[str, Collection[tuple[str, str]]] = {}
        self._published: Collection[tuple[str, str]] | None = None  # the topic's pairs at a rules reload

    def open_alerts(self, subject_id: str | None = None) -> list[Alert]:
        books = [self._open.get(subject_id, {})] if subject_id else list(self._open.values())
        return [a for book in books for a in book.values()]

    def forget(self, subject_id: str) -> None:
        self._open.pop(subject_id, None)
        self._seen.pop(subject_id, None)
        for key in [k for k in self._occurrences if k[1] == subject_id]:
            del self._occurrences[key]

    def adopt(self, *, subject_id: str, site_id: str, matches: set[tuple[str, str]], facts: dict[str, Fact],
              rules: dict[str, Rule], published: Collection[tuple[str, str]], open_alerts: list[Alert],
              detected_at: str, version: str) -> None:
        """After a rebuild loaded a subject's committed history without evaluating it batch by batch, take over
        what was published for it up to the committed offset (`published`: those pairs; `open_alerts`: the alerts
        they leave open). Each current match continues its latest published occurrence if that one is still
        open; open alerts that no current match claims stay in the book under their own id, so the next
        `reconcile` withdraws them. Later first matches of this subject continue the occurrence numbers found."""
        for_subject = getattr(published, "for_subject", None)
        seen = for_subject(subject_id) if for_subject is not None else published
        self._seen[subject_id] = seen
        book = dict(self._open.get(subject_id, {}))  # committed below, once every alert is built
        occurrences: dict[tuple[str, str, str], int] = {}
        unclaimed = {a.alert_id: a for a in open_alerts if a.subject_id == subject_id and a.status == "raised"}
        for rule_id, fact_id in sorted(matches):
            rule, fact = rules.get(rule_id), facts.get(fact_id)
            if (rule_id, fact_id) in book or rule is None or fact is None:
                continue
            key = (rule_id, subject_id, fact_id)
            n = self._next_occurrence(key)
            if n == 0:
                continue
            occurrences[key] = n
            latest = alert_id(rule_id, subject_id, fact_id, n - 1)
            if (latest, "retracted") in seen:  # withdrawn up to the commit: the match is a new occurrence
                continue
            found: Alert | None = unclaimed.pop(latest, None)
            try:
                book[(rule_id, fact_id)] = found or make_alert(
                    rule=rule, fact=fact, subject_id=subject_id, site_id=site_id, alert_id=latest,
                    detected_at=detected_at, version=version)
            except Exception as exc:
                raise EvaluationError(f"alert for rule {rule_id} on {fact.name}", exc) from exc
        for aid, alert in unclaimed.items():  # open at the commit, not held by the state there: withdrawn now
            book.setdefault((alert.rule, f"stale:{aid}"), alert)
        self._open[subject_id] = book
        self._occurrences.update(occurrences)

    def _next_occurrence(self, key: tuple[str, str, str]) -> int:
        n = self._occurrences.get(key, 0)
        seen = self._seen.get(key[1])
        if seen:
            while (alert_id(*key, n), "raised") in seen:
                n += 1
        return n

    def take_published(self, published: Collection[tuple[str, str]]) -> None:
        """The (alert_id, status) records already on the alerts topic: `take_over` never raises one of those ids."""
        self._published = published

    def take_over(self, old: "AlertBook", *, detected_at: str, version: str) -> list[Alert]:
        """A rules reload built this book from the subjects' stored history under the new rules; `old` is the book
        of the rules in force until now. Make this book continue the old one and return what to publish:
        * a condition (rule, subject, fact) open in both keeps the old alert and its id: nothing is published, so a
          reload that changes nothing for a subject publishes nothing for it;
        * a condition open only here is raised under an occurrence number after every one the old book used or
          the alerts topic holds, so its raise is never taken for a record already published;
        * an alert open only in the old book is withdrawn.
        The rebuild cannot reproduce the occurrence numbers of the live history (it sees each event's latest
        version only, and every deadline at once), so identity is matched by condition, never by alert_id."""
        out: list[Alert] = []
        self._seen.update(old._seen)  # what the topic held for adopted subjects: occurrences continue after it
        for key, n in old._occurrences.items():
            self._occurrences[key] = max(n, self._occurrences.get(key, 0))
        for subject_id in sorted(set(self._open) | set(old._open)):
            mine, theirs = self._open.setdefault(subject_id, {}), old._open.get(subject_id, {})
            # an alert the new rules raise at another instant or severity is withdrawn and raised as it now stands
            moved = {i for i in set(mine) & set(theirs)
                     if (mine[i].at, mine[i].severity) != (theirs[i].at, theirs[i].severity)}
            for identity in sorted((set(theirs) - set(mine)) | moved):
                gone = theirs[identity]
                out.append(gone.model_copy(update={"status": "retracted", "retracts": gone.alert_id,
                                                   "detected_at": detected_at, "rule_version": version}))
            for identity in sorted((set(mine) & set(theirs)) - moved):
                mine[identity] = theirs[identity]
            for identity in sorted((set(mine) - set(theirs)) | moved):
                rule_id, fact_id = identity
                key = (rule_id, subject_id, fact_id)
                n = max(old._occurrences.get(key, 0), self._occurrences.get(key, 1) - 1)
                seen = self._seen.get(subject_id) or ()
                while (alert_id(*key, n), "raised") in seen or (
                        self._published is not None and (alert_id(*key, n), "raised") in self._published):
                    n += 1
                self._occurrences[key] = n + 1
                raised = mine[identity].model_copy(update={"alert_id": alert_id(*key, n), "detected_at": detected_at})
                mine[identity] = raised
                out.append(raised)
        return out

    def reconcile(self, *, subject_id: str, site_id: str, matches: set[tuple[str, str]], facts: dict[str, Fact],
                  rules: dict[str, Rule], detected_at: str, version: str) -> list[Alert]:
        """Withdraw the open alerts no match claims and raise one per new match. All-or-nothing: every alert is
        built before the book changes, so an alert that cannot be built (EvaluationError naming its rule) leaves
        the book as it was."""
        book = self._open.get(subject_id, {})
        out: list[Alert] = []
        gone = sorted((set(book) - matches) | {i for i in set(book) & matches if self._moved(book[i], i, facts, rules)})
        for identity in gone:
            old = book[identity]
            out.append(old.model_copy(update={"status": "retracted", "retracts": old.alert_id,
                                              "detected_at": detected_at, "rule_version": version}))
        raised: list[tuple[tuple[str, str], tuple[str, str, str], int, Alert]] = []
        for identity in sorted(matches - (set(book) - set(gone))):
            rule_id, fact_id = identity
            rule, fact = rules.get(rule_id), facts.get(fact_id)
            if rule is None or fact is None:
                continue
            key = (rule_id, subject_id, fact_id)
            occurrence = self._next_occurrence(key)
            try:
                alert = make_alert(rule=rule, fact=fact, subject_id=subject_id, site_id=site_id,
                                   alert_id=alert_id(rule_id, subject_id, fact_id, occurrence),
                                   detected_at=detected_at, version=version)
            except Exception as exc:
                raise EvaluationError(f"alert for rule {rule_id} on {fact.name}", exc) from exc
            raised.append((identity, key, occurrence, alert))
        book = self._open.setdefault(subject_id, {})
        for identity in gone:
            del book[identity]
        for identity, key, occurrence, alert in raised:
            self._occurrences[key] = occurrence + 1
            book[identity] = alert
            out.append(alert)
        return out

    @staticmethod
    def _moved(alert: Alert, identity: tuple[str, str], facts: dict[str, Fact], rules: dict[str, Rule]) -> bool:
        """The condition is still met, but a late or amended record moved the instant it is anchored to (a first
        dose that moves T0 moves a visit window) or changed its severity: the open alert is withdrawn and raised
        anew as it now stands, so that live output equals what a restart derives from the same records."""
        rule, fact = rules.get(identity[0]), facts.get(identity[1])
        if rule is None or fact is None:
            return False
        return (str(fact.values.get(rule.at_field(fact.name))) != alert.at
                or rule.severity_for(fact.values) != alert.severity)

    def settle(self, subject_id: str, *, seen: Collection[tuple[str, str]], on_topic: Container[tuple[str, str]],
               topic_open: list[Alert]) -> bool:
        """A restarted owner has read again every record the previous owner published alerts for past the
        committed offset (it derived the same alerts under the same ids, and published none of them twice). Where
        that second pass went otherwise (a batch split differently across polls), the topic and the book are made
        to agree: an alert open on the topic that the book does not hold is withdrawn, and an alert the book holds
        that the topic shows withdrawn is dropped, so that the next `reconcile` raises it again under a new
        occurrence. `seen`: every pair the topic held for the subject when read back (occurrence numbers continue
        after them from now on); `on_topic`: what the topic holds now; `topic_open`: the alerts the read-back
        found open. True if the subject must be evaluated again."""
        self._seen[subject_id] = seen
        book = self._open.setdefault(subject_id, {})
        held = {a.alert_id for a in book.values()}
        changed = False
        for identity, alert in list(book.items()):
            if (alert.alert_id, "retracted") in on_topic:
                del book[identity]
                changed = True
        for alert in topic_open:
            if (alert.subject_id == subject_id and alert.alert_id not in held
                    and (alert.alert_id, "retracted") not in on_topic):
                book[(alert.rule, f"stale:{alert.alert_id}")] = alert
                changed = True
        return changed


MESSAGE_DECIMALS = 4
"""Numbers in alert messages are shown with at most this many decimals. Rounding is for display only (A-23.1):
facts carry values as computed, rules compare them as computed, and the alert's evidence keeps them unrounded."""


class Shown(float):
    """A fact value as a message shows it: `{value}` rounds to MESSAGE_DECIMALS and drops trailing zeros
    (29.99984 → 29.9998, 4.0 → 4); a template may still ask for its own format (`{value:.1f}`)."""

    def __format__(self, spec: str) -> str:
        if spec:
            return format(float(self), spec)
        text = f"{float(self):.{MESSAGE_DECIMALS}f}".rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text


def render_message(template: str, values: dict[str, Any]) -> str:
    """Fill a rule's message template from a fact, rounding numbers for display only."""
    shown = {k: Shown(v) if isinstance(v, float) else v for k, v in values.items() if v is not None}
    return template.format_map(SafeFormat(shown))


def make_alert(*, rule: Rule, fact: Fact, subject_id: str, site_id: str, alert_id: str, detected_at: str,
               version: str) -> Alert:
    values = fact.values
    evidence = {"fact": fact.name, "values": {k: v for k, v in values.items() if v is not None},
                "rule_condition": rule.condition_for(fact.name), **fact.evidence}
    return Alert(
        alert_id=alert_id,
        status="raised",
        rule=rule.spec.id,
        title=rule.spec.title,
        subject_id=subject_id,
        site_id=site_id,
        severity=rule.severity_for(values),
        category=rule.category,
        at=str(values.get(rule.at_field(fact.name))),
        detected_at=detected_at,
        rule_version=version,
        message=render_message(rule.message_for(fact.name), values),
        expects=rule.spec.expects,
        evidence=evidence,
    )

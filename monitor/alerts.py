"""Alert records and the book that turns rule matches into raised and retracted alerts.

An alert's identity is (rule, subject, the fact that fired it). Its `alert_id` is a hash of that identity, so the
same alert always gets the same id, in a replay, after a restart or under another rules version. If an alert is
withdrawn and the condition later returns, the new alert carries an occurrence number in its identity, so a
consumer that keys on `alert_id` never confuses the two.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

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
        # per adopted subject, the (alert_id, status) pairs the alerts topic held for it when it was adopted: its
        # occurrence numbers continue after them, whatever the service later does with its own published set
        self._seen: dict[str, Collection[tuple[str, str]]] = {}
        # adopted subjects whose partition still has records the previous owner may have processed (its
        # unacknowledged tail): alerts open on the topic that no match claims yet are not withdrawn until `settle`
        self._settling: set[str] = set()

    def open_alerts(self, subject_id: str | None = None) -> list[Alert]:
        books = [self._open.get(subject_id, {})] if subject_id else list(self._open.values())
        return [a for book in books for a in book.values()]

    def forget(self, subject_id: str) -> None:
        self._open.pop(subject_id, None)
        self._seen.pop(subject_id, None)
        self._settling.discard(subject_id)
        for key in [k for k in self._occurrences if k[1] == subject_id]:
            del self._occurrences[key]

    def adopt(self, *, subject_id: str, site_id: str, matches: set[tuple[str, str]], facts: dict[str, Fact],
              rules: dict[str, Rule], published: Collection[tuple[str, str]], open_alerts: list[Alert],
              detected_at: str, version: str, settling: bool = False) -> None:
        """After a rebuild loaded a subject's committed history without evaluating it batch by batch, take over
        what was published for it. Each current match continues its latest published occurrence (open, or
        withdrawn only by a crashed owner's unacknowledged tail, which is processed again next); open alerts that
        no current match claims stay in the book under their own id, so the next `reconcile` withdraws them.
        Later first matches of this subject continue the occurrence numbers found on the topic."""
        for_subject = getattr(published, "for_subject", None)
        self._seen[subject_id] = for_subject(subject_id) if for_subject is not None else published
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
            found: Alert | None = unclaimed.pop(latest, None)
            try:
                book[(rule_id, fact_id)] = found or make_alert(
                    rule=rule, fact=fact, subject_id=subject_id, site_id=site_id, alert_id=latest,
                    detected_at=detected_at, version=version)
            except Exception as exc:
                raise EvaluationError(f"alert for rule {rule_id} on {fact.name}", exc) from exc
        for aid, alert in unclaimed.items():
            # Deferred (a later record may claim it) only if it was raised at or after the rebuild's boundary time:
            # then the previous owner raised it in records past its last commit, which are read next. One raised
            # before is stale for the state at the boundary: withdrawn now, as it was by the clean run.
            later = settling and _at_or_after(alert.detected_at, detected_at)
            book.setdefault((alert.rule, f"{'published' if later else 'stale'}:{aid}"), alert)
        self._open[subject_id] = book
        if settling:
            self._settling.add(subject_id)
        else:
            self._settling.discard(subject_id)
        self._occurrences.update(occurrences)

    def _next_occurrence(self, key: tuple[str, str, str]) -> int:
        n = self._occurrences.get(key, 0)
        seen = self._seen.get(key[1])
        if seen:
            while (alert_id(*key, n), "raised") in seen:
                n += 1
        return n

    def reconcile(self, *, subject_id: str, site_id: str, matches: set[tuple[str, str]], facts: dict[str, Fact],
                  rules: dict[str, Rule], detected_at: str, version: str) -> list[Alert]:
        """Withdraw the open alerts no match claims and raise one per new match. All-or-nothing: every alert is
        built before the book changes, so an alert that cannot be built (EvaluationError naming its rule) leaves
        the book as it was."""
        book = self._open.get(subject_id, {})
        out: list[Alert] = []
        settling = subject_id in self._settling
        gone = sorted(k for k in set(book) - matches if not (settling and k[1].startswith("published:")))
        for identity in gone:
            old = book[identity]
            out.append(old.model_copy(update={"status": "retracted", "retracts": old.alert_id,
                                              "detected_at": detected_at, "rule_version": version}))
        raised: list[tuple[tuple[str, str], tuple[str, str, str], int, Alert]] = []
        for identity in sorted(matches - set(book)):
            rule_id, fact_id = identity
            rule, fact = rules.get(rule_id), facts.get(fact_id)
            if rule is None or fact is None:
                continue
            key = (rule_id, subject_id, fact_id)
            occurrence = self._next_occurrence(key)
            claimed = book.get((rule_id, f"published:{alert_id(*key, occurrence - 1)}")) if occurrence else None
            if claimed is not None:  # the previous owner published this very alert (still open): it is this match
                raised.append((identity, key, occurrence - 1, claimed))
                continue
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
            claimed_key = (alert.rule, f"published:{alert.alert_id}")
            if claimed_key in book:
                del book[claimed_key]
                book[identity] = alert
                continue
            book[identity] = alert
            out.append(alert)
        return out

    def settling(self, subject_id: str) -> bool:
        return subject_id in self._settling

    def settle(self, subject_id: str) -> bool:
        """The subject's partition is read past everything the previous owner may have processed: alerts open on
        the topic that no match claimed are withdrawn at its next `reconcile`. True if there are any."""
        self._settling.discard(subject_id)
        return any(k[1].startswith("published:") for k in self._open.get(subject_id, {}))


def _at_or_after(a: str, b: str) -> bool:
    try:
        import datetime as dt

        return dt.datetime.fromisoformat(a) >= dt.datetime.fromisoformat(b)
    except (TypeError, ValueError):
        return False


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

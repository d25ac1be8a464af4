"""The service's outbox: one batch's results on their way out, at least once and never twice.

A batch's alert records and dead letters must be acknowledged by the broker before its offsets are committed: a
crash in between then reads the batch again and derives the same alerts under the same ids, and a record already
on the alerts topic is not sent again. When the broker does not acknowledge, the batch is held here (the service
stops polling, is not ready, and retries with back-off): records still in the producer are waited for, never sent
twice; records the producer gave up on are sent again only after the alerts topic was read back.

Also here, because they are consumed when a record is published: the commit position each alert carries
(`positioned`), and why each withdrawal happened (`WithdrawalCauses`, the `alerts_withdrawn` metric's cause).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError

from connectors.base import AlertSink, RejectSink
from monitor.alerts import Alert
from monitor.errors import SinkUnavailable, SinkWaiting
from monitor.metrics import Metrics

log = logging.getLogger(__name__)

Produced = list[tuple[Alert, int | None]]  # alert records, each with the broker time (ms) of the record behind it


@dataclass(kw_only=True)
class HeldBatch:
    """One batch's results not yet safely out: its alerts and dead letters to be acknowledged, then its offsets."""

    alerts: Produced
    offsets: dict[TopicPartition, int]
    fresh: Produced = field(default_factory=list)  # handed to the alert sink
    added: bool = False  # `fresh` is in the sink: wait for it
    resend: bool = False  # the sink gave up on some records: read the topic back, then send what is missing
    alerts_done: bool = False
    dead_letters_done: bool = False
    since: float = field(default_factory=time.monotonic)
    attempts: int = 0

    def records(self) -> int:
        """How many alert records are held (those in the sink once handed to it)."""
        return len(self.fresh) if self.added else len(self.alerts)


def positioned(produced: Produced, offsets: Mapping[TopicPartition, int], *, lanes: Mapping[str, Any],
               committed: Mapping[TopicPartition, int]) -> Produced:
    """Each alert carries its commit position: its subject's events partition (`lanes`) and the offset committed
    with this batch there (or already `committed`, if the batch read nothing from it). A new owner committed below
    it reads that batch again (`PublishedAlerts.as_of`)."""
    out = []
    for alert, ts in produced:
        tp = lanes.get(alert.subject_id)
        if isinstance(tp, TopicPartition):
            at = max(offsets.get(tp, 0), committed.get(tp, 0))
            alert = alert.model_copy(update={"commit_position": (tp.partition, at)})
        out.append((alert, ts))
    return out


class WithdrawalCauses:
    """Why each withdrawal happened, from the moment the alert book withdraws an alert until the withdrawal is
    published: the `alerts_withdrawn` metric counts them by cause, so that flapping is visible."""

    def __init__(self) -> None:
        self._by_alert: dict[str, str] = {}  # alert_id -> why

    def note(self, alerts: list[Any], *, grace: dt.timedelta, cause: str | None = None,
             batch: list[Any] | None = None, held: set[str] | None = None) -> list[Any]:
        """Remember the cause of each withdrawal in `alerts` (alerts or (alert, ts) pairs; returned as given).
        From a batch of records: `amendment` if one of the subject's records corrects a held one, `late_data` if
        one happened before the alert's deadline + `grace` (it arrived after the alert), else `new_data`."""
        for item in alerts:
            alert = item[0] if isinstance(item, tuple) else item
            if alert.status != "retracted":
                continue
            why = cause or "new_data"
            if batch is not None:
                mine = [entry[0] for entry in batch if entry[0].subject_id == alert.subject_id]
                try:
                    judged = dt.datetime.fromisoformat(alert.at) + grace
                except (TypeError, ValueError):
                    judged = None
                if any(e.event_id in (held or set()) for e in mine):
                    why = "amendment"
                elif judged is not None and any(e.occurred_at <= judged for e in mine):
                    why = "late_data"
            self._by_alert[alert.alert_id] = why
        return alerts

    def take(self, alert_id: str) -> str:
        """The cause of a withdrawal being published (`other` if none was noted), forgotten from now on."""
        return self._by_alert.pop(alert_id, "other")

    def forget(self, alert_id: str) -> None:
        self._by_alert.pop(alert_id, None)


class Outbox:
    """Gets a held batch out: alert records published and acknowledged, then dead letters, then the offsets
    committed (through `commit`). `settle` tries once; the service calls it again, with back-off, until it is out.

    `published` is the set of (alert_id, status) pairs known to be on the alerts topic (never sent again);
    `refresh_published` reads the topic back. `is_ready`/`not_ready` are the service's readiness: while it is not
    ready (rebuilding) the service's own keys are remembered, and broker trouble makes it not ready."""

    def __init__(self, *, alerts: AlertSink, dead_letters: RejectSink, published: set[tuple[str, str]],
                 refresh_published: Callable[[], set[tuple[str, str]]] | None,
                 commit: Callable[[dict[TopicPartition, int]], None], is_ready: Callable[[], bool],
                 not_ready: Callable[[], None], stats: dict[str, int], metrics: Metrics | None,
                 on_alert: Callable[[Alert], None] | None, broker: str) -> None:
        self.alerts = alerts
        self.dead_letters = dead_letters
        self.published = published
        self.refresh_published = refresh_published
        self.commit = commit
        self.is_ready = is_ready
        self.not_ready = not_ready
        self.stats = stats
        self.metrics = metrics
        self.on_alert = on_alert
        self.broker = broker
        self.withdrawals = WithdrawalCauses()
        self.held: HeldBatch | None = None  # a batch whose alerts or offsets are not out yet (broker trouble)
        self._trouble_logged_at = 0.0

    def hold(self, alerts: Produced, offsets: dict[TopicPartition, int]) -> None:
        """A new batch's results (the previous one is out: the service polls only then)."""
        self.held = HeldBatch(alerts=alerts, offsets=offsets)

    def waiting(self) -> bool:
        """The held alerts are in the producer, waiting for acknowledgements (a wait that already took its time)."""
        box = self.held
        return box is not None and box.added and not box.resend and not box.alerts_done

    def settle(self) -> bool:
        """Try once to get the held batch out. True when nothing is held any more; False (logged, not ready) when
        the broker did not acknowledge: the batch stays held and nothing is committed past it."""
        box = self.held
        if box is None:
            return True
        box.attempts += 1
        try:
            if not box.alerts_done:
                self._publish(box)
                box.alerts_done = True
            if not box.dead_letters_done:
                self.dead_letters.flush()  # a dead letter the producer gave up on is sent again next time
                box.dead_letters_done = True
            self.commit(box.offsets)
        except SinkWaiting as exc:
            self._report_trouble(box, exc)
            return False
        except (SinkUnavailable, KafkaError) as exc:
            if not box.alerts_done:
                box.resend = True
            self._report_trouble(box, exc)
            return False
        self.held = None
        if box.attempts > 1:
            log.warning("Kafka broker acknowledges again: the held batch is out after %.0f s (%d alert records "
                        "published, offsets committed)", time.monotonic() - box.since, len(box.fresh))
        return True

    def _report_trouble(self, box: HeldBatch, exc: Exception) -> None:
        self.not_ready()
        now = time.monotonic()
        if box.attempts == 1 or now - self._trouble_logged_at >= 30.0:
            self._trouble_logged_at = now
            what = ("alert records" if not box.alerts_done else "dead letters" if not box.dead_letters_done
                    else "the offset commit")
            log.warning("Kafka broker at %s did not acknowledge %s (%s: %s): holding %d alert records and the "
                        "batch's offsets for %.0f s; nothing is committed past them; retrying with back-off — not "
                        "ready", self.broker, what, type(exc).__name__, exc, box.records(), now - box.since)

    def _publish(self, box: HeldBatch) -> None:
        if box.resend:  # the producer gave up on some: let it finish with the rest, then see what reached the topic
            self.alerts.flush()
            if self.refresh_published is not None:
                self.published |= self.refresh_published()
            box.resend, box.added = False, False
        if not box.added:
            box.fresh = []
            taken: set[tuple[str, str]] = set()
            for alert, ts in box.alerts:
                pair = (alert.alert_id, alert.status)
                if pair in taken:  # never twice in one batch either
                    continue
                taken.add(pair)
                if pair in self.published:
                    if box.attempts == 1:
                        self.stats["alerts_suppressed"] += 1
                    if alert.status == "retracted":
                        self.withdrawals.forget(alert.alert_id)
                    continue
                box.fresh.append((alert, ts))
            box.added = True
            for alert, _ in box.fresh:
                self.alerts.add(alert)
        self.alerts.flush()  # raises if the broker did not acknowledge: nothing is committed then
        self._published(box.fresh)

    def _published(self, fresh: Produced) -> None:
        now_ms = time.time() * 1000
        # Once the partitions are rebuilt, the alert book never produces a key it produced before (occurrence
        # numbers), so with a topic to read back from, the service's own keys are not kept: the set would grow by
        # about 200 B per alert record for the life of the process (soak benchmark).
        remember = self.refresh_published is None or not self.is_ready()
        for alert, ts in fresh:
            if remember:
                self.published.add((alert.alert_id, alert.status))
            self.stats["alerts_published"] += 1
            if self.metrics is not None:
                cause = self.withdrawals.take(alert.alert_id) if alert.status == "retracted" else "other"
                self.metrics.alert_published(alert, (now_ms - ts) / 1000 if ts and ts > 0 else None, cause=cause)
            if self.on_alert is not None:
                self.on_alert(alert)

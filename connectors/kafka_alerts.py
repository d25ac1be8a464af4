"""The alerts topic as a sink: alert records as JSON keyed by subject id, written with acks=all.

`flush()` returns only when the broker has acknowledged every record added, and raises if any failed or is still
waiting after a few seconds: the service commits event offsets only after it. Records the producer gave up on are
not sent again by the sink: the service reads the topic back and sends only the alerts that are not there. `published_alerts()` reads the topic back so a restarted monitor never publishes
an alert record twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from connectors.kafka_acked import AckedProducer, PublishError
from monitor.alerts import Alert
from monitor.config import Settings


class AlertPublishError(PublishError):
    """An alert was not acknowledged, or the alerts topic could not be read back."""


class KafkaAlertSink:
    def __init__(self, *, settings: Settings, producer: KafkaProducer | None = None) -> None:
        self.out = AckedProducer(producer=producer or KafkaProducer(
            bootstrap_servers=settings.bootstrap_servers, client_id=f"{settings.client_id}-alerts", acks="all",
            retries=5, linger_ms=2, max_in_flight_requests_per_connection=1, max_block_ms=5000,
            **settings.kafka.client_options()),
            topic=settings.alerts_topic, what="alert", resend_failed=False)  # the service reads the topic back first

    def add(self, alert: Alert) -> None:
        headers = [("alert_id", alert.alert_id.encode()), ("status", alert.status.encode()),
                   ("rule", alert.rule.encode())]
        if alert.commit_position is not None:  # events partition and offset: see PublishedAlerts.as_of
            headers.append(("commit_position", "%d:%d".encode() % alert.commit_position))
        self.out.send(key=alert.subject_id.encode("utf-8"), value=alert.to_json().encode("utf-8"), headers=headers)

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        self.out.close()


class PublishedAlerts(set[tuple[str, str]]):
    """The (alert_id, status) pairs on the alerts topic; `open` holds the raised records never retracted (alert_id
    → decoded record), so a recovering monitor can withdraw an alert whose condition went while it was away;
    `for_subject(id)` gives one subject's pairs (its occurrence numbers continue after them). Each pair published
    by a service carries its commit position (events partition, offset committed with the batch that produced
    it): `as_of(partition, offset)` is what the topic held once the records below that offset were processed."""

    def __init__(self) -> None:
        super().__init__()
        self.open: dict[str, dict] = {}
        self.by_subject: dict[str, set[tuple[str, str]]] = {}
        self.positions: dict[tuple[str, str], tuple[int, int]] = {}
        self.raised: dict[str, dict] = {}  # decoded raised records still needed: open, or withdrawn by a position

    def note(self, pair: tuple[str, str], subject_id: str | None, position: tuple[int, int] | None = None) -> None:
        self.add(pair)
        if subject_id is not None:
            self.by_subject.setdefault(subject_id, set()).add(pair)
        if position is not None:
            self.positions.setdefault(pair, position)

    def record(self, pair: tuple[str, str], subject_id: str | None, value: dict | None,
               position: tuple[int, int] | None = None) -> None:
        """One record read back: its pair, subject, decoded value (kept for raised records) and position."""
        self.note(pair, subject_id, position)
        if pair[1] == "raised" and value is not None:
            self.raised[pair[0]] = value

    def finish(self) -> PublishedAlerts:
        """Every record is in: work out the open alerts; keep only the raised records an `as_of` may need."""
        self.open = {aid: v for aid, v in self.raised.items() if (aid, "retracted") not in self}
        self.raised = {aid: v for aid, v in self.raised.items()
                       if aid in self.open or (aid, "retracted") in self.positions}
        return self

    def for_subject(self, subject_id: str) -> set[tuple[str, str]]:
        return self.by_subject.get(subject_id, set())

    def after(self, partition: int, offset: int) -> int | None:
        """The highest commit position on `partition` above `offset`: the previous owner published alerts for the
        records up to there, which a new owner committed at `offset` reads again. None if there is none."""
        above = [o for p, o in self.positions.values() if p == partition and o > offset]
        return max(above) if above else None

    def as_of(self, partition: int, offset: int) -> TopicAsOf:
        return TopicAsOf(self, partition, offset)


class TopicAsOf:
    """The alerts topic as it stood when the records of an events partition below `offset` had been processed:
    the pairs published with a higher commit position on that partition are left out (records without a
    position, from an older version, count as published before)."""

    def __init__(self, topic: PublishedAlerts, partition: int, offset: int) -> None:
        self.topic, self.partition, self.offset = topic, partition, offset

    def _before(self, pair: tuple[str, str]) -> bool:
        at = self.topic.positions.get(pair)
        return at is None or at[0] != self.partition or at[1] <= self.offset

    def for_subject(self, subject_id: str) -> set[tuple[str, str]]:
        pairs = self.topic.for_subject(subject_id)
        if not any(p in self.topic.positions for p in pairs):
            return pairs
        return {p for p in pairs if self._before(p)}

    def open_for(self, subject_id: str) -> list[dict]:
        pairs = self.for_subject(subject_id)
        return [self.topic.raised[aid] for aid, status in pairs
                if status == "raised" and (aid, "retracted") not in pairs and aid in self.topic.raised]


def read_to_end(consumer: KafkaConsumer, tps: list[TopicPartition], *, timeout_s: float,
                on_message: Callable[[Any], None]) -> None:
    """Read assigned partitions from where they are to their real end: the high watermark of the fetch responses
    (`consumer.highwater`), never less than what ListOffsets said. ListOffsets alone is not trusted: a broker may
    answer it with the first offset of the last record batch + 1 (ENGINE_NOTES, Tansu), which stops a read-back
    short of the records a restarted monitor must know it published. Raises AlertPublishError on timeout."""
    listed = consumer.end_offsets(tps)
    deadline = time.monotonic() + timeout_s
    while True:
        ends = {tp: max(listed.get(tp) or 0, consumer.highwater(tp) or 0) for tp in tps}
        known = all(consumer.highwater(tp) is not None for tp in tps)
        if known and all(consumer.position(tp) >= ends[tp] for tp in tps):
            return
        if time.monotonic() > deadline:
            raise AlertPublishError("could not read the alerts topic back in time; refusing to start")
        for msgs in consumer.poll(timeout_ms=500).values():
            for m in msgs:
                on_message(m)


def published_alerts(*, settings: Settings, timeout_s: float = 30.0) -> PublishedAlerts:
    """Every (alert_id, status) already on the alerts topic, read from the beginning to its real end."""
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False,
                             group_id=None, client_id=f"{settings.client_id}-recovery",
                             **settings.kafka.client_options())
    try:
        seen = PublishedAlerts()
        if settings.alerts_topic not in consumer.topics():  # also fetches the cluster metadata
            return seen
        parts = consumer.partitions_for_topic(settings.alerts_topic) or set()
        if not parts:
            raise AlertPublishError(f"no partition metadata for {settings.alerts_topic}; refusing to guess")
        tps = [TopicPartition(settings.alerts_topic, p) for p in sorted(parts)]
        if not tps:
            return seen
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        raised: dict[str, bytes] = {}

        def take(m: Any) -> None:
            h = {k: v for k, v in (m.headers or [])}  # header keys are str, values bytes
            if "alert_id" in h and "status" in h:
                key = (h["alert_id"].decode(), h["status"].decode())
                subject = m.key.decode("utf-8", "replace") if m.key is not None else None
                seen.note(key, subject, _position(h.get("commit_position")))
                if key[1] == "raised" and m.value is not None:
                    raised[key[0]] = m.value

        read_to_end(consumer, tps, timeout_s=timeout_s, on_message=take)
        for aid, value in raised.items():  # decoded once, and only those an as_of may need
            if (aid, "retracted") not in seen or (aid, "retracted") in seen.positions:
                seen.raised[aid] = json.loads(value)
        return seen.finish()
    finally:
        consumer.close()


def _position(raw: bytes | None) -> tuple[int, int] | None:
    try:
        partition, offset = raw.decode().split(":") if raw else ("", "")
        return int(partition), int(offset)
    except ValueError:
        return None

"""The events topic as a source: a kafka-python consumer in a consumer group, offsets committed by the caller.

Defaults that are wrong for this job are overridden (ENGINE_NOTES): no auto-commit, and a new group starts at the
earliest offset. The caller commits only after the alerts the events caused were acknowledged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition

from connectors.base import RawRecord
from monitor.config import Settings

log = logging.getLogger(__name__)


class _Listener(ConsumerRebalanceListener):
    def __init__(self, on_assigned: Callable[[list[TopicPartition]], None],
                 on_revoked: Callable[[list[TopicPartition]], None]) -> None:
        self._assigned, self._revoked = on_assigned, on_revoked

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._assigned(list(assigned))

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._revoked(list(revoked))


class KafkaEventSource:
    """Polls raw records; `commit(offsets)` stores the next offsets to read, per partition."""

    def __init__(self, *, settings: Settings, on_assigned: Callable[[list[TopicPartition]], None],
                 on_revoked: Callable[[list[TopicPartition]], None]) -> None:
        self.topic = settings.events_topic
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            group_id=settings.group_id,
            client_id=settings.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=settings.poll_max_records,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            fetch_max_bytes=max(52428800, settings.max_message_bytes * 4),
            max_partition_fetch_bytes=max(1048576, settings.max_message_bytes * 2),
            **settings.kafka.client_options(),
        )
        self.consumer.subscribe([self.topic], listener=_Listener(on_assigned, on_revoked))

    def poll(self, timeout_ms: int) -> list[RawRecord]:
        batches = self.consumer.poll(timeout_ms=timeout_ms)
        out: list[RawRecord] = []
        for tp in sorted(batches, key=lambda t: t.partition):
            for m in batches[tp]:
                out.append(RawRecord(value=m.value if m.value is not None else b"",
                                     origin=f"{tp.topic}/{tp.partition}@{m.offset}",
                                     headers={k: v for k, v in (m.headers or [])}, key=m.key, topic=tp.topic,
                                     partition=tp.partition, offset=m.offset, timestamp_ms=m.timestamp))
        return out

    def commit(self, offsets: dict[TopicPartition, int], timeout_ms: int = 5000) -> None:
        """Commit, or raise a KafkaError within `timeout_ms` (the caller retries and can notice SIGTERM)."""
        if offsets:
            from kafka.structs import OffsetAndMetadata

            self.consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()},
                                 timeout_ms=timeout_ms)

    def committed(self, tp: TopicPartition) -> int | None:
        return self.consumer.committed(tp)

    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """ListOffsets (latest). Some brokers answer it below the true end (ENGINE_NOTES): callers never let it
        fall below a committed offset, and use `highwater` once a fetch answered."""
        return dict(self.consumer.end_offsets(tps))

    def highwater(self, tp: TopicPartition) -> int | None:
        """The high watermark of the last fetch response for the partition (None before the first)."""
        return self.consumer.highwater(tp)

    def seek_to_beginning(self, tps: list[TopicPartition]) -> None:
        self.consumer.seek_to_beginning(*tps)

    def position(self, tp: TopicPartition) -> int:
        return int(self.consumer.position(tp))

    def lag(self) -> dict[TopicPartition, int]:
        """Messages behind the last known high-water mark, per assigned partition (no network call)."""
        out = {}
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is not None:
                out[tp] = max(0, high - self.consumer.position(tp))
        return out

    def assignment(self) -> set[Any]:
        return set(self.consumer.assignment())

    def close(self) -> None:
        self.consumer.close(autocommit=False)

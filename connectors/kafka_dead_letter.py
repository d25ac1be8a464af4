"""The dead-letter topic: every event that could not be parsed or validated, with its original bytes.

Headers name the reason (code and sentence) and where the record came from (topic, partition, offset).
"""

from __future__ import annotations

from kafka import KafkaProducer

from connectors.base import RawRecord
from connectors.kafka_acked import AckedProducer
from monitor.config import Settings
from monitor.errors import EventRejected


class KafkaDeadLetterSink:
    def __init__(self, *, settings: Settings, producer: KafkaProducer | None = None) -> None:
        self.out = AckedProducer(producer=producer or KafkaProducer(
            bootstrap_servers=settings.bootstrap_servers, client_id=f"{settings.client_id}-dead-letter",
            acks="all", retries=5, max_request_size=max(1048576, settings.max_message_bytes * 4), max_block_ms=5000,
            **settings.kafka.client_options()), topic=settings.dead_letter_topic, what="dead letter",
            resend_failed=True)  # at least once: a dead letter the producer gave up on is sent again
        self.count = 0

    def add(self, record: RawRecord, error: EventRejected) -> None:
        self.count += 1
        headers = [("reason", error.reason.encode()), ("detail", error.detail.encode("utf-8")[:2000]),
                   ("source_topic", (record.topic or "").encode()),
                   ("source_partition", str(record.partition).encode()),
                   ("source_offset", str(record.offset).encode())]
        if error.event_id:
            headers.append(("event_id", error.event_id.encode("utf-8")[:200]))
        self.out.send(key=record.key, value=record.value, headers=headers)

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        self.out.close()

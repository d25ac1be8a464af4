"""A producer wrapper whose `flush()` returns only when the broker acknowledged every record sent since the last
flush, and raises otherwise: the service commits event offsets only after it (at-least-once).

`flush()` waits at most `wait_s` (so a caller can notice SIGTERM during a broker outage). Records that are still in
the producer then stay there and the next `flush()` waits for them again (`PublishWaiting`: do not send them
again, the producer is still trying). Records the producer gave up on (`PublishError`) are either sent again at the
next flush (`resend_failed`, at-least-once: the dead-letter topic) or left to the caller, who knows how to find out
which of them did reach the topic (the alerts topic is read back, so an alert is never published twice).
"""

from __future__ import annotations

from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from monitor.errors import SinkUnavailable, SinkWaiting


class PublishError(SinkUnavailable):
    """The broker did not acknowledge a record; offsets are not committed past it."""


class PublishWaiting(PublishError, SinkWaiting):
    """Records are still waiting in the producer for the broker's acknowledgement."""


class AckedProducer:
    def __init__(self, *, producer: KafkaProducer, topic: str, what: str, wait_s: float = 5.0,
                 resend_failed: bool = False) -> None:
        self.producer = producer
        self.topic = topic
        self.what = what
        self.wait_s = wait_s
        self.resend_failed = resend_failed
        self._outstanding: list[tuple[Any, tuple[bytes | None, bytes, list[tuple[str, bytes]]]]] = []
        self._failed: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = []

    def send(self, *, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        future = self.producer.send(self.topic, key=key, value=value, headers=headers)
        self._outstanding.append((future, (key, value, headers)))

    @property
    def waiting(self) -> int:
        """Records handed to the producer and not yet acknowledged or failed."""
        return sum(1 for future, _ in self._outstanding if not future.is_done)

    def flush(self) -> None:
        failed, self._failed = self._failed, []
        for key, value, headers in failed:  # given up on by the producer last time: sent again, in order
            self.send(key=key, value=value, headers=headers)
        if not self._outstanding:
            return
        try:
            self.producer.flush(timeout=self.wait_s)
        except KafkaError:  # not all acknowledged within wait_s: they stay in the producer
            pass
        waiting = self.waiting
        if waiting:
            raise PublishWaiting(f"{waiting} {self.what} record(s) not yet acknowledged by the broker "
                                 f"after {self.wait_s:.0f} s")
        outstanding, self._outstanding = self._outstanding, []
        errors = [(record, future.exception) for future, record in outstanding if future.failed()]
        if errors:
            if self.resend_failed:
                self._failed = [record for record, _ in errors]
            raise PublishError(f"{len(errors)} {self.what} record(s) not acknowledged by the broker: {errors[0][1]}")

    def close(self) -> None:
        """Close, giving unacknowledged records 5 s. Records still unacknowledged then are abandoned (their batch's
        offsets were not committed: they are derived and published again at the next start)."""
        try:
            self.producer.close(timeout=5)
        except KafkaError:  # kafka-python's close stops at its flush timeout and would leave the producer open
            sender = getattr(self.producer, "_sender", None)
            if sender is not None:
                sender.force_close()  # aborts the records still waiting
                sender.join(5)
            try:
                self.producer.close(timeout=0)
            except KafkaError:
                pass

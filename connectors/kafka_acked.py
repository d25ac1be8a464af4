"""A producer wrapper whose `flush()` returns only when the broker acknowledged every record sent since the last
flush, and raises otherwise: the service commits event offsets only after it (at-least-once)."""

from __future__ import annotations

from typing import Any

from kafka import KafkaProducer

from monitor.errors import MonitorError


class PublishError(MonitorError):
    """The broker did not acknowledge a record; offsets are not committed past it."""


class AckedProducer:
    def __init__(self, *, producer: KafkaProducer, topic: str, what: str) -> None:
        self.producer = producer
        self.topic = topic
        self.what = what
        self._futures: list[Any] = []

    def send(self, *, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        self._futures.append(self.producer.send(self.topic, key=key, value=value, headers=headers))

    def flush(self) -> None:
        futures, self._futures = self._futures, []
        if not futures:
            return
        self.producer.flush()
        for future in futures:
            try:
                future.get(timeout=30)
            except Exception as exc:
                raise PublishError(f"{self.what} not acknowledged by the broker: {exc}") from exc

    def close(self) -> None:
        self.producer.close(timeout=5)

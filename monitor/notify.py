"""The notifier: alert records from the alerts topic into the store, and from the store's outbox to the safety
officers' e-mail and webhooks.

`protocol-monitor notify` consumes the alerts topic in its own consumer group, stores each record (idempotent on
(alert_id, status)) with the routes it must go to, commits the offset only after the store committed, and
delivers what is due. A delivery that fails waits in the outbox and is retried with back-off until the receiver
takes it; offsets never depend on the receivers, so a receiver that is down delays nothing else.

When the store cannot be written (disk full, read-only, server gone), the notifier stops: it commits the offsets
of the records it did store, logs one line that says what failed and what to do, and exits non-zero (an
orchestrator restarts it with back-off). The record it could not store is not dropped: its offset is not
committed, so the next start reads it again and stores it once.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from connectors.base import DeliveryError
from connectors.delivery import Router
from monitor.alerts import Alert
from monitor.backoff import Backoff, StoppedWhileConnecting, connect_with_backoff
from monitor.config import Settings
from monitor.store import AlertStore, StoreUnavailable

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, *, store: AlertStore, router: Router, base_retry_s: float = 5.0,
                 max_retry_s: float = 900.0) -> None:
        self.store = store
        self.router = router
        self.base_retry_s = base_retry_s
        self.max_retry_s = max_retry_s
        self.delivered = 0
        self.failed = 0

    def accept(self, alert: Alert) -> bool:
        """Store a record and queue its deliveries; False if it was already stored (a redelivery)."""
        return self.store.add_record(alert, sinks=self.router.route_names(alert))

    def deliver_due(self) -> int:
        """Try every delivery that is due; returns how many were delivered."""
        done = 0
        for alert_id, status, sink_name, attempts in self.store.due_deliveries():
            sink = self.router.sinks.get(sink_name)
            if sink is None:
                self.store.mark_failed(alert_id, status, sink_name, error="no such route in the configuration",
                                       retry_in_s=self.max_retry_s)
                continue
            try:
                sink.deliver(self.store.record_for(alert_id, status))
            except DeliveryError as exc:
                self.failed += 1
                wait = Backoff(base_s=self.base_retry_s, max_s=self.max_retry_s).delay(attempts)
                log.warning("delivery to %s failed (attempt %d), retrying in %.0f s: %s", sink_name, attempts + 1,
                            wait, exc)
                self.store.mark_failed(alert_id, status, sink_name, error=str(exc), retry_in_s=wait)
                continue
            self.store.mark_delivered(alert_id, status, sink_name)
            self.delivered += 1
            done += 1
        return done


def run_notifier(settings: Settings, *, stop: threading.Event) -> Notifier:
    """Consume the alerts topic into the store and deliver, until `stop`. Raises StoreUnavailable (after
    committing what was stored and logging why) when the store cannot be written."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError
    from kafka.structs import OffsetAndMetadata

    store = AlertStore(url=settings.store or "sqlite:///alerts.db")
    notifier = Notifier(store=store, router=Router.from_config(settings.routes))
    try:  # the broker may not answer yet: retry with back-off (and listen for SIGTERM) rather than crash
        consumer = connect_with_backoff("alerts consumer", lambda: KafkaConsumer(
            settings.alerts_topic, bootstrap_servers=settings.bootstrap_servers, group_id=settings.notify_group_id,
            enable_auto_commit=False, auto_offset_reset="earliest", session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms, **settings.kafka.client_options()),
            settings=settings, stop=stop)
    except StoppedWhileConnecting:
        log.info("notifier stopped before the broker answered")
        store.close()
        return notifier
    log.info("notifier: %d route(s), store %s", len(notifier.router.routes), store.url.split("@")[-1])
    commit_failed_at = 0.0

    def commit(stored: dict[TopicPartition, int]) -> None:
        if stored:
            consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in stored.items()})

    try:
        while not stop.is_set():
            batches = consumer.poll(timeout_ms=int(settings.tick_seconds * 1000))
            stored: dict[TopicPartition, int] = {}  # next offset to read, per partition, after what is stored
            for tp, messages in batches.items():
                for m in messages:
                    try:
                        notifier.accept(Alert.model_validate(json.loads(m.value)))
                    except ValueError as exc:  # not an alert record: counted and logged, never fatal
                        log.error("not an alert record at %s/%d@%d: %s", m.topic, m.partition, m.offset, exc)
                    except StoreUnavailable as exc:
                        try:
                            commit(stored)
                        except KafkaError as commit_exc:  # harmless: stored records are recognised when read again
                            log.warning("could not commit the stored records either (%s)", commit_exc)
                        log.error("alert store could not store the alert record at %s/%d@%d: stopped consuming; "
                                  "offsets are committed only up to the last stored record, so this record and "
                                  "the ones after it wait on the topic and are stored at the next start. %s",
                                  m.topic, m.partition, m.offset, exc)
                        raise
                    stored[tp] = m.offset + 1
            try:
                commit(stored)
            except KafkaError as exc:  # broker gone: what is stored stays stored; read again, it is recognised
                if time.monotonic() - commit_failed_at >= 30.0:
                    commit_failed_at = time.monotonic()
                    log.warning("could not commit the stored alert records (%s: %s); they are read again and "
                                "recognised when the broker answers; deliveries go on from the store",
                                type(exc).__name__, exc)
            try:
                notifier.deliver_due()
            except StoreUnavailable as exc:
                log.error("alert store failed while delivering: stopped; every stored record is committed and "
                          "undelivered ones stay in the outbox. %s", exc)
                raise
            time.sleep(0)
    finally:
        consumer.close(autocommit=False)
        store.close()
    return notifier

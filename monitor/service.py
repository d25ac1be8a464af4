"""The long-running service: events from Kafka in, alerts to Kafka out, at least once and never twice.

Per poll: each record is parsed (bad ones go to the dead-letter topic with their original bytes), applied to the
monitor, and deadlines that fell due are evaluated. Then the alert records are published and acknowledged, the
dead letters too, and only then are the consumed offsets committed. Alert ids are deterministic and the service
reads the alerts topic back at start, so a record it already published is never published again.

Time: in `wall` mode the processing time of an event is its broker timestamp and, between events, the wall clock,
so a missed H12 escalation is alerted within `tick_seconds` of deadline + grace. In `stream` mode it is the events'
`recorded_at` (replaying history through Kafka). On partition assignment the subjects of those partitions are
rebuilt by reading the partitions from the beginning; on revocation they are dropped.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import TopicPartition

from connectors.base import AlertSink, RawRecord, RejectSink
from monitor.alerts import Alert
from monitor.clock import ReplayClock
from monitor.config import Settings
from monitor.errors import EventRejected, MonitorError
from monitor.evaluator import Monitor
from monitor.events import decode, parse_event
from monitor.metrics import Metrics

log = logging.getLogger(__name__)


def _fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and modification times of the rule files: cheap to poll, changes on any edit."""
    files = sorted([*Path(directory).glob("*.yaml"), *Path(directory).glob("tables/*.yaml")])
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


@dataclass
class ServiceState:
    """What the service knows about its partitions: for readiness and for dropping subjects on revocation."""

    rebuild_until: dict[TopicPartition, int] = field(default_factory=dict)
    subjects_by_partition: dict[TopicPartition, set[str]] = field(default_factory=dict)
    ready: bool = False


class MonitorService:
    def __init__(self, *, settings: Settings, monitor: Monitor, clock: ReplayClock, alerts: AlertSink,
                 dead_letters: RejectSink, published: set[tuple[str, str]],
                 on_alert: Callable[[Alert], None] | None = None,
                 refresh_published: Callable[[], set[tuple[str, str]]] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.refresh_published = refresh_published
        self.monitor = monitor
        self.clock = clock
        self.alerts = alerts
        self.dead_letters = dead_letters
        self.published = published
        self.on_alert = on_alert
        self.state = ServiceState()
        self.source = None  # set by attach()
        self._newly_assigned: list[TopicPartition] = []
        self._gauges_at = 0.0
        self.reload_requested = threading.Event()
        self.audit_store: Any = None  # an AlertStore when configured: rules loads and switches are audited
        self._rules_fingerprint = _fingerprint(monitor.rules.directory)
        self._watched_at = time.monotonic()
        self.stats = {"events": 0, "rejected": 0, "alerts_published": 0, "alerts_suppressed": 0}

    # ---- partitions -------------------------------------------------------------------------------------------
    # kafka-python 3 runs rebalance listeners on its IO thread, where no blocking call is allowed: the listener
    # only records what changed, and the loop acts on it after poll returns.
    def on_assigned(self, tps: list[TopicPartition]) -> None:
        self._newly_assigned.extend(tps)

    def on_revoked(self, tps: list[TopicPartition]) -> None:
        """Drop the subjects of revoked partitions (in memory only; offsets were committed after each poll)."""
        for tp in tps:
            for subject in self.state.subjects_by_partition.pop(tp, set()):
                self.monitor.drop_subject(subject)
            self.state.rebuild_until.pop(tp, None)
            if tp in self._newly_assigned:
                self._newly_assigned.remove(tp)
        if tps:
            log.info("revoked partitions %s; their subjects were dropped", sorted(t.partition for t in tps))

    def _start_rebuilds(self) -> set[TopicPartition]:
        """Newly assigned partitions are read again from their beginning to rebuild their subjects' state."""
        tps, self._newly_assigned = list(self._newly_assigned), []
        if not tps or self.source is None:
            return set()
        if self.refresh_published is not None:  # another instance may have published for these subjects
            self.published |= self.refresh_published()
        ends = self.source.end_offsets(tps)
        for tp in tps:
            self.state.rebuild_until[tp] = ends.get(tp, 0)
            self.state.subjects_by_partition.setdefault(tp, set())
        self.source.seek_to_beginning(tps)
        log.info("assigned partitions %s; rebuilding their subjects from the beginning (%d records)",
                 sorted(t.partition for t in tps), sum(ends.values()))
        return set(tps)

    def attach(self, source) -> None:  # type: ignore[no-untyped-def]
        self.source = source

    # ---- the loop ---------------------------------------------------------------------------------------------
    def step(self, records: list[RawRecord]) -> None:
        """Process one poll's records, publish what they caused, then commit their offsets."""
        produced: list[tuple[Alert, int | None]] = []
        offsets: dict[TopicPartition, int] = {}
        batch: list = []
        batch_ts: list[int | None] = [None]

        def flush_batch() -> None:
            if batch:
                produced.extend((a, batch_ts[0]) for a in self.monitor.ingest(list(batch)))
                batch.clear()

        for rec in records:
            tp = TopicPartition(rec.topic, rec.partition)
            offsets[tp] = int(rec.offset) + 1  # type: ignore[arg-type]
            try:
                payload = decode(rec.value)
                event = parse_event(payload)
            except EventRejected as exc:
                self.stats["rejected"] += 1
                if self.metrics is not None:
                    self.metrics.events_rejected.labels(exc.reason).inc()
                log.warning("rejected %s: %s", rec.origin, exc.reason)
                self.dead_letters.add(rec, exc)
                continue
            self.stats["events"] += 1
            if self.metrics is not None:
                self.metrics.events_consumed.labels(event.site_id, event.type).inc()
            self.state.subjects_by_partition.setdefault(tp, set()).add(event.subject_id)
            if batch and batch[0][0].recorded_at != event.recorded_at:
                flush_batch()
            if not batch:
                self._advance(rec, event.recorded_at)
                produced.extend((a, None) for a in self.monitor.tick())
            batch.append((event, payload, {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset}))
            batch_ts[0] = rec.timestamp_ms
        flush_batch()
        if self.settings.clock == "wall":
            self.clock.advance_to(dt.datetime.now(dt.timezone.utc))
        produced.extend((a, None) for a in self.monitor.tick())
        self._publish(produced)
        self.dead_letters.flush()
        self._commit(offsets)
        self._refresh_gauges()

    def _advance(self, rec: RawRecord, recorded_at: dt.datetime) -> None:
        if self.settings.clock == "stream" or rec.timestamp_ms is None or rec.timestamp_ms < 0:
            self.clock.advance_to(recorded_at)
        else:
            self.clock.advance_to(dt.datetime.fromtimestamp(rec.timestamp_ms / 1000, dt.timezone.utc))

    def _publish(self, produced: list[tuple[Alert, int | None]]) -> None:
        fresh = []
        for alert, ts in produced:
            key = (alert.alert_id, alert.status)
            if key in self.published:
                self.stats["alerts_suppressed"] += 1
                continue
            self.alerts.add(alert)
            fresh.append((alert, ts))
        self.alerts.flush()  # raises if the broker did not acknowledge: nothing is committed then
        now_ms = time.time() * 1000
        # Once the partitions are rebuilt, the alert book never produces a key it produced before (occurrence
        # numbers), so with a topic to read back from, the service's own keys are not kept: the set would grow by
        # about 200 B per alert record for the life of the process (soak benchmark).
        remember = self.refresh_published is None or not self.state.ready
        for alert, ts in fresh:
            if remember:
                self.published.add((alert.alert_id, alert.status))
            self.stats["alerts_published"] += 1
            if self.metrics is not None:
                self.metrics.alert_published(alert, (now_ms - ts) / 1000 if ts and ts > 0 else None)
            if self.on_alert is not None:
                self.on_alert(alert)

    def _refresh_gauges(self, every_s: float = 1.0) -> None:
        """State gauges, at most once a second, on the service thread (the state's only owner)."""
        if self.metrics is None or time.monotonic() - self._gauges_at < every_s:
            return
        self._gauges_at = time.monotonic()
        m, mon = self.metrics, self.monitor
        m.set_gauge(m.subjects, "subjects", Tally((s.site_id, s.arm or "unknown") for s in mon.subjects.values()))
        m.set_gauge(m.open_alerts, "open", Tally((a.site_id, a.severity) for a in mon.book.open_alerts()))
        pending: Tally[tuple[str, ...]] = Tally({(s.site_id,): 0 for s in mon.subjects.values()})
        pending.update((mon.subjects[s].site_id,) for s in mon.deadlines.pending() if s in mon.subjects)
        m.set_gauge(m.deadlines_pending, "deadlines", pending)
        if self.source is not None:
            m.set_gauge(m.consumer_lag, "lag", Tally({(tp.topic, str(tp.partition)): lag
                                                      for tp, lag in self.source.lag().items()}))

    def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.source is None:
            return
        done = {tp: off for tp, off in offsets.items() if off >= self.state.rebuild_until.get(tp, 0)}
        for tp in list(self.state.rebuild_until):
            if tp in offsets and offsets[tp] >= self.state.rebuild_until[tp]:
                del self.state.rebuild_until[tp]
        self.source.commit(done)
        was_ready = self.state.ready
        self.state.ready = not self.state.rebuild_until and bool(self.source.assignment())
        if self.state.ready and not was_ready and self.refresh_published is not None:
            self.published.clear()  # read back for the rebuild; read again at the next assignment or reload

    metrics_server: Any = None

    def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if self.audit_store is not None:
            self.audit_store.close()
        for part in (self.source, self.alerts, self.dead_letters):
            if part is None:
                continue
            closer = getattr(part, "close", None)
            if closer is not None:
                closer()

    # ---- hot reload ---------------------------------------------------------------------------------------------
    def _rules_changed(self) -> bool:
        if self.settings.rules_watch_seconds <= 0 or time.monotonic() - self._watched_at < self.settings.rules_watch_seconds:
            return False
        self._watched_at = time.monotonic()
        now = _fingerprint(self.monitor.rules.directory)
        if now != self._rules_fingerprint:
            self._rules_fingerprint = now
            return True
        return False

    def reload_rules(self) -> bool:
        """Validate the rules directory, build the new version beside the old one, rebuild every subject into it,
        publish what the new version changes, and switch. An invalid directory is refused; the old rules stay."""
        from monitor.errors import RuleFileError
        from monitor.rules import load_rules

        old = self.monitor
        try:
            rules = load_rules(old.rules.directory)
        except RuleFileError as exc:
            log.error("new rules refused; version %s stays in force:\n  %s", old.rules.version,
                      "\n  ".join(f"{p}:{line}: {m}" for p, line, m in exc.problems))
            if self.metrics is not None:
                self.metrics.rules_reload_failures.inc()
            self._audit("rules_refused", {"version_in_force": old.rules.version,
                                          "problems": [f"{p}:{line}: {m}" for p, line, m in exc.problems][:50]})
            return False
        if rules.version == old.rules.version:
            return False
        if self.refresh_published is not None:  # the new book restarts its occurrence numbers: check the topic
            try:
                self.published |= self.refresh_published()
            except MonitorError as exc:
                log.error("new rules not switched: the alerts topic could not be read back (%s); version %s stays "
                          "in force, send SIGHUP to retry", exc, old.rules.version)
                return False
        started = time.monotonic()
        new = Monitor.create(rules=rules, clock=self.clock)
        stored = sorted((st for state in old.subjects.values() for st in state.events.values()),
                        key=lambda st: (st.event.recorded_at, st.seq))
        batch: list[tuple[Any, ...]] = []
        for st in stored:
            if batch and batch[0][0].recorded_at != st.event.recorded_at:
                new.ingest(batch)
                batch = []
            batch.append((st.event, json.loads(st.canonical), st.origin))
        if batch:
            new.ingest(batch)
        for subject_id, state in old.subjects.items():  # partition bookkeeping and site ids carry over
            if subject_id in new.subjects:
                new.subjects[subject_id].site_id = state.site_id
        before = {a.alert_id: a for a in old.book.open_alerts()}
        after = {a.alert_id: a for a in new.book.open_alerts()}
        now = self.clock.now().isoformat()
        changes: list[tuple[Alert, int | None]] = [(after[k], None) for k in sorted(set(after) - set(before))]
        changes += [(before[k].model_copy(update={"status": "retracted", "retracts": k, "detected_at": now,
                                                  "rule_version": rules.version}), None)
                    for k in sorted(set(before) - set(after))]
        self._publish(changes)
        self.monitor = new
        if self.metrics is not None:
            self.metrics.rules.info({"version": rules.version})
        self._audit("rules_switched", {"from": old.rules.version, "to": rules.version, "rules": len(rules.rules),
                                       "subjects_rebuilt": len(new.subjects), "alerts_raised": len(set(after) - set(before)),
                                       "alerts_withdrawn": len(set(before) - set(after))})
        log.info("rules version %s in force (was %s): %d subjects rebuilt in %.2f s; %d alerts raised, %d withdrawn",
                 rules.version, old.rules.version, len(new.subjects), time.monotonic() - started,
                 len(set(after) - set(before)), len(set(before) - set(after)))
        return True

    def _audit(self, action: str, data: dict[str, Any]) -> None:
        if self.audit_store is not None:
            self.audit_store.record_event(actor=f"{self.settings.client_id}@{self.settings.group_id}",
                                          action=action, data=data)

    def run(self, stop: threading.Event) -> None:
        if self.source is None:
            raise RuntimeError("attach() a source before run()")
        timeout_ms = int(self.settings.tick_seconds * 1000)
        while not stop.is_set():
            if self.reload_requested.is_set() or self._rules_changed():
                self.reload_requested.clear()
                self.reload_rules()
            records = self.source.poll(timeout_ms)
            rebuilding = self._start_rebuilds()
            if rebuilding:  # records fetched from the committed position are read again from the beginning
                records = [r for r in records if TopicPartition(r.topic, r.partition) not in rebuilding]
            self.step(records)
        log.info("stopping: offsets committed up to the last acknowledged alerts")


class _StoppedWhileConnecting(Exception):
    """The operator stopped the service before the broker answered."""


def _connect(what: str, make: Callable[[], Any], *, settings: Settings, stop: threading.Event | None) -> Any:
    """Create a Kafka client, retrying with back-off while the broker is unreachable (never crash at start)."""
    from kafka.errors import KafkaError

    delay = 1.0
    while True:
        try:
            return make()
        except KafkaError as exc:
            if stop is not None and stop.is_set():
                raise _StoppedWhileConnecting() from exc
            log.warning("Kafka broker unreachable at %s (%s: %s); retrying in %.0f s — not ready until connected",
                        settings.bootstrap_servers, what, type(exc).__name__, delay)
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)
            delay = min(delay * 2, 30.0)


def build_service(settings: Settings, *, on_alert: Callable[[Alert], None] | None = None,
                  stop: threading.Event | None = None) -> MonitorService:
    """Wire the service from settings: rules, engine, health endpoint, then the Kafka source and sinks (retried
    with back-off until the broker answers). Call `run(stop)`, then `close()`."""
    from connectors.kafka_alerts import KafkaAlertSink, published_alerts
    from connectors.kafka_dead_letter import KafkaDeadLetterSink
    from connectors.kafka_events import KafkaEventSource
    from prometheus_client import CollectorRegistry

    from monitor.metrics import HealthServer
    from monitor.rules import load_rules

    started = time.monotonic()
    rules = load_rules(settings.rules)
    clock = ReplayClock()
    monitor = Monitor.create(rules=rules, clock=clock)
    log.info("rules version %s loaded (%d rules) in %.1f s", rules.version, len(rules.rules),
             time.monotonic() - started)
    store = None
    if settings.store:
        from monitor.store import AlertStore

        store = AlertStore(url=settings.store)
        store.record_rules_loaded(version=rules.version, directory=str(rules.directory), rules=len(rules.rules),
                                  actor=f"{settings.client_id}@{settings.group_id}")
    metrics = Metrics(registry=CollectorRegistry())
    metrics.rules.info({"version": rules.version})
    service = MonitorService(settings=settings, monitor=monitor, clock=clock, alerts=None,  # type: ignore[arg-type]
                             dead_letters=None, published=set(),  # type: ignore[arg-type]
                             on_alert=on_alert, refresh_published=lambda: published_alerts(settings=settings),
                             metrics=metrics)
    service.audit_store = store
    if settings.metrics_port:  # up before Kafka: /healthz answers, /readyz says "not ready" while we connect
        service.metrics_server = HealthServer(registry=metrics.registry, host=settings.metrics_host,
                                              port=settings.metrics_port, ready=lambda: service.state.ready).start()
        log.info("metrics on http://%s:%d/metrics (and /healthz, /readyz)", settings.metrics_host,
                 settings.metrics_port)
    service.alerts = _connect("alerts producer", lambda: KafkaAlertSink(settings=settings), settings=settings,
                              stop=stop)
    service.dead_letters = _connect("dead-letter producer", lambda: KafkaDeadLetterSink(settings=settings),
                                    settings=settings, stop=stop)
    service.attach(_connect("events consumer", lambda: KafkaEventSource(
        settings=settings, on_assigned=service.on_assigned, on_revoked=service.on_revoked),
        settings=settings, stop=stop))
    log.info("connected to %s", settings.bootstrap_servers)
    return service


def run_service(settings: Settings, *, stop: threading.Event,
                on_alert: Callable[[Alert], None] | None = None,
                on_ready: Callable[[MonitorService], None] | None = None) -> MonitorService:
    """Build the service and run it until `stop` is set. Returns the service (for its stats)."""
    try:
        service = build_service(settings, on_alert=on_alert, stop=stop)
    except _StoppedWhileConnecting:
        log.info("stopped before the broker answered")
        raise SystemExit(0) from None
    if on_ready is not None:
        on_ready(service)
    try:
        service.run(stop)
    finally:
        service.close()
    return service

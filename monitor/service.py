"""The long-running service: events from Kafka in, alerts to Kafka out, at least once and never twice.

Per poll: each record is parsed (bad ones go to the dead-letter topic with their original bytes), applied to the
monitor, and deadlines that fell due are evaluated. Then the alert records are published and acknowledged, the
dead letters too, and only then are the consumed offsets committed. Alert ids are deterministic and the service
reads the alerts topic back at start, so a record it already published is never published again.

Faults: when the broker does not acknowledge (it is unreachable, or the alerts topic refuses records), the batch's
alerts, dead letters and offsets are held in the outbox (`monitor/outbox.py`): the service stops polling, is not
ready, logs why, and retries with back-off (`monitor/backoff.py`). On SIGTERM while holding, the service stops
without committing: at restart the batch is read and its alerts derived again.

Time: one clock per partition (a subject lives in one partition): each subject's deadlines follow its own
partition. In `wall` mode a partition's clock is the broker timestamp of its last record while it has a backlog
(never ahead of the wall clock) and the wall clock once it is caught up, so a missed H12 escalation is alerted
within `tick_seconds` of deadline + grace, and catching up after an outage raises no deadline whose satisfying
record waits in the backlog. In `stream` mode it is the partition's `recorded_at` (replaying history through Kafka);
a caught-up partition quiet for `idle_partition_seconds` follows the most advanced one.

Rebuild: on partition assignment the subjects of those partitions are rebuilt by reading the partitions from the
beginning (`monitor/rebuild.py` keeps where each rebuild stands); the service is ready once every assigned partition
is rebuilt (an empty one at once). On revocation they are dropped.

This module holds the loop (poll, process, publish, commit), hot reload of the rules and the wiring from settings.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kafka import TopicPartition
from kafka.errors import CommitFailedError, KafkaError

from connectors.base import AlertSink, RawRecord, RejectSink
from monitor.alerts import Alert
from monitor.backoff import Backoff, StoppedWhileConnecting, connect_with_backoff
from monitor.batches import BatchLoop
from monitor.clock import PartitionClocks, ReplayClock
from monitor.config import Settings
from monitor.errors import EventRejected, MonitorError, RuleFileError
from monitor.evaluator import Monitor
from monitor.events import parse_record
from monitor.metrics import Metrics
from monitor.outbox import Outbox, positioned
from monitor.rebuild import Rebuild, ServiceState

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


class MonitorService:
    def __init__(self, *, settings: Settings, monitor: Monitor, clock: ReplayClock | None, alerts: AlertSink,
                 dead_letters: RejectSink, published: set[tuple[str, str]],
                 on_alert: Callable[[Alert], None] | None = None,
                 refresh_published: Callable[[], set[tuple[str, str]]] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.refresh_published = refresh_published
        self.monitor = monitor
        # one processing clock per partition (issue 16): each subject's deadlines follow its own partition only
        self.clocks = PartitionClocks()
        monitor.clock = self.clocks
        self._last_record_at: dict[TopicPartition, float] = {}  # monotonic time a partition last gave a record
        self.state = ServiceState()
        # where each assigned partition's rebuild stands (rebuild on assignment: monitor/rebuild.py)
        self.rebuild = Rebuild(state=self.state, refresh_published=refresh_published)
        self.source = None  # set by attach()
        self._gauges_at = 0.0
        self.reload_requested = threading.Event()
        self.audit_store: Any = None  # an AlertStore when configured: rules loads and switches are audited
        self._rules_fingerprint = _fingerprint(monitor.rules.directory)
        self._watched_at = time.monotonic()
        self.stats = {"events": 0, "rejected": 0, "alerts_published": 0, "alerts_suppressed": 0}
        self._fhir: Any = None  # the FHIR mapper, made at the first FHIR record (input_format: fhir)
        # a batch's alerts, dead letters and offsets on their way out (held while the broker does not acknowledge)
        self.outbox = Outbox(alerts=alerts, dead_letters=dead_letters, published=published,
                             refresh_published=refresh_published, commit=self._commit,
                             is_ready=lambda: self.state.ready, not_ready=self._not_ready, stats=self.stats,
                             metrics=metrics, on_alert=on_alert, broker=settings.bootstrap_servers)
        self.retry_base_s = 1.0  # back-off while the broker does not answer: doubles up to retry_max_s
        self.retry_max_s = 30.0
        self._retries = 0  # waits since the broker last acknowledged: the next one is `backoff.delay(_retries)`
        self.site_risk: Any = None  # monitor.kri.SiteRisk when rules/kri.yaml exists: recomputed on its schedule

    def _not_ready(self) -> None:
        self.state.ready = False

    # ---- partitions -------------------------------------------------------------------------------------------
    # kafka-python 3 runs rebalance listeners on its IO thread, where no blocking call is allowed: the listener
    # only records what changed, and the loop acts on it after poll returns.
    def on_assigned(self, tps: list[TopicPartition]) -> None:
        self.rebuild.newly_assigned.extend(tps)

    def on_revoked(self, tps: list[TopicPartition]) -> None:
        """Drop the subjects of revoked partitions (in memory only; offsets were committed after each poll)."""
        for tp in tps:
            for subject in self.rebuild.revoke(tp):
                self.monitor.drop_subject(subject)
            self._last_record_at.pop(tp, None)
            self.clocks.drop(tp)
        if tps:
            log.info("revoked partitions %s; their subjects were dropped", sorted(t.partition for t in tps))

    def _start_rebuilds(self) -> set[TopicPartition]:
        """Newly assigned partitions start their rebuild (`Rebuild.start`); readiness follows."""
        tps = self.rebuild.start(self.source, published=self.outbox.published, site_risk=self.site_risk)
        if tps:
            self._update_ready()
        return tps

    def attach(self, source) -> None:  # type: ignore[no-untyped-def]
        self.source = source

    # ---- the loop ---------------------------------------------------------------------------------------------
    def step(self, records: list[RawRecord]) -> None:
        """Process one poll's records, publish what they caused, then commit their offsets."""
        produced: list[tuple[Alert, int | None]] = []
        offsets: dict[TopicPartition, int] = {}
        fhir_offsets: dict[TopicPartition, int] = {}
        if self.settings.input_format == "fhir":  # FHIR records become flat ones first (monitor/fhir.py)
            records, fhir_offsets = self._from_fhir(records)

        def deadlines(out: list[Alert]) -> None:
            produced.extend((a, None) for a in self._note_withdrawals(out, cause="deadline"))

        def applied(batch: list[Any], out: list[Alert], held: set[str]) -> None:
            self._note_withdrawals(out, batch=batch, held=held)
            produced.extend((a, batch[-1][3].timestamp_ms) for a in out)  # the broker time of its last record
            self._dead_letter_failures()

        # a batch stays within one partition: its clock is the one its subjects follow
        batches = BatchLoop(monitor=self.monitor,
                            key=lambda item: (item[0].recorded_at, item[2]["topic"], item[2]["partition"]),
                            advance=lambda item: self._advance(item[3], item[0].recorded_at),
                            on_deadlines=deadlines, on_batch=applied, track_held=True)
        self.rebuild.raise_ends(self.source)
        for rec in records:
            tp = TopicPartition(rec.topic, rec.partition)
            offsets[tp] = int(rec.offset) + 1  # type: ignore[arg-type]
            try:
                event, payload = parse_record(rec.value, max_bytes=self.settings.max_message_bytes)
                batches.admit(event)
            except EventRejected as exc:
                if rec.offset is not None and rec.offset < self.state.bulk_until.get(tp, 0):
                    continue  # rebuilding history: dead-lettered before the group committed past it
                self.stats["rejected"] += 1
                if self.outbox.metrics is not None:
                    self.outbox.metrics.events_rejected.labels(exc.reason).inc()
                log.warning("rejected %s: %s", rec.origin, exc.reason)
                self.outbox.dead_letters.add(rec, exc)
                if self.site_risk is not None:
                    self.site_risk.intake.dead_lettered(rec.value)
                continue
            self.stats["events"] += 1
            if self.outbox.metrics is not None:
                self.outbox.metrics.events_consumed.labels(event.site_id, event.type).inc()
            self.state.subjects_by_partition.setdefault(tp, set()).add(event.subject_id)
            self.monitor.lanes[event.subject_id] = tp
            self._last_record_at[tp] = time.monotonic()
            if tp in self.state.bulk_until:  # rebuilding: load history quietly up to the boundary
                if rec.offset < self.state.bulk_until[tp]:  # type: ignore[operator]
                    self._advance(rec, event.recorded_at)
                    self.monitor.load((event, payload, {"topic": rec.topic, "partition": rec.partition,
                                                        "offset": rec.offset}))
                    continue
                batches.flush()
                produced.extend(self._note_withdrawals(self.rebuild.finish(tp, monitor=self.monitor,
                                                                           published=self.outbox.published),
                                                       cause="recovery"))
            batches.add((event, payload, {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset},
                         rec))
        batches.flush()
        for tp in self.rebuild.finished(offsets):
            produced.extend(self._note_withdrawals(self.rebuild.finish(tp, monitor=self.monitor,
                                                                       published=self.outbox.published), cause="recovery"))
        self.rebuild.settle_due(offsets, monitor=self.monitor, published=self.outbox.published, produced=produced,
                                note=lambda alerts: self._note_withdrawals(alerts, cause="recovery"))
        self._advance_idle()
        produced.extend((a, None) for a in self._note_withdrawals(self.monitor.tick(), cause="deadline"))
        self._dead_letter_failures()
        for tp, off in fhir_offsets.items():  # a FHIR record that gave no event is still consumed
            offsets[tp] = max(offsets.get(tp, 0), off)
        if self.site_risk is not None and self.state.ready and self.site_risk.due():  # QTL breaches: same path
            produced.extend((a, None) for a in self.site_risk.recompute(self.monitor))
        self.outbox.hold(positioned(produced, offsets, lanes=self.monitor.lanes, committed=self.rebuild.committed), offsets)
        self._settle()  # if the broker does not acknowledge, run() holds the batch and retries
        self._refresh_gauges()

    def _note_withdrawals(self, alerts: list[Any], *, cause: str | None = None, batch: list[Any] | None = None,
                          held: set[str] | None = None) -> list[Any]:
        """Why each withdrawal happened, judged against the monitor in force (`WithdrawalCauses.note`)."""
        return self.outbox.withdrawals.note(alerts, grace=self.monitor.grace, cause=cause, batch=batch, held=held)

    def _from_fhir(self, records: list[RawRecord]) -> tuple[list[RawRecord], dict[TopicPartition, int]]:
        """Map FHIR records to flat ones; refusals go to the dead letters with the original bytes, ignored
        resources are counted (`fhir_ignored`). Also returns the offsets consumed, events or not."""
        from monitor.fhir import FhirMapper, code_map_path, flat_records, load_code_map

        try:  # read again when edited (a site's local code is a data edit); a broken edit keeps the map in force
            codes = load_code_map(code_map_path(self.settings.fhir_codes, self.settings.rules))
            if self._fhir is None or self._fhir.codes is not codes:
                self._fhir = FhirMapper(code_map=codes, max_bytes=self.settings.max_message_bytes)
        except RuleFileError as exc:
            if self._fhir is None:
                raise
            log.error("FHIR code map edit refused, the previous one stays in force: %s", exc)
        out: list[RawRecord] = []
        offsets: dict[TopicPartition, int] = {}
        for rec in records:
            tp = TopicPartition(rec.topic, rec.partition)
            offsets[tp] = int(rec.offset) + 1  # type: ignore[arg-type]
            mapped = self._fhir.map_record(rec.value)
            self.stats["fhir_ignored"] = self.stats.get("fhir_ignored", 0) + sum(mapped.ignored.values())
            rebuilding = rec.offset is not None and rec.offset < self.state.bulk_until.get(tp, 0)
            for refusal in mapped.rejected:
                if rebuilding:
                    continue  # dead-lettered before the group committed past it
                self.stats["rejected"] += 1
                if self.outbox.metrics is not None:
                    self.outbox.metrics.events_rejected.labels(refusal.reason).inc()
                log.warning("rejected %s: %s", rec.origin, refusal.reason)
                self.outbox.dead_letters.add(rec, refusal)
            out.extend(flat_records(rec, mapped))
        return out, offsets

    def _dead_letter_failures(self) -> None:
        """Records of a subject whose evaluation failed were undone by the monitor (logged there): they go to the
        dead letters with reason `evaluation_error`, like any record that cannot be used. A failure from a
        deadline or a rebuild has no record of this poll and was only logged."""
        for failure in self.monitor.take_failures():
            for item, error in zip(failure.items, failure.errors):
                rec = item[3] if len(item) > 3 else None
                if rec is None:
                    continue
                self.stats["rejected"] += 1
                if self.outbox.metrics is not None:
                    self.outbox.metrics.events_rejected.labels(error.reason).inc()
                self.outbox.dead_letters.add(rec, error)
                if self.site_risk is not None:
                    self.site_risk.intake.dead_lettered(rec.value)

    def _advance(self, rec: RawRecord, recorded_at: dt.datetime) -> None:
        """Move the record's partition clock. `stream`: the record's `recorded_at`. `wall`: its broker timestamp
        (the partition has a backlog while records are read), never ahead of the wall clock: a producer whose
        clock runs ahead (CreateTime) cannot fire deadlines early. A record without a timestamp counts as now."""
        tp = TopicPartition(rec.topic, rec.partition)
        if self.settings.clock == "stream":
            self.clocks.advance(tp, recorded_at)
            return
        now = dt.datetime.now(dt.timezone.utc)
        if rec.timestamp_ms is None or rec.timestamp_ms < 0:
            self.clocks.advance(tp, now)
        else:
            self.clocks.advance(tp, min(now, dt.datetime.fromtimestamp(rec.timestamp_ms / 1000, dt.timezone.utc)))

    def _caught_up(self) -> list[TopicPartition]:
        """Assigned partitions with nothing left to read (lag 0 at the last fetch), not rebuilding."""
        if self.source is None:
            return []
        lag_of = getattr(self.source, "lag", None)
        lags = lag_of() if lag_of is not None else {}
        highwater = getattr(self.source, "highwater", None)
        return [tp for tp in self.source.assignment()
                if lags.get(tp, 0) <= 0 and tp not in self.rebuild.newly_assigned and tp not in self.state.bulk_until
                and tp not in self.state.rebuild_until
                and (highwater is None or highwater(tp) is not None)]  # no fetch answered yet: not caught up

    def _advance_idle(self) -> None:
        """Partitions with no backlog. `wall`: their clock is the wall clock. `stream`: a partition that has
        received nothing for `idle_partition_seconds` follows the most advanced partition (as Flink marks an idle
        source), so a quiet partition never keeps its subjects' deadlines waiting for ever."""
        if self.settings.clock == "wall":
            now = dt.datetime.now(dt.timezone.utc)
            for tp in self._caught_up():
                self.clocks.advance(tp, now)
            return
        lanes = self.clocks.lanes()
        if not lanes:
            return
        latest = max(lanes.values())
        quiet_since = time.monotonic() - self.settings.idle_partition_seconds
        for tp in self._caught_up():
            if self._last_record_at.setdefault(tp, time.monotonic()) <= quiet_since:
                self.clocks.advance(tp, latest)

    # ---- getting a batch out: alerts, dead letters, then offsets ---------------------------------------------------
    def _settle(self) -> bool:
        """Try once to get the held batch out (`Outbox.settle`); once it is out, the back-off starts again."""
        holding = self.outbox.held is not None
        if not self.outbox.settle():
            return False
        if holding:
            self._retries = 0
        return True

    def _refresh_gauges(self, every_s: float = 1.0) -> None:
        """State gauges, at most once a second, on the service thread (the state's only owner)."""
        if self.outbox.metrics is None or time.monotonic() - self._gauges_at < every_s:
            return
        self._gauges_at = time.monotonic()
        m, mon = self.outbox.metrics, self.monitor
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
        # records read again below the committed offset (a rebuild) are never committed: offsets only go forward
        committed = self.rebuild.committed
        done = {tp: off for tp, off in offsets.items() if off > committed.get(tp, 0)}
        backwards = {tp: (off, committed[tp]) for tp, off in done.items()
                     if tp in committed and off < committed[tp]}
        if backwards:  # cannot happen after the filter above; a guard so that no change can ever make it happen
            raise RuntimeError(f"refusing to commit offsets backwards (offset, committed): {backwards}")
        try:
            self.source.commit(done)
        except CommitFailedError as exc:  # the group rebalanced meanwhile: the new owner rebuilds these partitions
            log.warning("offset commit refused after a rebalance (%s); the partitions' new owner reads them again "
                        "from the beginning and publishes nothing twice", exc)
        else:
            committed.update(done)
        for tp in list(self.state.rebuild_until):
            if tp in offsets and offsets[tp] >= self.state.rebuild_until[tp]:
                del self.state.rebuild_until[tp]
        self._update_ready()

    def _update_ready(self) -> None:
        """Ready means rebuilt: every assigned partition read up to its rebuild boundary (empty ones at once)."""
        if self.source is None:
            return
        was_ready = self.state.ready
        self.state.ready = not self.rebuild.pending() and bool(self.source.assignment())
        if self.state.ready and not was_ready and self.refresh_published is not None:
            # read back for the rebuild; read again at the next assignment or reload (rebound, not cleared: the
            # alert book keeps each adopted subject's own pairs)
            self.outbox.published = set()
            self.rebuild.forget_read_back()

    metrics_server: Any = None

    def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if self.audit_store is not None:
            self.audit_store.close()
        for part in (self.source, self.outbox.alerts, self.outbox.dead_letters):
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
            if self.outbox.metrics is not None:
                self.outbox.metrics.rules_reload_failures.inc()
            try:
                self._audit("rules_refused", {"version_in_force": old.rules.version,
                                              "problems": [f"{p}:{line}: {m}" for p, line, m in exc.problems][:50]})
            except MonitorError as audit_exc:
                log.error("the audit trail could not record the refused rules: %s", audit_exc)
            return False
        if rules.version == old.rules.version:
            return False
        if self.refresh_published is not None:  # the new book restarts its occurrence numbers: check the topic
            try:
                self.outbox.published |= self.refresh_published()
            except MonitorError as exc:
                log.error("new rules not switched: the alerts topic could not be read back (%s); version %s stays "
                          "in force, send SIGHUP to retry", exc, old.rules.version)
                return False
        started = time.monotonic()
        new = Monitor.create(rules=rules, clock=self.clocks, max_events_per_subject=old.max_events_per_subject)
        new.lanes.update(old.lanes)
        # Each subject's stored history is loaded and evaluated once, at its end state, as a recovery does: the
        # facts are a function of the history and the clock, so the end state is that of a batch-by-batch rebuild,
        # and the book below is matched to the old one by condition (take_over), not by the path that led there.
        for subject_id, state in old.subjects.items():
            for st in sorted(state.events.values(), key=lambda st: (st.event.recorded_at, st.seq)):
                new.load((st.event, json.loads(st.canonical), st.origin))
                new.subjects[subject_id].events[st.event.event_id].first_recorded_at = st.first_recorded_at
        new.evaluate_rebuilt(list(new.subjects), published=frozenset(), open_alerts={})
        undone = sum(len(f.items) for f in new.take_failures())
        if undone:  # already on the events topic and committed: logged, left out of the new version's state
            log.error("rules version %s could not evaluate %d stored record(s); they are left out of its state "
                      "(see the evaluation errors above)", rules.version, undone)
        for subject_id, state in old.subjects.items():  # partition bookkeeping and site ids carry over
            if subject_id in new.subjects:
                new.subjects[subject_id].site_id = state.site_id
        if self.outbox.published:  # what the topic holds, so a raise under the new rules never reuses a published id
            new.book.take_published(self.outbox.published)
        taken = new.book.take_over(old.book, detected_at=self.clocks.now().isoformat(), version=rules.version)
        changes: list[tuple[Alert, int | None]] = [(a, None) for a in taken]
        raised_n = sum(a.status == "raised" for a in taken)
        withdrawn_n = len(taken) - raised_n
        try:  # the audit trail says which rules were in force: a version that cannot be recorded is not used
            self._audit("rules_switched", {"from": old.rules.version, "to": rules.version,
                                           "rules": len(rules.rules), "subjects_rebuilt": len(new.subjects),
                                           "alerts_raised": raised_n, "alerts_withdrawn": withdrawn_n})
        except MonitorError as exc:
            log.error("new rules version %s NOT switched to: the audit trail could not record it (%s); version %s "
                      "stays in force and alerts keep flowing; fix the store, then edit the rules or send SIGHUP",
                      rules.version, exc, old.rules.version)
            if self.outbox.metrics is not None:
                self.outbox.metrics.rules_reload_failures.inc()
            return False
        self.monitor = new
        if self.site_risk is not None and rules.kri is not None:
            self.site_risk.spec = rules.kri  # an edited kri.yaml applies from the next recomputation
        self._note_withdrawals(changes, cause="rules_change")
        self.outbox.hold(positioned(changes, {}, lanes=self.monitor.lanes, committed=self.rebuild.committed), {})
        self._settle()  # held and retried by run() if the broker does not acknowledge
        if self.outbox.metrics is not None:
            self.outbox.metrics.rules.info({"version": rules.version})
        log.info("rules version %s in force (was %s): %d subjects rebuilt in %.2f s; %d alerts raised, %d withdrawn",
                 rules.version, old.rules.version, len(new.subjects), time.monotonic() - started,
                 raised_n, withdrawn_n)
        return True

    def _audit(self, action: str, data: dict[str, Any]) -> None:
        if self.audit_store is not None:
            self.audit_store.record_event(actor=f"{self.settings.client_id}@{self.settings.group_id}",
                                          action=action, data=data)

    def run(self, stop: threading.Event) -> None:
        """Poll, process, publish, commit until `stop` is set. A held batch (broker trouble) is retried with
        back-off before anything new is polled; on stop it is left uncommitted."""
        if self.source is None:
            raise RuntimeError("attach() a source before run()")
        while not stop.is_set():
            self.run_once(stop)
        if self.outbox.held is not None:
            log.warning("stopping with a batch the broker did not acknowledge (%d alert records held): its offsets "
                        "are not committed; at restart it is read again and its alerts derived and published",
                        self.outbox.held.records())
        else:
            log.info("stopping: offsets committed up to the last acknowledged alerts")

    def run_once(self, stop: threading.Event) -> None:
        """One turn of the loop: retry a held batch, or poll and process the next one."""
        if self.source is None:
            raise RuntimeError("attach() a source before run()")
        if self.outbox.held is not None:
            waiting = self.outbox.waiting()
            if not self._settle() and not waiting:  # a wait for acknowledgements already took its time
                self._back_off(stop)
            return
        if self.reload_requested.is_set() or self._rules_changed():
            self.reload_requested.clear()
            # the files read now are the watcher's reference: a SIGHUP reload is not followed by the watcher
            # loading (or refusing) the same files a second time
            self._rules_fingerprint = _fingerprint(self.monitor.rules.directory)
            self._watched_at = time.monotonic()
            self.reload_rules()
            return
        try:
            records = self.source.poll(int(self.settings.tick_seconds * 1000))
        except KafkaError as exc:
            self._no_answer("polling the events topic", exc, stop)
            return
        try:
            rebuilding = self._start_rebuilds()
        except (MonitorError, KafkaError) as exc:  # they stay newly assigned; retried at the next turn
            rebuilding = set(self.rebuild.newly_assigned)
            self._no_answer("starting the rebuild of newly assigned partitions", exc, None)
        if rebuilding:  # records fetched from the committed position are read again from the beginning
            records = [r for r in records if TopicPartition(r.topic, r.partition) not in rebuilding]
        self.step(records)

    def _no_answer(self, what: str, exc: Exception, stop: threading.Event | None) -> None:
        self.state.ready = False
        log.warning("Kafka broker at %s did not answer while %s (%s: %s); retrying in %.0f s — not ready",
                    self.settings.bootstrap_servers, what, type(exc).__name__, exc,
                    self.backoff.delay(self._retries))
        if stop is not None:
            self._back_off(stop)

    @property
    def backoff(self) -> Backoff:
        """The wait while the broker does not answer or acknowledge: `retry_base_s` doubling up to `retry_max_s`."""
        return Backoff(base_s=self.retry_base_s, max_s=self.retry_max_s)

    def _back_off(self, stop: threading.Event) -> None:
        self.backoff.wait(self._retries, stop)
        self._retries += 1


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
    monitor = Monitor.create(rules=rules, clock=clock, max_events_per_subject=settings.max_events_per_subject)
    log.info("rules version %s loaded (%d rules) in %.1f s", rules.version, len(rules.rules),
             time.monotonic() - started)
    if settings.input_format == "fhir":  # a broken FHIR code map refuses the start, like a broken rule file
        from monitor.fhir import code_map_path, load_code_map

        load_code_map(code_map_path(settings.fhir_codes, settings.rules))
    store = None
    if settings.store:
        from monitor.store import AlertStore

        try:  # the audit trail says which rules were in force: the service does not run rules it cannot record
            store = AlertStore(url=settings.store)
            store.record_rules_loaded(version=rules.version, directory=str(rules.directory), rules=len(rules.rules),
                                      actor=f"{settings.client_id}@{settings.group_id}")
        except MonitorError as exc:
            log.error("not starting: the audit trail cannot record rules version %s, so nothing is consumed "
                      "(alerts wait on the events topic). %s", rules.version, exc)
            raise
    metrics = Metrics(registry=CollectorRegistry())
    metrics.rules.info({"version": rules.version})
    service = MonitorService(settings=settings, monitor=monitor, clock=clock, alerts=None,  # type: ignore[arg-type]
                             dead_letters=None, published=set(),  # type: ignore[arg-type]
                             on_alert=on_alert, refresh_published=lambda: published_alerts(settings=settings),
                             metrics=metrics)
    service.audit_store = store
    if rules.kri is not None:
        from monitor.kri import IntakeTally, KriMetrics, SiteRisk, timings_from_store

        service.site_risk = SiteRisk(spec=rules.kri, intake=IntakeTally(), metrics=KriMetrics(registry=metrics.registry),
                                     interval_s=settings.kri_interval_seconds, raise_alerts=settings.qtl_alerts,
                                     store_alerts=(lambda: timings_from_store(store)) if store is not None else None)
    if settings.metrics_port:  # up before Kafka: /healthz answers, /readyz says "not ready" while we connect
        service.metrics_server = HealthServer(registry=metrics.registry, host=settings.metrics_host,
                                              port=settings.metrics_port, ready=lambda: service.state.ready).start()
        log.info("metrics on http://%s:%d/metrics (and /healthz, /readyz)", settings.metrics_host,
                 settings.metrics_port)
    service.outbox.alerts = connect_with_backoff("alerts producer", lambda: KafkaAlertSink(settings=settings), settings=settings,
                              stop=stop)
    service.outbox.dead_letters = connect_with_backoff("dead-letter producer", lambda: KafkaDeadLetterSink(settings=settings),
                                    settings=settings, stop=stop)
    service.attach(connect_with_backoff("events consumer", lambda: KafkaEventSource(
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
    except StoppedWhileConnecting:
        log.info("stopped before the broker answered")
        raise SystemExit(0) from None
    if on_ready is not None:
        on_ready(service)
    try:
        service.run(stop)
    finally:
        service.close()
    return service

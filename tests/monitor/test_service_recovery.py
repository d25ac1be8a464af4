"""Recovery in the crash window: an owner published alerts for records it never committed, then died. The next
owner loads the committed history quietly, evaluates it once, then processes the uncommitted tail batch by batch.
Whatever the committed offset, the alerts topic must end in the state of a clean run (the same open alerts), with
no (alert_id, status) record twice. An in-memory partition stands in for Kafka (the real-broker SIGKILL test is
tests/connectors/test_kafka_recovery.py)."""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest

from connectors.base import RawRecord
from connectors.kafka_alerts import PublishedAlerts
from monitor.clock import ReplayClock
from monitor.config import Settings
from monitor.evaluator import Monitor
from monitor.rules import load_rules
from monitor.service import MonitorService
from tests.conftest import SHARED, load_scenario
from tests.monitor.test_service import TP, Topic
from tests.support.services import stream_service

SCENARIOS = ("21_late_dose_record_retracts_alert.jsonl", "06_overdose_above_8mgkg.jsonl",
             "04_missed_escalation_h12.jsonl")


class Partition:
    """One partition, read one record per poll; it has a committed offset and can be read from the beginning."""

    def __init__(self, records: list[RawRecord], committed: int, per_poll: int = 1) -> None:
        self.records, self._committed, self.pos, self.per_poll = records, committed, committed, per_poll
        self.commits: list[int] = []

    def poll(self, timeout_ms: int) -> list[RawRecord]:
        out = self.records[self.pos:self.pos + self.per_poll]
        self.pos += len(out)
        return out

    def commit(self, offsets) -> None:
        if offsets:
            self.commits.append(offsets[TP])

    def committed(self, tp) -> int:
        return self._committed

    def end_offsets(self, tps) -> dict:
        return {tp: len(self.records) for tp in tps}

    def seek_to_beginning(self, tps) -> None:
        self.pos = 0

    def assignment(self) -> set:
        return {TP}

    def lag(self) -> dict:
        return {TP: len(self.records) - self.pos}


def read_back(topic: Topic) -> PublishedAlerts:
    """What `published_alerts` reads back from Kafka, commit positions (record headers there) included."""
    seen = PublishedAlerts()
    for a in topic.records:
        seen.record((a.alert_id, a.status), a.subject_id, json.loads(a.model_dump_json()), a.commit_position)
    return seen.finish()


def pairs(topic: Topic) -> set[tuple[str, str]]:
    return {(a.alert_id, a.status) for a in topic.records}


def records() -> list[RawRecord]:
    out: list[RawRecord] = []
    for name in SCENARIOS:
        path = SHARED / "scenarios" / name
        if not path.is_file():
            pytest.skip("published scenarios not found")
        out += [RawRecord(value=json.dumps(e).encode(), origin="", topic="events", partition=0, offset=0,
                          timestamp_ms=None) for e in load_scenario(path)[1]]
    out.sort(key=lambda r: json.loads(r.value)["recorded_at"])
    return [RawRecord(value=r.value, origin=f"events/0@{i}", topic="events", partition=0, offset=i,
                      timestamp_ms=None) for i, r in enumerate(out)]


def run(partition: Partition, topic: Topic, rules) -> None:
    """A new owner takes the partition and processes it to its end."""
    svc = stream_service(alerts=topic, dead_letters=Topic(), rules=rules, refresh_published=lambda: read_back(topic))
    svc.attach(partition)
    svc.on_assigned([TP])
    stop = threading.Event()
    for _ in range(len(partition.records) * 3 + 10):
        svc.run_once(stop)
        if partition.pos >= len(partition.records) and svc.state.ready:
            break
    assert svc.state.ready


def final_open(topic: Topic) -> Counter:
    return Counter((r["rule"], r["subject_id"], r["at"]) for r in read_back(topic).open.values())


def test_whatever_the_committed_offset_the_topic_ends_as_a_clean_run():
    rules = load_rules()
    recs = records()
    clean = Topic()
    run(Partition(recs, committed=0), clean, rules)
    want = final_open(clean)
    assert want and any(a.status == "retracted" for a in clean.records)
    for crashed_at in (len(recs) // 2, len(recs)):
        first = Topic()  # the crashed owner published everything up to crashed_at ...
        run(Partition(recs[:crashed_at], committed=0), first, rules)
        for committed in range(0, crashed_at + 1, 3):  # ... but committed only up to `committed`
            topic = Topic()
            topic.records = list(first.records)
            run(Partition(recs, committed=committed), topic, rules)
            twice = [k for k, n in Counter((a.alert_id, a.status) for a in topic.records).items() if n > 1]
            assert not twice, f"crash at {crashed_at}, committed {committed}: published twice {twice}"
            # the new owner reads the same records in the same polls as the crashed one: it derives the very alerts
            # the crashed owner published past its commit, under the same ids, and publishes none of them again
            assert pairs(topic) == pairs(clean), (
                f"crash at {crashed_at}, committed {committed}: extra {sorted(pairs(topic) - pairs(clean))}, "
                f"missing {sorted(pairs(clean) - pairs(topic))}")
            if crashed_at == len(recs):
                assert len(topic.records) == len(first.records), f"committed {committed}: published again"
            assert final_open(topic) == want, (
                f"crash at {crashed_at}, committed {committed}: open {sorted(final_open(topic))} "
                f"!= clean {sorted(want)}")


def test_a_new_owner_polling_otherwise_ends_as_a_clean_run():
    """The new owner reads the crashed owner's uncommitted records in other polls (batches split elsewhere): where
    its pass goes otherwise, the topic is corrected once those records are read (`Monitor.settle`); nothing is
    published twice and the open alerts on the topic are the clean run's and the new owner's own."""
    rules = load_rules()
    recs = records()
    clean = Topic()
    run(Partition(recs, committed=0), clean, rules)
    want = final_open(clean)
    first = Topic()
    run(Partition(recs, committed=0), first, rules)
    for per_poll in (2, 5, 9):
        for committed in range(0, len(recs), 7):
            topic = Topic()
            topic.records = list(first.records)
            run(Partition(recs, committed=committed, per_poll=per_poll), topic, rules)
            twice = [k for k, n in Counter((a.alert_id, a.status) for a in topic.records).items() if n > 1]
            assert not twice, f"{per_poll} per poll, committed {committed}: published twice {twice}"
            assert final_open(topic) == want, f"{per_poll} per poll, committed {committed}"


def test_where_the_second_pass_goes_otherwise_the_topic_is_corrected_once_past_the_crashed_owners_records():
    """A crashed owner's uncommitted records gave it an alert the new owner's pass never derives, and a withdrawal
    of one the new owner still holds (as a batch split elsewhere across polls can do): once past those records the
    new owner withdraws the first and raises the second again under a new id; nothing twice, the clean run's open
    conditions."""
    rules = load_rules()
    recs = records()
    clean = Topic()
    run(Partition(recs, committed=0), clean, rules)
    want = final_open(clean)
    committed = len(recs) // 2
    still_open = read_back(clean).open
    tail = [a for a in clean.records if a.commit_position[1] > committed + 1]
    held = next(a for a in tail if a.status == "raised" and a.alert_id in still_open)
    ghost = held.model_copy(update={"alert_id": "0" * 24})
    topic = Topic()
    topic.records = [a for a in clean.records if a.commit_position[1] <= committed + 1]
    topic.records += [ghost, held.model_copy(update={"status": "retracted", "retracts": held.alert_id})]
    topic.records += [a for a in tail if a not in topic.records]
    run(Partition(recs, committed=committed), topic, rules)
    twice = [k for k, n in Counter((a.alert_id, a.status) for a in topic.records).items() if n > 1]
    assert not twice, f"published twice {twice}"
    assert ("0" * 24, "retracted") in pairs(topic), "an alert the second pass does not hold stayed open"
    again = [a for a in topic.records[len(clean.records) + 2:] if a.status == "raised"]
    assert [(a.rule, a.subject_id, a.at) for a in again] == [(held.rule, held.subject_id, held.at)]
    assert again[0].alert_id != held.alert_id
    assert final_open(topic) == want


def test_an_open_alert_the_committed_state_does_not_hold_is_withdrawn_once():
    """Open on the topic, published for committed records, not held by the state at the commit: withdrawn at the
    rebuild's end, and not a second time when the partition settles in the same batch."""
    rules = load_rules()
    recs = records()
    clean = Topic()
    run(Partition(recs, committed=0), clean, rules)
    committed = len(recs) // 2
    some = next(a for a in clean.records if a.status == "raised")
    ghost = some.model_copy(update={"alert_id": "1" * 24, "commit_position": (0, 1)})
    topic = Topic()
    topic.records = [ghost] + [a for a in clean.records if a.commit_position[1] <= committed]  # all committed
    run(Partition(recs, committed=committed), topic, rules)
    assert [a.status for a in topic.records if a.alert_id == ghost.alert_id] == ["raised", "retracted"]
    assert not [k for k, n in Counter((a.alert_id, a.status) for a in topic.records).items() if n > 1]


class LowEndPartition(Partition):
    """A broker whose ListOffsets answers below the true end (ENGINE_NOTES: Tansu answers the last batch's first
    offset + 1), here even below the group's committed offset."""

    def end_offsets(self, tps) -> dict:
        return {tp: max(0, self._committed - 26) for tp in tps}

    def highwater(self, tp) -> int:  # the fetch responses' high watermark is right
        return len(self.records)


def test_a_low_end_offset_never_commits_backwards_nor_makes_the_rebuild_ready_early():
    """Issue 16: with the rebuild boundary taken from ListOffsets, an instance committed 3338 -> 3312, became ready
    mid-rebuild, forgot what it had published and re-raised every open alert under the same id."""
    rules = load_rules()
    recs = records()
    clean = Topic()
    run(Partition(recs, committed=0), clean, rules)
    committed = len(recs) - 5
    topic = Topic()
    topic.records = [a for a in clean.records]  # the previous owner published everything, committed `committed`
    partition = LowEndPartition(recs, committed=committed)
    svc = stream_service(alerts=topic, dead_letters=Topic(), rules=rules, refresh_published=lambda: read_back(topic))
    svc.attach(partition)
    svc.on_assigned([TP])
    stop = threading.Event()
    ready_at = None
    for _ in range(len(recs) * 3 + 10):
        svc.run_once(stop)
        if svc.state.ready and ready_at is None:
            ready_at = partition.pos
        if partition.pos >= len(recs) and svc.state.ready:
            break
    assert ready_at is not None and ready_at >= committed, f"ready at offset {ready_at}, before the rebuild's end"
    assert all(c > committed for c in partition.commits), f"committed below {committed}: {partition.commits}"
    assert partition.commits == sorted(partition.commits), f"committed backwards: {partition.commits}"
    assert not [k for k, n in Counter((a.alert_id, a.status) for a in topic.records).items() if n > 1]
    assert len(topic.records) == len(clean.records), "a restart into a published state published something"
    assert final_open(topic) == final_open(clean)


class EmptyPartition(Partition):
    def poll(self, timeout_ms: int) -> list[RawRecord]:
        return []


def test_an_instance_assigned_an_empty_partition_becomes_ready():
    rules = load_rules()
    clock = ReplayClock()
    svc = MonitorService(settings=Settings(clock="stream", rules_watch_seconds=0), clock=clock, alerts=Topic(),
                         dead_letters=Topic(), monitor=Monitor.create(rules=rules, clock=clock), published=set(),
                         refresh_published=lambda: read_back(Topic()))
    svc.attach(EmptyPartition([], committed=0))
    svc.on_assigned([TP])
    svc.run_once(threading.Event())
    assert svc.state.ready

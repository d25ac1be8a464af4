"""Alert identity across withdrawals and restarts (issue 16): a consumer that deduplicates on (alert_id, status)
keeps every raise, and a restart into a state already published publishes nothing for it."""

from __future__ import annotations

from connectors.kafka_alerts import PublishedAlerts
from monitor.alerts import AlertBook, alert_id
from monitor.facts import Fact
from monitor.rules import load_rules

AT = "2025-01-01T00:00:00+00:00"


def _setup():
    rules = load_rules().rules
    rule_id = sorted(rules)[0]
    fact = Fact("adverse_event", "1", {"at": AT})
    return rules, rule_id, {fact.fact_id: fact}, (rule_id, fact.fact_id)


def _reconcile(book, rules, facts, matches):
    return book.reconcile(subject_id="S", site_id="X", matches=matches, facts=facts, rules=rules, detected_at=AT,
                          version="v")


def test_a_withdrawal_then_a_raise_of_the_same_condition_gets_a_new_id():
    rules, rule_id, facts, match = _setup()
    book = AlertBook()
    first = _reconcile(book, rules, facts, {match})
    withdrawn = _reconcile(book, rules, facts, set())
    again = _reconcile(book, rules, facts, {match})
    assert [a.status for a in first + withdrawn + again] == ["raised", "retracted", "raised"]
    assert withdrawn[0].alert_id == first[0].alert_id
    assert again[0].alert_id != first[0].alert_id


def test_after_a_restart_the_occurrences_continue_those_on_the_topic_even_once_the_service_forgets_them():
    """The service drops its copy of the topic's pairs once ready (memory); the book keeps each adopted subject's
    own pairs, so a later raise never reuses an id raised (and withdrawn) before the restart."""
    rules, rule_id, facts, match = _setup()
    key = (rule_id, "S", match[1])
    topic = PublishedAlerts()
    for n in range(2):  # two earlier occurrences, each raised and withdrawn
        topic.note((alert_id(*key, n), "raised"), "S")
        topic.note((alert_id(*key, n), "retracted"), "S")
    book = AlertBook()
    book.adopt(subject_id="S", site_id="X", matches=set(), facts=facts, rules=rules, published=topic,
               open_alerts=[], detected_at=AT, version="v")
    assert _reconcile(book, rules, facts, set()) == []
    topic.clear()
    topic.by_subject.clear()  # the service forgot the read-back
    raised = _reconcile(book, rules, facts, {match})
    assert [a.alert_id for a in raised] == [alert_id(*key, 2)]


def test_a_restart_into_a_published_open_alert_claims_it_and_publishes_nothing():
    """The previous owner raised the alert in records after its last commit; the new owner, rebuilt up to the
    commit, does not match it yet: it neither withdraws it nor raises it again when the records come."""
    rules, rule_id, facts, match = _setup()
    book = AlertBook()
    published = _reconcile(AlertBook(), rules, facts, {match})[0]
    topic = PublishedAlerts()
    topic.note((published.alert_id, "raised"), "S")
    book.adopt(subject_id="S", site_id="X", matches=set(), facts=facts, rules=rules, published=topic,
               open_alerts=[published], detected_at=AT, version="v", settling=True)
    assert _reconcile(book, rules, facts, set()) == []  # not withdrawn while the tail is read
    assert _reconcile(book, rules, facts, {match}) == []  # claimed: nothing published twice
    assert book.settle("S") is False
    assert [a.alert_id for a in book.open_alerts("S")] == [published.alert_id]


def test_an_open_alert_no_record_claims_is_withdrawn_once_the_partition_is_settled():
    rules, rule_id, facts, match = _setup()
    book = AlertBook()
    published = _reconcile(AlertBook(), rules, facts, {match})[0]
    topic = PublishedAlerts()
    topic.note((published.alert_id, "raised"), "S")
    book.adopt(subject_id="S", site_id="X", matches=set(), facts=facts, rules=rules, published=topic,
               open_alerts=[published], detected_at=AT, version="v", settling=True)
    assert _reconcile(book, rules, facts, set()) == []
    assert book.settle("S") is True
    out = _reconcile(book, rules, facts, set())
    assert [(a.status, a.alert_id) for a in out] == [("retracted", published.alert_id)]

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


def _tail_topic(published, *, retracted=False):
    """The topic after a crashed owner published `published` for records past its commit (offset 10 of events
    partition 0), committed at 5."""
    topic = PublishedAlerts()
    topic.record((published.alert_id, "raised"), "S", published.model_dump(), (0, 10))
    if retracted:
        topic.record((published.alert_id, "retracted"), "S", None, (0, 10))
    return topic.finish()


def test_a_restart_into_a_published_open_alert_derives_it_again_under_its_id():
    """The previous owner raised the alert in records after its last commit; the new owner, rebuilt up to the
    commit, neither withdraws it nor numbers it anew: reading those records again derives the same id (which the
    service then does not publish twice), and settling finds nothing to change."""
    rules, rule_id, facts, match = _setup()
    published = _reconcile(AlertBook(), rules, facts, {match})[0]
    topic = _tail_topic(published)
    view = topic.as_of(0, 5)
    assert view.for_subject("S") == set() and view.open_for("S") == []
    assert topic.as_of(0, 10).open_for("S") == [published.model_dump()]
    assert topic.after(0, 5) == 10 and topic.after(0, 10) is None and topic.after(1, 5) is None
    book = AlertBook()
    book.adopt(subject_id="S", site_id="X", matches=set(), facts=facts, rules=rules, published=view,
               open_alerts=[], detected_at=AT, version="v")
    assert _reconcile(book, rules, facts, set()) == []  # not withdrawn
    again = _reconcile(book, rules, facts, {match})
    assert [(a.status, a.alert_id) for a in again] == [("raised", published.alert_id)]
    assert book.settle("S", seen=topic.for_subject("S"), on_topic=topic, topic_open=[published]) is False
    assert [a.alert_id for a in book.open_alerts("S")] == [published.alert_id]


def test_an_open_alert_the_second_pass_does_not_derive_is_withdrawn_once_settled():
    rules, rule_id, facts, match = _setup()
    published = _reconcile(AlertBook(), rules, facts, {match})[0]
    topic = _tail_topic(published)
    book = AlertBook()
    book.adopt(subject_id="S", site_id="X", matches=set(), facts=facts, rules=rules, published=topic.as_of(0, 5),
               open_alerts=[], detected_at=AT, version="v")
    assert _reconcile(book, rules, facts, set()) == []
    assert book.settle("S", seen=topic.for_subject("S"), on_topic=topic, topic_open=[published]) is True
    out = _reconcile(book, rules, facts, set())
    assert [(a.status, a.alert_id) for a in out] == [("retracted", published.alert_id)]
    assert _reconcile(book, rules, facts, {match})[0].alert_id != published.alert_id  # a later return: a new id


def test_an_alert_the_topic_shows_withdrawn_but_the_second_pass_holds_is_raised_again_under_a_new_id():
    """The crashed owner raised and withdrew the alert past its commit; the second pass (polls split otherwise)
    raised it and still holds it: a consumer would see it closed, so it is raised again, under a new id."""
    rules, rule_id, facts, match = _setup()
    published = _reconcile(AlertBook(), rules, facts, {match})[0]
    topic = _tail_topic(published, retracted=True)
    book = AlertBook()
    book.adopt(subject_id="S", site_id="X", matches=set(), facts=facts, rules=rules, published=topic.as_of(0, 5),
               open_alerts=[], detected_at=AT, version="v")
    assert [a.alert_id for a in _reconcile(book, rules, facts, {match})] == [published.alert_id]  # not published
    assert book.settle("S", seen=topic.for_subject("S"), on_topic=topic, topic_open=[]) is True
    out = _reconcile(book, rules, facts, {match})
    assert [a.status for a in out] == ["raised"] and out[0].alert_id not in {published.alert_id}
    assert (out[0].alert_id, "raised") not in topic

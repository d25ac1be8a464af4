"""The inbox over HTTP (Starlette's test client, no browser): security headers, CSRF, sign-in lockout and rate
limit, idle expiry, site fences on lists, counts, CSV and direct URLs, roles, electronic signatures and the audit
trail, on alerts produced by replaying published scenarios."""

from __future__ import annotations

import csv
import io
import re
import time

import pytest
from starlette.testclient import TestClient

from monitor.config import load_settings
from monitor.store import AlertStore
from monitor.web.app import build_app
from tests.web.inboxtools import PASSWORDS, fill

REGISTRY = None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inbox")
    url, events = fill(tmp)
    return url, events


def make_app(url, events, **web):
    settings = load_settings(overrides={"store": url})
    settings.web = settings.web.model_copy(update={"events": [str(events)], **web})
    return build_app(settings)


@pytest.fixture()
def app(world):
    url, events = world
    return make_app(url, events)


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def sign_in(client: TestClient, username: str, password: str | None = None):
    page = client.get("/signin")
    return client.post("/signin", data={"csrf": csrf_of(page.text), "username": username,
                                        "password": password if password is not None else PASSWORDS[username]},
                       follow_redirects=False)


def client_for(app, username: str) -> TestClient:
    client = TestClient(app, base_url="http://127.0.0.1")
    assert sign_in(client, username).status_code == 303
    return client


def h12_alert(url: str) -> dict:
    store = AlertStore(url=url)
    rows = store.inbox(sites=None, rule="DOSE-H12-MISSED-ESCALATION")
    store.close()
    return rows[0]


def test_security_headers_on_pages_and_no_inline_script(app):
    client = client_for(app, "dr.officer")
    for path in ("/signin", "/", "/inbox/live", "/inbox.csv", "/subjects/ANA-004"):
        r = client.get(path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["x-content-type-options"] == "nosniff"
        if path != "/inbox.csv":
            assert not re.search(r"<script(?![^>]*\bsrc=\"/static/)", r.text), "inline script"
            assert " style=" not in r.text and "<style" not in r.text and " on" + "click" not in r.text
    static = client.get("/static/inbox.js")
    assert static.status_code == 200 and "no-store" not in static.headers["cache-control"]


def test_session_cookie_is_signed_httponly_samesite(app):
    client = TestClient(app, base_url="http://127.0.0.1")
    r = sign_in(client, "dr.officer")
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and "Path=/" in cookie
    # a tampered cookie is no session
    value = client.cookies.get("pm_session")
    client.cookies.set("pm_session", value[:-2] + ("AA" if not value.endswith("AA") else "BB"))
    assert client.get("/", follow_redirects=False).status_code == 303


def test_forms_without_their_csrf_token_are_refused(app, world):
    url, _ = world
    client = client_for(app, "dr.officer")
    alert = h12_alert(url)
    before = len(AlertStore(url=url).audit_entries())
    for data in ({"action": "acknowledge", "password": PASSWORDS["dr.officer"]},
                 {"action": "acknowledge", "password": PASSWORDS["dr.officer"], "csrf": "forged"}):
        r = client.post(f"/alerts/{alert['alert_id']}", data=data, follow_redirects=False)
        assert r.status_code == 403
    assert client.post("/signout", data={}).status_code == 403
    anonymous = TestClient(app, base_url="http://127.0.0.1")
    anonymous.get("/signin")
    assert anonymous.post("/signin", data={"username": "dr.officer", "password": PASSWORDS["dr.officer"]},
                          follow_redirects=False).status_code == 403
    assert AlertStore(url=url).get(alert["alert_id"])["state"] == "raised"
    assert len(AlertStore(url=url).audit_entries()) == before


def test_repeated_failed_signins_lock_the_account(world):
    url, events = world
    app = make_app(url, events, max_failed_signins=3, lockout_minutes=5)
    store = AlertStore(url=url)
    from monitor.web.passwords import hash_password
    store.add_user(username="locky", printed_name="L", role="viewer", sites=[], password_hash=hash_password(
        "the-right-password"), actor="test")
    client = TestClient(app, base_url="http://127.0.0.1")
    for _ in range(3):
        assert sign_in(client, "locky", "wrong-password!").status_code == 401
    assert AlertStore(url=url).get_user("locky")["locked_until"]
    r = sign_in(client, "locky", "the-right-password")
    assert r.status_code == 401 and "locked" in r.text
    assert "user_locked" in [e.action for e in AlertStore(url=url).audit_entries()]


def test_signin_is_rate_limited_per_address(world):
    url, events = world
    app = make_app(url, events, signin_attempts_per_minute=4)
    client = TestClient(app, base_url="http://127.0.0.1")
    codes = [sign_in(client, "nobody", "whatever-at-all").status_code for _ in range(6)]
    assert codes[:4] == [401] * 4 and codes[4:] == [429, 429]


def test_idle_sessions_expire(world):
    url, events = world
    app = make_app(url, events, session_idle_minutes=0.05)  # 3 s
    client = client_for(app, "viewer")
    assert client.get("/", follow_redirects=False).status_code == 200
    time.sleep(3.5)
    assert client.get("/", follow_redirects=False).headers["location"] == "/signin"


def test_polling_does_not_keep_a_session_alive(world):
    url, events = world
    app = make_app(url, events, session_idle_minutes=0.05)  # 3 s
    client = client_for(app, "viewer")
    for _ in range(5):
        time.sleep(0.8)
        client.get("/inbox/live")
    assert client.get("/inbox/live").status_code == 401


def test_site_monitor_sees_only_their_sites(app, world):
    url, _ = world
    alert = h12_alert(url)
    assert alert["site_id"] == "FR-BIC-01"
    officer = client_for(app, "dr.officer")
    toulouse = client_for(app, "cra.toulouse")
    everything = officer.get("/").text
    assert 'data-site="FR-BIC-01"' in everything and 'data-site="FR-TLS-03"' in everything
    mine = toulouse.get("/").text
    assert 'data-site="FR-TLS-03"' in mine and "FR-BIC-01" not in mine and alert["alert_id"] not in mine
    assert "FR-BIC-01" not in toulouse.get("/inbox/live").text
    forced = toulouse.get("/?site=FR-BIC-01").text
    assert 'data-site="FR-BIC-01"' not in forced and "alert-row" not in forced
    assert toulouse.get(f"/alerts/{alert['alert_id']}").status_code == 404
    assert toulouse.get("/alerts/does-not-exist").status_code == 404
    assert toulouse.get("/subjects/ANA-004").status_code == 404
    assert toulouse.get("/subjects/ANA-030").status_code == 200
    rows = list(csv.DictReader(io.StringIO(toulouse.get("/inbox.csv").text)))
    assert rows and {r["site_id"] for r in rows} == {"FR-TLS-03"}
    rows = list(csv.DictReader(io.StringIO(toulouse.get("/inbox.csv?site=FR-BIC-01").text)))
    assert rows == []
    all_rows = list(csv.DictReader(io.StringIO(officer.get("/inbox.csv").text)))
    assert {r["site_id"] for r in all_rows} == {"FR-BIC-01", "FR-TLS-03"}
    # a site monitor may comment on their own site's alerts only
    r = toulouse.post(f"/alerts/{alert['alert_id']}", data={
        "csrf": csrf_of(toulouse.get("/").text), "action": "comment", "text": "x",
        "password": PASSWORDS["cra.toulouse"]})
    assert r.status_code == 404


def test_inbox_order_filters_and_withdrawn(app, world):
    url, _ = world
    client = client_for(app, "dr.officer")
    rows = list(csv.DictReader(io.StringIO(client.get("/inbox.csv").text)))
    states = [r["state"] for r in rows]
    first_closed = next((i for i, s in enumerate(states) if s not in ("raised", "acknowledged")), len(states))
    assert all(s not in ("raised", "acknowledged") for s in states[first_closed:])
    rank = {"critical": 0, "major": 1, "minor": 2, "info": 3}
    open_rows = rows[:first_closed]
    assert [(rank[r["severity"]], r["at_utc"]) for r in open_rows] == sorted(
        (rank[r["severity"]], r["at_utc"]) for r in open_rows)
    withdrawn = [r for r in rows if r["withdrawn"] == "yes"]
    assert withdrawn, "scenario 21 withdraws an alert"
    html = client.get("/?state=withdrawn").text
    assert 'class="badge withdrawn"' in html
    only = list(csv.DictReader(io.StringIO(client.get("/inbox.csv?rule=DOSE-H12-MISSED-ESCALATION").text)))
    assert {r["rule"] for r in only} == {"DOSE-H12-MISSED-ESCALATION"}
    assert all(r["subject_id"] == "ANA-030" for r in csv.DictReader(io.StringIO(
        client.get("/inbox.csv?subject=ANA-030").text)))
    assert list(csv.DictReader(io.StringIO(client.get("/inbox.csv?days_open=3").text))) == []
    assert "2025-02-10 23:30 +01:00" in client.get("/").text  # site time with its offset


def test_viewer_reads_only(app, world):
    url, _ = world
    alert = h12_alert(url)
    viewer = client_for(app, "viewer")
    page = viewer.get(f"/alerts/{alert['alert_id']}")
    assert page.status_code == 200 and 'id="form-close"' not in page.text
    r = viewer.post(f"/alerts/{alert['alert_id']}", data={"csrf": csrf_of(page.text), "action": "close",
                                                          "reason": "not a deviation",
                                                          "password": PASSWORDS["viewer"]})
    assert r.status_code == 403


def test_signed_actions_wrong_password_and_audit(app, world):
    url, _ = world
    alert = h12_alert(url)
    aid = alert["alert_id"]
    client = client_for(app, "dr.officer")
    page = client.get(f"/alerts/{aid}")
    token = csrf_of(page.text)
    before = len(AlertStore(url=url).audit_entries())
    r = client.post(f"/alerts/{aid}", data={"csrf": token, "action": "close", "reason": "not a deviation",
                                            "password": "not-my-password"})
    assert r.status_code == 400 and "nothing was signed" in r.text
    store = AlertStore(url=url)
    assert store.get(aid)["state"] == "raised" and len(store.audit_entries()) == before
    steps = [({"action": "acknowledge", "text": "looking"}, "acknowledged"),
             ({"action": "assign", "assignee": "cra.bicetre"}, "assigned to cra.bicetre"),
             ({"action": "comment", "text": "asked the site"}, "commented"),
             ({"action": "close", "reason": "deviation confirmed: reported to the sponsor", "text": "PD-17"},
              "closed: deviation confirmed: reported to the sponsor"),
             ({"action": "reopen", "text": "new data"}, "re-opened")]
    for data, meaning in steps:
        r = client.post(f"/alerts/{aid}", data={"csrf": token, "password": PASSWORDS["dr.officer"], **data})
        assert r.status_code == 200 and meaning in r.text, (data, r.text[-800:])
        assert "Dr Olivia Officer" in r.text
    store = AlertStore(url=url)
    assert store.get(aid)["state"] == "raised" and store.get(aid)["assignee"] == "cra.bicetre"
    signed = [e for e in store.audit_entries() if e.action.endswith("_signed")]
    assert [e.data["meaning"] for e in signed[-5:]] == [m for _, m in steps]
    assert all(e.data["printed_name"] == "Dr Olivia Officer" and e.actor == "dr.officer" for e in signed[-5:])
    assert store.verify_audit() == []
    # closing needs a reason from the list
    r = client.post(f"/alerts/{aid}", data={"csrf": token, "password": PASSWORDS["dr.officer"], "action": "close",
                                            "reason": "because"})
    assert r.status_code == 409 and AlertStore(url=url).get(aid)["state"] == "raised"
    # the bicetre monitor was assigned and may comment on it
    bic = client_for(app, "cra.bicetre")
    page = bic.get(f"/alerts/{aid}")
    assert 'id="form-comment"' in page.text and 'id="form-close"' not in page.text
    r = bic.post(f"/alerts/{aid}", data={"csrf": csrf_of(page.text), "action": "comment", "text": "site replied",
                                         "password": PASSWORDS["cra.bicetre"]})
    assert r.status_code == 200 and "Beatrice Bicetre" in r.text


def test_subject_chart_explains_the_h12_alert(app, world):
    url, _ = world
    alert = h12_alert(url)
    client = client_for(app, "dr.officer")
    html = client.get("/subjects/ANA-004").text
    svg = html[html.index("<svg"):html.index("</svg>")]
    for marker in ("T0", "H12", "H24", "H48"):
        assert f'data-marker="{marker}"' in svg
    assert 'data-window="H12"' in svg and 'data-threshold="febrile"' in svg
    assert 'class="reading febrile" data-event="ANA-004-E019"' in svg  # the febrile H12 reading
    assert svg.count('class="dose"') >= 2 and 'data-ladder="8"' in svg
    assert 'class="ivig"' in svg
    for threshold in ("ANC", "ANC-on-treatment", "eGFR", "liver"):
        assert f'data-threshold="{threshold}"' in svg
    assert 'data-analyte="ANC"' in svg and 'data-analyte="eGFR"' in svg and 'data-analyte="ALT"' in svg
    assert f'href="/alerts/{alert["alert_id"]}"' in svg
    assert "timeline-event" in html and "timeline-alert" in html


def test_streamed_evidence_shows_its_kafka_topic_partition_and_offset(app, world):
    url, _ = world
    store = AlertStore(url=url)
    alert = store.record_for(h12_alert(url)["alert_id"], "raised")
    sources = {eid: {"topic": "clinical-events", "partition": 3, "offset": 1200 + i}
               for i, eid in enumerate(alert.evidence["events"])}
    streamed = alert.model_copy(update={"alert_id": "streamed-h12", "evidence": {**alert.evidence,
                                                                                  "sources": sources}})
    store.add_record(streamed)
    html = client_for(app, "dr.officer").get("/alerts/streamed-h12").text
    table = html[html.index('id="evidence-events"'):]
    table = table[:table.index("</table>")]
    assert "clinical-events/3/1200" in table and "clinical-events/3/1201" in table


def test_evidence_mapped_from_fhir_shows_the_resource_and_version(app, world):
    url, _ = world
    store = AlertStore(url=url)
    alert = store.record_for(h12_alert(url)["alert_id"], "raised")
    first = alert.evidence["events"][0]
    sources = {first: {"topic": "clinical-events", "partition": 1, "offset": 7, "fhir": "Observation/t1/_history/2",
                       "resource_type": "Observation", "resource_id": "t1", "version": "2"}}
    fhir = alert.model_copy(update={"alert_id": "fhir-h12", "evidence": {**alert.evidence, "sources": sources}})
    store.add_record(fhir)
    html = client_for(app, "dr.officer").get("/alerts/fhir-h12").text
    table = html[html.index('id="evidence-events"'):]
    table = table[:table.index("</table>")]
    assert "clinical-events/1/7" in table and "FHIR Observation/t1/_history/2" in table

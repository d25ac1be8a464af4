"""The inbox on a PostgreSQL alert store (Debian's server started by the test on 127.0.0.1): fences, counts, CSV,
a signed close and the audit trail, as on SQLite."""

from __future__ import annotations

import csv
import io

import pytest
from starlette.testclient import TestClient

from monitor.store import AlertStore
from tests.support.pgtools import requires_postgres
from tests.web.inboxtools import PASSWORDS, fill
from tests.web.test_inbox_http import client_for, csrf_of, make_app

pytest.importorskip("psycopg", reason="the postgres extra is not installed")
pytestmark = requires_postgres


def test_inbox_on_postgresql(pg, tmp_path):
    url, events = fill(tmp_path, pg.url)
    app = make_app(url, events)
    officer = client_for(app, "dr.officer")
    toulouse = client_for(app, "cra.toulouse")
    rows = list(csv.DictReader(io.StringIO(officer.get("/inbox.csv").text)))
    assert {r["site_id"] for r in rows} == {"FR-BIC-01", "FR-TLS-03"}
    assert [r["state"] for r in rows].index("withdrawn") > 0  # open first
    mine = list(csv.DictReader(io.StringIO(toulouse.get("/inbox.csv").text)))
    assert mine and {r["site_id"] for r in mine} == {"FR-TLS-03"}
    target = next(r for r in rows if r["rule"] == "DOSE-H12-MISSED-ESCALATION" and r["state"] == "raised")
    assert toulouse.get(f"/alerts/{target['alert_id']}").status_code == 404
    assert 'data-site="FR-BIC-01"' not in toulouse.get("/").text
    token = csrf_of(officer.get(f"/alerts/{target['alert_id']}").text)
    r = officer.post(f"/alerts/{target['alert_id']}", data={
        "csrf": token, "action": "close", "reason": "not a deviation", "password": PASSWORDS["dr.officer"]})
    assert r.status_code == 200 and "closed: not a deviation" in r.text and "Dr Olivia Officer" in r.text
    locked = TestClient(app, base_url="http://127.0.0.1")
    page = locked.get("/signin")
    for _ in range(5):
        locked.post("/signin", data={"csrf": csrf_of(page.text), "username": "viewer", "password": "wrong-one-x"})
    store = AlertStore(url=url)
    assert store.get(target["alert_id"])["state"] == "closed"
    assert store.get_user("viewer")["locked_until"]
    assert store.verify_audit() == []

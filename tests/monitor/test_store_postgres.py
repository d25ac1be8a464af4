"""The same lifecycle and audit trail on PostgreSQL (Debian's server started by the test on 127.0.0.1)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import SHARED, final_alerts, load_scenario, run_events
from tests.support.pgtools import requires_postgres

psycopg = pytest.importorskip("psycopg", reason="the postgres extra is not installed")
pytestmark = requires_postgres


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor", *args], capture_output=True, text=True, timeout=60)


def test_lifecycle_and_audit_on_postgresql(pg, tmp_path):
    from monitor.store import AlertStore

    header, events = load_scenario(SHARED / "scenarios" / "06_overdose_above_8mgkg.jsonl")
    alerts, _, _ = run_events(events, tmp_path=tmp_path)
    store = AlertStore(url=pg.url)
    for a in alerts:
        assert store.add_record(a, sinks=["webhook"]) is True
        assert store.add_record(a) is False
    store.close()
    target = final_alerts(alerts)[0].alert_id
    assert _cli("alerts", "ack", target, "--by", "dr.safety", "--store", pg.url).returncode == 0
    assert _cli("alerts", "close", target, "--by", "dr.safety", "--reason", "reported", "--store", pg.url).returncode == 0
    shown = json.loads(_cli("alerts", "show", target, "--store", pg.url).stdout)
    assert shown["state"] == "closed" and shown["closed_by"] == "dr.safety"
    assert "intact" in _cli("audit", "verify", "--store", pg.url).stdout
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute("UPDATE audit SET actor = 'someone.else' WHERE seq = 2")
    result = _cli("audit", "verify", "--store", pg.url)
    assert result.returncode == 1 and "entry 2 was altered" in result.stdout

"""The alert store's lifecycle and the audit trail's tamper evidence (SQLite; PostgreSQL in its own test)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from monitor.store import AlertStore, StoreError
from tests.conftest import SHARED, final_alerts, load_scenario, run_events


@pytest.fixture(scope="module")
def alerts(tmp_path_factory):
    header, events = load_scenario(SHARED / "scenarios" / "21_late_dose_record_retracts_alert.jsonl")
    _, more = load_scenario(SHARED / "scenarios" / "06_overdose_above_8mgkg.jsonl")
    out, _, _ = run_events(events + more, tmp_path=tmp_path_factory.mktemp("ev"))
    assert any(a.status == "retracted" for a in out) and final_alerts(out)
    return out


def filled(path, alerts) -> AlertStore:
    store = AlertStore(url=f"sqlite:///{path}")
    store.record_rules_loaded(version="abc", directory="rules", rules=47, actor="protocol-monitor")
    for a in alerts:
        store.add_record(a, sinks=["email"])
    return store


def test_records_are_idempotent_and_drive_the_lifecycle(tmp_path, alerts):
    store = filled(tmp_path / "a.db", alerts)
    for a in alerts:
        assert store.add_record(a) is False  # a redelivered record changes nothing
    withdrawn = next(a for a in alerts if a.status == "retracted")
    assert store.get(withdrawn.alert_id)["state"] == "withdrawn"
    live = final_alerts(alerts)[0]
    assert store.get(live.alert_id)["state"] == "raised"
    store.acknowledge(live.alert_id, by="dr.safety", reason="seen")
    with pytest.raises(StoreError, match="cannot be acknowledged"):
        store.acknowledge(live.alert_id, by="dr.safety")
    with pytest.raises(StoreError, match="reason"):
        store.close_alert(live.alert_id, by="dr.safety", reason=" ")
    store.close_alert(live.alert_id, by="dr.safety", reason="site retrained; deviation reported")
    got = store.get(live.alert_id)
    assert (got["state"], got["ack_by"], got["closed_by"]) == ("closed", "dr.safety", "dr.safety")
    assert got["record"]["rule"] == live.rule
    actions = [e.action for e in store.audit_entries()]
    assert actions[0] == "rules_loaded" and "alert_acknowledged" in actions and actions[-1] == "alert_closed"
    assert store.verify_audit() == []
    with pytest.raises(StoreError, match="no alert"):
        store.acknowledge("nope", by="x")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor", *args], capture_output=True, text=True, timeout=60)


def _audit(path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def test_audit_verify_detects_an_edited_entry(tmp_path, alerts):
    path = tmp_path / "edit.db"
    filled(path, alerts).close()
    assert _cli("audit", "verify", "--store", f"sqlite:///{path}").returncode == 0
    db = _audit(path)
    data = json.loads(db.execute("SELECT data FROM audit WHERE seq = 3").fetchone()[0])
    data["severity"] = "minor"  # someone downgrades an alert after the fact
    db.execute("UPDATE audit SET data = ? WHERE seq = 3", (json.dumps(data, sort_keys=True),))
    db.close()
    result = _cli("audit", "verify", "--store", f"sqlite:///{path}")
    assert result.returncode == 1 and "entry 3 was altered" in result.stdout


def test_audit_verify_detects_a_removed_entry(tmp_path, alerts):
    path = tmp_path / "remove.db"
    filled(path, alerts).close()
    db = _audit(path)
    db.execute("DELETE FROM audit WHERE seq = 4")
    db.close()
    result = _cli("audit", "verify", "--store", f"sqlite:///{path}")
    assert result.returncode == 1 and "4..4 were removed" in result.stdout


def test_audit_verify_detects_reordered_entries(tmp_path, alerts):
    path = tmp_path / "reorder.db"
    filled(path, alerts).close()
    db = _audit(path)
    db.execute("UPDATE audit SET seq = -1 WHERE seq = 3")
    db.execute("UPDATE audit SET seq = 3 WHERE seq = 4")
    db.execute("UPDATE audit SET seq = 4 WHERE seq = -1")
    db.close()
    result = _cli("audit", "verify", "--store", f"sqlite:///{path}")
    assert result.returncode == 1 and "out of order" in result.stdout
    assert "altered" not in result.stdout  # nothing was edited, only moved


def test_lifecycle_commands(tmp_path, alerts):
    path = tmp_path / "cli.db"
    filled(path, alerts).close()
    url = f"sqlite:///{path}"
    listed = _cli("alerts", "list", "--store", url, "--state", "raised")
    assert listed.returncode == 0 and "DOSE-MAX-EXCEEDED" in listed.stdout
    alert_id = next(line.split()[0] for line in listed.stdout.splitlines() if "DOSE-MAX-EXCEEDED" in line)
    assert _cli("alerts", "ack", alert_id, "--by", "dr.safety", "--store", url).returncode == 0
    closed = _cli("alerts", "close", alert_id, "--by", "dr.safety", "--reason", "reported to sponsor", "--store", url)
    assert closed.returncode == 0
    shown = json.loads(_cli("alerts", "show", alert_id, "--store", url).stdout)
    assert shown["state"] == "closed" and shown["close_reason"] == "reported to sponsor"
    again = _cli("alerts", "ack", alert_id, "--by", "dr.safety", "--store", url)
    assert again.returncode == 1 and "cannot be acknowledged" in again.stderr
    assert _cli("audit", "verify", "--store", url).returncode == 0

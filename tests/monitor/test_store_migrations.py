"""Versioned store migrations: a store created by the release before them (commit b514a41, kept verbatim in
tests/monitor/legacy/) upgrades in place on SQLite and PostgreSQL, keeping every record and audit entry, and the
audit trail still verifies; instants are sorted as instants, not as text with mixed offsets."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from monitor.alerts import Alert
from monitor.store import SCHEMA_VERSION, AlertStore, utc_instant
from tests.conftest import SHARED, load_scenario, run_events
from tests.support.pgtools import TempPostgres, requires_postgres

LEGACY = Path(__file__).parent / "legacy" / "store_b514a41.py"


def legacy_store_class():
    spec = importlib.util.spec_from_file_location("legacy_store_b514a41", LEGACY)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module.AlertStore


def scenario_alerts(tmp_path: Path) -> list[Alert]:
    out: list[Alert] = []
    for name in ("04_missed_escalation_h12.jsonl", "21_late_dose_record_retracts_alert.jsonl",
                 "30_rectal_and_nonprotocol_sites.jsonl"):
        header, events = load_scenario(SHARED / "scenarios" / name)
        sub = tmp_path / name
        sub.mkdir()
        alerts, _, _ = run_events(events, until=header.get("evaluation_horizon"), tmp_path=sub)
        out.extend(alerts)
    return out


def fill_legacy(url: str, alerts: list[Alert]) -> dict:
    old = legacy_store_class()(url=url)
    for a in alerts:
        old.add_record(a, sinks=["webhook"])
    old.record_rules_loaded(version="abc", directory="rules", rules=47, actor="protocol-monitor")
    raised = [a.alert_id for a in alerts if a.status == "raised"]
    withdrawn = {a.alert_id for a in alerts if a.status == "retracted"}
    open_ids = [a for a in raised if a not in withdrawn]
    old.acknowledge(open_ids[0], by="dr.legacy", reason="seen")
    old.close_alert(open_ids[1], by="dr.legacy", reason="not a deviation")
    before = {
        "entries": [(e.seq, e.hash) for e in old.audit_entries()],
        "alerts": {r["alert_id"]: (r["state"], r["at"]) for r in old.list(limit=10_000)},
        "acked": open_ids[0], "closed": open_ids[1],
    }
    assert old.verify_audit() == []
    old.close()
    return before


def check_upgraded(url: str, before: dict) -> AlertStore:
    store = AlertStore(url=url)
    assert store.schema_version() == SCHEMA_VERSION
    entries = store.audit_entries()
    assert [(e.seq, e.hash) for e in entries[:len(before["entries"])]] == before["entries"]
    assert [e.action for e in entries[len(before["entries"]):]] == ["store_migrated"]
    assert entries[-1].data["from_version"] == 1 and entries[-1].data["to_version"] == SCHEMA_VERSION
    assert store.verify_audit() == []
    now = {r["alert_id"]: (r["state"], r["at"]) for r in store.list(limit=10_000)}
    assert now == before["alerts"]
    acked = store.get(before["acked"])
    assert acked["ack_by"] == "dr.legacy" and acked["state"] == "acknowledged"
    assert acked["at_utc"] == utc_instant(acked["at"]) and acked["raised_at"]
    history = store.history(before["closed"])
    assert [h["action"] for h in history] == ["raised", "close"]
    # opening again applies nothing more
    store.close()
    store = AlertStore(url=url)
    assert [e.action for e in store.audit_entries()].count("store_migrated") == 1
    return store


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor", *args], capture_output=True, text=True, timeout=60)


def test_sqlite_store_of_the_previous_release_upgrades_in_place(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    before = fill_legacy(url, scenario_alerts(tmp_path))
    store = check_upgraded(url, before)
    store.close()
    result = cli("audit", "verify", "--store", url)
    assert result.returncode == 0 and "intact" in result.stdout


def test_a_new_store_starts_at_the_latest_version_without_audit_entries(tmp_path):
    store = AlertStore(url=f"sqlite:///{tmp_path / 'new.db'}")
    assert store.schema_version() == SCHEMA_VERSION and store.audit_entries() == []


def test_a_store_newer_than_the_code_is_refused(tmp_path):
    from monitor.store import StoreError

    url = f"sqlite:///{tmp_path / 'new.db'}"
    AlertStore(url=url).record_event(actor="x", action="y", data={})
    import sqlite3

    with sqlite3.connect(tmp_path / "new.db") as conn:
        conn.execute("INSERT INTO schema_version VALUES (99, 'future', 'now')")
    with pytest.raises(StoreError, match="newer"):
        AlertStore(url=url)


def test_instants_with_mixed_offsets_sort_as_instants(tmp_path):
    store = AlertStore(url=f"sqlite:///{tmp_path / 's.db'}")
    _, events = load_scenario(SHARED / "scenarios" / "06_overdose_above_8mgkg.jsonl")
    alerts, _, _ = run_events(events, tmp_path=tmp_path)
    base = alerts[0]
    # as text, "2025-02-10T09:00:00+05:00" sorts after "2025-02-10T08:00:00+01:00"; as instants it is 3 h earlier
    late = base.model_copy(update={"alert_id": "late", "at": "2025-02-10T08:00:00+01:00"})
    early = base.model_copy(update={"alert_id": "early", "at": "2025-02-10T09:00:00+05:00"})
    zulu = base.model_copy(update={"alert_id": "zulu", "at": "2025-02-10T05:00:00Z"})
    for a in (late, early, zulu):
        store.add_record(a)
    assert [r["alert_id"] for r in store.list()] == ["early", "zulu", "late"]
    assert [r["alert_id"] for r in store.inbox(sites=None)] == ["early", "zulu", "late"]


@requires_postgres
def test_postgresql_store_of_the_previous_release_upgrades_in_place(tmp_path):
    pytest.importorskip("psycopg", reason="the postgres extra is not installed")
    server = TempPostgres().start()
    try:
        before = fill_legacy(server.url, scenario_alerts(tmp_path))
        store = check_upgraded(server.url, before)
        store.close()
        result = cli("audit", "verify", "--store", server.url)
        assert result.returncode == 0 and "intact" in result.stdout
    finally:
        server.stop()

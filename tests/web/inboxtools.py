"""Helpers for the inbox tests: a store filled by replaying published scenarios, accounts, and the events file
the subject pages chart."""

from __future__ import annotations

import json
import re
from pathlib import Path

from monitor.store import AlertStore
from monitor.web.passwords import hash_password
from tests.conftest import SHARED, load_scenario, run_events

# FR-BIC-01: missed H12 escalation (04), overdose (06), a withdrawn alert (21); FR-TLS-03: scenario 30
SCENARIOS = ("04_missed_escalation_h12.jsonl", "06_overdose_above_8mgkg.jsonl",
             "21_late_dose_record_retracts_alert.jsonl", "30_rectal_and_nonprotocol_sites.jsonl")
LATE_SCENARIO = "13_excl_neutropenia_si_units.jsonl"  # published while a browser has the inbox open
PASSWORDS = {"dr.officer": "officer-pass-123", "cra.toulouse": "toulouse-pass-123", "cra.bicetre": "bicetre-pass-123",
             "viewer": "viewer-pass-1234"}


def replay(name: str, tmp_path: Path) -> tuple[list, list[dict]]:
    header, events = load_scenario(SHARED / "scenarios" / name)
    work = tmp_path / re.sub(r"\W", "_", name)
    work.mkdir(exist_ok=True)
    alerts, _, _ = run_events(events, until=header.get("evaluation_horizon"), tmp_path=work)
    return alerts, events


def fill(tmp_path: Path, url: str | None = None) -> tuple[str, Path]:
    """A store (SQLite in tmp_path unless a URL is given) holding the alerts of SCENARIOS (raised and withdrawn
    records, in order) and the accounts; returns (store URL, events file)."""
    url = url or f"sqlite:///{tmp_path / 'inbox.db'}"
    store = AlertStore(url=url)
    events_file = tmp_path / "events.jsonl"
    with events_file.open("w") as out:
        for name in SCENARIOS:
            alerts, events = replay(name, tmp_path)
            for a in alerts:
                store.add_record(a)
            for e in events:
                out.write(json.dumps(e) + "\n")
    users = [("dr.officer", "Dr Olivia Officer", "safety_officer", []),
             ("cra.toulouse", "Thomas Toulouse", "site_monitor", ["FR-TLS-03"]),
             ("cra.bicetre", "Beatrice Bicetre", "site_monitor", ["FR-BIC-01"]),
             ("viewer", "Victor Viewer", "viewer", [])]
    for username, name, role, sites in users:
        store.add_user(username=username, printed_name=name, role=role, sites=sites,
                       password_hash=hash_password(PASSWORDS[username]), actor="test")
    store.close()
    return url, events_file


def publish_late(url: str, events_file: Path, tmp_path: Path) -> list:
    """Add the alerts of LATE_SCENARIO to the store (as the notifier does) and its events to the file."""
    alerts, events = replay(LATE_SCENARIO, tmp_path)
    store = AlertStore(url=url)
    for a in alerts:
        store.add_record(a)
    store.close()
    with events_file.open("a") as out:
        for e in events:
            out.write(json.dumps(e) + "\n")
    return alerts

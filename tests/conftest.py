"""Shared test helpers: run the real monitor in-process over JSON Lines events."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
import pytest

from connectors.file import JsonLinesSource
from connectors.memory import ListSink
from monitor.clock import ReplayClock
from monitor.evaluator import Monitor
from monitor.replay import replay
from monitor.rules import RuleSet, load_rules
from tests.support.pgtools import TempPostgres

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SCENARIOS = sorted((SHARED / "scenarios").glob("*.jsonl"))


def run_events(events: list[dict] | Path, *, until: str | None = None, rules: RuleSet | None = None,
               tmp_path: Path | None = None) -> tuple[list, list, Monitor]:
    """Replay events (dicts, or a JSON Lines path) through a fresh monitor; returns (alerts, rejects, monitor)."""
    if isinstance(events, Path):
        path = events
    else:
        assert tmp_path is not None
        path = tmp_path / "events.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in events))
    rules = rules or load_rules()
    clock = ReplayClock()
    monitor = Monitor.create(rules=rules, clock=clock)
    alerts, rejects = ListSink(), ListSink()
    horizon = dt.datetime.fromisoformat(until) if until else None
    replay(source=JsonLinesSource(paths=[path]), monitor=monitor, clock=clock, alerts=alerts, rejects=rejects,
           until=horizon)
    return alerts.items, rejects.items, monitor


def final_alerts(alerts: list) -> list:
    withdrawn = {a.alert_id for a in alerts if a.status == "retracted"}
    return [a for a in alerts if a.status == "raised" and a.alert_id not in withdrawn]


def load_scenario(path: Path) -> tuple[dict, list[dict]]:
    """A published scenario (header, events); the test is skipped, with the reason, where ../shared is absent."""
    if not path.is_file():
        pytest.skip(f"published scenario {path.name} not found (../shared is not beside the checkout)")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


@pytest.fixture(scope="session")
def rules() -> RuleSet:
    return load_rules()


@pytest.fixture(scope="module")
def pg() -> Iterator[TempPostgres]:
    """A throwaway PostgreSQL server for the module (tests/support/pgtools.py); mark the module
    `pytestmark = requires_postgres` so that it is skipped where PostgreSQL is not installed."""
    server = TempPostgres().start()
    yield server
    server.stop()

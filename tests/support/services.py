"""An in-process `MonitorService` for the tests that drive its loop by hand (`run_once`) against in-memory fakes of
the source and the topics: the stream clock, no rules watcher, nothing published yet. Written once so the service's
constructor is spelled in one place for them."""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from monitor.clock import ReplayClock
from monitor.config import Settings
from monitor.evaluator import Monitor
from monitor.rules import RuleSet, load_rules
from monitor.service import MonitorService


def stream_service(*, alerts: Any, dead_letters: Any, rules: RuleSet | Path | None = None,
                   refresh_published: Callable[[], Collection[tuple[str, str]]] | None = None,
                   retry_s: float | None = None) -> MonitorService:
    """`rules`: loaded rules, or a rules directory (default: the shipped rules). `retry_s`: the broker back-off,
    short in tests that hold a batch."""
    if not isinstance(rules, RuleSet):
        rules = load_rules(rules)
    clock = ReplayClock()
    svc = MonitorService(settings=Settings(clock="stream", rules_watch_seconds=0), clock=clock, alerts=alerts,
                         dead_letters=dead_letters, monitor=Monitor.create(rules=rules, clock=clock), published=set(),
                         refresh_published=refresh_published)  # type: ignore[arg-type]
    if retry_s is not None:
        svc.retry_base_s = svc.retry_max_s = retry_s
    return svc

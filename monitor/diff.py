"""`protocol-monitor rules diff`: what a rules change would have done on past data.

The same events are replayed under the old and the new rules (each in its own monitor, replay clock). Alerts are
matched by `alert_id` (a hash of rule, subject and the fact that fired, independent of the rules version):
added and removed final alerts, alerts whose severity, time or message changed, and provisional alerts (raised
then withdrawn) that appear or disappear; summarised per rule and site.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from connectors.file import JsonLinesSource
from connectors.memory import ListSink
from monitor.alerts import Alert
from monitor.clock import ReplayClock
from monitor.evaluator import Monitor
from monitor.replay import replay
from monitor.rules import RuleSet, load_rules

COMPARED = ("severity", "at", "detected_at", "message", "category")


@dataclass
class RulesDiff:
    added: list[Alert] = field(default_factory=list)
    removed: list[Alert] = field(default_factory=list)
    changed: list[tuple[Alert, Alert, dict[str, tuple[Any, Any]]]] = field(default_factory=list)
    provisional_added: list[Alert] = field(default_factory=list)
    provisional_removed: list[Alert] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.provisional_added or self.provisional_removed)

    def summary(self) -> Counter[tuple[str, str, str]]:
        """(change, rule, site) → count."""
        out: Counter[tuple[str, str, str]] = Counter()
        for kind, items in (("added", self.added), ("removed", self.removed),
                            ("provisional added", self.provisional_added),
                            ("provisional removed", self.provisional_removed)):
            for a in items:
                out[(kind, a.rule, a.site_id)] += 1
        for old, _, _ in self.changed:
            out[("changed", old.rule, old.site_id)] += 1
        return out


def _run(rules: RuleSet, paths: list[str | Path], until: dt.datetime | None) -> tuple[dict[str, Alert], dict[str, Alert]]:
    clock = ReplayClock()
    monitor = Monitor.create(rules=rules, clock=clock)
    sink, rejects = ListSink(), ListSink()
    replay(source=JsonLinesSource(paths=paths), monitor=monitor, clock=clock, alerts=sink, rejects=rejects,
           until=until)
    withdrawn = {a.alert_id for a in sink.items if a.status == "retracted"}
    raised = {a.alert_id: a for a in sink.items if a.status == "raised"}
    final = {k: a for k, a in raised.items() if k not in withdrawn}
    provisional = {k: a for k, a in raised.items() if k in withdrawn}
    return final, provisional


def diff_rules(*, old: RuleSet, new: RuleSet, paths: list[str | Path], until: dt.datetime | None) -> RulesDiff:
    old_final, old_prov = _run(old, paths, until)
    new_final, new_prov = _run(new, paths, until)
    result = RulesDiff()
    result.added = [new_final[k] for k in sorted(set(new_final) - set(old_final))]
    result.removed = [old_final[k] for k in sorted(set(old_final) - set(new_final))]
    for k in sorted(set(old_final) & set(new_final)):
        a, b = old_final[k], new_final[k]
        changes = {f: (getattr(a, f), getattr(b, f)) for f in COMPARED if getattr(a, f) != getattr(b, f)}
        if changes:
            result.changed.append((a, b, changes))
    result.provisional_added = [new_prov[k] for k in sorted(set(new_prov) - set(old_prov))]
    result.provisional_removed = [old_prov[k] for k in sorted(set(old_prov) - set(new_prov))]
    return result


def print_diff(d: RulesDiff, old: RuleSet, new: RuleSet, out: TextIO = sys.stdout) -> None:
    out.write(f"rules {old.version} ({old.directory}) -> {new.version} ({new.directory})\n")
    if d.empty:
        out.write("no difference in the alerts\n")
        return
    for a in d.added:
        out.write(f"+ {a.rule:<32} {a.subject_id:<10} {a.site_id:<10} at {a.at}  {a.severity}: {a.message}\n")
    for a in d.removed:
        out.write(f"- {a.rule:<32} {a.subject_id:<10} {a.site_id:<10} at {a.at}  {a.severity}: {a.message}\n")
    for a, _, changes in d.changed:
        what = "; ".join(f"{f}: {x} -> {y}" for f, (x, y) in changes.items())
        out.write(f"~ {a.rule:<32} {a.subject_id:<10} {a.site_id:<10} {what}\n")
    for a in d.provisional_added:
        out.write(f"+ provisional {a.rule} {a.subject_id} at {a.at} (raised, then withdrawn)\n")
    for a in d.provisional_removed:
        out.write(f"- provisional {a.rule} {a.subject_id} at {a.at} (no longer raised and withdrawn)\n")
    out.write("\nper rule and site:\n")
    for (kind, rule, site), n in sorted(d.summary().items()):
        out.write(f"  {kind:<20} {rule:<32} {site:<10} {n}\n")


def main(*, old_dir: str, new_dir: str, files: list[str], until: dt.datetime | None) -> int:
    old, new = load_rules(old_dir), load_rules(new_dir)
    d = diff_rules(old=old, new=new, paths=[Path(f) for f in files], until=until)
    print_diff(d, old, new)
    return 0

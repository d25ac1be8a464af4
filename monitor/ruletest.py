"""Rule tests as data: timelines written relative to T0, with the alerts a correct monitor ends with.

Rule authors write them next to the rules (`rules/tests/*.yaml`), like `promtool test rules`:

    tests:
      - name: supplement below 1.8 mg/kg at H12 is a missed escalation
        base: anakinra                 # a compliant timeline from rules/tests/bases.yaml
        change: {temp_h12: {temperature_c: 38.5}}   # edit a base event by name
        add:
          - {name: supp, type: drug_administration, at: T0+12h30m, drug: anakinra, ...}
        drop: [temp_h8]                # remove base events by name
        until: T0+20d                  # evaluation horizon (default: the base's)
        expect:                        # the COMPLETE final alert set of the test subject
          - {rule: DOSE-H12-MISSED-ESCALATION, at: T0+15h}
        expect_retracted: [RULE-ID]    # raised and later withdrawn

Times are `T0`, `T0+12h`, `T0-2d6h30m`; an event's `recorded` defaults to its `at` + 10 minutes. Each test
runs alone through the real monitor under the replay clock.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from connectors.memory import ListSink, MemorySource
from monitor.clock import ReplayClock
from monitor.errors import RuleFileError
from monitor.evaluator import Monitor
from monitor.rules import RuleSet
from monitor.yamlfiles import load_yaml, pydantic_problems

_OFFSET = re.compile(r"^T0(?P<rest>([+-]\d+(\.\d+)?[dhm](\d+(\.\d+)?[dhm])*)*)$")
TOLERANCE_S = 60


def resolve(text: str, t0: dt.datetime) -> dt.datetime:
    """'T0+1d2h30m' → an instant; sign applies per part ('T0-2h+30m' is 1 h 30 before)."""
    m = _OFFSET.match(str(text).replace(" ", ""))
    if not m:
        raise ValueError(f"time {text!r} is not of the form T0, T0+12h, T0-2d6h30m")
    total = dt.timedelta()
    sign = "+"
    for part in re.finditer(r"([+-]?)(\d+(?:\.\d+)?)([dhm])", m.group("rest")):
        sign = part.group(1) or sign
        amount = float(part.group(2)) * {"d": 86400, "h": 3600, "m": 60}[part.group(3)]
        total += dt.timedelta(seconds=amount if sign == "+" else -amount)
    return t0 + total


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Expect(_M):
    rule: str
    at: str | None = None
    severity: str | None = None


class RuleTest(_M):
    name: str
    base: str
    subject: str | None = None
    change: dict[str, dict[str, Any]] = Field(default_factory=dict)
    add: list[dict[str, Any]] = Field(default_factory=list)
    drop: list[str] = Field(default_factory=list)
    until: str | None = None
    expect: list[Expect] = Field(default_factory=list)
    expect_retracted: list[str] = Field(default_factory=list)


class TestFile(_M):
    tests: list[RuleTest]


class Base(_M):
    """A compliant timeline. `extends` copies another base's events (minus `drop`) before adding its own."""

    subject: str
    site: str
    arm: str
    t0: dt.datetime | None = None
    until: str | None = None
    extends: str | None = None
    drop: list[str] = Field(default_factory=list)
    events: list[dict[str, Any]] = Field(default_factory=list)


class Bases(_M):
    bases: dict[str, Base]


@dataclass
class TestResult:
    name: str
    path: str
    line: int | None
    problems: list[str] = field(default_factory=list)
    alerts: list[Any] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class Suite:
    bases: dict[str, Base]
    tests: list[tuple[str, int | None, RuleTest]]

    def rules_covered(self) -> dict[str, list[str]]:
        """Rule id → names of the tests that expect it to fire (or to be withdrawn)."""
        out: dict[str, list[str]] = {}
        for _, _, t in self.tests:
            for rule in {e.rule for e in t.expect} | set(t.expect_retracted):
                out.setdefault(rule, []).append(t.name)
        return out


def load_suite(directory: str | Path) -> Suite:
    root = Path(directory)
    problems: list[tuple[str, int | None, str]] = []
    bases_path = root / "bases.yaml"
    bases: dict[str, Base] = {}
    if bases_path.is_file():
        data, lines = load_yaml(bases_path, bases_path.read_text())
        try:
            bases = Bases.model_validate(data).bases
        except ValidationError as exc:
            problems.extend(pydantic_problems(bases_path, exc, lines))
        for name, b in list(bases.items()):
            if b.extends is not None:
                parent = bases.get(b.extends)
                if parent is None or parent.extends is not None:
                    problems.append((str(bases_path), lines.get(("bases", name)),
                                     f"base '{name}' extends '{b.extends}', which is not a plain base"))
                    continue
                keep = [e for e in parent.events if e.get("name") not in set(b.drop)]
                bases[name] = b.model_copy(update={"events": keep + b.events, "t0": b.t0 or parent.t0,
                                                   "until": b.until or parent.until, "extends": None})
            if bases[name].t0 is None or bases[name].until is None:
                problems.append((str(bases_path), lines.get(("bases", name)), f"base '{name}' needs t0 and until"))
    tests: list[tuple[str, int | None, RuleTest]] = []
    for path in sorted(root.glob("*.yaml")):
        if path.name == "bases.yaml":
            continue
        data, lines = load_yaml(path, path.read_text())
        try:
            tf = TestFile.model_validate(data)
        except ValidationError as exc:
            problems.extend(pydantic_problems(path, exc, lines))
            continue
        for i, t in enumerate(tf.tests):
            if t.base not in bases:
                problems.append((str(path), lines.get(("tests", i)), f"test '{t.name}': unknown base '{t.base}'"))
            tests.append((str(path), lines.get(("tests", i)), t))
    if problems:
        raise RuleFileError(problems)
    return Suite(bases, tests)


def build_events(test: RuleTest, base: Base) -> tuple[list[dict[str, Any]], dt.datetime]:
    """The test's timeline: the base's events with the test's changes, as monitor input in delivery order."""
    subject = test.subject or base.subject
    named: dict[str, dict[str, Any]] = {}
    for ev in base.events:
        named[ev["name"]] = copy.deepcopy(ev)
    for name in test.drop:
        if name not in named:
            raise ValueError(f"drop: base '{test.base}' has no event '{name}'")
        del named[name]
    for name, fields in test.change.items():
        if name not in named:
            raise ValueError(f"change: base '{test.base}' has no event '{name}'")
        named[name].update(fields)
    for ev in test.add:
        if "name" not in ev:
            raise ValueError(f"add: every added event needs a name ({ev})")
        named[ev["name"]] = copy.deepcopy(ev)
    t0 = base.t0
    if t0 is None or base.until is None:
        raise ValueError(f"base '{test.base}' needs t0 and until")
    out = []
    for name, ev in named.items():
        ev = dict(ev)
        at = resolve(ev.pop("at"), t0)
        recorded = resolve(ev.pop("recorded"), t0) if "recorded" in ev else at + dt.timedelta(minutes=10)
        ev.pop("name")
        for key, value in list(ev.items()):
            if isinstance(value, str) and value.startswith("T0"):
                ev[key] = resolve(value, t0).isoformat()
        ev.setdefault("event_id", f"{subject}-{name}")
        ev.setdefault("subject_id", subject)
        ev.setdefault("site_id", base.site)
        ev.setdefault("arm", base.arm)
        ev["occurred_at"], ev["recorded_at"] = at.isoformat(), recorded.isoformat()
        out.append(ev)
    out.sort(key=lambda e: (e["recorded_at"], e["event_id"]))
    horizon = resolve(test.until or base.until, t0)
    return out, horizon


def run_test(test: RuleTest, base: Base, rules: RuleSet, *, path: str = "", line: int | None = None) -> TestResult:
    from monitor.replay import replay

    result = TestResult(test.name, path, line)
    try:
        events, horizon = build_events(test, base)
    except ValueError as exc:
        result.problems.append(str(exc))
        return result
    clock = ReplayClock()
    monitor = Monitor.create(rules=rules, clock=clock)
    sink, rejects = ListSink(), ListSink()
    replay(source=MemorySource(events=events), monitor=monitor, clock=clock, alerts=sink, rejects=rejects, until=horizon)
    for record, error in rejects.items:
        result.problems.append(f"event rejected: {error}")
    withdrawn = {a.alert_id for a in sink.items if a.status == "retracted"}
    final = [a for a in sink.items if a.status == "raised" and a.alert_id not in withdrawn]
    result.alerts = final
    unmatched = list(final)
    t0 = base.t0 or horizon
    for exp in test.expect:
        target = resolve(exp.at, t0) if exp.at else None
        hit = next((a for a in unmatched if a.rule == exp.rule and (
            target is None or abs((dt.datetime.fromisoformat(a.at) - target).total_seconds()) <= TOLERANCE_S)
            and (exp.severity is None or a.severity == exp.severity)), None)
        if hit is None:
            same = [f"{a.rule} at {a.at} ({a.severity})" for a in unmatched if a.rule == exp.rule]
            want = f"{exp.rule}" + (f" at {target.isoformat()}" if target else "") + (
                f" ({exp.severity})" if exp.severity else "")
            result.problems.append(f"missing: {want}" + (f"; got {', '.join(same)}" if same else ""))
        else:
            unmatched.remove(hit)
    for a in unmatched:
        result.problems.append(f"unexpected: {a.rule} at {a.at} ({a.severity}): {a.message}")
    pulled = Counter(a.rule for a in sink.items if a.status == "retracted")
    for rule in test.expect_retracted:
        if not pulled[rule]:
            result.problems.append(f"not raised then withdrawn: {rule}")
    return result


def run_suite(suite: Suite, rules: RuleSet) -> list[TestResult]:
    return [run_test(t, suite.bases[t.base], rules, path=p, line=line) for p, line, t in suite.tests]

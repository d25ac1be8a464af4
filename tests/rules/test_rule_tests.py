"""Every rule test under rules/tests runs through the real monitor, and every rule has at least one test."""

from __future__ import annotations

import pytest

from monitor.rules import DEFAULT_RULES_DIR, load_rules
from monitor.ruletest import load_suite, run_test

SUITE = load_suite(DEFAULT_RULES_DIR / "tests")
RULES = load_rules()


@pytest.mark.parametrize("case", SUITE.tests, ids=[f"{t.base}: {t.name}" for _, _, t in SUITE.tests])
def test_rule_test(case):
    path, line, test = case
    result = run_test(test, SUITE.bases[test.base], RULES, path=path, line=line)
    assert result.ok, f"{path}:{line} {test.name}\n  " + "\n  ".join(result.problems)


def test_every_rule_has_a_test_that_makes_it_fire():
    untested = sorted(set(RULES.rules) - set(SUITE.rules_covered()))
    assert not untested, f"rules with no rule test: {untested}"


def test_every_rule_test_names_known_rules():
    unknown = {e.rule for _, _, t in SUITE.tests for e in t.expect} - set(RULES.rules)
    assert not unknown, f"tests expect rules that do not exist: {sorted(unknown)}"

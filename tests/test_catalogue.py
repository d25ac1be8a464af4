"""Traceability: every rule id of RULES_SPEC §4 is a rule, the catalogue lists each one, and it is current."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from monitor.catalogue import catalogue
from monitor.rules import load_rules
from tests.conftest import SHARED

DOC = Path(__file__).resolve().parents[1] / "docs" / "RULES.md"


def spec_rule_ids() -> set[str]:
    spec = (SHARED / "RULES_SPEC.md").read_text()
    section = spec[spec.index("## 4. Rule catalogue"):spec.index("## 5. Event model")]
    return set(re.findall(r"^\*\*([A-Z]+(?:-[A-Z0-9]+)+)\*\*", section, flags=re.M))


@pytest.mark.skipif(not (SHARED / "RULES_SPEC.md").is_file(), reason="../shared/RULES_SPEC.md not found")
def test_every_spec_rule_is_implemented_and_nothing_else():
    ids = spec_rule_ids()
    assert len(ids) > 40
    assert set(load_rules().rules) == ids


def test_catalogue_lists_every_rule_with_source_and_tests():
    rules = load_rules()
    text = catalogue(rules)
    for rule_id, rule in rules.rules.items():
        block = text.split(f"## {rule_id}\n", 1)[1].split("\n## ", 1)[0]
        assert rule.spec.source and f"Registry: “{rule.spec.source}”" in block
        assert "Tests (0)" not in block, f"{rule_id} has no rule test"


def test_committed_catalogue_is_current():
    assert DOC.read_text(encoding="utf-8") == catalogue(load_rules()), (
        "docs/RULES.md is stale: run `protocol-monitor rules doc -o docs/RULES.md`")

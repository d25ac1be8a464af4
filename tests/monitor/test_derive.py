"""The derivation code holds no protocol number or name (issue 15: protocol structure is data).

A different amendment of the protocol may change an hour, a window, a dose level, a ladder step, an arm code or a
drug name; each of those lives in rules/parameters.yaml (or a table) and is read from there. This test reads
monitor/derive.py's syntax tree and fails on a literal that looks like one, naming its line."""

from __future__ import annotations

import ast
from pathlib import Path

import monitor.derive
from monitor.rules import load_rules

DERIVE = Path(monitor.derive.__file__)
NEUTRAL_NUMBERS = {0, 1, -1}
"""0, 1 and -1 count and index; they are never a protocol choice."""


def _module_constants(tree: ast.Module) -> set[int]:
    """Line numbers of module-level `NAME = number` constants (HOURS_PER_DAY = 24): named, documented, not protocol."""
    return {node.lineno for node in tree.body if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)}


def _subscript_parts(tree: ast.Module) -> set[int]:
    """ids of constants used as an index or slice bound (x[3], items[-3:]): positions in a tuple, not protocol."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            for inner in ast.walk(node.slice):
                if isinstance(inner, ast.Constant):
                    found.add(id(inner))
    return found


def test_no_protocol_number_is_a_literal_in_the_derivations():
    tree = ast.parse(DERIVE.read_text())
    named, indexes = _module_constants(tree), _subscript_parts(tree)
    found = [f"{DERIVE.name}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and isinstance(node.value, (int, float))
             and not isinstance(node.value, bool) and node.value not in NEUTRAL_NUMBERS
             and node.lineno not in named and id(node) not in indexes]
    assert found == [], "protocol numbers belong in rules/parameters.yaml: " + ", ".join(found)


def test_no_arm_step_or_study_drug_name_is_a_literal_in_the_derivations():
    params = load_rules().parameters
    names = {*params.arms.model_dump().values(), *(s.name for s in params.ladder_steps),
             *params.ivig_retreatment_purposes, *params.study_drug_names.anakinra, *params.study_drug_names.ivig}
    tree = ast.parse(DERIVE.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = [f"{DERIVE.name}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
             and node.value.strip().lower() in {n.lower() for n in names}]
    assert found == [], "arm codes, ladder steps and drug names belong in rules/parameters.yaml: " + ", ".join(found)


def test_the_literal_check_would_catch_a_hard_coded_hour(tmp_path, monkeypatch):
    """The checks above can fail: the same scan over a derivation with `hx(12)` and `arm == "anakinra"` finds both."""
    bad = tmp_path / "derive.py"
    bad.write_text('def f(v):\n    """anakinra in a docstring is fine."""\n    return v.hx(12) if v.arm == "anakinra" else None\n')
    monkeypatch.setattr(monitor.derive, "__file__", str(bad))
    monkeypatch.setattr(__import__(__name__, fromlist=["DERIVE"]), "DERIVE", bad)
    import pytest
    with pytest.raises(AssertionError, match=r"derive.py:3: 12"):
        test_no_protocol_number_is_a_literal_in_the_derivations()
    with pytest.raises(AssertionError, match=r"derive.py:3: 'anakinra'"):
        test_no_arm_step_or_study_drug_name_is_a_literal_in_the_derivations()

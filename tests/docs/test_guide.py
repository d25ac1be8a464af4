"""Every example of the rule authors' guide runs: its rules load, its table entries load, its rule tests pass
against the shipped rules plus the guide's rules, and every command it names exists."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from monitor.rules import DEFAULT_RULES_DIR, load_rules
from monitor.ruletest import load_suite, run_test

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "RULE_AUTHORS.md"


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{re.escape(kind)}\n(.*?)```", GUIDE.read_text(), flags=re.S)


def guide_rules(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, target)
    (target / "guide.yaml").write_text("category: eligibility\nrules:\n" + "".join(blocks("yaml rule")))
    for entry in blocks("yaml table:cyp450"):
        table = target / "tables" / "cyp450.yaml"
        table.write_text(table.read_text() + entry)
    return target


def test_the_guide_has_examples_of_each_kind():
    assert blocks("yaml rule") and blocks("yaml rule-test") and blocks("yaml table:cyp450")


def test_guide_rules_and_table_entries_load(tmp_path):
    rules = load_rules(guide_rules(tmp_path))
    assert "EXAMPLE-INR-REVIEW" in rules.rules
    assert any(e.drug == "letermovir" for e in rules.tables.cyp450.interactors)


def test_guide_rule_tests_pass(tmp_path):
    target = guide_rules(tmp_path)
    (target / "tests" / "guide.yaml").write_text("tests:\n" + "".join(blocks("yaml rule-test")))
    rules = load_rules(target)
    suite = load_suite(target / "tests")
    mine = [(p, line, t) for p, line, t in suite.tests if p.endswith("guide.yaml")]
    assert len(mine) == 3
    for path, line, test in mine:
        result = run_test(test, suite.bases[test.base], rules, path=path, line=line)
        assert result.ok, f"{test.name}: {result.problems}"


def test_every_command_the_guide_names_exists():
    for command in set(re.findall(r"protocol-monitor rules (\w+)", GUIDE.read_text())):
        out = subprocess.run([sys.executable, "-m", "monitor", "rules", command, "--help"], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, (command, out.stderr)


def test_the_plausibility_example_edits_the_shipped_table(tmp_path):
    """The guide's worked example names a line of the shipped table, and its edit loads and widens the range."""
    [example] = blocks("diff table:plausibility")
    old = next(line[1:] for line in example.splitlines() if line.startswith("-"))
    new = next(line[1:] for line in example.splitlines() if line.startswith("+"))
    target = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, target)
    table = target / "tables" / "plausibility.yaml"
    assert old in table.read_text(), "the guide's '-' line is not in rules/tables/plausibility.yaml"
    table.write_text(table.read_text().replace(old, new))
    before = load_rules().tables.plausibility.labs["ferritin"].range
    after = load_rules(target).tables.plausibility.labs["ferritin"].range
    assert after != before and after[1] > before[1]


def diff_blocks() -> list[tuple[str, str]]:
    return re.findall(r"```diff (rules/\S+)\n(.*?)```", GUIDE.read_text(), flags=re.S)


def apply_diff(root: Path, relative: str, body: str) -> None:
    """Apply one guide diff to a copy of rules/: each `-` line must be in the shipped file (the guide shows the file
    as it is); a `+` line replaces the `-` line before it, or is inserted after the context line before it."""
    path = root / relative.removeprefix("rules/")
    lines = path.read_text().splitlines()
    anchor: int | None = None
    for raw in body.splitlines():
        mark, text = raw[:1], raw[1:]
        if mark == "-":
            hits = [i for i, line in enumerate(lines) if line.rstrip() == text.rstrip()]
            assert hits, f"the guide's line is not in {relative}: {text!r}"
            anchor = hits[0]
            del lines[anchor]
            anchor -= 1
        elif mark == "+":
            assert anchor is not None, f"a + line with nothing before it in the guide's diff of {relative}"
            lines.insert(anchor + 1, text)
            anchor += 1
        else:
            hits = [i for i, line in enumerate(lines) if line.rstrip() == text.rstrip()
                    and (anchor is None or i > anchor)]
            assert hits, f"the guide's context line is not in {relative}: {text!r}"
            anchor = hits[0]
    path.write_text("\n".join(lines) + "\n")


def test_every_diff_in_the_guide_applies_to_the_shipped_files_and_loads(tmp_path):
    found = diff_blocks()
    assert len(found) >= 4
    shipped = load_rules().version
    for n, (relative, body) in enumerate(found):
        target = tmp_path / f"rules{n}"
        shutil.copytree(DEFAULT_RULES_DIR, target)
        apply_diff(target, relative, body)
        edited = load_rules(target)  # refuses with file and line if the edit broke a file
        assert edited.version != shipped, f"the guide's edit of {relative} changed nothing"

"""The command line as a user runs it: replay output, determinism, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import SCENARIOS


def _run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor", *args], capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """All published scenarios' events in one stream (headers removed)."""
    if not SCENARIOS:
        pytest.skip("../shared/scenarios not found")
    path = tmp_path_factory.mktemp("stream") / "all.jsonl"
    with path.open("w") as out:
        for scenario in SCENARIOS:
            out.writelines(line + "\n" for line in scenario.read_text().splitlines()[1:] if line.strip())
    return path


def test_replay_is_byte_identical_twice(stream):
    first = _run("replay", str(stream), "--until", "2025-06-30T00:00:00+02:00")
    second = _run("replay", str(stream), "--until", "2025-06-30T00:00:00+02:00")
    assert first.returncode == 0, first.stderr
    assert first.stdout and first.stdout == second.stdout
    records = [json.loads(line) for line in first.stdout.splitlines()]
    for rec in records:
        assert {"alert_id", "rule", "subject_id", "site_id", "severity", "category", "status", "at",
                "detected_at", "rule_version", "message", "evidence"} <= set(rec)
        assert rec["evidence"]["events"], rec


def test_replay_reports_bad_lines_and_goes_on(tmp_path):
    good = SCENARIOS[0].read_text().splitlines()[1] if SCENARIOS else None
    if good is None:
        pytest.skip("no scenarios")
    path = tmp_path / "mixed.jsonl"
    path.write_text("{not json\n" + '{"type": "teleport", "event_id": "X1"}\n' + good + "\n")
    result = _run("replay", str(path))
    assert result.returncode == 0
    assert "malformed_json" in result.stderr and "unknown_type" in result.stderr and "X1" in result.stderr
    assert "records read: 3" in result.stderr and "rejected: 2" in result.stderr


def test_replay_missing_file_is_a_clear_error(tmp_path):
    result = _run("replay", str(tmp_path / "nope.jsonl"))
    assert result.returncode == 2 and "no such file" in result.stderr


def test_bad_rules_dir_is_refused_with_file_and_line(tmp_path):
    import shutil

    from monitor.rules import DEFAULT_RULES_DIR

    shutil.copytree(DEFAULT_RULES_DIR, tmp_path / "rules")
    target = tmp_path / "rules" / "dosing.yaml"
    target.write_text(target.read_text().replace("severity: critical", "severity: catastrophic"))
    result = _run("rules", "check", str(tmp_path / "rules"))
    assert result.returncode == 3
    assert "dosing.yaml:" in result.stderr and "severity" in result.stderr

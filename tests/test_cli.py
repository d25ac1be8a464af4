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


ABSURD = [1e308, -1e308, float("nan"), float("inf"), float("-inf"), "n/a", {"x": {"y": 1}}, [1, 2]]
NUMERIC = ("weight_kg", "height_cm", "dose_mg_per_kg", "dose_mg", "dose_g_per_kg", "dose_g", "temperature_c",
           "value", "worst_z", "dose_mg_per_kg_per_day", "physician_activity_score", "gestational_age_at_birth_weeks")


def _hostile_lines(events: list[dict]) -> list[str]:
    """For every numeric field of every event: a new record (own event id) with an absurd value in it, and a
    reference range that does not parse; NaN and Infinity written as senders do."""
    out = []
    for i, event in enumerate(events):
        for name in [n for n in NUMERIC if n in event] + (["reference_range"] if event["type"] == "lab_result" else []):
            for j, value in enumerate(ABSURD):
                bad = dict(event, event_id=f"HOSTILE-{i}-{name}-{j}")
                bad[name] = {"low": 0, "high": value} if name == "reference_range" else value
                out.append(json.dumps(bad, allow_nan=True))
    return out


@pytest.mark.parametrize("name", ["06_overdose_above_8mgkg", "13_excl_neutropenia_si_units",
                                  "16_excl_renal_schwartz_umol", "46_coronary_worsening_and_d45_nonresolution"])
def test_replay_of_a_scenario_mixed_with_hundreds_of_hostile_records(name, tmp_path):
    """Issue 13: each hostile record is rejected with a reason on standard error, the replay exits 0, and the
    scenario's expected alerts are written as in a clean replay."""
    from tests.conftest import SHARED, load_scenario

    header, events = load_scenario(SHARED / "scenarios" / f"{name}.jsonl")
    hostile = _hostile_lines(events)
    assert len(hostile) >= 100
    lines = []
    for i, event in enumerate(events):  # each hostile record right after the event it was made from
        lines.append(json.dumps(event))
        lines += [h for h in hostile if h.startswith("{") and f'"HOSTILE-{i}-' in h]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    done = _run("replay", str(path), "--until", header["evaluation_horizon"])
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]
    withdrawn = {r["retracts"] for r in records if r["status"] == "retracted"}
    final = sorted((r["rule"], r["subject_id"]) for r in records if r["status"] == "raised"
                   and r["alert_id"] not in withdrawn)
    assert final == sorted((a["rule"], a["subject"]) for a in header["expected_alerts"])
    rejected = [line for line in done.stderr.splitlines() if "HOSTILE-" in line]
    assert len(rejected) == len(hostile), done.stderr[-3000:]
    assert "Traceback" not in done.stderr

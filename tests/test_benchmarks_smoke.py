"""CI runs the benchmark command at a smoke size: it must complete and report every measure (no timing asserted)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT.parent / "shared" / "scenarios").is_dir(), reason="published scenarios not found")
@pytest.mark.skipif(shutil.which("nproc") is None and not os.environ.get("CI"), reason="not a Linux machine")
def test_benchmark_command_runs_at_smoke_size(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--smoke", "--json", str(out)],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    for key in ("replay_events_per_s", "replay_peak_rss_mb", "raw_consume_events_per_s", "e2e_events_per_s",
                "latency_p50_s", "latency_p99_s", "deadline_late_max_s", "recovery_ready_s", "memory_per_subject_kb",
                "engine_session_kb"):
        assert data[key] is not None, key
    assert data["deadline_alerts"] >= 1
    assert "replay events/s" in result.stdout and "memory per subject KB" in result.stdout

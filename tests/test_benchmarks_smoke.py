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


@pytest.mark.skipif(not (ROOT.parent / "shared" / "scenarios").is_dir(), reason="published scenarios not found")
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="the soak benchmark samples /proc (Linux)")
def test_soak_benchmark_runs_at_smoke_size(tmp_path):
    """One minute of the soak stream: every sample has the figures a leak would show in, the service processed the
    stream (amendments raised and withdrew alerts, invalid messages went to the dead-letter topic, the live deadline
    subjects were alerted) and it was stopped cleanly. No timing is asserted."""
    out = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_soak.py"), "--smoke", "--json", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    samples = data["samples"]
    assert samples[0]["minute"] == 0 and len(samples) == 5  # the warm-up sample, then one every 15 s
    for s in samples:
        for key in ("rss_mb", "fds", "threads", "lag", "alerts_raised", "alerts_retracted", "dead_letters"):
            assert s[key] is not None, key
        assert s["rss_mb"] > 0 and s["fds"] > 0 and s["threads"] > 0
    stream = samples[1:]
    assert all(s["processed_per_s"] > 0 for s in stream)
    assert sum(s["alerts_raised"] for s in stream) > 0 and sum(s["alerts_retracted"] for s in stream) > 0
    assert all(s["latency_p50_s"] is not None for s in stream)
    assert data["dead_letters_total"] == data["sent"]["invalid"] > 0
    assert sum(s["deadline_alerts"] for s in stream) >= 1
    sent_total = data["warmup_events"] + sum(data["sent"].values())
    assert data["drained_after_stream"] and data["service_exit_code"] == 0
    stats = data["service_stats"]
    assert stats["rejected"] == data["sent"]["invalid"]
    assert stats["events"] + stats["rejected"] >= sent_total  # everything sent was consumed (the first round too)
    v = data["verdict"]
    for key in ("rss_growth_mb", "rss_growth_pct", "rss_slope_mb_per_min", "fds_first", "fds_last", "threads_first",
                "threads_last", "memory_flat", "ok"):
        assert key in v, key
    assert "verdict: RSS" in result.stdout and "rss_mb" in result.stdout

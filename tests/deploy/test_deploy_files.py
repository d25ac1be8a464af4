"""The deployment files: promtool and amtool checks (deploy/check.sh), and the dashboards' structure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TOOLS = shutil.which("promtool") and shutil.which("amtool")


@pytest.mark.skipif(not TOOLS and not os.environ.get("CI"),
                    reason="promtool/amtool not installed (Debian prometheus, prometheus-alertmanager; .ci/run installs them)")
def test_promtool_and_amtool_checks_pass():
    result = subprocess.run(["bash", str(DEPLOY / "check.sh")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "deploy checks passed" in result.stdout
    assert result.stdout.count("route ok") == sum(
        1 for line in (DEPLOY / "alertmanager" / "routes.test").read_text().splitlines()
        if line.strip() and not line.startswith("#"))


def test_dashboards_have_site_and_rule_variables_and_prometheus_targets():
    for path in (DEPLOY / "grafana" / "dashboards").glob("*.json"):
        board = json.loads(path.read_text())
        names = {v["name"] for v in board["templating"]["list"]}
        assert {"site", "rule"} <= names, path
        for panel in board["panels"]:
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), (path, panel["title"])
            assert panel["datasource"]["uid"] == "prometheus"

"""README "Feeding FHIR": its sample resources are the example file, and its command does what it says."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("## Feeding FHIR\n", 1)[1].split("\n## ", 1)[0]


def test_the_samples_in_the_readme_are_the_example_file():
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", section(), flags=re.S)]
    lines = [json.loads(line) for line in (ROOT / "docs/examples/fhir-sample.ndjson").read_text().splitlines()]
    assert [b["resourceType"] for b in blocks] == ["Observation", "MedicationAdministration"]
    assert blocks == lines


def test_the_readme_command_replays_them_into_the_alerts_it_names():
    [command] = re.findall(r"```sh\n(.*?)```", section(), flags=re.S)
    argv = shlex.split(command.strip())
    assert argv[0] == ".venv/bin/protocol-monitor"
    proc = subprocess.run([sys.executable, "-m", "monitor", *argv[1:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    alerts = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(a["rule"] for a in alerts) == ["DOSE-MAX-EXCEEDED", "DOSE-START", "DQ-TEMP-UNIT-SUSPECT"]
    for rule in ("DOSE-MAX-EXCEEDED", "DOSE-START", "DQ-TEMP-UNIT-SUSPECT"):
        assert f"`{rule}`" in section()
    dose = next(a for a in alerts if a["rule"] == "DOSE-MAX-EXCEEDED")
    assert dose["evidence"]["sources"] == {"MedicationAdministration/dose-0043": {
        "fhir": "MedicationAdministration/dose-0043/_history/1", "resource_type": "MedicationAdministration",
        "resource_id": "dose-0043", "version": "1"}}
    assert '"fhir": "MedicationAdministration/dose-0043/_history/1"' in section().replace("\n", " ")
    assert "rejected: 0" in proc.stderr

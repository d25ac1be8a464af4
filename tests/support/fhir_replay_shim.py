"""`check_scenarios.py --cmd` for the FHIR form: takes `replay FILE [--until T]` with FILE in the flat form, turns it
into FHIR Bundles with the test converter and runs `protocol-monitor replay --input-format fhir` on them, so the
shared check tool judges the FHIR path exactly as it judges the flat one."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from monitor.cli import main  # noqa: E402
from tests.support.fhirconv import to_fhir_lines  # noqa: E402


def run(argv: list[str]) -> int:
    assert argv[0] == "replay", argv  # noqa: S101
    source, rest = Path(argv[1]), argv[2:]
    events = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "fhir.jsonl"
        target.write_text("".join(line + "\n" for line in to_fhir_lines(events)), encoding="utf-8")
        return main(["replay", "--input-format", "fhir", str(target), *rest])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))

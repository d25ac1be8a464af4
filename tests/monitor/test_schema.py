"""Editors check rule files while the author types: the JSON Schemas are current, every shipped file names its
schema and validates against it, and the schema catches the mistakes authors make."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from monitor.rules import DEFAULT_RULES_DIR
from monitor.schema import SCHEMAS, schema_for

FILES = sorted([*DEFAULT_RULES_DIR.glob("*.yaml"), *DEFAULT_RULES_DIR.glob("tables/*.yaml")])


def schema_of(path: Path) -> dict:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema="), f"{path} does not name its schema"
    return json.loads((path.parent / first.split("=", 1)[1]).read_text())


def test_committed_schemas_are_current():
    for name in SCHEMAS:
        committed = json.loads((DEFAULT_RULES_DIR / "schema" / name).read_text())
        assert committed == schema_for(name), f"rules/schema/{name} is stale: run `protocol-monitor rules schema`"


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_every_shipped_file_validates_against_its_schema(path):
    jsonschema.validate(yaml.safe_load(path.read_text()), schema_of(path))


def test_the_schema_flags_an_unknown_field_an_unknown_fact_and_a_bad_operator():
    schema = schema_of(DEFAULT_RULES_DIR / "dosing.yaml")
    doc = yaml.safe_load((DEFAULT_RULES_DIR / "dosing.yaml").read_text())
    for mutate in (lambda r: r.update(severty="major"), lambda r: r.update(fact="anakinra_doses"),
                   lambda r: r["when"].update(dose_mg_per_kg={"less_than": 3})):
        broken = json.loads(json.dumps(doc))
        mutate(broken["rules"][0])
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)

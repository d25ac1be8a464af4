"""JSON Schemas for the rule, parameter, table and rule-test files, generated from the pydantic models.

Each YAML file names its schema on its first line (`# yaml-language-server: $schema=...`), so editors with the
YAML language server (VS Code, IntelliJ, Neovim) complete field names and flag mistakes while the author types.
`protocol-monitor rules schema` regenerates them; a test fails if the committed ones are stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from monitor.facts import FactCatalogue, standard_catalogue
from monitor.kri import KriFile
from monitor.fhir import FhirCodesFile
from monitor.rules import (CypTable, ImmunosuppressantTable, LiveVaccineTable, Parameters, PlausibilityTable,
                           RuleFile)

SCHEMAS: dict[str, type[BaseModel]] = {
    "rules.schema.json": RuleFile,
    "parameters.schema.json": Parameters,
    "cyp450.schema.json": CypTable,
    "immunosuppressants.schema.json": ImmunosuppressantTable,
    "live_vaccines.schema.json": LiveVaccineTable,
    "plausibility.schema.json": PlausibilityTable,
    "kri.schema.json": KriFile,
    "fhir_codes.schema.json": FhirCodesFile,  # rules/fhir/codes.yaml (issue 18)
}


def _condition_schema(facts: FactCatalogue) -> dict[str, Any]:
    """A condition: field tests on the fact's fields (all facts' fields offered), `all`/`any` groups."""
    fields = sorted({name for f in facts.values() for name in f.fields})
    ops: dict[str, dict[str, Any]] = {op: {} for op in ("eq", "ne", "lt", "lte", "gt", "gte")}
    ops["in"] = {"type": "array", "minItems": 1}
    test = {"anyOf": [{"type": ["string", "number", "boolean"]},
                      {"type": "object", "properties": ops, "additionalProperties": False, "minProperties": 1}]}
    return {"type": "object", "minProperties": 1, "additionalProperties": False,
            "properties": {**{f: test for f in fields},
                           "all": {"type": "array", "items": {"$ref": "#/$defs/Condition"}, "minItems": 1},
                           "any": {"type": "array", "items": {"$ref": "#/$defs/Condition"}, "minItems": 1}}}


def schema_for(name: str, facts: FactCatalogue | None = None) -> dict[str, Any]:
    facts = facts if facts is not None else standard_catalogue()
    schema = SCHEMAS[name].model_json_schema()
    if name == "rules.schema.json":
        defs = schema.setdefault("$defs", {})
        defs["Condition"] = _condition_schema(facts)
        for model in ("RuleSpec", "Alternative"):
            props = defs[model]["properties"]
            props["fact"] = {"enum": sorted(facts), "description": "a derived fact (monitor/facts.py)"}
            props["when"] = {"$ref": "#/$defs/Condition"}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def write_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name in SCHEMAS:
        path = directory / name
        path.write_text(json.dumps(schema_for(name), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        out.append(path)
    return out


def main(directory: str | None) -> int:
    from monitor.rules import DEFAULT_RULES_DIR

    for path in write_schemas(Path(directory) if directory else DEFAULT_RULES_DIR / "schema"):
        print(f"wrote {path}", file=sys.stderr)
    return 0

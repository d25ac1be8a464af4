"""FHIR R4 in (issue 18): FHIR resources and Bundles become the monitor's flat events (RULES_SPEC §5).

Sites send HL7 FHIR R4, not the monitor's flat JSON. Rather than a second evaluation path, each resource is turned
into the flat event it stands for, which then goes through exactly the same validation, amendment policy and rules
as a flat event: one path, so FHIR and flat inputs cannot drift apart.

Validation uses `fhir.resources`' R4B models (docs/RULE_AUTHORS.md, "Feeding FHIR: the code map", says why this
library and not `fhirclient`). Codes and units come from `rules/fhir/codes.yaml`, never from this module, so a
site's local code is a data edit.

Every way a resource can be unusable ends in `FhirRejected` (an `EventRejected`) whose detail starts with the path
inside the resource (`Observation.valueQuantity.code`); a resource the rules do not need (a Patient on its own, a
vaccine not given) is counted as ignored, never dead-lettered.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from connectors.base import RawRecord
from monitor.errors import EventRejected, RuleFileError
from monitor.events import MAX_EVENT_BYTES, Enrollment

DEFAULT_CODE_MAP = Path(__file__).resolve().parent.parent / "rules" / "fhir" / "codes.yaml"

MAPPED_TYPES = ("Observation", "MedicationAdministration", "MedicationStatement", "MedicationRequest",
                "Immunization", "AdverseEvent", "Encounter", "ResearchSubject")
"""Resource types that become events. Any other valid R4 resource (Patient on its own, Practitioner, Consent ...)
is ignored and counted."""

RETRACTED = "entered-in-error"


class FhirRejected(EventRejected):
    """A FHIR resource that cannot become an event. `path` is where inside the resource the problem is."""

    def __init__(self, reason: str, path: str, detail: str, *, event_id: str | None = None) -> None:
        super().__init__(reason, f"{path}: {detail}", event_id=event_id)
        self.path = path


# ---- the code map (data) ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ObservationConcept:
    concept: str
    type: str
    flat: dict[str, Any]
    units: tuple[str, ...]
    site: str | None = None  # a site-specific temperature code names the measurement site


@dataclass(frozen=True, kw_only=True)
class Drug:
    name: str
    atc: str


@dataclass(frozen=True, kw_only=True)
class CodeMap:
    """`rules/fhir/codes.yaml`, indexed for lookup. Built only by `load_code_map`."""

    systems: dict[str, str]
    event_id_system: str
    subject_system: str
    site_tag_system: str
    arm_tag_system: str
    extension_base: str
    observations: dict[tuple[str, str], ObservationConcept]
    percentage_codes: frozenset[tuple[str, str]]
    percentage_units: tuple[str, ...]
    wbc_codes: frozenset[tuple[str, str]]
    ignored_codes: frozenset[tuple[str, str]]
    echo_components: dict[str, str]
    body_sites: dict[str, str]
    routes: dict[str, str]
    dose_units: dict[str, str]
    weight_units: dict[str, float]
    drugs_by_atc: dict[str, Drug]
    drugs_by_rxnorm: dict[str, Drug]
    drugs_by_name: dict[str, Drug]
    seriousness: dict[str, bool]
    source: str = ""

    def ext(self, name: str) -> str:
        return self.extension_base + name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodingSpec(_Strict):
    system: str = Field(description="a short name from `systems`, or the system URI")
    code: str
    site: str | None = Field(default=None, description="a site-specific temperature code's measurement site")


class ObservationSpec(_Strict):
    concept: str
    type: Literal["vital_sign", "lab_result", "echocardiogram"]
    flat: dict[str, str] = Field(default_factory=dict, description="fields the event gets (analyte, code)")
    codes: list[CodingSpec] = Field(min_length=1)
    units: list[str] = Field(min_length=1, description="UCUM codes accepted in valueQuantity")


class PercentageSpec(_Strict):
    codes: list[CodingSpec] = Field(min_length=1)
    units: list[str] = Field(min_length=1)
    wbc_codes: list[CodingSpec] = Field(min_length=1)


class IdentifierSpec(_Strict):
    event_id_system: str
    subject_system: str
    site_tag_system: str
    arm_tag_system: str


class DrugSpec(_Strict):
    name: str
    atc: str
    rxnorm: list[str] = Field(default_factory=list)
    names: list[str] = Field(default_factory=list)


DoseField = Literal["dose_mg", "dose_g", "dose_mg_per_kg", "dose_g_per_kg", "dose_mg_per_kg_per_day", "dose_iu"]


class FhirCodesFile(_Strict):
    """`rules/fhir/codes.yaml`: how FHIR R4 resources become events (docs/RULE_AUTHORS.md, Feeding FHIR)."""

    systems: dict[str, str]
    identifiers: IdentifierSpec
    extension_base: str
    observations: list[ObservationSpec] = Field(min_length=1)
    neutrophil_percentage: PercentageSpec
    ignored_observations: list[CodingSpec] = Field(default_factory=list, description="codes read and ignored")
    echo_components: dict[str, str]
    body_sites: dict[str, str]
    routes: dict[str, str]
    dose_units: dict[str, DoseField]
    weight_units: dict[str, float]
    drugs: list[DrugSpec] = Field(default_factory=list)
    seriousness: dict[str, bool]


def code_map_path(fhir_codes: str | Path | None, rules_dir: str | Path | None) -> Path:
    """The code map in force: the one named, else the rules directory's `fhir/codes.yaml`, else the bundled one."""
    if fhir_codes:
        return Path(fhir_codes)
    if rules_dir and (Path(rules_dir) / "fhir" / "codes.yaml").is_file():
        return Path(rules_dir) / "fhir" / "codes.yaml"
    return DEFAULT_CODE_MAP


def load_code_map(path: str | Path | None = None) -> CodeMap:
    """Read, validate and index the code map. A malformed file is a RuleFileError naming the file and each
    problem (nothing half-loaded)."""
    where = Path(path) if path is not None else DEFAULT_CODE_MAP
    try:
        stamp = where.stat().st_mtime_ns
    except OSError:
        stamp = 0
    return _load_code_map(str(where.resolve()), stamp)


@lru_cache(maxsize=8)
def _load_code_map(where: str, stamp: int) -> CodeMap:
    """Cached per file and modification time: an edited map is read again."""
    try:
        data = FhirCodesFile.model_validate(yaml.safe_load(Path(where).read_text(encoding="utf-8")))
    except ValidationError as exc:
        raise RuleFileError([(where, None, ".".join(str(p) for p in e["loc"]) + ": " + e["msg"])
                             for e in exc.errors(include_url=False)]) from None
    except (OSError, yaml.YAMLError) as exc:
        raise RuleFileError([(where, None, f"FHIR code map unusable: {type(exc).__name__}: {exc}")]) from None
    systems = dict(data.systems)

    def key(c: CodingSpec) -> tuple[str, str]:
        return systems.get(c.system, c.system), c.code

    observations: dict[tuple[str, str], ObservationConcept] = {}
    for entry in data.observations:
        for c in entry.codes:
            observations[key(c)] = ObservationConcept(concept=entry.concept, type=entry.type, flat=dict(entry.flat),
                                                      units=tuple(entry.units), site=c.site)
    drugs_by_atc, drugs_by_rxnorm, drugs_by_name = {}, {}, {}
    for d in data.drugs:
        drug = Drug(name=d.name, atc=d.atc)
        drugs_by_atc[d.atc.upper()] = drug
        for r in d.rxnorm:
            drugs_by_rxnorm[r] = drug
        for n in [d.name, *d.names]:
            drugs_by_name[n.strip().lower()] = drug
    ids, pct = data.identifiers, data.neutrophil_percentage
    return CodeMap(
        systems=systems, event_id_system=ids.event_id_system, subject_system=ids.subject_system,
        site_tag_system=ids.site_tag_system, arm_tag_system=ids.arm_tag_system, extension_base=data.extension_base,
        observations=observations, percentage_codes=frozenset(key(c) for c in pct.codes),
        percentage_units=tuple(pct.units), wbc_codes=frozenset(key(c) for c in pct.wbc_codes),
        ignored_codes=frozenset(key(c) for c in data.ignored_observations),
        echo_components=dict(data.echo_components), body_sites=dict(data.body_sites), routes=dict(data.routes),
        dose_units=dict(data.dose_units), weight_units=dict(data.weight_units), drugs_by_atc=drugs_by_atc,
        drugs_by_rxnorm=drugs_by_rxnorm, drugs_by_name=drugs_by_name, seriousness=dict(data.seriousness),
        source=where)


# ---- validation with fhir.resources (R4B models) ---------------------------------------------------------------------
@lru_cache(maxsize=64)
def _model(resource_type: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError, AttributeError, ImportError):
        return None


def _validation_path(resource_type: str, error: dict[str, Any]) -> str:
    parts = [resource_type]
    for p in error.get("loc", ()):
        if isinstance(p, int):
            parts[-1] += f"[{p}]"
        elif p != "__root__":
            parts.append(str(p))
    return ".".join(parts)


def validate_resource(resource: dict[str, Any], *, where: str = "") -> str:
    """Check `resource` against the R4 (R4B) model of its type; return the type. The first problem is refused with
    its path; an element the R4 model does not have (an R5 shape such as `MedicationStatement.medication.concept`)
    says so."""
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        raise FhirRejected("fhir_resource_type", "resourceType", f"missing or not a string{where}")
    model = _model(resource_type)
    if model is None:
        raise FhirRejected("fhir_resource_type", "resourceType",
                           f"{resource_type!r} is not a FHIR R4 resource type{where}")
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # an element R4 does not have says most about the sender (an R5 feed): report it before what it lacks
        first = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])
        path = _validation_path(resource_type, dict(first))
        if first.get("type") == "extra_forbidden":
            raise FhirRejected("fhir_not_r4", path, f"not an element of FHIR R4 {resource_type} (an R5 or "
                               f"unknown shape){where}") from None
        raise FhirRejected("fhir_invalid", path, f"{first.get('msg')}{where}"
                           + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")) from None
    except (TypeError, ValueError, RecursionError) as exc:  # defensive: library edge cases on odd input
        raise FhirRejected("fhir_invalid", resource_type, f"{exc}{where}") from None
    return resource_type


# ---- the result of mapping one record ---------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Mapped:
    """What one record (a resource or a Bundle) gave: flat event payloads with the FHIR reference each came from,
    refusals, and the resources ignored (by kind; no identifiers, so counting them leaks nothing)."""

    events: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    rejected: list[FhirRejected] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)


def _codings(concept: Any) -> list[dict[str, Any]]:
    if not isinstance(concept, dict):
        return []
    return [c for c in concept.get("coding") or [] if isinstance(c, dict)]


def _tag(resource: dict[str, Any], system: str) -> str | None:
    for t in (resource.get("meta") or {}).get("tag") or []:
        if isinstance(t, dict) and t.get("system") == system and t.get("code"):
            return str(t["code"])
    return None


def _extensions(element: dict[str, Any], url: str) -> list[dict[str, Any]]:
    return [e for e in element.get("extension") or [] if isinstance(e, dict) and e.get("url") == url]


def _ext_value(element: dict[str, Any], url: str) -> Any:
    for e in _extensions(element, url):
        for k, v in e.items():
            if k.startswith("value"):
                return v
    return None


def _extension_tree(ext: dict[str, Any], model: Any) -> dict[str, Any]:
    """A complex extension whose children are named after the fields of `model` (a pydantic model) → a dict.
    Children repeat for list fields; a child with children of its own is a nested object."""
    out: dict[str, Any] = {}
    for child in ext.get("extension") or []:
        name = child.get("url")
        if not isinstance(name, str):
            continue
        value: Any = next((v for k, v in child.items() if k.startswith("value")), None)
        if child.get("extension"):
            annotation = model.model_fields[name].annotation if name in model.model_fields else None
            sub = next((a for a in get_args(annotation) if isinstance(a, type) and hasattr(a, "model_fields")), None)
            value = _extension_tree(child, sub) if sub is not None else {
                c.get("url"): next((v for k, v in c.items() if k.startswith("value")), None)
                for c in child.get("extension") or []}
        info = model.model_fields.get(name) if model is not None else None
        is_list = info is not None and (get_origin(info.annotation) is list or any(
            get_origin(a) is list for a in get_args(info.annotation)))
        if is_list:
            out.setdefault(name, []).append(value)
        else:
            out[name] = value
    return out


class FhirMapper:
    """Turns FHIR R4 records (a resource or a Bundle, as JSON bytes) into flat event payloads."""

    def __init__(self, *, code_map: CodeMap | None = None, max_bytes: int = MAX_EVENT_BYTES) -> None:
        self.codes = code_map if code_map is not None else load_code_map()
        self.max_bytes = max_bytes

    # -- records ---------------------------------------------------------------------------------------------------
    def map_record(self, raw: bytes | str) -> Mapped:
        """Never raises for bad input: every problem is in `Mapped.rejected`."""
        out = Mapped()
        size = len(raw.encode("utf-8", "surrogatepass")) if isinstance(raw, str) else len(raw)
        if size > self.max_bytes:
            out.rejected.append(FhirRejected("too_large", "$", f"record is {size} bytes; the limit is "
                                             f"{self.max_bytes} (max_message_bytes)"))
            return out
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            out.rejected.append(FhirRejected("malformed_json", "$", f"not valid JSON ({exc})"))
            return out
        if not isinstance(data, dict):
            out.rejected.append(FhirRejected("not_an_object", "$", f"a FHIR resource is a JSON object, got "
                                             f"{type(data).__name__}"))
            return out
        self.map_resource(data, out)
        return out

    def map_resource(self, data: dict[str, Any], out: Mapped) -> None:
        """One resource or Bundle (already decoded) into `out`."""
        try:
            kind = validate_resource(data) if data.get("resourceType") != "Bundle" else "Bundle"
        except FhirRejected as exc:
            out.rejected.append(exc)
            return
        if kind == "Bundle":
            self._bundle(data, out)
        else:
            self._entries([(data, "", None)], out)

    def _bundle(self, bundle: dict[str, Any], out: Mapped) -> None:
        entries = bundle.get("entry")
        if not isinstance(entries, list):
            entries = []
        good: list[tuple[dict[str, Any], str, str | None]] = []
        for i, entry in enumerate(entries):
            where = f" (Bundle.entry[{i}])"
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict):
                out.rejected.append(FhirRejected("fhir_invalid", f"Bundle.entry[{i}].resource",
                                                 "missing or not an object"))
                continue
            if resource.get("resourceType") == "Bundle":
                self.map_resource(resource, out)
                continue
            try:
                validate_resource(resource, where=where)
            except FhirRejected as exc:
                out.rejected.append(exc)
                continue
            good.append((resource, where, entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None))
        self._entries(good, out)

    def _entries(self, items: list[tuple[dict[str, Any], str, str | None]], out: Mapped) -> None:
        """Map validated resources that arrived together: a ResearchSubject finds its Patient, a neutrophil
        percentage its WBC, among them."""
        index: dict[str, dict[str, Any]] = {}
        for resource, _, full_url in items:
            index[f"{resource['resourceType']}/{resource.get('id')}"] = resource
            if full_url:
                index[full_url] = resource
        used_wbc: set[int] = set()
        for resource, where, _ in items:
            kind = resource["resourceType"]
            if kind not in MAPPED_TYPES:
                out.ignored[kind] += 1
                continue
            try:
                payload = getattr(self, f"_{kind}")(resource, index, used_wbc)
            except FhirRejected as exc:
                if where:
                    exc.detail += where
                    exc.args = (f"{exc.reason}: {exc.detail}",)
                out.rejected.append(exc)
                continue
            except (AttributeError, TypeError, ValueError, KeyError) as exc:  # a valid but odd shape we missed
                out.rejected.append(FhirRejected("fhir_unmappable", kind, f"{type(exc).__name__}: {exc}{where}"))
                continue
            if payload is None:
                out.ignored[f"{kind} not needed by the rules"] += 1
                continue
            out.events.append((payload, self._reference(resource)))

    # -- common fields ---------------------------------------------------------------------------------------------
    @staticmethod
    def _reference(resource: dict[str, Any]) -> str:
        version = (resource.get("meta") or {}).get("versionId")
        ref = f"{resource['resourceType']}/{resource.get('id', '')}"
        return f"{ref}/_history/{version}" if version else ref

    def _subject_id(self, resource: dict[str, Any], element: str, index: dict[str, dict[str, Any]]) -> str:
        kind = resource["resourceType"]
        ref = resource.get(element)
        if not isinstance(ref, dict):
            raise FhirRejected("fhir_no_subject", f"{kind}.{element}", "missing: the event cannot be attributed to "
                               "a subject")
        ident = ref.get("identifier")
        if isinstance(ident, dict) and ident.get("system") == self.codes.subject_system and ident.get("value"):
            return str(ident["value"])
        target = ref.get("reference")
        if isinstance(target, str) and target:
            patient = index.get(target)
            if patient is not None:
                for i in patient.get("identifier") or []:
                    if i.get("system") == self.codes.subject_system and i.get("value"):
                        return str(i["value"])
                if patient.get("id"):
                    return str(patient["id"])
            tail = target.rstrip("/").split("/")
            if len(tail) >= 2 and tail[-2] in ("Patient", "ResearchSubject") and tail[-1]:
                return tail[-1]
            if len(tail) >= 4 and tail[-3] == "_history":
                return tail[-3]
        raise FhirRejected("fhir_no_subject", f"{kind}.{element}", "neither a subject identifier "
                           f"({self.codes.subject_system}) nor a Patient reference")

    def _common(self, resource: dict[str, Any], *, subject: str, index: dict[str, dict[str, Any]],
                occurred: Any, occurred_path: str, etype: str) -> dict[str, Any]:
        kind = resource["resourceType"]
        identifiers = resource.get("identifier") or []
        if isinstance(identifiers, dict):  # 0..1 on some resources (AdverseEvent)
            identifiers = [identifiers]
        event_id = next((str(i["value"]) for i in identifiers
                         if isinstance(i, dict) and i.get("system") == self.codes.event_id_system and i.get("value")),
                        None)
        if event_id is None:
            if not resource.get("id"):
                raise FhirRejected("fhir_no_id", f"{kind}.id", "neither an id nor an identifier "
                                   f"({self.codes.event_id_system}): amendments could not be matched")
            event_id = f"{kind}/{resource['id']}"
        subject_id = self._subject_id(resource, subject, index)
        site = _tag(resource, self.codes.site_tag_system)
        if site is None:
            raise FhirRejected("fhir_no_site", f"{kind}.meta.tag", f"no tag with system {self.codes.site_tag_system} "
                               "names the site", event_id=event_id)
        recorded = (resource.get("meta") or {}).get("lastUpdated")
        if not recorded:
            raise FhirRejected("fhir_no_time", f"{kind}.meta.lastUpdated", "missing: it is when the record was "
                               "made (recorded_at), which orders amendments", event_id=event_id)
        if not occurred:
            raise FhirRejected("fhir_no_time", f"{kind}.{occurred_path}", "missing: when it happened",
                               event_id=event_id)
        payload: dict[str, Any] = {"event_id": event_id, "subject_id": subject_id, "site_id": site, "type": etype,
                                   "occurred_at": occurred, "recorded_at": recorded,
                                   "source_ref": self._reference(resource)}
        arm = _tag(resource, self.codes.arm_tag_system)
        if arm:
            payload["arm"] = arm
        status = resource.get("status")
        if status in (RETRACTED, "amended", "corrected", "preliminary"):
            payload["status"] = status
        return payload

    def _coded(self, concept: Any) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
        for c in _codings(concept):
            k = (str(c.get("system")), str(c.get("code")))
            if k in self.codes.observations:
                return c, k
        return None, None

    def _unit(self, quantity: Any, accepted: tuple[str, ...], path: str, concept: str) -> tuple[float, str]:
        if not isinstance(quantity, dict) or quantity.get("value") is None:
            raise FhirRejected("fhir_no_value", path, f"{concept} needs a value")
        unit = quantity.get("code") or quantity.get("unit")
        which = "code" if quantity.get("code") else "unit"
        if unit not in accepted:
            raise FhirRejected("fhir_unit", f"{path}.{which}", f"unit {unit!r} is not accepted for {concept} "
                               f"(accepted UCUM: {', '.join(accepted)}; rules/fhir/codes.yaml)")
        return float(quantity["value"]), str(unit)

    # -- Observation ---------------------------------------------------------------------------------------------
    def _Observation(self, r: dict[str, Any], index: dict[str, dict[str, Any]], used_wbc: set[int]
                     ) -> dict[str, Any] | None:
        occurred = r.get("effectiveDateTime") or (r.get("effectivePeriod") or {}).get("start") or r.get(
            "effectiveInstant")
        keys = {(str(c.get("system")), str(c.get("code"))) for c in _codings(r.get("code"))}
        if keys & self.codes.wbc_codes or keys & self.codes.ignored_codes:
            return None
        if keys & self.codes.percentage_codes:
            return self._neutrophil_percentage(r, index, used_wbc, occurred)
        coding, key = self._coded(r.get("code"))
        if key is None:
            shown = ", ".join(f"{s}|{c}" for s, c in sorted(keys)) or "none"
            raise FhirRejected("fhir_unknown_code", "Observation.code.coding", f"no code the monitor maps ({shown}); "
                               "add a site's local code to rules/fhir/codes.yaml")
        spec = self.codes.observations[key]
        if spec.type == "echocardiogram":
            return self._echo(r, index, occurred)
        payload = self._common(r, subject="subject", index=index, occurred=occurred, occurred_path="effective[x]",
                               etype=spec.type)
        value, unit = self._unit(r.get("valueQuantity"), spec.units, "Observation.valueQuantity", spec.concept)
        payload.update(spec.flat)
        if spec.concept == "body_temperature":
            site = spec.site or self._site(r)
            if site is not None:
                payload["site"] = site
            if unit == "Cel":
                payload["temperature_c"] = value
            else:
                payload.update(value=value, unit=unit)
        elif spec.type == "vital_sign":
            payload.update(value=value, unit=unit)
        else:
            payload.update(loinc=key[1], value=value, unit=unit)
            ranges = [x for x in r.get("referenceRange") or [] if isinstance(x, dict)]
            if ranges:
                low, high = ranges[0].get("low") or {}, ranges[0].get("high") or {}
                payload["reference_range"] = {"low": low.get("value"), "high": high.get("value"),
                                              "unit": low.get("code") or high.get("code") or low.get("unit")
                                              or high.get("unit")}
            method = (r.get("method") or {}).get("text")
            if method:
                payload["method"] = method
        return payload

    def _site(self, r: dict[str, Any]) -> str | None:
        for element in ("bodySite", "method"):
            for c in _codings(r.get(element)):
                site = self.codes.body_sites.get(str(c.get("code")))
                if site is not None:
                    return site
        text = (r.get("bodySite") or {}).get("text")
        return str(text).strip().lower() if text else None

    def _neutrophil_percentage(self, r: dict[str, Any], index: dict[str, dict[str, Any]], used_wbc: set[int],
                               occurred: Any) -> dict[str, Any]:
        """ANC = WBC × neutrophil % / 100, only with a WBC of the same specimen (issue 18)."""
        specimen = (r.get("specimen") or {}).get("reference")
        wbc = None
        if specimen:
            for other in index.values():
                codes = {(str(c.get("system")), str(c.get("code"))) for c in _codings(other.get("code"))}
                if (other.get("resourceType") == "Observation" and codes & self.codes.wbc_codes
                        and (other.get("specimen") or {}).get("reference") == specimen):
                    wbc = other
                    break
        if wbc is None:
            raise FhirRejected("fhir_unpaired_percentage", "Observation.specimen",
                               "a neutrophil percentage is not an ANC; it is converted only with a WBC from the same "
                               "specimen in the same Bundle" + ("" if specimen else " (this one names no specimen)"))
        payload = self._common(r, subject="subject", index=index, occurred=occurred, occurred_path="effective[x]",
                               etype="lab_result")
        pct, _ = self._unit(r.get("valueQuantity"), self.codes.percentage_units, "Observation.valueQuantity",
                            "neutrophil percentage")
        anc = next(s for s in self.codes.observations.values() if s.concept == "ANC")
        count, unit = self._unit(wbc.get("valueQuantity"), anc.units, "Observation(WBC).valueQuantity", "WBC")
        used_wbc.add(id(wbc))
        payload.update(analyte="ANC", loinc=None, value=round(count * pct / 100.0, 6), unit=unit,
                       method="WBC x neutrophil % / 100")
        return payload

    def _echo(self, r: dict[str, Any], index: dict[str, dict[str, Any]], occurred: Any) -> dict[str, Any]:
        payload = self._common(r, subject="subject", index=index, occurred=occurred, occurred_path="effective[x]",
                               etype="echocardiogram")
        zs: dict[str, float] = {}
        for i, comp in enumerate(r.get("component") or []):
            artery = next((self.codes.echo_components[str(c.get("code"))] for c in _codings(comp.get("code"))
                           if str(c.get("code")) in self.codes.echo_components), None)
            if artery is None:
                raise FhirRejected("fhir_unknown_code", f"Observation.component[{i}].code",
                                   "not a coronary artery the code map knows")
            q = comp.get("valueQuantity")
            if isinstance(q, dict) and q.get("value") is not None:
                zs[artery] = float(q["value"])
        visit = (r.get("encounter") or {}).get("display")
        payload.update(coronary_z_scores=zs, worst_z=max(zs.values()) if zs else None)
        if visit:
            payload["visit"] = visit
        return payload

    # -- medications ---------------------------------------------------------------------------------------------
    def _drug(self, r: dict[str, Any], index: dict[str, dict[str, Any]]) -> tuple[str, str | None]:
        kind = r["resourceType"]
        concept = r.get("medicationCodeableConcept")
        path = f"{kind}.medicationCodeableConcept"
        if concept is None and isinstance(r.get("medicationReference"), dict):
            target = r["medicationReference"].get("reference", "")
            med = index.get(target) or next((c for c in r.get("contained") or []
                                             if f"#{c.get('id')}" == target), None)
            concept = (med or {}).get("code")
            path = f"{kind}.medicationReference"
        atc_system, rx_system = self.codes.systems["atc"], self.codes.systems["rxnorm"]
        text = (concept or {}).get("text")
        for c in _codings(concept):
            if c.get("system") == atc_system and c.get("code"):
                atc = str(c["code"]).upper()
                known = self.codes.drugs_by_atc.get(atc)
                return (text or c.get("display") or (known.name if known else atc)), atc
        for c in _codings(concept):
            if c.get("system") == rx_system and str(c.get("code")) in self.codes.drugs_by_rxnorm:
                d = self.codes.drugs_by_rxnorm[str(c["code"])]
                return text or d.name, d.atc
        if text and text.strip().lower() in self.codes.drugs_by_name:
            d = self.codes.drugs_by_name[text.strip().lower()]
            return text, d.atc
        raise FhirRejected("fhir_unknown_code", path, "the drug has no ATC code, and neither its RxNorm code nor its "
                           "name is in rules/fhir/codes.yaml")

    def _route(self, dosage: dict[str, Any]) -> str | None:
        route = dosage.get("route")
        for c in _codings(route):
            if str(c.get("code")) in self.codes.routes:
                return self.codes.routes[str(c.get("code"))]
        text = (route or {}).get("text") if isinstance(route, dict) else None
        return str(text).strip().lower() if text else None

    def _dose(self, quantity: Any, path: str) -> dict[str, float]:
        if not isinstance(quantity, dict) or quantity.get("value") is None:
            return {}
        unit = quantity.get("code") or quantity.get("unit")
        fieldname = self.codes.dose_units.get(str(unit))
        if fieldname is None:
            raise FhirRejected("fhir_unit", f"{path}.{'code' if quantity.get('code') else 'unit'}",
                               f"dose unit {unit!r} is not accepted (accepted UCUM: "
                               f"{', '.join(self.codes.dose_units)}; rules/fhir/codes.yaml)")
        return {fieldname: float(quantity["value"])}

    def _MedicationAdministration(self, r: dict[str, Any], index: dict[str, dict[str, Any]], _: set[int]
                                  ) -> dict[str, Any] | None:
        if r.get("status") not in ("completed", "in-progress", RETRACTED):
            return None  # not given (not-done, stopped before start, on-hold ...): not an administration
        period = r.get("effectivePeriod") or {}
        payload = self._common(r, subject="subject", index=index, occurred=r.get("effectiveDateTime") or
                               period.get("start"), occurred_path="effective[x]", etype="drug_administration")
        drug, atc = self._drug(r, index)
        dosage = r.get("dosage") or {}
        payload.update(drug=drug, atc=atc, route=self._route(dosage),
                       study_drug=bool(_ext_value(r, self.codes.ext("study-drug"))))
        payload.update(self._dose(dosage.get("dose"), "MedicationAdministration.dosage.dose"))
        payload.update(self._dose(_ext_value(dosage, self.codes.ext("dose-per-kg")),
                                  "MedicationAdministration.dosage.extension(dose-per-kg).valueQuantity"))
        weight = _ext_value(r, self.codes.ext("body-weight"))
        if isinstance(weight, dict) and weight.get("value") is not None:
            unit = weight.get("code") or weight.get("unit")
            if unit not in self.codes.weight_units:
                raise FhirRejected("fhir_unit", "MedicationAdministration.extension(body-weight).valueQuantity.code",
                                   f"weight unit {unit!r} is not accepted ({', '.join(self.codes.weight_units)})")
            payload["weight_kg"] = float(weight["value"]) * self.codes.weight_units[str(unit)]
        if period.get("end"):
            payload["infusion_end_at"] = period["end"]
        reasons = [x.get("text") for x in r.get("reasonCode") or [] if isinstance(x, dict) and x.get("text")]
        if reasons:
            payload["purpose"] = reasons[0]
        return payload

    def _concomitant(self, r: dict[str, Any], index: dict[str, dict[str, Any]], dosage: dict[str, Any],
                     start: Any, end: Any, occurred: Any) -> dict[str, Any]:
        payload = self._common(r, subject="subject", index=index, occurred=occurred or start,
                               occurred_path="effective[x]", etype="concomitant_medication")
        drug, atc = self._drug(r, index)
        payload.update(drug=drug, atc=atc, route=self._route(dosage), start_at=start or occurred, end_at=end)
        kind = r["resourceType"]
        element = "dosage" if kind == "MedicationStatement" else "dosageInstruction"
        for i, dr in enumerate(dosage.get("doseAndRate") or []):
            payload.update(self._dose(dr.get("doseQuantity"), f"{kind}.{element}[0].doseAndRate[{i}].doseQuantity"))
        timing = dosage.get("timing") or {}
        frequency = (timing.get("code") or {}).get("text")
        if frequency:
            payload["frequency"] = frequency
        if dosage.get("asNeededBoolean"):
            payload["regimen"] = "prn"
        elif (timing.get("repeat") or {}).get("count") == 1:
            payload["regimen"] = "single"
        elif dosage:
            payload["regimen"] = "scheduled"
        reasons = [x.get("text") for x in r.get("reasonCode") or [] if isinstance(x, dict) and x.get("text")]
        if reasons:
            payload["indication"] = reasons[0]
        return payload

    def _MedicationStatement(self, r: dict[str, Any], index: dict[str, dict[str, Any]], _: set[int]
                             ) -> dict[str, Any] | None:
        if r.get("status") in ("not-taken", "intended", "unknown"):
            return None
        period = r.get("effectivePeriod") or {}
        occurred = _ext_value(r, self.codes.ext("reported-at"))
        start = period.get("start") or r.get("effectiveDateTime")
        return self._concomitant(r, index, (r.get("dosage") or [{}])[0], start, period.get("end"),
                                 occurred or start)

    def _MedicationRequest(self, r: dict[str, Any], index: dict[str, dict[str, Any]], _: set[int]
                           ) -> dict[str, Any] | None:
        if r.get("status") in ("cancelled", "draft", "unknown") or r.get("intent") in ("proposal", "plan"):
            return None
        dosage = (r.get("dosageInstruction") or [{}])[0]
        bounds = ((dosage.get("timing") or {}).get("repeat") or {}).get("boundsPeriod") or {}
        return self._concomitant(r, index, dosage, bounds.get("start") or r.get("authoredOn"), bounds.get("end"),
                                 r.get("authoredOn") or bounds.get("start"))

    # -- vaccines, adverse events, visits, enrollment --------------------------------------------------------------
    def _Immunization(self, r: dict[str, Any], index: dict[str, dict[str, Any]], _: set[int]
                      ) -> dict[str, Any] | None:
        if r.get("status") == "not-done":
            return None  # a vaccine not given cannot be a live vaccine in the washout
        payload = self._common(r, subject="patient", index=index, occurred=r.get("occurrenceDateTime"),
                               occurred_path="occurrence[x]", etype="immunization")
        concept = r.get("vaccineCode") or {}
        atc = next((str(c["code"]) for c in _codings(concept)
                    if c.get("system") == self.codes.systems["atc"] and c.get("code")), None)
        name = concept.get("text") or next((c.get("display") for c in _codings(concept) if c.get("display")), None)
        if not name and not atc:
            raise FhirRejected("fhir_unknown_code", "Immunization.vaccineCode", "neither an ATC code nor a name")
        payload.update(vaccine=name or atc, atc=atc, route=self._route(r))
        live = _ext_value(r, self.codes.ext("live-attenuated"))
        if isinstance(live, bool):
            payload["live_attenuated"] = live
        return payload

    def _AdverseEvent(self, r: dict[str, Any], index: dict[str, dict[str, Any]], _: set[int]
                      ) -> dict[str, Any] | None:
        if r.get("actuality") == "potential":
            return None
        payload = self._common(r, subject="subject", index=index, occurred=r.get("date"), occurred_path="date",
                               etype="adverse_event")
        event = r.get("event") or {}
        meddra = next((c for c in _codings(event) if c.get("system") == self.codes.systems["meddra"]), None)
        term = event.get("text") or (meddra or {}).get("display")
        if not term:
            raise FhirRejected("fhir_missing", "AdverseEvent.event", "no term (text or MedDRA display)")
        serious = next((self.codes.seriousness[str(c.get("code"))] for c in _codings(r.get("seriousness"))
                        if str(c.get("code")) in self.codes.seriousness), False)
        payload.update(term=term, serious=serious,
                       serious_criteria=[e.get("valueCode") for e in _extensions(r, self.codes.ext("serious-criterion"))
                                         if e.get("valueCode")])
        if meddra is not None and meddra.get("display"):
            payload["meddra_pt"] = meddra["display"]
        grade = _ext_value(r, self.codes.ext("ctcae-grade"))
        if grade is not None:
            payload["grade"] = grade
        infection = _ext_value(r, self.codes.ext("infection-type"))
        if infection:
            payload["infection_type"] = infection
        if r.get("detected"):
            payload["investigator_aware_at"] = r["detected"]
        for s in r.get("suspectEntity") or []:
            for c in s.get("causality") or []:
                text = (c.get("assessment") or {}).get("text")
                if text:
                    payload["related_to_study_drug"] = text
        return payload

    def _Encounter(self, r: dict[str, Any], index: dict[str, dict[str, Any]], _: set[int]) -> dict[str, Any] | None:
        if r.get("status") in ("planned", "cancelled", "unknown"):
            return None
        payload = self._common(r, subject="subject", index=index, occurred=(r.get("period") or {}).get("start"),
                               occurred_path="period.start", etype="visit")
        label = next((t.get("text") for t in r.get("type") or [] if isinstance(t, dict) and t.get("text")), None)
        if not label:
            raise FhirRejected("fhir_missing", "Encounter.type", "no visit label (type.text, e.g. D14)")
        payload["visit"] = label
        for name, fieldname in (("nominal-day", "nominal_day"), ("physician-activity-score", "physician_activity_score"),
                                ("parent-activity-score", "parent_activity_score")):
            value = _ext_value(r, self.codes.ext(name))
            if value is not None:
                payload[fieldname] = value
        return payload

    def _ResearchSubject(self, r: dict[str, Any], index: dict[str, dict[str, Any]], _: set[int]
                         ) -> dict[str, Any] | None:
        """Enrollment: the arm and start from the ResearchSubject, birth date and sex from its Patient (in the same
        Bundle), the eligibility CRF from the `eligibility-crf` extension. Nothing else of the Patient (name,
        address, telecom) is read, so nothing else is kept."""
        payload = self._common(r, subject="individual", index=index, occurred=(r.get("period") or {}).get("start"),
                               occurred_path="period.start", etype="enrollment")
        patient = index.get(((r.get("individual") or {}).get("reference")) or "")
        if patient is None or not patient.get("birthDate"):
            raise FhirRejected("fhir_missing", "ResearchSubject.individual", "its Patient, with birthDate, must come "
                               "in the same Bundle")
        payload.update(birth_date=patient["birthDate"],
                       sex={"male": "M", "female": "F"}.get(patient.get("gender", ""), patient.get("gender")))
        if r.get("assignedArm"):
            payload["arm"] = r["assignedArm"]
        consent = _ext_value(r, self.codes.ext("consent-signed-at"))
        if consent:
            payload["consent_signed_at"] = consent
        for crf in _extensions(r, self.codes.ext("eligibility-crf")):
            tree = _extension_tree(crf, Enrollment)
            payload.update({k: v for k, v in tree.items() if k not in payload})
        return payload


SUBJECT_ELEMENT = {"Immunization": "patient", "ResearchSubject": "individual"}


def subject_key(resource: dict[str, Any], codes: CodeMap) -> str | None:
    """The subject id a resource belongs to (for keying records by subject), or None; never raises."""
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        return None
    if resource["resourceType"] == "Patient":
        for i in resource.get("identifier") or []:
            if isinstance(i, dict) and i.get("system") == codes.subject_system and i.get("value"):
                return str(i["value"])
        return str(resource["id"]) if resource.get("id") else None
    try:
        return FhirMapper(code_map=codes)._subject_id(
            resource, SUBJECT_ELEMENT.get(resource["resourceType"], "subject"), {})
    except (FhirRejected, AttributeError, TypeError):
        return None


def flat_records(record: RawRecord, mapped: Mapped) -> list[RawRecord]:
    """Each event mapped from `record` as a record of its own (flat JSON) that keeps the original's place (topic,
    partition, offset, timestamp; its origin, which is logged, not the resource id) and names the FHIR resource in a
    `fhir_resource` header, so the
    rest of the pipeline (batching, offsets, dead letters, rebuilds) handles it like any flat record."""
    out = []
    for payload, ref in mapped.events:
        out.append(RawRecord(value=json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8"),
                             origin=record.origin, headers={**record.headers, "fhir_resource":
                                                                       ref.encode("utf-8")},
                             key=record.key, topic=record.topic, partition=record.partition, offset=record.offset,
                             timestamp_ms=record.timestamp_ms))
    return out

"""Clinical event model (RULES_SPEC §5) and parsing of raw input into validated events.

Every way an input can be wrong ends in `EventRejected` with a reason code (for counting) and a sentence a data
manager can act on. Nothing here raises anything else for bad input.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AwareDatetime,
    BeforeValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from pydantic_core import PydanticCustomError

from monitor.errors import EventRejected

MAX_EVENT_BYTES = 1_000_000
"""Largest accepted event; a bigger one is rejected as `too_large` (it is never a real clinical record)."""

Arm = Annotated[str, StringConstraints(min_length=1, max_length=64)]
"""An arm code; which codes the protocol has is data (parameters.yaml `arms`), checked by `Monitor.admit`."""
def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a number is required, not true/false")
    return value


Number = Annotated[float, Field(allow_inf_nan=False), BeforeValidator(_no_bool)]


def _iso_text(value: Any) -> Any:
    if not isinstance(value, (str, dt.datetime)):
        raise PydanticCustomError("datetime_number",
                                  "an ISO 8601 date-time text with a UTC offset is required, not a number")
    return value


Instant = Annotated[AwareDatetime, BeforeValidator(_iso_text)]
"""An instant as ISO 8601 text with its offset. A bare number is refused: seconds or milliseconds since 1970 cannot
be told apart (one 14-digit number is the year 4199 read as milliseconds), and one record stamped far ahead would
move a replay's clock and fire every other subject's deadlines."""
Text = Annotated[str, Field(min_length=1, max_length=4000)]


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=True)

    event_id: Text
    subject_id: Annotated[str, Field(min_length=1, max_length=200)]
    site_id: Annotated[str, Field(min_length=1, max_length=200)]
    arm: Arm | None = None
    occurred_at: Instant
    recorded_at: Instant
    status: Literal["final", "amended", "corrected", "preliminary", "entered-in-error"] | None = None
    amendment_reason: str | None = None
    ingest_batch: str | None = None
    source: str | None = None
    source_ref: Annotated[str, Field(max_length=400)] | None = None  # mapped from: FHIR Type/id/_history/version


class KdDiagnosis(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    classification: str | None = None
    fever_onset_date: dt.date | None = None
    principal_signs: list[str] = Field(default_factory=list)
    signs_present_by_fever_day: int | None = None
    fever_days_at_first_ivig: int | None = None
    crp_mg_dl: Number | None = None
    esr_mm_h: Number | None = None
    supplemental_lab_criteria: list[str] = Field(default_factory=list)
    echo_positive: bool | None = None


class Enrollment(_Base):
    type: Literal["enrollment"]
    birth_date: dt.date
    sex: str | None = None
    consent_signed_at: Instant | None = None
    weight_kg: Number | None = None
    height_cm: Number | None = None
    gestational_age_at_birth_weeks: Number | None = None
    kd_diagnosis: KdDiagnosis | None = None
    exclusion_checklist: dict[str, StrictBool | None] = Field(default_factory=dict)
    health_insurance: bool | None = None


class VitalSign(_Base):
    type: Literal["vital_sign"]
    code: str | None = None
    analyte: str | None = None
    temperature_c: Number | None = None
    value: Number | None = None
    unit: str | None = None
    site: str | None = None


class ReferenceRange(BaseModel):
    """A lab's reference range. `low`/`high` are validated numbers like any other: a numeric string ("45") is read
    as 45 (laboratory systems export them as text), anything else ("n/a", "<5", NaN) refuses the record as
    `bad_number`, so nothing downstream ever converts raw text."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    low: Number | None = None
    high: Number | None = None
    unit: str | None = None


class LabResult(_Base):
    type: Literal["lab_result"]
    analyte: Text
    loinc: str | None = None
    value: Number
    unit: str | None = None
    reference_range: ReferenceRange | None = None
    method: str | None = None


class _DoseFields(BaseModel):
    dose_mg_per_kg: Number | None = None
    dose_mg: Number | None = None
    dose_g_per_kg: Number | None = None
    dose_g: Number | None = None


class DrugAdministration(_Base, _DoseFields):
    type: Literal["drug_administration"]
    drug: Text
    atc: str | None = None
    route: str | None = None
    weight_kg: Number | None = None
    infusion_end_at: Instant | None = None
    study_drug: bool = False
    purpose: str | None = None


class ConcomitantMedication(_Base, _DoseFields):
    type: Literal["concomitant_medication"]
    drug: Text
    atc: str | None = None
    route: str | None = None
    dose_mg_per_kg_per_day: Number | None = None
    dose_iu: Number | None = None
    frequency: str | None = None
    regimen: str | None = None
    indication: str | None = None
    start_at: Instant | None = None
    end_at: Instant | None = None


class Immunization(_Base):
    type: Literal["immunization"]
    vaccine: Text
    atc: str | None = None
    live_attenuated: bool | None = None
    route: str | None = None


class AdverseEvent(_Base):
    type: Literal["adverse_event"]
    term: Text
    meddra_pt: str | None = None
    grade: int | None = None
    serious: bool = False
    serious_criteria: list[str] = Field(default_factory=list)
    related_to_study_drug: bool | str | None = None
    infection_type: str | None = None
    investigator_aware_at: Instant | None = None


class Visit(_Base):
    type: Literal["visit"]
    visit: Text
    nominal_day: int | None = None
    physician_activity_score: Number | None = None
    parent_activity_score: Number | None = None


class Echocardiogram(_Base):
    type: Literal["echocardiogram"]
    visit: str | None = None
    coronary_z_scores: dict[str, Number | None] = Field(default_factory=dict)
    worst_z: Number | None = None

    @field_validator("coronary_z_scores")
    @classmethod
    def _known_arteries(cls, value: dict[str, float | None]) -> dict[str, float | None]:
        return {k: v for k, v in value.items() if v is not None}


Event = Annotated[
    Union[
        Enrollment,
        VitalSign,
        LabResult,
        DrugAdministration,
        ConcomitantMedication,
        Immunization,
        AdverseEvent,
        Visit,
        Echocardiogram,
    ],
    Field(discriminator="type"),
]
EVENT_TYPES: tuple[str, ...] = (
    "enrollment",
    "vital_sign",
    "lab_result",
    "drug_administration",
    "concomitant_medication",
    "immunization",
    "adverse_event",
    "visit",
    "echocardiogram",
)
_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def _describe(error: Any) -> str:
    where = ".".join(str(p) for p in error.get("loc", ()) if p not in EVENT_TYPES)
    kind = error.get("type", "")
    if kind == "missing":
        return f"required field '{where}' is missing"
    if kind == "timezone_aware":
        return f"'{where}' has no UTC offset; send ISO-8601 with an offset, e.g. 2025-02-10T08:30:00+01:00"
    if kind.startswith("datetime") or kind.startswith("date"):
        return f"'{where}' is not an ISO-8601 date/time ({error.get('msg')})"
    if kind.startswith("float") or kind.startswith("int") or kind == "finite_number":
        return f"'{where}' is not a usable number (got {error.get('input')!r})"
    return f"'{where}': {error.get('msg')}"


def _reason_for(errors: list[Any]) -> str:
    kinds = {e.get("type", "") for e in errors}
    if "missing" in kinds:
        return "missing_field"
    if any(k.startswith(("datetime", "date", "timezone")) for k in kinds):
        return "bad_time"
    if any(k.startswith(("float", "int", "finite")) for k in kinds):
        return "bad_number"
    return "invalid_field"


def _check_size(raw: bytes | str, max_bytes: int) -> None:
    size = len(raw.encode("utf-8", "surrogatepass")) if isinstance(raw, str) else len(raw)
    if size > max_bytes:
        raise EventRejected("too_large", f"event is {size} bytes; the limit is {max_bytes} (max_message_bytes)")


def decode(raw: bytes | str, *, max_bytes: int = MAX_EVENT_BYTES) -> dict[str, Any]:
    """Turn raw bytes into a JSON object, or reject with the reason (`too_large` above `max_bytes`)."""
    _check_size(raw, max_bytes)
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EventRejected("malformed_json", f"not valid JSON ({exc})") from None
    except RecursionError:
        raise EventRejected("malformed_json", "JSON nested too deeply to be an event") from None
    if not isinstance(value, dict):
        raise EventRejected("not_an_object", f"an event must be a JSON object, got {type(value).__name__}")
    return value


def parse_event(data: dict[str, Any]) -> Event:
    """Validate one decoded event. Raises EventRejected naming the first problem a person should fix."""
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    kind = data.get("type")
    if kind is None:
        raise EventRejected("missing_field", "required field 'type' is missing", event_id=event_id)
    if kind not in EVENT_TYPES:
        raise EventRejected(
            "unknown_type", f"unknown event type {kind!r}; expected one of {', '.join(EVENT_TYPES)}", event_id=event_id
        )
    try:
        return _compact(_ADAPTER.validate_python(data))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        detail = "; ".join(_describe(e) for e in errors[:3])
        raise EventRejected(_reason_for(errors), f"{kind} event: {detail}", event_id=event_id) from None
    except (TypeError, ValueError, RecursionError) as exc:  # defensive: pydantic edge cases on odd input
        raise EventRejected("invalid_field", f"{kind} event: {exc}", event_id=event_id) from None


def parse_record(raw: bytes | str, *, max_bytes: int = MAX_EVENT_BYTES) -> tuple[Event, bytes | dict[str, Any]]:
    """`decode` then `parse_event` in one pass: the event, and its payload for `SubjectState.apply`, which is the
    record's JSON text (bytes) when the event validated straight from it (its canonical text is computed from it
    only if its event id is already held), else the decoded object. Anything the one-pass validation refuses goes
    through `decode` and `parse_event`, so every rejection and its reason are theirs."""
    _check_size(raw, max_bytes)
    try:
        event = _ADAPTER.validate_json(raw)
    except (ValidationError, TypeError, ValueError, RecursionError):
        payload = decode(raw, max_bytes=max_bytes)
        return parse_event(payload), payload
    # jiter refuses lone surrogates, so a text that validated encodes to UTF-8
    return _compact(event), raw if isinstance(raw, bytes) else raw.encode("utf-8")


def canonical_of(payload: bytes | str | dict[str, Any]) -> str:
    """The canonical text of a payload: a decoded object, a record's JSON text (bytes), or a canonical text."""
    if isinstance(payload, str):
        return payload
    return canonical(json.loads(payload) if isinstance(payload, bytes) else payload)


_FIELDS_SETS: dict[tuple[type, frozenset[str]], set[str]] = {}
_MAX_FIELDS_SETS = 4096


def _compact(event: Any) -> Any:
    """A subject's history holds ~100 events for months: events of one type that set the same fields share one
    fields-set (~730 bytes each otherwise; frozen models never change it), given to the public
    `model_construct(_fields_set=...)` with the validated values, and short repeated texts (subject, site, type,
    drug, unit ...) are interned. Values are unchanged."""
    cls = type(event)
    fields = event.model_fields_set
    key = (cls, frozenset(fields))
    shared = _FIELDS_SETS.get(key)
    if shared is None:
        if len(_FIELDS_SETS) >= _MAX_FIELDS_SETS:
            return event
        shared = _FIELDS_SETS[key] = set(fields)
    values = {name: sys.intern(value) if type(value) is str and name != "event_id" and len(value) <= 64 else value
              for name, value in event}
    return cls.model_construct(_fields_set=shared, **values)


def canonical(data: dict[str, Any]) -> str:
    """Canonical text of a payload, used to tell a transport retry (same bytes) from an amendment (§2.6)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

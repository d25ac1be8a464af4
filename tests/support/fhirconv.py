"""Test-only converter: the monitor's flat events (RULES_SPEC §5) as the FHIR R4 resources a hospital or EDC would
send (issue 18). It is the inverse of monitor/fhir.py written independently from the code map's data, so a
scenario replayed in both forms must give the same alerts.

Consecutive events of one subject recorded at the same instant go into one Bundle (one JSON line); an event id
seen again becomes a new `meta.versionId` of the same resource; a flat `status: entered-in-error` stays one.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from monitor.fhir import DEFAULT_CODE_MAP

_MAP = yaml.safe_load(DEFAULT_CODE_MAP.read_text(encoding="utf-8"))
SYS = _MAP["systems"]
IDS = _MAP["identifiers"]
EXT = _MAP["extension_base"]
SITES = {v: k for k, v in _MAP["body_sites"].items()}
ROUTES = {v: k for k, v in _MAP["routes"].items()}
LOINC, UCUM, SNOMED, ATC = SYS["loinc"], SYS["ucum"], SYS["snomed"], SYS["atc"]


def _q(value: Any, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def _cc(system: str, code: str, text: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"coding": [{"system": system, "code": code}]}
    if text:
        out["text"] = text
    return out


def _fid(event_id: str) -> str:
    """FHIR ids allow [A-Za-z0-9-.]{1,64}."""
    return "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in event_id)[:64]


def _crf_extension(url: str, data: dict[str, Any]) -> dict[str, Any]:
    children = []
    for name, value in data.items():
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, dict):
                children.append(_crf_extension(name, v))
            elif isinstance(v, bool):
                children.append({"url": name, "valueBoolean": v})
            elif isinstance(v, int):
                children.append({"url": name, "valueInteger": v})
            elif isinstance(v, float):
                children.append({"url": name, "valueDecimal": v})
            else:
                children.append({"url": name, "valueString": str(v)})
    return {"url": url, "extension": children}


class Converter:
    """Keeps the version of each resource, so re-sent events become amendments (meta.versionId 2, 3 ...)."""

    def __init__(self) -> None:
        self.versions: dict[str, int] = {}

    def resources(self, e: dict[str, Any]) -> list[dict[str, Any]]:
        kind = e["type"]
        rtype = {"vital_sign": "Observation", "lab_result": "Observation", "echocardiogram": "Observation",
                 "drug_administration": "MedicationAdministration", "concomitant_medication": "MedicationStatement",
                 "immunization": "Immunization", "adverse_event": "AdverseEvent", "visit": "Encounter",
                 "enrollment": "ResearchSubject"}[kind]
        key = f"{rtype}/{e['event_id']}"
        self.versions[key] = self.versions.get(key, 0) + 1
        tags = [{"system": IDS["site_tag_system"], "code": e["site_id"]}]
        if e.get("arm"):
            tags.append({"system": IDS["arm_tag_system"], "code": e["arm"]})
        r: dict[str, Any] = {
            "resourceType": rtype, "id": _fid(e["event_id"]),
            "meta": {"versionId": str(self.versions[key]), "lastUpdated": e["recorded_at"], "tag": tags},
            "identifier": [{"system": IDS["event_id_system"], "value": e["event_id"]}],
        }
        subject = {"reference": f"Patient/{_fid(e['subject_id'])}",
                   "identifier": {"system": IDS["subject_system"], "value": e["subject_id"]}}
        retracted = e.get("status") == "entered-in-error"
        amended = e.get("status") in ("amended", "corrected")
        extra: list[dict[str, Any]] = []
        if rtype == "Observation":
            r.update(status="entered-in-error" if retracted else e.get("status") or "final", subject=subject,
                     effectiveDateTime=e["occurred_at"])
            if kind == "vital_sign":
                r["category"] = [_cc("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs")]
                r["code"] = _cc(LOINC, e.get("code") or "8310-5")
                if e.get("temperature_c") is not None:
                    r["valueQuantity"] = _q(e["temperature_c"], "Cel")
                else:
                    r["valueQuantity"] = _q(e["value"], e["unit"])
                if e.get("site"):
                    r["bodySite"] = _cc(SNOMED, SITES[e["site"]], e["site"])
            elif kind == "lab_result":
                r["category"] = [_cc("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory")]
                r["code"] = _cc(LOINC, e["loinc"], e["analyte"])
                r["valueQuantity"] = _q(e["value"], e["unit"])
                rr = e.get("reference_range")
                if rr:
                    rng: dict[str, Any] = {}
                    if rr.get("low") is not None:
                        rng["low"] = _q(rr["low"], rr.get("unit") or e["unit"])
                    if rr.get("high") is not None:
                        rng["high"] = _q(rr["high"], rr.get("unit") or e["unit"])
                    r["referenceRange"] = [rng]
                if e.get("method"):
                    r["method"] = {"text": e["method"]}
            else:
                r["code"] = _cc(SYS["local"], "coronary-z-scores", "Coronary artery Z scores")
                r["component"] = [{"code": _cc(SYS["local"], artery), "valueQuantity": _q(z, "1")}
                                  for artery, z in e["coronary_z_scores"].items() if z is not None]
                if e.get("visit"):
                    r["encounter"] = {"display": e["visit"]}
        elif rtype == "MedicationAdministration":
            r.update(status="entered-in-error" if retracted else "completed", subject=subject,
                     medicationCodeableConcept=_cc(ATC, e["atc"], e["drug"]))
            if e.get("infusion_end_at"):
                r["effectivePeriod"] = {"start": e["occurred_at"], "end": e["infusion_end_at"]}
            else:
                r["effectiveDateTime"] = e["occurred_at"]
            dosage: dict[str, Any] = {}
            if e.get("route"):
                dosage["route"] = _cc(SNOMED, ROUTES[e["route"]], e["route"])
            absolute = [(f, u) for f, u in (("dose_mg", "mg"), ("dose_g", "g")) if e.get(f) is not None]
            per_kg = [(f, u) for f, u in (("dose_mg_per_kg", "mg/kg"), ("dose_g_per_kg", "g/kg"))
                      if e.get(f) is not None]
            if absolute:
                dosage["dose"] = _q(e[absolute[0][0]], absolute[0][1])
                if per_kg:
                    dosage["extension"] = [{"url": EXT + "dose-per-kg", "valueQuantity": _q(e[per_kg[0][0]],
                                                                                            per_kg[0][1])}]
            elif per_kg:
                dosage["dose"] = _q(e[per_kg[0][0]], per_kg[0][1])
            if dosage:
                r["dosage"] = dosage
            extra.append({"url": EXT + "study-drug", "valueBoolean": bool(e.get("study_drug"))})
            if e.get("weight_kg") is not None:
                extra.append({"url": EXT + "body-weight", "valueQuantity": _q(e["weight_kg"], "kg")})
            if e.get("purpose"):
                r["reasonCode"] = [{"text": e["purpose"]}]
        elif rtype == "MedicationStatement":
            r.update(status="entered-in-error" if retracted else "active", subject=subject,
                     medicationCodeableConcept=_cc(ATC, e["atc"], e["drug"]))
            period = {"start": e.get("start_at") or e["occurred_at"]}
            if e.get("end_at"):
                period["end"] = e["end_at"]
            r["effectivePeriod"] = period
            if e["occurred_at"] != period["start"]:
                extra.append({"url": EXT + "reported-at", "valueDateTime": e["occurred_at"]})
            d: dict[str, Any] = {}
            if e.get("route"):
                d["route"] = _cc(SNOMED, ROUTES[e["route"]], e["route"])
            for f, u in (("dose_mg", "mg"), ("dose_mg_per_kg", "mg/kg"), ("dose_mg_per_kg_per_day", "mg/kg/d"),
                         ("dose_iu", "[iU]"), ("dose_g", "g"), ("dose_g_per_kg", "g/kg")):
                if e.get(f) is not None:
                    d.setdefault("doseAndRate", []).append({"doseQuantity": _q(e[f], u)})
            if e.get("frequency"):
                d["timing"] = {"code": {"text": e["frequency"]}}
            if e.get("regimen") == "prn":
                d["asNeededBoolean"] = True
            elif e.get("regimen") == "single":
                d.setdefault("timing", {})["repeat"] = {"count": 1}
            r["dosage"] = [d]
            if e.get("indication"):
                r["reasonCode"] = [{"text": e["indication"]}]
        elif rtype == "Immunization":
            r.update(status="entered-in-error" if retracted else "completed", patient=subject,
                     vaccineCode=_cc(ATC, e["atc"], e["vaccine"]), occurrenceDateTime=e["occurred_at"])
            if e.get("route"):
                r["route"] = _cc(SNOMED, ROUTES[e["route"]], e["route"])
            if e.get("live_attenuated") is not None:
                extra.append({"url": EXT + "live-attenuated", "valueBoolean": e["live_attenuated"]})
        elif rtype == "AdverseEvent":
            r["identifier"] = r["identifier"][0]  # 0..1 in R4
            r.update(actuality="actual", subject=subject, date=e["occurred_at"],
                     event={"coding": [{"system": SYS["meddra"], "display": e["meddra_pt"]}], "text": e["term"]}
                     if e.get("meddra_pt") else {"text": e["term"]},
                     seriousness=_cc("http://terminology.hl7.org/CodeSystem/adverse-event-seriousness",
                                     "serious" if e.get("serious") else "non-serious"))
            if e.get("investigator_aware_at"):
                r["detected"] = e["investigator_aware_at"]
            if e.get("grade") is not None:
                extra.append({"url": EXT + "ctcae-grade", "valueInteger": e["grade"]})
            for c in e.get("serious_criteria") or []:
                extra.append({"url": EXT + "serious-criterion", "valueCode": c})
            if e.get("infection_type"):
                extra.append({"url": EXT + "infection-type", "valueCode": e["infection_type"]})
            if e.get("related_to_study_drug") is not None:
                r["suspectEntity"] = [{"instance": {"display": "study drug"},
                                       "causality": [{"assessment": {"text": str(e["related_to_study_drug"])}}]}]
        elif rtype == "Encounter":
            r.update(status="entered-in-error" if retracted else "finished",
                     **{"class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}},
                     subject=subject, period={"start": e["occurred_at"]}, type=[{"text": e["visit"]}])
            for name, f in (("nominal-day", "nominal_day"), ("physician-activity-score", "physician_activity_score"),
                            ("parent-activity-score", "parent_activity_score")):
                if e.get(f) is not None:
                    value_key = "valueInteger" if isinstance(e[f], int) else "valueDecimal"
                    extra.append({"url": EXT + name, value_key: e[f]})
        else:  # enrollment: ResearchSubject + its Patient (birth date and sex only)
            patient = {"resourceType": "Patient", "id": _fid(e["subject_id"]),
                       "identifier": [{"system": IDS["subject_system"], "value": e["subject_id"]}],
                       "birthDate": e["birth_date"],
                       "gender": {"M": "male", "F": "female"}.get(e.get("sex") or "", "unknown")}
            r.update(status="off-study" if retracted else "on-study", period={"start": e["occurred_at"]},
                     study={"reference": "ResearchStudy/NCT04656184"}, individual=subject)
            if retracted:
                r["status"] = "withdrawn"
            if e.get("arm"):
                r["assignedArm"] = e["arm"]
            if e.get("consent_signed_at"):
                extra.append({"url": EXT + "consent-signed-at", "valueDateTime": e["consent_signed_at"]})
            crf = {k: e.get(k) for k in ("weight_kg", "height_cm", "gestational_age_at_birth_weeks", "kd_diagnosis",
                                         "exclusion_checklist", "health_insurance")}
            extra.append(_crf_extension(EXT + "eligibility-crf", crf))
            if extra:
                r["extension"] = extra
            return [r, patient]
        if amended and rtype == "Observation":
            r["status"] = e["status"]
        if extra:
            r["extension"] = extra
        return [r]

    def bundle(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        entries = []
        for e in events:
            for res in self.resources(e):
                entries.append({"fullUrl": f"{res['resourceType']}/{res['id']}", "resource": res})
        return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def to_fhir_lines(events: list[dict[str, Any]]) -> list[str]:
    """Flat events in delivery order → FHIR Bundles, one JSON line each, in the same order."""
    conv = Converter()
    groups: list[list[dict[str, Any]]] = []
    for e in events:
        if groups and (groups[-1][0]["subject_id"], groups[-1][0]["recorded_at"]) == (e["subject_id"],
                                                                                      e["recorded_at"]) and all(
                g["event_id"] != e["event_id"] for g in groups[-1]):
            groups[-1].append(e)
        else:
            groups.append([e])
    return [json.dumps(conv.bundle(g), ensure_ascii=False) for g in groups]

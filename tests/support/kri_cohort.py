"""The cohort of the QTL tests (tests/monitor/test_kri.py in process, tests/connectors/test_kri_kafka.py through the
real service): eight subjects at three sites, the first randomised on an ineligible ANC, and the lab's later
correction that brings the trial back within the limit. Written once so both tests judge the same trial."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, NamedTuple

from monitor.generate import cohort_plan, subject_events


class QtlCohort(NamedTuple):
    events: list[dict[str, Any]]  # in `recorded_at` order
    ineligible: str  # the subject randomised on an ineligible ANC
    correction: dict[str, Any]  # its ANC corrected an hour after the last event (a transcription error)


def qtl_cohort() -> QtlCohort:
    plans = cohort_plan(subjects=8, seed=4, sites=3, deviation_rate=0.0)
    plans = [dataclasses.replace(p, deviation="low_anc" if i == 0 else None) for i, p in enumerate(plans)]
    events = sorted((e for p in plans for e in subject_events(p, 3)),
                    key=lambda e: (dt.datetime.fromisoformat(e["recorded_at"]), e["subject_id"], e["event_id"]))
    ineligible = plans[0].subject_id
    anc = next(e for e in events if e["subject_id"] == ineligible and e.get("analyte") == "ANC")
    last = max(dt.datetime.fromisoformat(e["recorded_at"]) for e in events)
    correction = {**anc, "value": 3.2, "status": "corrected",
                  "recorded_at": (last + dt.timedelta(hours=1)).isoformat()}  # the lab corrects a transcription
    return QtlCohort(events=events, ineligible=ineligible, correction=correction)

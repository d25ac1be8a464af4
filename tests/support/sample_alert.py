"""One realistic alert record for the delivery tests (e-mail, webhook): a missed H12 escalation, streamed."""

from __future__ import annotations

from monitor.alerts import Alert, alert_id

EVENTS = ["ANA-004-E001", "ANA-004-E020", "ANA-004-E031"]
MESSAGE = ("Febrile at H12 (38.5 C at 2025-02-10T20:10:00+01:00) but only 0.0 mg/kg was given in the escalation "
           "window 2025-02-10T19:30:00+01:00 to 2025-02-10T23:30:00+01:00.")
EXPECTS = "A supplementary 2 mg/kg (>= 1.8) in [H12-1h, H12+3h] when febrile at H12."


def make_alert(status: str = "raised") -> Alert:
    aid = alert_id("DOSE-H12-MISSED-ESCALATION", "ANA-004", "ladder_step:H12", 0)
    return Alert(
        alert_id=aid, status=status, retracts=aid if status == "retracted" else None,
        rule="DOSE-H12-MISSED-ESCALATION", title="Febrile at H12 but no supplementary dose",
        subject_id="ANA-004", site_id="FR-BIC-01", severity="major", category="dosing",
        at="2025-02-10T23:30:00+01:00",
        detected_at="2025-02-11T01:30:00+01:00" if status == "raised" else "2025-02-11T09:05:00+01:00",
        rule_version="a31d264df3db", message=MESSAGE, expects=EXPECTS,
        evidence={"fact": "ladder_step", "events": EVENTS,
                  "values": {"at": "2025-02-10T23:30:00+01:00", "step": "H12", "febrile": True, "assessed_c": 38.5,
                             "assessed_at": "2025-02-10T20:10:00+01:00", "given_mg_per_kg": 0.0,
                             "doses_in_window": 0.0, "weight_known": True, "level_day1": 4.0,
                             "window_start": "2025-02-10T19:30:00+01:00",
                             "window_end": "2025-02-10T23:30:00+01:00"},
                  "sources": {"ANA-004-E020": {"topic": "clinical-events", "partition": 3, "offset": 1187},
                              "ANA-004-E031": {"topic": "clinical-events", "partition": 3, "offset": 1402}},
                  "rule_condition": "step = H12 and febrile = true and ((weight_known = true and "
                                    "given_mg_per_kg < 1.8) or (weight_known = false and doses_in_window = 0))",
                  "hx": "2025-02-10T20:30:00+01:00", "raw_c": 38.1, "site": "axillary"})

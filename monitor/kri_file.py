"""rules/kri.yaml, the site-risk file rule authors write (issue 20): the measures a KRI or a QTL may name, the
file's model and its loader. `monitor.kri` computes the scores and the QTL alerts from it; this module is apart so
that loading a rules directory (`monitor.rules.load_rules`) does not import the scoring and the alerts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from monitor.errors import RuleFileError
from monitor.yamlfiles import closest, load_yaml, pydantic_problems

KRI_FILE = "kri.yaml"

# --------------------------------------------------------------------------------------------------------------
# The measures a KRI or a QTL may name


@dataclass(frozen=True)
class Measure:
    """One per-site quantity the monitor can compute. `kind` says what it can be used for: `count` and
    `participants` (a count of distinct participants, who are listed in a QTL's evidence) as numerators or
    denominators, `exposure` (participant-time) as a denominator, `sample` (one value per record) only by a
    descriptive KRI."""

    name: str
    kind: Literal["count", "participants", "exposure", "sample"]
    description: str


MEASURES: dict[str, Measure] = {m.name: m for m in (
    Measure("participants_enrolled", "participants", "participants with an enrollment (randomisation) record"),
    Measure("participant_weeks", "exposure", "weeks from enrollment to now, capped at the follow-up length"),
    Measure("major_dosing_deviations", "count", "open dosing alerts of severity major or critical"),
    Measure("participants_with_major_dosing_deviation", "participants",
            "participants with at least one open major or critical dosing alert"),
    Measure("missed_h12_h24_assessments", "count", "open FEVER-ASSESSMENT-MISSING alerts for the H12 or H24 window"),
    Measure("h12_h24_assessments_due", "count",
            "H12 and H24 fever assessments whose window closed (anakinra arm: Hx + 1 h + grace has passed)"),
    Measure("endpoint_assessments_missing", "participants",
            "participants with an open FEVER-ASSESSMENT-MISSING alert for the primary-endpoint window"),
    Measure("endpoint_assessments_due", "participants",
            "participants whose primary-endpoint window closed (T0 + 48 h + grace has passed)"),
    Measure("eligibility_alerts", "count", "open eligibility alerts (any severity)"),
    Measure("participants_ineligible", "participants",
            "participants with an open eligibility alert of severity major or critical"),
    Measure("serious_adverse_events", "count", "adverse events recorded as serious"),
    Measure("late_sae_reports", "count", "open SAFE-SAE-LATE-REPORT alerts"),
    Measure("records_received", "count", "records received: accepted event versions plus dead letters"),
    Measure("dead_lettered_records", "count", "records sent to the dead letters (refused or not evaluable)"),
    Measure("data_entry_delay_hours", "sample", "recorded_at - occurred_at of each event when first reported, h"),
    Measure("open_alert_age_days", "sample",
            "age of each alert still open (raised or acknowledged in the inbox store; without a store: the "
            "monitor's open alerts, from their detection), days"),
    Measure("time_to_acknowledge_hours", "sample",
            "from an alert's arrival in the inbox store to its acknowledgement, hours (needs a store)"),
)}

# --------------------------------------------------------------------------------------------------------------
# rules/kri.yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Thresholds(_Strict):
    """|score| at or above `amber` flags amber, at or above `red` flags red (gsm's defaults: 2 and 3)."""

    amber: float = Field(default=2.0, gt=0)
    red: float = Field(default=3.0, gt=0)


class Minimum(_Strict):
    """A site under either minimum gets no flag (gsm's defaults: 3 participants, 30 days of exposure)."""

    participants: int = Field(default=3, ge=0)
    exposure_days: float = Field(default=30.0, ge=0)


class KriSpec(_Strict):
    """One key risk indicator: a ratio scored per site, or (`method: descriptive`) a statistic of a sample shown
    per site without a score."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")
    title: str
    numerator: str
    denominator: str | None = None
    method: Literal["binomial", "poisson", "descriptive"]
    statistic: Literal["median", "p90", "mean"] | None = None
    thresholds: Thresholds = Thresholds()
    minimum: Minimum = Minimum()
    exact_below_expected: float = Field(default=5.0, ge=0)
    """Use the exact test when the site's expected count under the trial rate is below this."""


class QtlSpec(_Strict):
    """A trial-level limit: numerator / denominator over the whole trial must stay at or under `limit`."""

    id: str = Field(pattern=r"^QTL-[A-Z0-9-]+$")
    title: str
    numerator: str
    denominator: str
    limit: float = Field(gt=0, le=1)  # a share: 0.10 is 10 %
    severity: Literal["critical", "major", "minor", "info"] = "major"
    expects: str = ""


class KriFile(_Strict):
    """rules/kri.yaml: the KRIs, the QTLs, and the follow-up length exposure is capped at."""

    follow_up_days: float = Field(default=60.0, gt=0)
    kris: list[KriSpec]
    qtls: list[QtlSpec] = []


def load_kri(directory: str | Path) -> KriFile | None:
    """Read and check `kri.yaml` in a rules directory (None if there is none). Raises RuleFileError with every
    problem's file and line: an unknown measure, a measure of the wrong kind, a duplicate name."""
    path = Path(directory) / KRI_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleFileError([(str(path), None, f"cannot be read: {exc}")]) from None
    data, lines = load_yaml(path, text)

    try:
        spec = KriFile.model_validate(data)
    except ValidationError as exc:
        raise RuleFileError(pydantic_problems(path, exc, lines, KriFile)) from None
    problems: list[tuple[str, int | None, str]] = []

    def check(where: tuple[Any, ...], label: str, name: str | None, kinds: set[str]) -> None:
        line = lines.get(where) or lines.get(where[:-1])
        if name is None:
            return
        if name not in MEASURES:
            problems.append((str(path), line, f"{label}: unknown measure '{name}'"
                                              f"{closest(name, sorted(MEASURES))} (known: see monitor/kri_file.py)"))
        elif MEASURES[name].kind not in kinds:
            problems.append((str(path), line, f"{label}: '{name}' is a {MEASURES[name].kind} measure; "
                                              f"here it must be one of: {', '.join(sorted(kinds))}"))

    seen: dict[str, int | None] = {}
    for i, k in enumerate(spec.kris):
        where = f"kris[{i}] ({k.name})"
        if k.name in seen:
            problems.append((str(path), lines.get(("kris", i)), f"{where}: duplicate KRI name (first at line "
                                                                  f"{seen[k.name]})"))
        seen.setdefault(k.name, lines.get(("kris", i)))
        if k.method == "descriptive":
            check(("kris", i, "numerator"), f"{where} numerator", k.numerator, {"sample"})
            if k.statistic is None:
                problems.append((str(path), lines.get(("kris", i)), f"{where}: a descriptive KRI needs a statistic"))
            if k.denominator is not None:
                problems.append((str(path), lines.get(("kris", i, "denominator")),
                                 f"{where}: a descriptive KRI has no denominator"))
            continue
        check(("kris", i, "numerator"), f"{where} numerator", k.numerator, {"count", "participants"})
        if k.denominator is None:
            problems.append((str(path), lines.get(("kris", i)), f"{where}: a {k.method} KRI needs a denominator"))
        else:
            kinds = {"count", "participants"} | ({"exposure"} if k.method == "poisson" else set())
            check(("kris", i, "denominator"), f"{where} denominator", k.denominator, kinds)
        if k.thresholds.red < k.thresholds.amber:
            problems.append((str(path), lines.get(("kris", i, "thresholds")),
                             f"{where}: the red threshold is below the amber one"))
    ids: set[str] = set()
    for i, q in enumerate(spec.qtls):
        where = f"qtls[{i}] ({q.id})"
        if q.id in ids:
            problems.append((str(path), lines.get(("qtls", i)), f"{where}: duplicate QTL id"))
        ids.add(q.id)
        check(("qtls", i, "numerator"), f"{where} numerator", q.numerator, {"count", "participants"})
        check(("qtls", i, "denominator"), f"{where} denominator", q.denominator, {"count", "participants"})
    if problems:
        raise RuleFileError(problems)
    return spec

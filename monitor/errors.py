"""One root exception type, with a few subclasses that tell the operator what to do."""

from __future__ import annotations


class MonitorError(Exception):
    """Root of every error the monitor raises on purpose."""


class EventRejected(MonitorError):
    """An input event can not be used. `reason` is a short machine-readable code, `detail` says what to fix."""

    def __init__(self, reason: str, detail: str, *, event_id: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.event_id = event_id


class RuleFileError(MonitorError):
    """A rule or table file is invalid. Each problem names its file and line; nothing from the files is used."""

    def __init__(self, problems: list[tuple[str, int | None, str]]) -> None:
        self.problems = problems
        lines = [f"{path}:{line if line is not None else '?'}: {msg}" for path, line, msg in problems]
        super().__init__("rule files refused (the rules in force are unchanged):\n  " + "\n  ".join(lines))


class EngineError(MonitorError):
    """The rules engine failed on a fact or an action; the subject's evaluation is incomplete."""


class EvaluationError(MonitorError):
    """Evaluating one subject failed: a derivation, the rules engine, or building an alert raised. `stage` names
    which (e.g. `derivation _lab_signals`, `rules engine`, `alert for rule DOSE-MAX-EXCEEDED`). The monitor undoes
    that subject's batch, sends its records to the dead letters as `evaluation_error`, and goes on with the others:
    fix the rule, parameter or derivation named, then replay the dead letters."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"{stage} raised {type(cause).__name__}: {cause}")
        self.stage = stage
        self.cause = cause


class ConfigError(MonitorError):
    """The configuration is unusable; the message names the setting."""


class SinkUnavailable(MonitorError):
    """An output (the alerts or dead-letter topic) did not acknowledge records. Nothing is committed past them: the
    service holds them, stays not ready and retries with back-off until the output takes them."""


class SinkWaiting(SinkUnavailable):
    """Records were handed to the producer and still wait for the broker's acknowledgement. Wait for them: sending
    them again could publish them twice."""

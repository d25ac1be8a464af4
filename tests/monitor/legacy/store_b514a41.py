# The alert store exactly as released at commit b514a41 (before versioned migrations), kept to create the
# stores the migration tests upgrade. Do not edit.
"""The alert store: alert records, their lifecycle, the delivery outbox and the audit trail.

An embedded SQLite file by default (`sqlite:///alerts.db`), or PostgreSQL for shared use
(`postgresql://user@host/db`, with the `postgres` extra). Records are stored once per (alert_id, status), so a
redelivered record changes nothing. Lifecycle: raised → acknowledged → closed (with who, when and a reason), and
withdrawn by the monitor. Every record stored, every lifecycle action and every rules version loaded is appended
to the hash-chained audit trail in the same transaction.
"""

from __future__ import annotations

import builtins
import datetime as dt
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from monitor.alerts import Alert
from monitor.audit import GENESIS, AuditEntry, entry_hash, verify
from monitor.errors import ConfigError, MonitorError

STATES = ("raised", "acknowledged", "closed", "withdrawn")

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS alerts (
        alert_id TEXT PRIMARY KEY, rule TEXT NOT NULL, subject_id TEXT NOT NULL, site_id TEXT NOT NULL,
        severity TEXT NOT NULL, category TEXT NOT NULL, at TEXT NOT NULL, detected_at TEXT NOT NULL,
        rule_version TEXT NOT NULL, message TEXT NOT NULL, record TEXT NOT NULL, state TEXT NOT NULL,
        updated_at TEXT NOT NULL, ack_by TEXT, ack_at TEXT, ack_reason TEXT,
        closed_by TEXT, closed_at TEXT, close_reason TEXT, withdrawn_at TEXT)""",
    """CREATE TABLE IF NOT EXISTS records (
        alert_id TEXT NOT NULL, status TEXT NOT NULL, record TEXT NOT NULL, stored_at TEXT NOT NULL,
        PRIMARY KEY (alert_id, status))""",
    """CREATE TABLE IF NOT EXISTS outbox (
        alert_id TEXT NOT NULL, status TEXT NOT NULL, sink TEXT NOT NULL, attempts INTEGER NOT NULL,
        next_attempt_at TEXT NOT NULL, delivered_at TEXT, last_error TEXT,
        PRIMARY KEY (alert_id, status, sink))""",
    """CREATE TABLE IF NOT EXISTS audit (
        seq INTEGER PRIMARY KEY, at TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, data TEXT NOT NULL,
        prev_hash TEXT NOT NULL, hash TEXT NOT NULL)""",
]


class StoreError(MonitorError):
    """The alert store refused an action (unknown alert, a transition the lifecycle forbids, a broken store)."""


class StoreUnavailable(StoreError):
    """The alert store could not be read or written (disk full, read-only, server unreachable). Nothing was stored
    by the failed action; the message says what failed and what to do."""


def _diagnose(exc: BaseException) -> str:
    """What an operator should do about a database error, in one sentence."""
    text = str(exc).lower()
    state = getattr(getattr(exc, "diag", None), "sqlstate", None) or getattr(exc, "sqlstate", None) or ""
    if "disk is full" in text or "no space" in text or state == "53100":
        return "the disk holding the alert store is full: free space (or give the volume more), then start again"
    if "readonly" in text or "read-only" in text or state == "25006":
        return ("the alert store is read-only: make the database file, its directory and its volume writable, then "
                "start again")
    if "unable to open" in text:
        return "the alert store file cannot be opened: check the path, its directory and their permissions"
    if "locked" in text or "busy" in text:
        return "another process holds the alert store locked: stop it or wait, then start again"
    if state.startswith("08") or "connection" in text or "server" in text:
        return "the PostgreSQL server cannot be reached: check that it runs and the URL, then start again"
    return "check the alert store (its disk, permissions and server), then start again"


def _database_errors() -> tuple[type[BaseException], ...]:
    """Errors of the database itself (not of our SQL): SQLite's and, when installed, psycopg's."""
    out: list[type[BaseException]] = [sqlite3.OperationalError, sqlite3.DatabaseError]
    try:
        import psycopg  # type: ignore[import-not-found]
    except ImportError:
        return tuple(out)
    return (*out, psycopg.OperationalError, psycopg.errors.DiskFull, psycopg.errors.ReadOnlySqlTransaction)


def _unavailable(url: str, exc: BaseException) -> StoreUnavailable:
    hint = _diagnose(exc)
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":  # SQLite's message may hide the cause
        volume = _volume(Path(url[len("sqlite:///"):]).parent)
        if volume:
            hint = volume
    return StoreUnavailable(f"alert store {_where(url)} failed ({type(exc).__name__}: {exc}); {hint}")


def _volume(directory: Path) -> str | None:
    """A read-only or full file system under an SQLite store, named as such."""
    import os

    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return (f"the file system holding {directory} is mounted read-only: mount it read-write, then start "
                "again")
    if st.f_bavail == 0:
        return f"the disk holding {directory} is full: free space (or give the volume more), then start again"
    return None


def _where(url: str) -> str:
    return url.split("@")[-1]  # never the password


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class AlertStore:
    def __init__(self, *, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._errors = _database_errors()
        if url.startswith("sqlite:///"):
            path = url[len("sqlite:///"):]
            try:
                if path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                self._conn: Any = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
                self._conn.execute("PRAGMA journal_mode=WAL")
            except (OSError, sqlite3.Error) as exc:
                raise _unavailable(url, exc) from exc
            self._pg = False
        elif url.startswith(("postgresql://", "postgres://")):
            try:
                import psycopg  # type: ignore[import-not-found]
            except ImportError:
                raise ConfigError("PostgreSQL store needs the extra: pip install -e '.[postgres]'") from None
            try:
                self._conn = psycopg.connect(url, autocommit=True)
            except Exception as exc:
                raise ConfigError(f"cannot connect to the alert store {url.split('@')[-1]}: {exc}") from None
            self._pg = True
        else:
            raise ConfigError(f"alert store URL must be sqlite:///PATH or postgresql://...; got {url!r}")
        with self._tx() as cur:
            for statement in SCHEMA:
                cur.execute(statement)

    # ---- plumbing ---------------------------------------------------------------------------------------------
    def _sql(self, text: str) -> str:
        return text.replace("?", "%s") if self._pg else text

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """One transaction; the audit table is locked so the chain has one writer at a time. A failure of the
        database itself (disk full, read-only, connection lost) becomes StoreUnavailable: nothing was stored."""
        with self._lock:
            try:
                cur = self._conn.cursor()
            except self._errors as exc:
                raise _unavailable(self.url, exc) from exc
            try:
                if self._pg:
                    cur.execute("BEGIN")
                    if self._has_audit(cur):
                        cur.execute("LOCK TABLE audit IN EXCLUSIVE MODE")
                else:
                    cur.execute("BEGIN IMMEDIATE")
                yield _Cursor(cur, self._sql)
                cur.execute("COMMIT")
            except BaseException as exc:
                try:
                    cur.execute("ROLLBACK")
                except Exception:  # noqa: S110 - SQLite may have rolled back already (disk full); the cause matters
                    pass
                if isinstance(exc, self._errors) and not isinstance(
                        exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)):
                    raise _unavailable(self.url, exc) from exc
                raise
            finally:
                try:
                    cur.close()
                except Exception:  # noqa: S110 - a lost connection; the error above says so
                    pass

    def _has_audit(self, cur: Any) -> bool:
        cur.execute("SELECT to_regclass('audit') IS NOT NULL")
        return bool(cur.fetchone()[0])

    def close(self) -> None:
        self._conn.close()

    # ---- audit ------------------------------------------------------------------------------------------------
    def _audit(self, cur: Any, *, actor: str, action: str, data: dict[str, Any]) -> None:
        cur.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        row = cur.fetchone()
        seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
        at = _now()
        digest = entry_hash(at=at, actor=actor, action=action, data=data, prev_hash=prev)
        cur.execute("INSERT INTO audit (seq, at, actor, action, data, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (seq, at, actor, action, json.dumps(data, sort_keys=True), prev, digest))

    def audit_entries(self) -> "builtins.list[AuditEntry]":
        with self._tx() as cur:
            cur.execute("SELECT seq, at, actor, action, data, prev_hash, hash FROM audit ORDER BY seq")
            return [AuditEntry(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6]) for r in cur.fetchall()]

    def verify_audit(self) -> "builtins.list[str]":
        return verify(self.audit_entries())

    def record_event(self, *, actor: str, action: str, data: dict[str, Any]) -> None:
        with self._tx() as cur:
            self._audit(cur, actor=actor, action=action, data=data)

    def record_rules_loaded(self, *, version: str, directory: str, rules: int, actor: str) -> None:
        with self._tx() as cur:
            self._audit(cur, actor=actor, action="rules_loaded",
                        data={"version": version, "directory": directory, "rules": rules})

    # ---- alert records ----------------------------------------------------------------------------------------
    def add_record(self, alert: Alert, *, sinks: list[str] = (), actor: str = "protocol-monitor") -> bool:  # type: ignore[assignment]
        """Store one alert record (idempotent on (alert_id, status)) and queue it for the given sinks.
        Returns False if it was already stored."""
        record = alert.to_json()
        now = _now()
        with self._tx() as cur:
            cur.execute("SELECT 1 FROM records WHERE alert_id = ? AND status = ?", (alert.alert_id, alert.status))
            if cur.fetchone():
                return False
            cur.execute("INSERT INTO records (alert_id, status, record, stored_at) VALUES (?, ?, ?, ?)",
                        (alert.alert_id, alert.status, record, now))
            if alert.status == "raised":
                # a withdrawal can arrive first (records re-sent after a broker outage): the alert is then withdrawn
                cur.execute("SELECT 1 FROM records WHERE alert_id = ? AND status = 'retracted'", (alert.alert_id,))
                withdrawn = cur.fetchone() is not None
                cur.execute(
                    "INSERT INTO alerts (alert_id, rule, subject_id, site_id, severity, category, at, detected_at, "
                    "rule_version, message, record, state, updated_at, withdrawn_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (alert.alert_id, alert.rule, alert.subject_id, alert.site_id, alert.severity, alert.category,
                     alert.at, alert.detected_at, alert.rule_version, alert.message, record,
                     "withdrawn" if withdrawn else "raised", now, now if withdrawn else None))
            else:
                cur.execute("UPDATE alerts SET state = CASE WHEN state = 'closed' THEN state ELSE 'withdrawn' END, "
                            "withdrawn_at = ?, updated_at = ? WHERE alert_id = ?", (now, now, alert.alert_id))
            for sink in sinks:
                cur.execute("INSERT INTO outbox (alert_id, status, sink, attempts, next_attempt_at) "
                            "VALUES (?, ?, ?, 0, ?)", (alert.alert_id, alert.status, sink, now))
            self._audit(cur, actor=actor, action=f"alert_{alert.status}",
                        data={"alert_id": alert.alert_id, "rule": alert.rule, "subject_id": alert.subject_id,
                              "site_id": alert.site_id, "severity": alert.severity, "at": alert.at,
                              "rule_version": alert.rule_version, "record_sha256": _sha(record)})
        return True

    def get(self, alert_id: str) -> dict[str, Any]:
        with self._tx() as cur:
            cur.execute("SELECT alert_id, rule, subject_id, site_id, severity, category, at, detected_at, "
                        "rule_version, message, record, state, updated_at, ack_by, ack_at, ack_reason, closed_by, "
                        "closed_at, close_reason, withdrawn_at FROM alerts WHERE alert_id = ?", (alert_id,))
            row = cur.fetchone()
            if row is None:
                raise StoreError(f"no alert {alert_id} in the store")
            names = ["alert_id", "rule", "subject_id", "site_id", "severity", "category", "at", "detected_at",
                     "rule_version", "message", "record", "state", "updated_at", "ack_by", "ack_at", "ack_reason",
                     "closed_by", "closed_at", "close_reason", "withdrawn_at"]
            out = dict(zip(names, row))
            out["record"] = json.loads(out["record"])
            return out

    def list(self, *, state: str | None = None, site: str | None = None, rule: str | None = None,
             limit: int = 200) -> "builtins.list[dict[str, Any]]":
        where, args = [], []
        for column, value in (("state", state), ("site_id", site), ("rule", rule)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        # column names are fixed above; every value is a bound parameter
        sql = ("SELECT alert_id, state, severity, rule, subject_id, site_id, at FROM alerts"  # noqa: S608
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY at, alert_id LIMIT ?")
        with self._tx() as cur:
            cur.execute(sql, (*args, limit))
            return [dict(zip(["alert_id", "state", "severity", "rule", "subject_id", "site_id", "at"], r))
                    for r in cur.fetchall()]

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def acknowledge(self, alert_id: str, *, by: str, reason: str = "") -> None:
        self._transition(alert_id, by=by, reason=reason, action="acknowledged", allowed=("raised",),
                         sql="UPDATE alerts SET state = 'acknowledged', ack_by = ?, ack_at = ?, ack_reason = ?, "
                             "updated_at = ? WHERE alert_id = ?")

    def close_alert(self, alert_id: str, *, by: str, reason: str) -> None:
        if not reason.strip():
            raise StoreError("closing an alert needs a reason (--reason)")
        self._transition(alert_id, by=by, reason=reason, action="closed",
                         allowed=("raised", "acknowledged", "withdrawn"),
                         sql="UPDATE alerts SET state = 'closed', closed_by = ?, closed_at = ?, close_reason = ?, "
                             "updated_at = ? WHERE alert_id = ?")

    def _transition(self, alert_id: str, *, by: str, reason: str, action: str, allowed: tuple[str, ...],
                    sql: str) -> None:
        if not by.strip():
            raise StoreError("say who does this (--by)")
        with self._tx() as cur:
            cur.execute("SELECT state FROM alerts WHERE alert_id = ?", (alert_id,))
            row = cur.fetchone()
            if row is None:
                raise StoreError(f"no alert {alert_id} in the store")
            if row[0] not in allowed:
                raise StoreError(f"alert {alert_id} is {row[0]}; it cannot be {action}")
            now = _now()
            cur.execute(sql, (by, now, reason, now, alert_id))
            self._audit(cur, actor=by, action=f"alert_{action}", data={"alert_id": alert_id, "reason": reason})

    # ---- outbox -----------------------------------------------------------------------------------------------
    def due_deliveries(self, *, limit: int = 100) -> "builtins.list[tuple[str, str, str, int]]":
        with self._tx() as cur:
            cur.execute("SELECT alert_id, status, sink, attempts FROM outbox WHERE delivered_at IS NULL "
                        "AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?", (_now(), limit))
            return [tuple(r) for r in cur.fetchall()]  # type: ignore[misc]

    def record_for(self, alert_id: str, status: str) -> Alert:
        with self._tx() as cur:
            cur.execute("SELECT record FROM records WHERE alert_id = ? AND status = ?", (alert_id, status))
            row = cur.fetchone()
        if row is None:
            raise StoreError(f"no record {alert_id}/{status}")
        return Alert.model_validate_json(row[0])

    def mark_delivered(self, alert_id: str, status: str, sink: str) -> None:
        with self._tx() as cur:
            cur.execute("UPDATE outbox SET delivered_at = ?, attempts = attempts + 1, last_error = NULL "
                        "WHERE alert_id = ? AND status = ? AND sink = ?", (_now(), alert_id, status, sink))
            self._audit(cur, actor="protocol-monitor", action="alert_delivered",
                        data={"alert_id": alert_id, "status": status, "sink": sink})

    def mark_failed(self, alert_id: str, status: str, sink: str, *, error: str, retry_in_s: float) -> None:
        later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=retry_in_s)).isoformat(timespec="milliseconds")
        with self._tx() as cur:
            cur.execute("UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ? "
                        "WHERE alert_id = ? AND status = ? AND sink = ?", (error[:500], later, alert_id, status, sink))

    def pending_count(self) -> int:
        with self._tx() as cur:
            cur.execute("SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL")
            return int(cur.fetchone()[0])


class _Cursor:
    """A cursor that writes `?` placeholders for either database."""

    def __init__(self, cur: Any, sql: Any) -> None:
        self._cur, self._sql = cur, sql

    def execute(self, text: str, args: tuple[Any, ...] = ()) -> None:
        self._cur.execute(self._sql(text), args)

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._cur.fetchall())


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()

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

BASE_SCHEMA = [
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
SCHEMA = BASE_SCHEMA  # the schema of release 0.1.0 (migration 1), kept under its old name

ROLES = ("safety_officer", "site_monitor", "viewer")
SEVERITY_RANK = {"critical": 0, "major": 1, "minor": 2, "info": 3}
CLOSE_REASONS = (
    "not a deviation",
    "deviation confirmed: reported to the sponsor",
    "deviation confirmed: site retrained",
    "data error: corrected at the site",
    "duplicate of another alert",
    "other",
)


def _v2_statements() -> list[str]:
    return [
        "ALTER TABLE alerts ADD COLUMN at_utc TEXT",
        "ALTER TABLE alerts ADD COLUMN raised_at TEXT",
        "ALTER TABLE alerts ADD COLUMN assignee TEXT",
        "CREATE INDEX IF NOT EXISTS alerts_by_site ON alerts (site_id, state)",
        "CREATE INDEX IF NOT EXISTS alerts_by_subject ON alerts (subject_id)",
        """CREATE TABLE IF NOT EXISTS users (
            username TEXT PRIMARY KEY, printed_name TEXT NOT NULL, role TEXT NOT NULL, sites TEXT NOT NULL,
            password_hash TEXT NOT NULL, disabled INTEGER NOT NULL DEFAULT 0,
            failed_signins INTEGER NOT NULL DEFAULT 0, locked_until TEXT, created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS signatures (
            signature_id TEXT PRIMARY KEY, alert_id TEXT NOT NULL, username TEXT NOT NULL,
            printed_name TEXT NOT NULL, action TEXT NOT NULL, meaning TEXT NOT NULL, reason TEXT NOT NULL,
            at TEXT NOT NULL, audit_seq INTEGER NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS comments (
            comment_id TEXT PRIMARY KEY, alert_id TEXT NOT NULL, author TEXT NOT NULL, text TEXT NOT NULL,
            at TEXT NOT NULL, signature_id TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS assignments (
            assignment_id TEXT PRIMARY KEY, alert_id TEXT NOT NULL, assignee TEXT NOT NULL,
            assigned_by TEXT NOT NULL, at TEXT NOT NULL, signature_id TEXT NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS signatures_by_alert ON signatures (alert_id)",
    ]


def _v2_backfill(cur: Any) -> None:
    """Every existing alert gets its instant in UTC (sortable as text) and the time it was first stored."""
    cur.execute("SELECT alert_id, at, detected_at, updated_at FROM alerts")
    rows = cur.fetchall()
    for alert_id, at, detected_at, updated_at in rows:
        cur.execute("SELECT stored_at FROM records WHERE alert_id = ? AND status = 'raised'", (alert_id,))
        stored = cur.fetchone()
        cur.execute("UPDATE alerts SET at_utc = ?, raised_at = ? WHERE alert_id = ?",
                    (utc_instant(at, fallback=detected_at), stored[0] if stored else updated_at, alert_id))


# Versioned migrations, applied in order, each in the transaction that records it in schema_version. A store made
# by release 0.1.0 (no schema_version table) is at version 0 with migration 1's tables already there; migration 1
# only creates what is missing, so it upgrades in place. Never edit a released migration: append a new one.
def _migration_1(cur: Any) -> None:
    for statement in BASE_SCHEMA:
        cur.execute(statement)


def _migration_2(cur: Any) -> None:
    for statement in _v2_statements():
        cur.execute(statement)
    _v2_backfill(cur)


MIGRATIONS: list[tuple[int, str, Any]] = [
    (1, "alerts, records, outbox, audit (release 0.1.0)", _migration_1),
    (2, "UTC instants, days open, assignee; users, signatures, comments, assignments", _migration_2),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def utc_instant(text: str | None, *, fallback: str | None = None) -> str:
    """An ISO-8601 instant with any offset as fixed-width UTC text, so ordering the text orders the instants."""
    for candidate in (text, fallback):
        if not candidate:
            continue
        try:
            value = dt.datetime.fromisoformat(str(candidate).replace("Z", "+00:00"))
        except ValueError:
            continue
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds")
    return _now()


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
        self._migrate()

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

    def _table_exists(self, cur: Any, name: str) -> bool:
        if self._pg:
            cur.execute("SELECT to_regclass(?) IS NOT NULL", (name,))
        else:
            cur.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        return bool(cur.fetchone()[0])

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, one numbered migration per transaction. An upgrade of a store that
        already held data is written to the audit trail (from, to), continuing the chain."""
        fresh: bool | None = None
        while True:
            with self._tx() as cur:
                if self._pg:
                    cur.execute("SELECT pg_advisory_xact_lock(4711017)")  # one migrating process at a time
                cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                            "description TEXT NOT NULL, applied_at TEXT NOT NULL)")
                cur.execute("SELECT MAX(version) FROM schema_version")
                current = cur.fetchone()[0] or 0
                if current > SCHEMA_VERSION:
                    raise StoreError(f"the alert store {_where(self.url)} has schema version {current}, newer than "
                                     f"this release knows ({SCHEMA_VERSION}): upgrade protocol-monitor")
                pending = [m for m in MIGRATIONS if m[0] > current]
                if not pending:
                    return
                version, description, apply = pending[0]
                if fresh is None:
                    fresh = current == 0 and not self._table_exists(cur, "alerts")
                apply(cur)
                cur.execute("INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                            (version, description, _now()))
                if not fresh and version > 1:  # migration 1 only adopts a store of release 0.1.0 as it is
                    self._audit(cur, actor="protocol-monitor", action="store_migrated",
                                data={"from_version": current, "to_version": version, "description": description})

    def schema_version(self) -> int:
        with self._tx() as cur:
            cur.execute("SELECT MAX(version) FROM schema_version")
            return int(cur.fetchone()[0] or 0)

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
                    "rule_version, message, record, state, updated_at, withdrawn_at, at_utc, raised_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (alert.alert_id, alert.rule, alert.subject_id, alert.site_id, alert.severity, alert.category,
                     alert.at, alert.detected_at, alert.rule_version, alert.message, record,
                     "withdrawn" if withdrawn else "raised", now, now if withdrawn else None,
                     utc_instant(alert.at, fallback=alert.detected_at), now))
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
                        "closed_at, close_reason, withdrawn_at, at_utc, raised_at, assignee FROM alerts WHERE alert_id = ?",
                        (alert_id,))
            row = cur.fetchone()
            if row is None:
                raise StoreError(f"no alert {alert_id} in the store")
            names = ["alert_id", "rule", "subject_id", "site_id", "severity", "category", "at", "detected_at",
                     "rule_version", "message", "record", "state", "updated_at", "ack_by", "ack_at", "ack_reason",
                     "closed_by", "closed_at", "close_reason", "withdrawn_at", "at_utc", "raised_at", "assignee"]
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
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY at_utc, alert_id LIMIT ?")
        with self._tx() as cur:
            cur.execute(sql, (*args, limit))
            return [dict(zip(["alert_id", "state", "severity", "rule", "subject_id", "site_id", "at"], r))
                    for r in cur.fetchall()]

    def alert_timings(self) -> "builtins.list[tuple[str, str, str, str | None]]":
        """(site_id, state, raised_at, ack_at) of every alert: the site-risk KRIs (monitor/kri.py) read the age of
        open alerts and the time to acknowledge from here. No subject id leaves the store this way."""
        with self._tx() as cur:
            cur.execute("SELECT site_id, state, raised_at, ack_at FROM alerts")
            return [(r[0], r[1], r[2], r[3]) for r in cur.fetchall()]

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

    # ---- the inbox: filtered, fenced queries ------------------------------------------------------------------
    INBOX_COLUMNS = ("alert_id", "state", "severity", "rule", "category", "subject_id", "site_id", "at", "at_utc",
                     "detected_at", "raised_at", "withdrawn_at", "assignee", "message", "rule_version")

    @staticmethod
    def _fence(sites: "builtins.list[str] | None", where: "builtins.list[str]", args: "builtins.list[Any]") -> None:
        """sites None: every site; otherwise only these (an empty list: none)."""
        if sites is None:
            return
        if not sites:
            where.append("1 = 0")
            return
        where.append("site_id IN (" + ", ".join("?" for _ in sites) + ")")
        args.extend(sites)

    def inbox(self, *, sites: "builtins.list[str] | None", site: str | None = None, rule: str | None = None,
              severity: str | None = None, category: str | None = None, state: str | None = None,
              assignee: str | None = None, subject: str | None = None, min_days_open: float | None = None,
              limit: int = 500, now: dt.datetime | None = None) -> "builtins.list[dict[str, Any]]":
        """Alerts within the fence `sites`, open ones first (raised, acknowledged), then most severe, then oldest
        (by the instant in UTC). state "open" = raised or acknowledged; "withdrawn" includes closed-after-withdrawal."""
        where: builtins.list[str] = []
        args: builtins.list[Any] = []
        self._fence(sites, where, args)
        for column, value in (("site_id", site), ("rule", rule), ("severity", severity), ("category", category),
                              ("subject_id", subject)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        if assignee == "-":
            where.append("assignee IS NULL")
        elif assignee:
            where.append("assignee = ?")
            args.append(assignee)
        if state == "open":
            where.append("state IN ('raised', 'acknowledged')")
        elif state == "withdrawn":
            where.append("withdrawn_at IS NOT NULL")
        elif state:
            where.append("state = ?")
            args.append(state)
        if min_days_open:
            cut = ((now or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(days=min_days_open))
            where.append("state IN ('raised', 'acknowledged') AND raised_at <= ?")
            args.append(cut.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds"))
        rank = "CASE severity " + " ".join(f"WHEN '{k}' THEN {v}" for k, v in SEVERITY_RANK.items()) + " ELSE 9 END"
        # column names and the CASE are fixed above; every value is a bound parameter
        sql = (f"SELECT {', '.join(self.INBOX_COLUMNS)} FROM alerts"  # noqa: S608
               + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY CASE WHEN state IN ('raised', 'acknowledged') THEN 0 ELSE 1 END, "
               + rank + ", at_utc, alert_id LIMIT ?")
        with self._tx() as cur:
            cur.execute(sql, (*args, limit))
            return [dict(zip(self.INBOX_COLUMNS, r)) for r in cur.fetchall()]

    def counts(self, *, sites: "builtins.list[str] | None") -> dict[str, Any]:
        """Counts within the fence: by site × state, and open alerts by rule."""
        where: builtins.list[str] = []
        args: builtins.list[Any] = []
        self._fence(sites, where, args)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        with self._tx() as cur:
            cur.execute("SELECT site_id, state, COUNT(*) FROM alerts" + clause  # noqa: S608 - fixed text
                        + " GROUP BY site_id, state ORDER BY site_id, state", tuple(args))
            by_site: dict[str, dict[str, int]] = {}
            for site_id, state, n in cur.fetchall():
                by_site.setdefault(site_id, {})[state] = int(n)
            open_clause = (clause + " AND " if clause else " WHERE ") + "state IN ('raised', 'acknowledged')"
            cur.execute("SELECT rule, COUNT(*) FROM alerts" + open_clause  # noqa: S608 - fixed text
                        + " GROUP BY rule ORDER BY COUNT(*) DESC, rule", tuple(args))
            by_rule = {r: int(n) for r, n in cur.fetchall()}
        return {"by_site": by_site, "by_rule": by_rule}

    def distinct(self, column: str, *, sites: "builtins.list[str] | None") -> "builtins.list[str]":
        if column not in ("site_id", "rule", "category", "severity", "assignee", "subject_id"):
            raise StoreError(f"no such column {column}")
        where: builtins.list[str] = [f"{column} IS NOT NULL"]
        args: builtins.list[Any] = []
        self._fence(sites, where, args)
        with self._tx() as cur:
            cur.execute(f"SELECT DISTINCT {column} FROM alerts WHERE "  # noqa: S608 - column checked above
                        + " AND ".join(where) + f" ORDER BY {column}", tuple(args))
            return [r[0] for r in cur.fetchall()]

    def history(self, alert_id: str) -> "builtins.list[dict[str, Any]]":
        """What happened to one alert, in order: records stored (raised, withdrawn), command-line actions and
        electronically signed actions with their signer's printed name and meaning."""
        alert = self.get(alert_id)
        out: builtins.list[dict[str, Any]] = []
        with self._tx() as cur:
            cur.execute("SELECT status, stored_at FROM records WHERE alert_id = ?", (alert_id,))
            for status, stored_at in cur.fetchall():
                out.append({"at": stored_at, "who": "protocol-monitor", "printed_name": "protocol-monitor",
                            "action": "raised" if status == "raised" else "withdrawn", "reason": "",
                            "meaning": "raised by the monitor" if status == "raised"
                            else "withdrawn by the monitor (the data no longer support it)", "signed": False})
            cur.execute("SELECT signature_id, username, printed_name, action, meaning, reason, at, audit_seq "
                        "FROM signatures WHERE alert_id = ? ORDER BY audit_seq", (alert_id,))
            signed = [dict(zip(["signature_id", "who", "printed_name", "action", "meaning", "reason", "at",
                                "audit_seq"], r)) for r in cur.fetchall()]
            cur.execute("SELECT signature_id, text FROM comments WHERE alert_id = ?", (alert_id,))
            texts = dict(cur.fetchall())
        for s in signed:
            s["signed"] = True
            s["text"] = texts.get(s["signature_id"], "")
        out.extend(signed)
        signed_actions = {s["action"] for s in signed}
        # actions taken with `alerts ack|close` on the command line (not signed electronically)
        if alert["ack_at"] and "acknowledge" not in signed_actions:
            out.append({"at": alert["ack_at"], "who": alert["ack_by"], "printed_name": alert["ack_by"],
                        "action": "acknowledge", "meaning": "acknowledged (command line, not signed)",
                        "reason": alert["ack_reason"] or "", "signed": False})
        if alert["closed_at"] and "close" not in signed_actions:
            out.append({"at": alert["closed_at"], "who": alert["closed_by"], "printed_name": alert["closed_by"],
                        "action": "close", "meaning": "closed (command line, not signed)",
                        "reason": alert["close_reason"] or "", "signed": False})
        out.sort(key=lambda h: (h["at"], h.get("audit_seq", 0)))
        return out

    # ---- electronically signed actions -------------------------------------------------------------------------
    def sign_action(self, alert_id: str, *, username: str, printed_name: str, action: str, reason: str = "",
                    text: str = "", assignee: str | None = None) -> dict[str, Any]:
        """One lifecycle action as an electronic signature (21 CFR Part 11 §11.50): the caller has just checked
        the signer's password. The state change, the signature (printed name, UTC date-time, meaning), the comment
        or assignment, and the audit entry are written in one transaction."""
        import uuid

        reason, text = reason.strip(), text.strip()
        if action not in ("acknowledge", "assign", "comment", "close", "reopen"):
            raise StoreError(f"unknown action {action!r}")
        with self._tx() as cur:
            cur.execute("SELECT state, withdrawn_at FROM alerts WHERE alert_id = ?", (alert_id,))
            row = cur.fetchone()
            if row is None:
                raise StoreError(f"no alert {alert_id} in the store")
            state, withdrawn_at = row
            now = _now()
            if action == "acknowledge":
                if state != "raised":
                    raise StoreError(f"alert {alert_id} is {state}; only a raised alert can be acknowledged")
                meaning = "acknowledged"
                cur.execute("UPDATE alerts SET state = 'acknowledged', ack_by = ?, ack_at = ?, ack_reason = ?, "
                            "updated_at = ? WHERE alert_id = ?", (username, now, text, now, alert_id))
            elif action == "assign":
                if not assignee:
                    raise StoreError("say to whom the alert is assigned")
                if state == "closed":
                    raise StoreError(f"alert {alert_id} is closed; re-open it first")
                meaning = f"assigned to {assignee}"
                cur.execute("UPDATE alerts SET assignee = ?, updated_at = ? WHERE alert_id = ?",
                            (assignee, now, alert_id))
            elif action == "comment":
                if not text:
                    raise StoreError("a comment needs text")
                meaning = "commented"
            elif action == "close":
                if reason not in CLOSE_REASONS:
                    raise StoreError("closing an alert needs a reason from the list")
                if reason == "other" and not text:
                    raise StoreError("closing for another reason needs an explanation")
                if state == "closed":
                    raise StoreError(f"alert {alert_id} is already closed")
                meaning = f"closed: {reason}"
                cur.execute("UPDATE alerts SET state = 'closed', closed_by = ?, closed_at = ?, close_reason = ?, "
                            "updated_at = ? WHERE alert_id = ?",
                            (username, now, reason + (f" ({text})" if text else ""), now, alert_id))
            else:  # reopen
                if state != "closed":
                    raise StoreError(f"alert {alert_id} is {state}; only a closed alert can be re-opened")
                if not text:
                    raise StoreError("re-opening an alert needs a reason")
                meaning = "re-opened"
                cur.execute("UPDATE alerts SET state = ?, closed_by = NULL, closed_at = NULL, close_reason = NULL, "
                            "updated_at = ? WHERE alert_id = ?",
                            ("withdrawn" if withdrawn_at else "raised", now, alert_id))
            signature_id = uuid.uuid4().hex
            full_reason = reason if action == "close" else (text if action in ("reopen", "acknowledge") else "")
            self._audit(cur, actor=username, action=f"alert_{action}_signed",
                        data={"alert_id": alert_id, "signature_id": signature_id, "printed_name": printed_name,
                              "meaning": meaning, "reason": full_reason, "text": text,
                              "assignee": assignee if action == "assign" else None,
                              "signature": "password re-entered"})
            cur.execute("SELECT MAX(seq) FROM audit")
            seq = int(cur.fetchone()[0])
            cur.execute("SELECT at FROM audit WHERE seq = ?", (seq,))
            at = cur.fetchone()[0]
            cur.execute("INSERT INTO signatures (signature_id, alert_id, username, printed_name, action, meaning, "
                        "reason, at, audit_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (signature_id, alert_id, username, printed_name, action, meaning, full_reason, at, seq))
            if action == "comment" or (text and action in ("close", "assign")):
                cur.execute("INSERT INTO comments (comment_id, alert_id, author, text, at, signature_id) "
                            "VALUES (?, ?, ?, ?, ?, ?)", (uuid.uuid4().hex, alert_id, username, text, at, signature_id))
            if action == "assign":
                cur.execute("INSERT INTO assignments (assignment_id, alert_id, assignee, assigned_by, at, "
                            "signature_id) VALUES (?, ?, ?, ?, ?, ?)",
                            (uuid.uuid4().hex, alert_id, assignee, username, at, signature_id))
        return {"signature_id": signature_id, "printed_name": printed_name, "meaning": meaning, "at": at,
                "audit_seq": seq}

    # ---- users -----------------------------------------------------------------------------------------------
    USER_COLUMNS = ("username", "printed_name", "role", "sites", "password_hash", "disabled", "failed_signins",
                    "locked_until", "created_at", "updated_at")

    def add_user(self, *, username: str, printed_name: str, role: str, sites: "builtins.list[str]",
                 password_hash: str, actor: str) -> None:
        if role not in ROLES:
            raise StoreError(f"role must be one of {', '.join(ROLES)}")
        if role == "site_monitor" and not sites:
            raise StoreError("a site monitor needs at least one site (--sites)")
        if not username.strip() or not printed_name.strip():
            raise StoreError("a user needs a user name and a printed name")
        now = _now()
        with self._tx() as cur:
            cur.execute("SELECT 1 FROM users WHERE username = ?", (username,))
            if cur.fetchone():
                raise StoreError(f"user {username} exists already")
            cur.execute("INSERT INTO users (username, printed_name, role, sites, password_hash, disabled, "
                        "failed_signins, locked_until, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 0, 0, NULL, ?, ?)",
                        (username, printed_name, role, ",".join(sites), password_hash, now, now))
            self._audit(cur, actor=actor, action="user_added",
                        data={"username": username, "printed_name": printed_name, "role": role, "sites": sites})

    def get_user(self, username: str) -> dict[str, Any] | None:
        with self._tx() as cur:
            cur.execute(f"SELECT {', '.join(self.USER_COLUMNS)} FROM users WHERE username = ?",  # noqa: S608
                        (username,))
            row = cur.fetchone()
        if row is None:
            return None
        user = dict(zip(self.USER_COLUMNS, row))
        user["sites"] = [s for s in (user["sites"] or "").split(",") if s]
        user["disabled"] = bool(user["disabled"])
        return user

    def list_users(self) -> "builtins.list[dict[str, Any]]":
        with self._tx() as cur:
            cur.execute("SELECT username FROM users ORDER BY username")
            names = [r[0] for r in cur.fetchall()]
        return [u for u in (self.get_user(n) for n in names) if u is not None]

    def set_password(self, username: str, *, password_hash: str, actor: str) -> None:
        with self._tx() as cur:
            cur.execute("UPDATE users SET password_hash = ?, failed_signins = 0, locked_until = NULL, updated_at = ? "
                        "WHERE username = ?", (password_hash, _now(), username))
            cur.execute("SELECT 1 FROM users WHERE username = ?", (username,))
            if not cur.fetchone():
                raise StoreError(f"no user {username}")
            self._audit(cur, actor=actor, action="user_password_set", data={"username": username})

    def disable_user(self, username: str, *, actor: str) -> None:
        with self._tx() as cur:
            cur.execute("SELECT 1 FROM users WHERE username = ?", (username,))
            if not cur.fetchone():
                raise StoreError(f"no user {username}")
            cur.execute("UPDATE users SET disabled = 1, updated_at = ? WHERE username = ?", (_now(), username))
            self._audit(cur, actor=actor, action="user_disabled", data={"username": username})

    def record_signin(self, username: str, *, ok: bool, max_failures: int, lockout_minutes: float,
                      context: str = "sign-in") -> bool:
        """Count a failed password (sign-in or signature) or reset the count; returns True when this failure
        locked the account. Failures that lock are written to the audit trail."""
        with self._tx() as cur:
            cur.execute("SELECT failed_signins FROM users WHERE username = ?", (username,))
            row = cur.fetchone()
            if row is None:
                return False
            if ok:
                cur.execute("UPDATE users SET failed_signins = 0, locked_until = NULL WHERE username = ?", (username,))
                return False
            failures = int(row[0]) + 1
            locked = failures >= max_failures
            until = ((dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=lockout_minutes))
                     .isoformat(timespec="milliseconds") if locked else None)
            cur.execute("UPDATE users SET failed_signins = ?, locked_until = COALESCE(?, locked_until) "
                        "WHERE username = ?", (0 if locked else failures, until, username))
            if locked:
                self._audit(cur, actor="protocol-monitor", action="user_locked",
                            data={"username": username, "until": until, "after": f"{failures} failed {context}s"})
            return locked

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

"""`protocol-monitor users add|passwd|disable|list`: argon2 hashes, passwords never on the command line and never
printed, every change in the audit trail (without the hash)."""

from __future__ import annotations

import os
import subprocess
import sys

from monitor.store import AlertStore
from monitor.web.passwords import check_password


def cli(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor", *args], capture_output=True, text=True, timeout=60,
                          input=stdin, env={**os.environ, **(env or {})})


def test_add_list_passwd_disable(tmp_path):
    url = f"sqlite:///{tmp_path / 'u.db'}"
    secret = "correct horse battery"
    r = cli("users", "add", "dr.o", "--name", "Dr O", "--role", "safety_officer", "--password-stdin",
            "--store", url, stdin=secret + "\n")
    assert r.returncode == 0, r.stderr
    r = cli("users", "add", "cra.t", "--name", "T", "--role", "site_monitor", "--sites", "FR-TLS-03",
            "--password-env", "NEWPASS", "--store", url, env={"NEWPASS": "another long secret"})
    assert r.returncode == 0, r.stderr
    listed = cli("users", "list", "--store", url)
    assert "dr.o" in listed.stdout and "FR-TLS-03" in listed.stdout and "active" in listed.stdout
    store = AlertStore(url=url)
    user = store.get_user("dr.o")
    assert user["password_hash"].startswith("$argon2id$") and check_password(user["password_hash"], secret)
    assert cli("users", "passwd", "dr.o", "--password-stdin", "--store", url, stdin="a new secret 42\n").returncode == 0
    assert check_password(AlertStore(url=url).get_user("dr.o")["password_hash"], "a new secret 42")
    assert cli("users", "disable", "cra.t", "--store", url).returncode == 0
    assert "disabled" in cli("users", "list", "--store", url).stdout
    entries = AlertStore(url=url).audit_entries()
    assert [e.action for e in entries] == ["user_added", "user_added", "user_password_set", "user_disabled"]
    text = repr([e.data for e in entries])
    assert "argon2" not in text and secret not in text
    for out in (r.stdout, r.stderr, listed.stdout, listed.stderr):
        assert secret not in out
    assert "intact" in cli("audit", "verify", "--store", url).stdout


def test_refusals(tmp_path):
    url = f"sqlite:///{tmp_path / 'u.db'}"
    # no argument takes a password; no terminal: a clear message
    r = cli("users", "add", "x", "--name", "X", "--role", "viewer", "--password", "abcdefghijk", "--store", url)
    assert r.returncode != 0
    r = cli("users", "add", "x", "--name", "X", "--role", "viewer", "--store", url)
    assert r.returncode == 1 and "--password-stdin" in r.stderr
    r = cli("users", "add", "x", "--name", "X", "--role", "viewer", "--password-stdin", "--store", url, stdin="short\n")
    assert r.returncode == 1 and "at least" in r.stderr
    r = cli("users", "add", "m", "--name", "M", "--role", "site_monitor", "--password-stdin", "--store", url,
            stdin="long enough pass\n")
    assert r.returncode == 1 and "at least one site" in r.stderr
    assert cli("users", "add", "x", "--name", "X", "--role", "viewer", "--password-stdin", "--store", url,
               stdin="long enough pass\n").returncode == 0
    r = cli("users", "add", "x", "--name", "X", "--role", "viewer", "--password-stdin", "--store", url,
            stdin="long enough pass\n")
    assert r.returncode == 1 and "exists" in r.stderr


def test_serve_help_describes_the_settings():
    r = cli("serve", "--help")
    assert r.returncode == 0
    for name in ("session_secret", "session_idle_minutes", "max_failed_signins", "lockout_minutes", "poll_seconds",
                 "127.0.0.1", "PROTOCOL_MONITOR_WEB__"):
        assert name in r.stdout, name

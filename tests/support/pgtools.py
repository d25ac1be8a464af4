"""A throwaway PostgreSQL server for tests: Debian's binaries, a temporary data directory, 127.0.0.1 and a free
port, trust authentication, stopped by the test (pg_ctl stop, then its PID).

Tests take the module-scoped `pg` fixture (tests/conftest.py) and mark themselves with `requires_postgres`."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from monitor.broker import free_port


def pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


requires_postgres = pytest.mark.skipif(
    pg_bindir() is None and not os.environ.get("CI"),
    reason="PostgreSQL is not installed (Debian package postgresql; .ci/run installs it)")
"""Skip where PostgreSQL is not installed, except on CI, where its absence must fail."""


class TempPostgres:
    def __init__(self) -> None:
        bindir = pg_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
        self.bindir = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pgtest-"))
        self.data = self.dir / "data"
        self.user = "postgres" if os.geteuid() == 0 else None
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> subprocess.CompletedProcess:
        cmd = list(argv)
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    def start(self) -> "TempPostgres":
        if self.user:
            shutil.chown(self.dir, self.user)
        result = self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust")
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr[-500:]}")
        result = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-w",
                           "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")
        if result.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr[-500:]} {(self.dir / 'log').read_text()[-500:]}")
        return self

    def stop(self) -> None:
        pidfile = self.data / "postmaster.pid"
        pid = int(pidfile.read_text().split()[0]) if pidfile.exists() else None
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        if pid is not None:
            try:
                os.kill(pid, 0)
                os.kill(pid, signal.SIGTERM)
                time.sleep(1)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

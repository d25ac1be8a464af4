"""Loopback relays that put TLS and SASL/PLAIN in front of the test broker, with the bit of Kafka framing they need.

Test support only: production runs on Apache Kafka, which does TLS and SASL itself. Tansu 0.6.0, the local test
broker (`monitor.broker.LocalBroker`), can do neither, so `SecuredBroker` starts a plain LocalBroker that advertises
a front port and chains, on loopback:

    client -> [TlsTerminator] -> [SaslPlainGateway] -> Tansu

TLS: Tansu 0.6.0 has `--cert` and `--key` options but its command line refuses them together ("the argument
'--cert <CERT>' cannot be used with '--key <KEY>'": both sit in one exclusive clap group) and it starts TLS only
when given both, so it can not serve TLS. `TlsTerminator` terminates TLS (Python's `ssl`, a server certificate the
test makes) and forwards the bytes: clients see a real TLS listener, as they would in front of Apache Kafka.

SASL/PLAIN: Tansu 0.6.0 offers no PLAIN mechanism (a PLAIN handshake ends in `Auth(Sasl(NoSharedMechanism))` in
its log), and on memory storage its SCRAM users can not be created once `--authentication` is on (`tansu user
create` is itself refused with `NotAuthenticated`). `SaslPlainGateway` answers the Kafka SaslHandshake and
SaslAuthenticate requests (KIP-43, KIP-152) itself: a wrong user or password gets SASL_AUTHENTICATION_FAILED and the
connection is closed, anything but ApiVersions before authentication closes the connection, and after success the
bytes go to Tansu unchanged. (Tansu's own `--authentication`, SCRAM, is passed with
`LocalBroker(extra_args=["--authentication"])`.)
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

from monitor.broker import LocalBroker, free_port


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


def read_frame(sock: socket.socket) -> bytes | None:
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


def uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    """Kafka's unsigned varint at buf[pos]: (value, position after it)."""
    shift = value = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def sized(payload: bytes) -> bytes:
    """A Kafka frame: the payload behind its 4-byte big-endian size."""
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
            request = read_frame(client)
            if request is None:
                return False
            key = int.from_bytes(request[4:6], "big", signed=True)
            version = int.from_bytes(request[6:8], "big", signed=True)
            correlation = request[8:12]
            client_id_len = int.from_bytes(request[12:14], "big", signed=True)
            pos = 14 + max(client_id_len, 0)
            if key == 18:  # ApiVersions: Tansu's own answer (it lists SaslHandshake and SaslAuthenticate)
                upstream.sendall(request)
                answer = read_frame(upstream)
                if answer is None:
                    return False
                client.sendall(answer)
            elif key == 17:  # SaslHandshake v0/v1: string mechanism
                size = int.from_bytes(request[pos:pos + 2], "big")
                mechanism = request[pos + 2:pos + 2 + size].decode()
                mechanism_ok = mechanism == "PLAIN"
                error = 0 if mechanism_ok else UNSUPPORTED_SASL_MECHANISM
                client.sendall(sized(correlation + error.to_bytes(2, "big") + (1).to_bytes(4, "big")
                                      + (5).to_bytes(2, "big") + b"PLAIN"))
                if not mechanism_ok:
                    return False
            elif key == 36 and mechanism_ok:  # SaslAuthenticate v0-v2
                if version >= 2:
                    tags, pos = uvarint(request, pos)
                    for _ in range(tags):
                        _, pos = uvarint(request, pos)
                        size, pos = uvarint(request, pos)
                        pos += size
                    size, pos = uvarint(request, pos)
                    token = request[pos:pos + size - 1]
                else:
                    size = int.from_bytes(request[pos:pos + 4], "big")
                    token = request[pos + 4:pos + 4 + size]
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
                client.sendall(sized(body))
                if ok:
                    self.successes += 1
                else:
                    self.failures += 1
                return ok
            else:  # anything else before authentication: refused, as by a broker that requires SASL
                return False


class SecuredBroker:
    """`with SecuredBroker(tls_cert=..., tls_key=..., sasl_plain_users=...) as broker:` a LocalBroker behind a TLS
    terminator and/or a SASL/PLAIN gateway; `broker.bootstrap` is the front address clients use.

    `tls_cert`/`tls_key` (PEM paths): clients must connect with TLS (`security_protocol: SSL`/`SASL_SSL`);
    `sasl_plain_users` ({user: password}): clients must authenticate with SASL/PLAIN. `terminator` and `gateway`
    (or None) expose their counters to the test."""

    def __init__(self, *, tls_cert: Path | None = None, tls_key: Path | None = None,
                 sasl_plain_users: dict[str, str] | None = None, log_path: Path | None = None) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both a certificate and its private key (tls_cert and tls_key)")
        if tls_cert is None and sasl_plain_users is None:
            raise ValueError("nothing to put in front of the broker: give tls_cert/tls_key and/or sasl_plain_users")
        self.tls = (tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
        self.sasl_plain_users = sasl_plain_users
        self.port = free_port()  # the front: the terminator's port, or the gateway's without TLS
        self.gateway_port = (free_port() if self.tls else self.port) if sasl_plain_users is not None else None
        self.broker = LocalBroker(advertised_port=self.port, log_path=log_path)
        self.bootstrap = self.broker.bootstrap
        self.terminator: TlsTerminator | None = None
        self.gateway: SaslPlainGateway | None = None

    def start(self) -> "SecuredBroker":
        self.broker.start()
        try:
            if self.sasl_plain_users is not None and self.gateway_port is not None:
                self.gateway = SaslPlainGateway(listen_port=self.gateway_port, upstream_port=self.broker.port,
                                                users=self.sasl_plain_users).start()
            if self.tls is not None:
                self.terminator = TlsTerminator(listen_port=self.port, upstream_port=self.gateway_port
                                                or self.broker.port, cert=self.tls[0], key=self.tls[1]).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for relay in (self.terminator, self.gateway):
            if relay is not None:
                relay.stop()
        self.terminator = self.gateway = None
        self.broker.stop()

    def __enter__(self) -> "SecuredBroker":
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

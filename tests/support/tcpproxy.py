"""A loopback TCP proxy that can simulate a broker outage without restarting the broker.

Tansu keeps everything in memory, so restarting it loses every topic and offset. Instead the broker advertises the
proxy's port (LocalBroker(advertised_port=...)), every client reaches it only through the proxy, and the test
`cut()`s the proxy (every open connection is closed and new ones are closed at once: what a client sees when the
broker goes away) and later `restore()`s it.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from types import TracebackType

from monitor.broker import free_port


class TcpProxy:
    """`with TcpProxy(upstream_port=...) as proxy:` listens on 127.0.0.1:`proxy.port` and forwards to upstream.

    Clients whose Kafka client id is in `bypass` are never cut: a test producer can go on writing events "directly
    to the broker" while the service is cut off (the broker advertises only the proxy's address). `cut(only=...)`
    cuts just the named clients (e.g. the service's alerts producer: the alerts topic is down, the rest is up)."""

    def __init__(self, *, upstream_port: int, port: int | None = None, upstream_host: str = "127.0.0.1",
                 bypass: frozenset[str] = frozenset()) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port or free_port()
        self.bypass = bypass
        self.connections = 0  # accepted and forwarded so far
        self.refused = 0  # connections closed at once because the proxy was cut
        self._lock = threading.Lock()
        self._pairs: dict[tuple[socket.socket, socket.socket], str | None] = {}  # (client, upstream) -> client id
        self._cut = threading.Event()
        self._only: frozenset[str] | None = None
        self._closed = threading.Event()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    # ---- control ----------------------------------------------------------------------------------------------
    def start(self) -> "TcpProxy":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept_loop, args=(listener,), daemon=True,
                                          name=f"tcpproxy-{self.port}")
        self._acceptor.start()
        return self

    def cut(self, only: frozenset[str] | None = None) -> None:
        """Close every open connection (but the bypassed ones; with `only`, just those clients') and close new
        ones at once."""
        self._only = only
        self._cut.set()
        with self._lock:
            victims = [pair for pair, client_id in self._pairs.items() if self._blocked(client_id)]
            for pair in victims:
                del self._pairs[pair]
        for client, upstream in victims:
            _close(client)
            _close(upstream)

    def restore(self) -> None:
        """Forward new connections again; clients reconnect on their own."""
        self._cut.clear()
        self._only = None

    def _blocked(self, client_id: str | None) -> bool:
        if not self._cut.is_set() or client_id in self.bypass:
            return False
        return self._only is None or client_id in self._only

    def close(self) -> None:
        self._closed.set()
        self.cut()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            pairs, self._pairs = list(self._pairs), {}
        for client, upstream in pairs:
            _close(client)
            _close(upstream)

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # ---- forwarding -------------------------------------------------------------------------------------------
    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._closed.is_set():
            try:
                client, _ = listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        client_id = _client_id(client)
        if self._blocked(client_id) or self._closed.is_set():
            self.refused += 1
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _reset(client)
            return
        client.settimeout(None)
        upstream.settimeout(None)
        with self._lock:
            self._pairs[(client, upstream)] = client_id
            self.connections += 1
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(a, b, (client, upstream)), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair: tuple[socket.socket, socket.socket]) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)
            with self._lock:
                self._pairs.pop(pair, None)


def _client_id(client: socket.socket) -> str | None:
    """The client id of the first Kafka request on a connection, peeked (the bytes stay for the broker):
    int32 size, int16 api key, int16 version, int32 correlation id, int16 length + client id."""
    client.settimeout(5)
    data = b""
    try:
        for _ in range(50):
            data = client.recv(4096, socket.MSG_PEEK)
            if len(data) >= 14:
                length = struct.unpack(">h", data[12:14])[0]
                if length < 0:
                    return None
                if len(data) >= 14 + length:
                    return data[14:14 + length].decode("utf-8", "replace")
            if not data:
                return None
            time.sleep(0.01)
    except OSError:
        return None
    return None


def _reset(s: socket.socket) -> None:
    """Close with a reset, as a host that went away would."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _close(s)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass

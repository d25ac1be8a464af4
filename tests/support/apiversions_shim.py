"""A loopback shim between librdkafka clients (kcat) and the Tansu test broker.

Tansu 0.6 answers ApiVersions v3 with response-level tagged fields (supported/finalized features) that librdkafka
2.0.2, Debian's build behind kcat, fails to parse ("Read underflow" at the end of the response), and that
librdkafka no longer lets a client skip (api.version.request=false is ignored). The shim forwards every byte
unchanged except those tagged fields of ApiVersions responses, which it empties. Apache Kafka needs no shim; the
monitor's own client (kafka-python) talks to Tansu directly.
"""

from __future__ import annotations

import socket
import struct
import threading

from tests.support.relays import read_frame, sized, uvarint


def _strip_apiversions_tags(body: bytes) -> bytes:
    """body = correlation id (4) + error (2) + compact array of (key, min, max, tags) + throttle (4) + tags."""
    pos = 6
    count, pos = uvarint(body, pos)
    for _ in range(max(count - 1, 0)):
        pos += 6
        tags, pos = uvarint(body, pos)
        for _ in range(tags):
            _, pos = uvarint(body, pos)
            size, pos = uvarint(body, pos)
            pos += size
    pos += 4
    return body[:pos] + b"\x00"


class ApiVersionsShim:
    def __init__(self, *, upstream_port: int, listen_port: int) -> None:
        self.upstream_port = upstream_port
        self.listen_port = listen_port
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", listen_port))
        self.server.listen(16)
        self._stop = threading.Event()

    def start(self) -> "ApiVersionsShim":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            pending: set[int] = set()
            threading.Thread(target=self._requests, args=(client, upstream, pending), daemon=True).start()
            threading.Thread(target=self._responses, args=(upstream, client, pending), daemon=True).start()

    @staticmethod
    def _requests(src: socket.socket, dst: socket.socket, pending: set[int]) -> None:
        try:
            while (request := read_frame(src)) is not None:
                api_key, version, correlation = struct.unpack(">hhi", request[4:12])
                if api_key == 18 and version >= 3:
                    pending.add(correlation)
                dst.sendall(request)
        except OSError:
            pass
        dst.close()

    @staticmethod
    def _responses(src: socket.socket, dst: socket.socket, pending: set[int]) -> None:
        try:
            while (response := read_frame(src)) is not None:
                body = response[4:]
                correlation = struct.unpack(">i", body[:4])[0]
                if correlation in pending:
                    pending.discard(correlation)
                    body = _strip_apiversions_tags(body)
                dst.sendall(sized(body))
        except OSError:
            pass
        dst.close()

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

from tests.support.relays import LoopbackRelay, read_frame, sized, uvarint


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


class ApiVersionsShim(LoopbackRelay):
    """Listens on 127.0.0.1:`listen_port`, forwards to 127.0.0.1:`upstream_port`, empties the tagged fields of
    ApiVersions v3+ responses on the way back."""

    name = "apiversions-shim"

    def _serve(self, client: socket.socket) -> None:
        self._track(client)
        upstream = self._upstream(client)
        if upstream is None:
            return
        pending: set[int] = set()  # correlation ids of ApiVersions v3+ requests awaiting their response
        threading.Thread(target=self._responses, args=(upstream, client, pending), daemon=True).start()
        self._requests(client, upstream, pending)

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

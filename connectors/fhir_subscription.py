"""A FHIR Subscription endpoint (R4 Backport IG): hospital FHIR servers push notifications, the resources go to
the events topic (issue 18).

Notifications are `history` Bundles whose first entry is a `Parameters` SubscriptionStatus (the R4 Backport's
shape; an R4B `SubscriptionStatus` resource is accepted too) with `type` handshake, heartbeat or
event-notification. Handshakes and heartbeats are answered 200 and produce nothing. An event notification's
resources are grouped by subject, each group produced as one Bundle keyed by subject id (so the events of a subject
stay in order on one partition, and a ResearchSubject travels with its Patient, a neutrophil percentage with its
WBC), and the endpoint answers 200 only once the broker acknowledged them: a notification answered 200 is not lost.

Only the envelope is judged here, and a malformed one is refused with 400 and a reason (the sender's server shows it
and retries). Whether each resource maps to an event is for the monitor, which dead-letters a bad one with its path,
so one bad resource never blocks the others. Nothing is logged about a resource: no subject id reaches a log.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from monitor.config import Settings
from monitor.errors import MonitorError, SinkUnavailable
from monitor.fhir import CodeMap, code_map_path, load_code_map, subject_key

log = logging.getLogger(__name__)

NOTIFICATION_TYPES = ("handshake", "heartbeat", "event-notification", "query-status", "query-event")


class NotificationRefused(MonitorError):
    """The notification itself is malformed: answered 400 with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _status(bundle: dict[str, Any]) -> tuple[str, str]:
    """(notification type, subscription reference) from the first entry, or NotificationRefused."""
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        raise NotificationRefused("Bundle.entry: a notification starts with its SubscriptionStatus entry")
    status = entries[0].get("resource")
    if not isinstance(status, dict):
        raise NotificationRefused("Bundle.entry[0].resource: missing")
    kind = subscription = None
    if status.get("resourceType") == "Parameters":
        for p in status.get("parameter") or []:
            if not isinstance(p, dict):
                continue
            if p.get("name") == "type":
                kind = p.get("valueCode")
            elif p.get("name") == "subscription":
                subscription = (p.get("valueReference") or {}).get("reference")
    elif status.get("resourceType") == "SubscriptionStatus":
        kind = status.get("type")
        subscription = (status.get("subscription") or {}).get("reference")
    else:
        raise NotificationRefused("Bundle.entry[0].resource: a Parameters (R4 Backport) or SubscriptionStatus, "
                                  f"not {status.get('resourceType')!r}")
    if kind not in NOTIFICATION_TYPES:
        raise NotificationRefused(f"Bundle.entry[0].resource.parameter(type): {kind!r} is not one of "
                                  + ", ".join(NOTIFICATION_TYPES))
    if not isinstance(subscription, str) or not subscription:
        raise NotificationRefused("Bundle.entry[0].resource.parameter(subscription): missing reference")
    return str(kind), subscription


def read_notification(body: bytes, *, max_bytes: int) -> tuple[str, str, list[dict[str, Any]]]:
    """(type, subscription, the notified resources) of a notification, or NotificationRefused with the reason."""
    if len(body) > max_bytes:
        raise NotificationRefused(f"notification is {len(body)} bytes; the limit is {max_bytes}")
    try:
        bundle = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise NotificationRefused(f"not valid JSON ({exc})") from None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise NotificationRefused("resourceType: a notification is a Bundle")
    if bundle.get("type") != "history":
        raise NotificationRefused(f"Bundle.type: a notification is a 'history' Bundle, not {bundle.get('type')!r}")
    kind, subscription = _status(bundle)
    resources = []
    for i, entry in enumerate(bundle["entry"][1:], start=1):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            raise NotificationRefused(f"Bundle.entry[{i}].resource: missing; only full-resource notifications are "
                                      "accepted (set the Subscription's content to full-resource)")
        resources.append(resource)
    if kind != "event-notification" and resources:
        raise NotificationRefused(f"a {kind} carries no resources, this one has {len(resources)}")
    return kind, subscription, resources


def group_by_subject(resources: list[dict[str, Any]], codes: CodeMap) -> list[tuple[str | None, bytes]]:
    """One collection Bundle per subject, in first-seen order, keyed by subject id. A resource with no subject
    (to be dead-lettered by the monitor) travels unkeyed on its own."""
    groups: dict[str | None, list[dict[str, Any]]] = {}
    out: list[tuple[str | None, bytes]] = []
    for resource in resources:
        key = subject_key(resource, codes)
        if key is None:
            out.append((None, json.dumps(resource, separators=(",", ":")).encode("utf-8")))
            continue
        groups.setdefault(key, []).append(resource)
    for key, items in groups.items():
        bundle = {"resourceType": "Bundle", "type": "collection",
                  "entry": [{"fullUrl": f"{r.get('resourceType')}/{r.get('id')}", "resource": r} for r in items]}
        out.append((key, json.dumps(bundle, separators=(",", ":"), ensure_ascii=False).encode("utf-8")))
    return out


class KafkaEventsProducer:
    """Produces to the events topic and waits for the broker's acknowledgement (acks=all)."""

    def __init__(self, *, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.events_topic
        self._producer: Any = None

    def send(self, records: list[tuple[str | None, bytes]], timeout_s: float = 30.0) -> None:
        from kafka.errors import KafkaError

        try:
            if self._producer is None:
                from kafka import KafkaProducer

                self._producer = KafkaProducer(bootstrap_servers=self.settings.bootstrap_servers, acks="all",
                                               max_request_size=max(1048576, self.settings.max_message_bytes * 2),
                                               **self.settings.kafka.client_options())
            futures = [self._producer.send(self.topic, key=k.encode("utf-8") if k else None, value=v)
                       for k, v in records]
            for f in futures:
                f.get(timeout=timeout_s)
        except KafkaError as exc:
            raise SinkUnavailable(f"events topic did not acknowledge: {type(exc).__name__}") from None

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)


def build_app(*, send: Callable[[list[tuple[str | None, bytes]]], None], codes: CodeMap | None = None,
              path: str = "/fhir/subscription", max_bytes: int = 10_000_000) -> Starlette:
    """The endpoint as a Starlette app; `send` produces keyed records and raises SinkUnavailable if not acked."""
    code_map = codes if codes is not None else load_code_map()
    counts: Counter[str] = Counter()

    def notify(request_body: bytes) -> JSONResponse:
        try:
            kind, _, resources = read_notification(request_body, max_bytes=max_bytes)
        except NotificationRefused as exc:
            counts["refused"] += 1
            log.warning("subscription notification refused: %s", exc.reason.split(":")[0])
            return JSONResponse({"error": "malformed notification", "reason": exc.reason}, status_code=400)
        counts[kind] += 1
        if kind != "event-notification":
            return JSONResponse({"type": kind, "accepted": True})
        records = group_by_subject(resources, code_map)
        try:
            send(records)
        except SinkUnavailable as exc:
            log.warning("subscription notification not taken: %s", exc)
            return JSONResponse({"error": "events topic unavailable, retry later"}, status_code=503,
                                headers={"Retry-After": "5"})
        counts["resources"] += len(resources)
        return JSONResponse({"type": kind, "accepted": True, "resources": len(resources), "records": len(records)})

    async def post(request: Request) -> JSONResponse:
        from starlette.concurrency import run_in_threadpool

        body = await request.body()
        return await run_in_threadpool(notify, body)

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(dict(counts))

    return Starlette(routes=[Route(path, post, methods=["POST"]), Route(path + "/stats", stats, methods=["GET"])])


def serve(*, settings: Settings, host: str, port: int, path: str, ssl_certfile: str | None = None,
          ssl_keyfile: str | None = None) -> int:
    """`protocol-monitor fhir-subscription`: listen until SIGTERM/SIGINT (uvicorn's handling). With a certificate
    and key it speaks HTTPS itself (hospital FHIR servers post across the network); without, plain HTTP meant for
    loopback or behind a TLS reverse proxy."""
    import socket

    import uvicorn

    producer = KafkaEventsProducer(settings=settings)
    app = build_app(send=producer.send, codes=load_code_map(code_map_path(settings.fhir_codes, settings.rules)), path=path,
                    max_bytes=settings.max_message_bytes * 10)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    scheme = "https" if ssl_certfile else "http"
    print(f"FHIR subscription endpoint on {scheme}://{host}:{sock.getsockname()[1]}{path} -> "
          f"{settings.events_topic}", file=sys.stderr, flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, server_header=False,
                                      ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)).run(sockets=[sock])
    finally:
        producer.close()
    return 0


__all__ = ["build_app", "serve", "read_notification", "group_by_subject", "NotificationRefused",
           "KafkaEventsProducer"]

"""WebhookSink against a real HTTP receiver (stdlib ThreadingHTTPServer) on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from connectors.base import DeliveryError
from connectors.webhook import WebhookSink
from monitor.alerts import Alert
from monitor.broker import free_port
from tests.support.sample_alert import make_alert


class Receiver:
    """A webhook receiver: records every request; can fail the first N, refuse, redirect, or hang."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[dict] = []
        self.fail_first = 0
        self.fail_status = 503
        self.status = 200
        self.extra_headers: dict[str, str] = {}
        self.hang_s = 0.0
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                n = len(receiver.requests)
                if receiver.hang_s:
                    receiver.release.wait(receiver.hang_s)
                status = receiver.fail_status if n <= receiver.fail_first else receiver.status
                try:
                    self.send_response(status)
                    for name, value in receiver.extra_headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the client gave up (timeout test)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hooks/alerts") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def receiver():
    r = Receiver()
    try:
        yield r
    finally:
        r.stop()


class Sleeps(list):
    """An injectable `sleep` that records the delays asked for and does not wait."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_delivers_the_alert_json_with_idempotency_headers(receiver):
    sleeps = Sleeps()
    alert = make_alert()
    WebhookSink(receiver.url(), headers={"Authorization": "Bearer t0ken"}, sleep=sleeps).deliver(alert)
    WebhookSink(receiver.url(), sleep=sleeps).deliver(make_alert("retracted"))

    assert len(receiver.requests) == 2
    req = receiver.requests[0]
    assert req["path"] == "/hooks/alerts"
    assert req["body"].decode("utf-8") == alert.to_json()
    assert Alert.model_validate_json(req["body"]) == alert
    assert req["headers"]["Content-Type"] == "application/json"
    assert req["headers"]["X-Alert-Id"] == alert.alert_id
    assert req["headers"]["Idempotency-Key"] == f"{alert.alert_id}:raised"
    assert req["headers"]["Authorization"] == "Bearer t0ken"
    retracted = receiver.requests[1]
    assert retracted["headers"]["Idempotency-Key"] == f"{alert.alert_id}:retracted"
    assert json.loads(retracted["body"])["retracts"] == alert.alert_id
    assert sleeps == []


def test_retries_after_503_with_exponential_backoff_then_succeeds(receiver):
    receiver.fail_first = 2
    sleeps = Sleeps()
    WebhookSink(receiver.url(), retries=3, backoff_s=0.5, sleep=sleeps).deliver(make_alert())
    assert len(receiver.requests) == 3
    assert sleeps == [0.5, 1.0]
    keys = {r["headers"]["Idempotency-Key"] for r in receiver.requests}
    bodies = {r["body"] for r in receiver.requests}
    assert len(keys) == 1 and len(bodies) == 1  # every attempt is the same request


def test_backoff_is_capped_and_gives_up_after_the_retries(receiver):
    receiver.fail_first = 100
    sleeps = Sleeps()
    sink = WebhookSink(receiver.url(), retries=5, backoff_s=1.0, max_backoff_s=4.0, sleep=sleeps)
    with pytest.raises(DeliveryError, match=r"after 6 attempt\(s\): HTTP 503"):
        sink.deliver(make_alert())
    assert len(receiver.requests) == 6
    assert sleeps == [1.0, 2.0, 4.0, 4.0, 4.0]


@pytest.mark.parametrize("status", [408, 429, 500, 502])
def test_transient_statuses_are_retried(receiver, status):
    receiver.fail_first, receiver.fail_status = 1, status
    sleeps = Sleeps()
    WebhookSink(receiver.url(), sleep=sleeps).deliver(make_alert())
    assert len(receiver.requests) == 2 and sleeps == [0.5]


def test_retry_after_is_honoured_up_to_the_cap(receiver):
    receiver.fail_first, receiver.fail_status = 1, 429
    receiver.extra_headers = {"Retry-After": "3"}
    sleeps = Sleeps()
    WebhookSink(receiver.url(), sleep=sleeps).deliver(make_alert())
    assert sleeps == [3.0]


@pytest.mark.parametrize("status", [400, 401, 404, 410, 422])
def test_client_errors_are_refused_without_retry(receiver, status):
    receiver.status = status
    sleeps = Sleeps()
    sink = WebhookSink(receiver.url("/hooks/SECRET-PATH-TOKEN?key=s3cret"), sleep=sleeps)
    with pytest.raises(DeliveryError, match=f"HTTP {status}.*not retried") as info:
        sink.deliver(make_alert())
    assert len(receiver.requests) == 1
    assert sleeps == []
    assert "SECRET" not in str(info.value) and "s3cret" not in str(info.value)  # no secrets from the URL


def test_redirect_is_not_followed(receiver):
    receiver.status = 302
    receiver.extra_headers = {"Location": "/elsewhere"}
    with pytest.raises(DeliveryError, match="redirected"):
        WebhookSink(receiver.url(), sleep=Sleeps()).deliver(make_alert())
    assert len(receiver.requests) == 1


def test_receiver_slower_than_the_timeout_fails_after_the_retries(receiver):
    receiver.hang_s = 5.0
    sleeps = Sleeps()
    sink = WebhookSink(receiver.url(), timeout_s=0.3, retries=2, sleep=sleeps)
    start = time.monotonic()
    with pytest.raises(DeliveryError, match=r"after 3 attempt\(s\): no answer within 0\.3 s"):
        sink.deliver(make_alert())
    elapsed = time.monotonic() - start
    assert 0.8 <= elapsed < 3.0
    assert len(receiver.requests) == 3
    assert sleeps == [0.5, 1.0]


def test_receiver_down_then_back_the_alert_waits_then_goes():
    port = free_port()
    url = f"http://127.0.0.1:{port}/hooks/alerts"
    sleeps = Sleeps()
    sink = WebhookSink(url, retries=2, sleep=sleeps)
    alert = make_alert()
    with pytest.raises(DeliveryError, match=r"after 3 attempt\(s\): cannot connect"):
        sink.deliver(alert)
    assert sleeps == [0.5, 1.0]

    receiver = Receiver(port)
    try:
        sink.deliver(alert)  # the caller retries the alert it kept in its outbox
        assert [r["body"].decode() for r in receiver.requests] == [alert.to_json()]
    finally:
        receiver.stop()


def test_receiver_coming_back_during_backoff_gets_the_alert():
    port = free_port()
    started: list[Receiver] = []

    def sleep(seconds: float) -> None:
        if not started:
            started.append(Receiver(port))

    try:
        WebhookSink(f"http://127.0.0.1:{port}/", retries=3, sleep=sleep).deliver(make_alert())
        assert len(started[0].requests) == 1
    finally:
        for r in started:
            r.stop()


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "file:///etc/passwd", "127.0.0.1:8080/x", "http://",
                                 "http://127.0.0.1:notaport/"])
def test_only_http_urls_are_accepted(url):
    with pytest.raises(ValueError):
        WebhookSink(url)


def test_https_url_is_accepted():
    assert WebhookSink("https://alerts.example.org/hook?token=abc").target == "https://alerts.example.org"

"""Alerts by webhook: POST the alert record (the same JSON as on the alerts topic) to an HTTP(S) receiver.

2xx means delivered. A 4xx other than 408/429 means the receiver refuses this alert: `DeliveryError` at once,
without retrying. 5xx, 408, 429, connection errors and timeouts are retried with exponential back-off, then
`DeliveryError`, so the caller keeps the alert in its outbox. Every attempt carries `Idempotency-Key:
<alert_id>:<status>`, so a receiver can drop a repeat. Redirects are not followed (urllib would turn the POST into
a GET and lose the alert). Logs and errors name only scheme://host:port, never the path, query or headers, which
often carry a secret token.
"""

from __future__ import annotations

import http.client
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from connectors.base import DeliveryError
from monitor.backoff import Backoff
from monitor.alerts import Alert

log = logging.getLogger(__name__)

RETRIED_STATUSES = frozenset({408, 429})
USER_AGENT = "protocol-monitor-webhook/0.1"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None  # the 3xx reaches us as an HTTPError


def _retry_after(value: str | None) -> float | None:
    """Seconds asked by a Retry-After header (delta-seconds or HTTP date), if any."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class WebhookSink:
    """Delivers each alert with one HTTP POST (and retries); `deliver` returns only once the receiver took it."""

    def __init__(self, url: str, *, timeout_s: float = 5.0, headers: dict[str, str] | None = None, retries: int = 3,
                 backoff_s: float = 0.5, max_backoff_s: float = 8.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"WebhookSink: only http:// or https:// URLs with a host are accepted, not {url!r}"
                             if parts.scheme in ("http", "https") else
                             f"WebhookSink: only http:// or https:// URLs are accepted (got scheme {parts.scheme!r})")
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise ValueError(f"WebhookSink: bad port in URL: {exc}") from None
        if timeout_s <= 0:
            raise ValueError("WebhookSink: timeout_s must be > 0")
        if retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise ValueError("WebhookSink: retries, backoff_s and max_backoff_s must be >= 0")
        for name, value in (headers or {}).items():
            if any(c in f"{name}{value}" for c in "\r\n\0"):
                raise ValueError(f"WebhookSink: header {name!r} contains a line break")
        self.url = url
        self.timeout_s = float(timeout_s)
        self.headers = dict(headers or {})
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.sleep = sleep
        self.target = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"  # safe to log: no path, query, userinfo
        self._opener = urllib.request.build_opener(_NoRedirect)

    def __repr__(self) -> str:
        return f"WebhookSink({self.target!r}, retries={self.retries}, timeout_s={self.timeout_s:g})"

    def delay(self, attempt: int) -> float:
        """Back-off before retry number `attempt + 1`: backoff_s * 2**attempt, capped at max_backoff_s."""
        return Backoff(base_s=self.backoff_s, max_s=self.max_backoff_s).delay(attempt)

    def _request(self, alert: Alert, body: bytes) -> urllib.request.Request:
        headers = {"User-Agent": USER_AGENT, **self.headers,
                   "Content-Type": "application/json", "X-Alert-Id": alert.alert_id,
                   "X-Alert-Status": alert.status, "Idempotency-Key": f"{alert.alert_id}:{alert.status}"}
        return urllib.request.Request(self.url, data=body, headers=headers, method="POST")  # noqa: S310 - only http/https URLs are accepted in __init__

    def deliver(self, alert: Alert) -> None:
        """POST the alert; returns on 2xx, raises `DeliveryError` when refused or when every attempt failed."""
        body = alert.to_json().encode("utf-8")
        what = f"alert {alert.alert_id} ({alert.status}) to webhook {self.target}"
        last = ""
        for attempt in range(self.retries + 1):
            wait: float | None = None
            try:
                with self._opener.open(self._request(alert, body), timeout=self.timeout_s) as response:
                    response.read(65536)  # drain a short answer so the connection closes cleanly
                    status = response.status
                log.info("delivered %s (HTTP %d, attempt %d)", what, status, attempt + 1)
                return
            except urllib.error.HTTPError as exc:
                status, reason = exc.code, exc.reason
                retry_after = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
                exc.close()
                if not (status >= 500 or status in RETRIED_STATUSES):
                    kind = "redirected (set the final URL)" if 300 <= status < 400 else "refused"
                    raise DeliveryError(f"{what}: receiver {kind} it with HTTP {status} {reason}; "
                                        "not retried") from exc
                last = f"HTTP {status} {reason}"
                if retry_after is not None:
                    wait = min(retry_after, self.max_backoff_s)
            except urllib.error.URLError as exc:
                cause = exc.reason
                last = (f"no answer within {self.timeout_s:g} s" if isinstance(cause, TimeoutError)
                        else f"cannot connect: {cause}")
            except TimeoutError:
                last = f"no answer within {self.timeout_s:g} s"
            except (OSError, http.client.HTTPException) as exc:
                last = f"connection failed: {type(exc).__name__}: {exc}"
            if attempt < self.retries:
                delay = max(self.delay(attempt), wait or 0.0)
                log.warning("%s: attempt %d failed (%s); retrying in %.2f s", what, attempt + 1, last, delay)
                self.sleep(delay)
        raise DeliveryError(f"{what} failed after {self.retries + 1} attempt(s): {last}")

"""Exponential back-off, written once: the service waiting for the broker (connecting, holding a batch it did not
acknowledge), the notifier retrying a delivery, and the webhook retrying a POST all wait base x 2^attempt, capped.

`Backoff` is the rule; `Backoff.wait` the one way to sleep by it (cut short by a stop event, so SIGTERM is never
kept waiting); `Backoff.retry` the one retry loop (creating a client until the broker answers);
`connect_with_backoff` that loop for a Kafka client, shared by the service and the notifier."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class StoppedWhileConnecting(Exception):
    """The operator stopped the service before the broker answered."""


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """`delay(attempt)` is how long to wait before retry number attempt + 1 (attempt 0 waits `base_s`)."""

    base_s: float
    max_s: float

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.max_s < 0:
            raise ValueError("back-off: base_s and max_s must be >= 0")

    def delay(self, attempt: int) -> float:
        if attempt < 0:
            raise ValueError("back-off: attempt must be >= 0")
        if self.base_s == 0:
            return 0.0
        # 2 ** attempt overflows a float past ~1024 doublings: cap before computing it
        return self.max_s if attempt > 64 else min(self.max_s, self.base_s * 2 ** attempt)

    def wait(self, attempt: int, stop: threading.Event | None = None) -> None:
        """Sleep `delay(attempt)`; with `stop`, wake as soon as it is set (an operator's stop is not kept waiting)."""
        if stop is not None:
            stop.wait(self.delay(attempt))
        else:
            time.sleep(self.delay(attempt))

    def retry(self, make: Callable[[], T], *, retry_on: tuple[type[BaseException], ...],
              stop: threading.Event | None = None,
              on_retry: Callable[[BaseException, float], None] | None = None) -> T:
        """Call `make` until it returns, waiting by this rule after each failure in `retry_on` (`on_retry` hears
        of each, with the delay to come). Raises StoppedWhileConnecting once `stop` is set after a failure."""
        attempt = 0
        while True:
            try:
                return make()
            except retry_on as exc:
                if stop is not None and stop.is_set():
                    raise StoppedWhileConnecting() from exc
                if on_retry is not None:
                    on_retry(exc, self.delay(attempt))
                self.wait(attempt, stop)
                attempt += 1


def connect_with_backoff(what: str, make: Callable[[], Any], *, settings: Any, stop: threading.Event | None) -> Any:
    """Create a Kafka client, retrying with back-off while the broker is unreachable (never crash at start).
    `settings` is a `monitor.config.Settings` (its `bootstrap_servers` are named in the log)."""
    from kafka.errors import KafkaError

    def unreachable(exc: BaseException, delay: float) -> None:
        log.warning("Kafka broker unreachable at %s (%s: %s); retrying in %.0f s — not ready until connected",
                    settings.bootstrap_servers, what, type(exc).__name__, delay)

    # 1 s, doubling up to 30 s: a broker that comes back is found quickly, one that stays away is not hammered
    return Backoff(base_s=1.0, max_s=30.0).retry(make, retry_on=(KafkaError,), stop=stop, on_retry=unreachable)

"""Exponential back-off, written once: the service waiting for the broker (connecting, holding a batch it did not
acknowledge), the notifier retrying a delivery, and the webhook retrying a POST all wait base x 2^attempt, capped."""

from __future__ import annotations

from dataclasses import dataclass


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

"""The one back-off rule the service, the notifier and the webhook share: base x 2^attempt, capped."""

from __future__ import annotations

import pytest

from monitor.backoff import Backoff


def test_delays_double_from_the_base_up_to_the_cap():
    b = Backoff(base_s=1.0, max_s=30.0)
    assert [b.delay(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert b.delay(10_000) == 30  # no float overflow after a long outage


def test_a_zero_base_never_waits_and_bad_values_are_refused():
    assert Backoff(base_s=0, max_s=5).delay(3) == 0
    with pytest.raises(ValueError):
        Backoff(base_s=-1, max_s=5)
    with pytest.raises(ValueError):
        Backoff(base_s=1, max_s=5).delay(-1)
